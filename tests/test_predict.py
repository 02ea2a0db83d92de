"""The predict command: palette masks, overlays, label PNGs, failures listed per file, batching."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from fastseg import SegFormer, SegFormerConfig
from fastseg import predict
from fastseg.data.palettes import PALETTES


def tiny_segformer(num_classes):
    torch.manual_seed(0)
    cfg = SegFormerConfig(num_classes=num_classes, embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                          num_heads=(1, 2, 4, 8), decoder_dim=32, variant=None)
    return SegFormer(config=cfg)


def test_predict_writes_palette_masks_and_overlays(tmp_path):
    tiny_segformer(19).save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for name, size in (("a", (40, 56)), ("b", (33, 47))):
        images[name] = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        Image.fromarray(images[name]).save(tmp_path / "in" / f"{name}.jpg", quality=100)
    p = argparse.ArgumentParser()
    predict.add_predict_arguments(p)
    args = p.parse_args([str(tmp_path / "in"), "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                         "--palette", "cityscapes", "--overlay", "0.4", "--save-labels", "--quiet"])
    assert predict.predict_main(args) == 0
    palette = PALETTES["cityscapes"]
    for name in ("a", "b"):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        labels = np.asarray(Image.open(tmp_path / "out" / f"{name}_labels.png")).astype(np.int64)
        blend = np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png")).astype(int)
        image = np.asarray(Image.open(tmp_path / "in" / f"{name}.jpg").convert("RGB")).astype(int)
        assert mask.shape == images[name].shape and labels.max() < 19
        np.testing.assert_array_equal(mask, palette[labels])
        assert np.abs(blend - (0.4 * mask + 0.6 * image)).max() <= 1
    args.palette = "ade20k"
    with pytest.raises(ValueError, match="150 colours"):
        predict.predict_main(args)
    args.inputs = [str(tmp_path / "missing.png")]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict.predict_main(args)



def _predict_args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    predict.add_predict_arguments(p)
    return p.parse_args([str(tmp_path / "in"), "--checkpoint", str(tmp_path / "model"), "--quiet", *extra])


def test_predict_skips_an_unreadable_image_writes_the_rest_and_fails_at_the_end(tmp_path, capsys):
    tiny_segformer(4).save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "c", "d"):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "in" / "e.jpg").write_bytes(b"")
    args = _predict_args(tmp_path, "--out", str(tmp_path / "out"), "--workers", "2", "--batch", "2")
    assert predict.predict_main(args) == 1
    err = capsys.readouterr().err
    assert "b.png" in err and "e.jpg" in err and "2 of 5 image(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png", "d.png"]


def test_predict_more_than_256_classes_writes_16_bit_labels_that_read_back_exactly(tmp_path, capsys):
    from fastseg.data import read_image, read_label
    from fastseg.data.transforms import TestTransform
    from fastseg.inference import segment_labels

    model = tiny_segformer(300)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    args = _predict_args(tmp_path, "--out", str(tmp_path / "out"), "--save-labels", "--workers", "0")
    assert predict.predict_main(args) == 0
    assert "16-bit" in capsys.readouterr().err
    with Image.open(tmp_path / "out" / "a_labels.png") as im:
        assert im.mode.startswith("I")
    x, _ = TestTransform(None)(read_image(tmp_path / "in" / "a.png"))
    with torch.no_grad():
        want = segment_labels(model.eval(), x[None])[0].numpy()
    got = read_label(tmp_path / "out" / "a_labels.png")
    np.testing.assert_array_equal(got, want)
    assert want.max() > 255  # the test means something: ids an 8-bit PNG would wrap
    predict.save_label_png(np.array([[0, 255]]), tmp_path / "small.png", 19)  # <= 256 classes: 8-bit
    with Image.open(tmp_path / "small.png") as im:
        assert im.mode == "L"


def test_predict_batched_masks_equal_single_image_masks(tmp_path):
    tiny_segformer(19).save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(2)
    for i, size in enumerate(((40, 56), (33, 47), (40, 56), (33, 47), (40, 56))):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    assert predict.predict_main(_predict_args(tmp_path, "--out", str(tmp_path / "one"), "--workers", "0")) == 0
    assert predict.predict_main(_predict_args(tmp_path, "--out", str(tmp_path / "many"), "--batch", "3",
                                               "--workers", "1", "--save-labels")) == 0
    for i in range(5):
        one = np.asarray(Image.open(tmp_path / "one" / f"{i}.png"))
        many = np.asarray(Image.open(tmp_path / "many" / f"{i}.png"))
        np.testing.assert_array_equal(one, many)
        assert np.asarray(Image.open(tmp_path / "many" / f"{i}_labels.png")).shape == one.shape[:2]
