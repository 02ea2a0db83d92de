"""Inference whose memory is bounded by the window, not the image: uint8 images normalised one
window at a time, slide windows streamed in raster order with rows finished as soon as no later
window covers them, labels in the smallest integer dtype, the Mix-FFN hidden map in bands."""
import pytest
import torch

import fastseg.inference as inference
from fastseg import SegFormer, SegFormerConfig
from fastseg.data.transforms import normalize_pixels
from fastseg.inference import label_dtype, segment, segment_labels


def tiny_segformer(num_classes, depths=(1, 1, 1, 1)):
    torch.manual_seed(0)
    cfg = SegFormerConfig(num_classes=num_classes, embed_dims=(16, 32, 64, 128), depths=depths,
                          num_heads=(1, 2, 4, 8), decoder_dim=32, variant=None)
    return SegFormer(config=cfg).eval()


def pixels(B, H, W, seed=0):
    return torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def full_image_slide_labels(model, x, crop, stride, out_size=None):
    """The previous implementation: every window's logits summed into full-size (K, H, W) maps,
    divided by the count (mmseg's slide), resized to the output, argmax."""
    probs = segment(model, x, mode="slide", crop=crop, stride=stride, out_size=out_size)
    return probs.argmax(1)


@pytest.mark.parametrize("crop, stride, out_size", [
    ((40, 48), (24, 36), None),       # 4 window rows, overlaps of 16 rows
    ((36, 36), (20, 28), None),       # rows covered by up to 2 windows, last window shifted back
    ((40, 40), (40, 40), None),       # no overlap
    ((40, 48), (24, 36), (131, 97)),  # output size other than the input's (a test scale)
])
def test_streamed_slide_labels_are_the_full_image_accumulators_labels(crop, stride, out_size):
    model = tiny_segformer(19)
    x8 = pixels(2, 101, 83)
    x = normalize_pixels(x8)
    with torch.no_grad():
        old = full_image_slide_labels(model, x, crop, stride, out_size)
        for images in (x, x8):  # normalised beforehand, or one window at a time: the same
            new, scores, finite = segment_labels(model, images, mode="slide", crop=crop, stride=stride,
                                                 out_size=out_size, return_scores=True, return_finite=True)
            assert new.dtype == torch.uint8 and new.shape == old.shape
            assert torch.equal(new.long(), old)
            assert finite.tolist() == [True, True] and (scores > 0).all()


def test_streamed_slide_holds_the_windows_of_two_window_rows_at_most(monkeypatch):
    """Label rows are finished while the windows run: when a window runs, the windows held are
    those of its own window row and the one before (not all the image's)."""
    model = tiny_segformer(5)
    held_counts, real = [], inference._finish_band

    def counting(held, *a, **k):
        held_counts.append(len(held[0][0]))
        return real(held, *a, **k)

    monkeypatch.setattr(inference, "_finish_band", counting)
    with torch.no_grad():
        segment_labels(model, pixels(1, 140, 64), mode="slide", crop=(40, 64), stride=(20, 64))
    windows = len(inference._window_grid((140, 64), (40, 64), (20, 64)))
    assert windows == 6 and held_counts and max(held_counts) <= 2 < windows


def test_uint8_images_give_the_labels_of_normalised_ones_in_every_mode():
    model = tiny_segformer(7)
    model.set_fused(True)
    x8 = pixels(1, 48, 61, seed=1)
    x = normalize_pixels(x8)
    with torch.no_grad():
        for kw in ({}, {"scales": (0.75, 1.25), "flip": True}, {"out_size": (70, 50)}, {"two_step": True}):
            assert torch.equal(segment_labels(model, x8, **kw), segment_labels(model, x, **kw)), kw


def test_labels_take_the_smallest_integer_dtype():
    assert label_dtype(2) == label_dtype(256) == torch.uint8
    assert label_dtype(257) == label_dtype(32768) == torch.int16
    assert label_dtype(40000) == torch.int32
    x = pixels(1, 40, 40)
    with torch.no_grad():
        assert segment_labels(tiny_segformer(19), x).dtype == torch.uint8
        labels = segment_labels(tiny_segformer(300), x, mode="slide", crop=32, stride=24)
    assert labels.dtype == torch.int16 and int(labels.max()) > 255
