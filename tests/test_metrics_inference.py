"""Metrics against hand-computed confusion matrices; whole / sliding-window / multi-scale + flip
inference; the eval command (predict: tests/test_predict.py)."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fastseg import SegFormer, SegFormerConfig
from fastseg import evaluate
from fastseg.data.palettes import PALETTES, colorize, generated_palette, overlay
from fastseg.inference import main_logits, segment, slide_inference, whole_inference
from fastseg.metrics import SegMetric, confusion_matrix, format_table, metrics_from_confusion


# --- metrics -----------------------------------------------------------------------------------------

def test_confusion_matrix_and_metrics_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2, 255, 255, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 3, 2, 0])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    m = metrics_from_confusion(cm)
    assert m["IoU"][:3] == pytest.approx([2 / 4, 2 / 3, 0.0]) and math.isnan(m["IoU"][3])
    assert m["Acc"][:3] == pytest.approx([2 / 3, 1.0, 0.0]) and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)  # class 3 absent everywhere: not counted
    assert m["mAcc"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert m["aAcc"] == pytest.approx(4 / 6) and m["pixels"] == 6


def test_a_class_predicted_but_absent_from_the_labels_counts_as_iou_zero():
    target = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 2], [1, 1]])
    m = metrics_from_confusion(confusion_matrix(pred, target, 3))
    assert m["IoU"] == pytest.approx([0.5, 1.0, 0.0]) and m["mIoU"] == pytest.approx(0.5)
    assert math.isnan(m["Acc"][2]) and m["mAcc"] == pytest.approx(0.75)


def test_accumulation_and_bad_labels():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 5, (2, 9, 7), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 6, (2, 9, 7), generator=g) for _ in range(3)]
    for t in targets:
        t[t == 5] = 255
    metric = SegMetric(5)
    for p, t in zip(preds, targets):
        metric.update(p, t)
    assert torch.equal(metric.cm, confusion_matrix(torch.cat(preds), torch.cat(targets), 5))
    assert metric.cm.sum() == sum(int((t != 255).sum()) for t in targets)
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\).*\[7\]"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, 255]), 5)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 5)
    table = format_table(metric.compute(), ["a", "b", "c", "d", "e"])
    assert "mIoU" in table and len(table.splitlines()) == 9


# --- inference ---------------------------------------------------------------------------------------

class Position(nn.Module):
    """Logits that are a known function of position inside the input: (column, row, 0)."""

    def forward(self, x):
        B, _, H, W = x.shape
        cols = torch.arange(W, dtype=x.dtype).expand(B, H, W)
        rows = torch.arange(H, dtype=x.dtype)[:, None].expand(B, H, W)
        return torch.stack([cols, rows, torch.zeros_like(cols)], dim=1)


class QuarterConv(nn.Module):
    """Conv logits at 1/4 resolution, like SegFormer; returns (main, [aux]) in training mode."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 3, padding=1)

    def forward(self, x):
        out = self.conv(F.avg_pool2d(x, 4, ceil_mode=True))
        return (out, [out * 0]) if self.training else out


class Pointwise(nn.Module):
    """A 1×1 conv: equivariant to flips (and to resizing up to interpolation)."""

    def __init__(self, k=4):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x)


def test_whole_resizes_to_the_input_and_handles_tuple_outputs():
    model = QuarterConv()
    x = torch.randn(2, 3, 37, 50)
    out = whole_inference(model.eval(), x)
    assert out.shape == (2, 3, 37, 50)
    torch.testing.assert_close(out, F.interpolate(model(x), size=(37, 50), mode="bilinear", align_corners=False))
    model.train()
    assert main_logits(model(x)).shape == (2, 3, 10, 13)


def test_slide_with_a_window_covering_the_image_is_whole():
    model = QuarterConv().eval()
    x = torch.randn(1, 3, 40, 52)
    torch.testing.assert_close(slide_inference(model, x, (64, 64), (32, 32)), whole_inference(model, x))
    torch.testing.assert_close(slide_inference(model, x, (40, 52), (7, 9)), whole_inference(model, x))


def test_slide_averages_overlapping_windows():
    # H=10, crop 6, stride 4 → rows [0, 6), [4, 10); W=13, crop 8, stride 5 → cols [0, 8), [5, 13).
    out = slide_inference(Position(), torch.zeros(1, 3, 10, 13), (6, 8), (4, 5))[0]
    x = torch.arange(13.0)
    y = torch.arange(10.0)
    want_cols = torch.where(x < 5, x, torch.where(x < 8, (x + (x - 5)) / 2, x - 5))
    want_rows = torch.where(y < 4, y, torch.where(y < 6, (y + (y - 4)) / 2, y - 4))
    torch.testing.assert_close(out[0], want_cols.expand(10, 13))
    torch.testing.assert_close(out[1], want_rows[:, None].expand(10, 13))
    # The last window is shifted back to end at the border, never past it.
    out = slide_inference(Position(), torch.zeros(1, 3, 5, 11), (5, 4), (5, 4))[0]
    torch.testing.assert_close(out[0, 0], torch.tensor([0., 1, 2, 3, 0, 1, 2, 1.5, 1, 2, 3]))


def test_multi_scale_and_flip():
    x = torch.randn(1, 3, 24, 36)
    model = Pointwise().eval()
    single = segment(model, x)
    torch.testing.assert_close(single, model(x).softmax(1))
    # A flip-equivariant model: the flipped pass, flipped back, agrees.
    torch.testing.assert_close(segment(model, x, flip=True), single)
    scales = (0.5, 1.0, 1.5)
    want = 0
    for s in scales:
        xs = F.interpolate(x, size=(int(24 * s + 0.5), int(36 * s + 0.5)), mode="bilinear", align_corners=False)
        want = want + F.interpolate(model(xs), size=(24, 36), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(segment(model, x, scales=scales), want / 3)
    # A model that is not flip-equivariant: the flipped pass is mirrored back before averaging.
    pos = Position()
    want = (pos(x).softmax(1) + pos(x).flip(-1).softmax(1)) / 2
    torch.testing.assert_close(segment(pos, x, flip=True), want)
    out = segment(model, x, mode="slide", crop=(16, 16), stride=(8, 8), scales=(0.75, 1.25), flip=True,
                  out_size=(12, 18))
    assert out.shape == (1, 4, 12, 18)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 12, 18))
    with pytest.raises(ValueError, match="crop and stride"):
        segment(model, x, mode="slide")


# --- eval and predict commands ----------------------------------------------------------------------

def tiny_segformer(num_classes):
    torch.manual_seed(0)
    cfg = SegFormerConfig(num_classes=num_classes, embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                          num_heads=(1, 2, 4, 8), decoder_dim=32, variant=None)
    return SegFormer(config=cfg)


class Brightness(nn.Module):
    """Class 1 where the image is bright, class 0 where it is dark (an oracle for the test data)."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        m = x.mean(1, keepdim=True)
        return torch.cat([-m, m], 1)


def folder_dataset(root, n=3, size=(48, 64)):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        label = np.zeros(size, np.uint8)
        label[:, : 16 * (i + 1)] = 1
        label[:4] = 255
        Image.fromarray(np.repeat((label == 1)[..., None] * 255, 3, -1).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(label).save(root / "labels" / f"{i}.png")


def test_evaluate_model_with_an_oracle(tmp_path):
    from fastseg.data import ImageMaskFolder

    folder_dataset(tmp_path)
    ds = ImageMaskFolder(tmp_path, None, num_classes=2)
    for kw in ({}, {"mode": "slide", "crop": (32, 32), "stride": (16, 16)}, {"scales": (1.0, 2.0), "flip": True}):
        m = evaluate.evaluate_model(Brightness(), ds, progress=False, **kw)
        assert m["mIoU"] == 1.0 and m["aAcc"] == 1.0 and m["images"] == 3, kw
        assert m["pixels"] == 3 * 44 * 64


def test_eval_command_writes_json(tmp_path, capsys):
    folder_dataset(tmp_path / "data")
    tiny_segformer(2).save_pretrained(tmp_path / "model")
    p = argparse.ArgumentParser()
    evaluate.add_eval_arguments(p)
    out = tmp_path / "eval.json"
    args = p.parse_args(["--checkpoint", str(tmp_path / "model"), "--dataset", "folder", "--data-root",
                         str(tmp_path / "data"), "--num-classes", "2", "--split", "none", "--workers", "0",
                         "--mode", "slide", "--crop", "32", "--stride", "24", "--out", str(out), "--quiet"])
    assert evaluate.eval_main(args) == 0
    record = json.loads(out.read_text())
    assert 0.0 <= record["mIoU"] <= 1.0 and record["images"] == 3 and set(record["per_class"]) == {"class_0", "class_1"}
    assert record["settings"]["mode"] == "slide" and record["settings"]["crop"] == [32, 32]
    assert "mIoU" in capsys.readouterr().out
    args.num_classes = 3
    with pytest.raises(ValueError, match="predicts 2 classes"):
        evaluate.eval_main(args)


def test_palettes():
    assert PALETTES["ade20k"].shape == (150, 3) and PALETTES["cityscapes"].shape == (19, 3)
    assert PALETTES["ade20k"][0].tolist() == [120, 120, 120] and PALETTES["cityscapes"][0].tolist() == [128, 64, 128]
    pal = generated_palette(40)
    assert pal.shape == (40, 3) and len({tuple(c) for c in pal.tolist()}) == 40
    labels = np.array([[0, 1], [255, 39]])
    colours = colorize(labels, pal)
    assert colours[1, 0].tolist() == [0, 0, 0] and colours[1, 1].tolist() == pal[39].tolist()
    img = np.full((2, 2, 3), 200, np.uint8)
    assert overlay(img, colours, 0.0).tolist() == img.tolist() and overlay(img, colours, 1.0).tolist() == colours.tolist()
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, colours, 1.5)


# --- labels without full-resolution logits (segment_labels, the fused upsample + argmax) -------------

class ColourOracle(nn.Module):
    """Logits at 1/4 resolution from the distance of each 4×4 block's mean colour to each class's
    colour of the synthetic set (background: a fixed score): a confident model, no training."""

    def __init__(self, colours):
        super().__init__()
        from fastseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        c = (torch.tensor(colours, dtype=torch.float32) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        self.register_buffer("c", c)
        self.num_classes = len(colours)

    def forward(self, x):
        p = F.avg_pool2d(x, 4, ceil_mode=True)
        d = ((p[:, None] - self.c[None, :, :, None, None]) ** 2).sum(2)
        d[:, 0] = 0.3
        return -4 * d


@pytest.mark.parametrize("fused", [False, True])
def test_segment_labels_whole_is_the_two_step_path(fused):
    from fastseg.inference import segment_labels

    for K, size in ((19, (64, 96)), (150, (61, 47))):
        model = tiny_segformer(K).eval()
        model.set_fused(fused)
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            old = segment(model, x).argmax(1)
            new, scores = segment_labels(model, x, return_scores=True)
            assert torch.equal(new, old), (K, size, (new != old).float().mean().item())
            assert torch.equal(segment_labels(model, x, two_step=True), old)
        assert scores.shape == new.shape


def test_segment_labels_every_mode_is_the_two_step_path_for_a_random_segformer():
    from fastseg.inference import segment_labels

    model = tiny_segformer(19).eval()
    x = torch.randn(1, 3, 56, 76)
    for kw in ({"mode": "slide", "crop": (40, 48), "stride": (24, 36)}, {"scales": (0.75, 1.25), "flip": True},
               {"out_size": (97, 131)}):
        with torch.no_grad():
            old = segment(model, x, **kw).argmax(1)
            new, scores = segment_labels(model, x, return_scores=True, **kw)
        assert torch.equal(new, old), (kw, (new != old).float().mean().item())
        assert (scores > 0).all() and (scores <= 1).all()


def test_segment_labels_slide_and_multi_scale_agreement_and_miou():
    """Against the two-step path on the synthetic set with a confident model (fixed seed): the same
    labels and mIoU in every mode (slide with aligned and misaligned windows, multi-scale + flip,
    an output size other than the input's)."""
    from fastseg.data import EvalSet, TestTransform, build_dataset
    from fastseg.inference import segment_labels

    ds = build_dataset("synthetic", "val", None, num_classes=5, synthetic_size=96, synthetic_images=4)
    model = ColourOracle(ds.colours).eval()
    samples = EvalSet(ds, TestTransform(None))
    cases = [{}, {"mode": "slide", "crop": (64, 64), "stride": (32, 32)},
             {"mode": "slide", "crop": (48, 48), "stride": (36, 36)}, {"scales": (0.5, 1.0, 1.5), "flip": True},
             {"mode": "slide", "crop": (64, 64), "stride": (40, 40), "scales": (0.75, 1.25), "flip": True},
             {"out_size": (150, 170)}]
    for kw in cases:
        old_metric, new_metric, same, n = SegMetric(5), SegMetric(5), 0, 0
        for i in range(len(samples)):
            x, y, _ = samples[i]
            with torch.no_grad():
                old = segment(model, x[None], **kw).argmax(1)[0]
                new = segment_labels(model, x[None], **kw)[0]
            if "out_size" not in kw:
                old_metric.update(old, y)
                new_metric.update(new, y)
            same += int((old == new).sum())
            n += old.numel()
        assert same == n, (kw, same / n)
        if "out_size" not in kw:
            assert old_metric.compute()["mIoU"] == new_metric.compute()["mIoU"], kw


def test_a_test_scale_pass_gives_the_same_labels_through_the_fused_op_and_through_the_bands(monkeypatch):
    """Whole mode with an output size other than the input's: the fused path (the logits resized to
    the input size, then upsample + argmax) and the banded path it falls back to when those logits
    would be too big give the two-step labels."""
    import fastseg.inference as inference

    model = tiny_segformer(19).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        old = segment(model, x, out_size=(83, 57)).argmax(1)
        fused = inference.segment_labels(model, x, out_size=(83, 57))
        monkeypatch.setattr(inference, "TWO_RESIZE_ELEMENTS", 0)
        banded = inference.segment_labels(model, x, out_size=(83, 57))
    assert torch.equal(fused.long(), old) and torch.equal(banded.long(), old)
