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


# --- images read as viewers show them; what cannot be read is named ------------------------------

def test_predict_reads_16_bit_images_as_their_top_8_bits(tmp_path):
    """A 16-bit PNG: the overlay at alpha 0 is the image predict decoded, and it is ``>> 8`` of the
    file's values (convert("RGB") made 99 % of them 255: a mask of a white image)."""
    from test_read_image import gradient16

    tiny_segformer(4).save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    a = gradient16(40, 52)
    Image.fromarray(a).save(tmp_path / "in" / "g.png")
    assert predict.predict_main(_predict_args(tmp_path, "--out", str(tmp_path / "out"), "--overlay", "0",
                                              "--workers", "0")) == 0
    seen = np.asarray(Image.open(tmp_path / "out" / "g_overlay.png"))
    np.testing.assert_array_equal(seen, np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_predict_follows_exif_orientation_and_no_exif_reads_the_stored_pixels(tmp_path):
    from test_read_image import exif_image

    tiny_segformer(4).save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    stored = np.random.default_rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide as stored
    exif_image(tmp_path / "in" / "photo.jpg", stored, orientation=6)  # shown 64 wide, 96 high
    assert predict.predict_main(_predict_args(tmp_path, "--out", str(tmp_path / "shown"), "--workers", "0")) == 0
    assert np.asarray(Image.open(tmp_path / "shown" / "photo.png")).shape == (96, 64, 3)
    assert predict.predict_main(_predict_args(tmp_path, "--out", str(tmp_path / "raw"), "--workers", "0",
                                              "--no-exif")) == 0
    assert np.asarray(Image.open(tmp_path / "raw" / "photo.png")).shape == (64, 96, 3)


def test_predict_names_a_folder_and_a_text_file_named_like_images_and_writes_the_rest(tmp_path, capsys):
    tiny_segformer(4).save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((36, 40, 3), 90, np.uint8)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "x.png").mkdir()
    (tmp_path / "in" / "y.jpg").write_text("hello")
    (tmp_path / "in" / "notes.txt").write_text("not an image name: ignored")
    assert predict.predict_main(_predict_args(tmp_path, "--out", str(tmp_path / "out"), "--workers", "1")) == 1
    err = capsys.readouterr().err
    assert "2 of 3 image(s) failed" in err
    failed = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(failed) == 2 and "x.png: " in failed[0] and "folder" in failed[0] and "y.jpg: " in failed[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


# --- fused by default ------------------------------------------------------------------------------

def _loaded_models(monkeypatch):
    """Every model load_model returns, recorded (what predict / eval actually ran)."""
    import fastseg.inference

    seen, real = [], fastseg.inference.load_model

    def recording(*a, **k):
        model, info = real(*a, **k)
        seen.append(model)
        return model, info

    monkeypatch.setattr(fastseg.inference, "load_model", recording)
    return seen


@pytest.mark.parametrize("flags, fused", [((), True), (("--fused",), True), (("--no-fused",), False)])
def test_predict_runs_fused_by_default(tmp_path, monkeypatch, flags, fused):
    tiny_segformer(4).save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((36, 40, 3), 90, np.uint8)).save(tmp_path / "in" / "a.png")
    seen = _loaded_models(monkeypatch)
    assert predict.predict_main(_predict_args(tmp_path, "--workers", "0", "--out", str(tmp_path / "o"), *flags)) == 0
    (model,) = seen
    assert model.fused is fused
    assert all(m.fused is fused for m in model.modules() if hasattr(m, "fused") and m is not model)


@pytest.mark.parametrize("flags, fused", [((), True), (("--no-fused",), False)])
def test_eval_runs_fused_by_default_and_records_it(tmp_path, monkeypatch, flags, fused):
    import json

    from fastseg import evaluate

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    Image.fromarray(np.full((36, 40, 3), 90, np.uint8)).save(tmp_path / "data" / "images" / "a.png")
    Image.fromarray(np.zeros((36, 40), np.uint8)).save(tmp_path / "data" / "labels" / "a.png")
    tiny_segformer(2).save_pretrained(tmp_path / "model")
    seen = _loaded_models(monkeypatch)
    p = argparse.ArgumentParser()
    evaluate.add_eval_arguments(p)
    args = p.parse_args(["--checkpoint", str(tmp_path / "model"), "--dataset", "folder", "--data-root",
                         str(tmp_path / "data"), "--num-classes", "2", "--workers", "0", "--quiet",
                         "--out", str(tmp_path / "e.json"), *flags])
    assert evaluate.eval_main(args) == 0
    assert seen[0].fused is fused
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["fused"] is fused


# --- non-finite logits: one warning per image, no mask ------------------------------------------

def test_predict_with_nan_weights_writes_no_mask_and_names_every_image(tmp_path, capsys):
    model = tiny_segformer(4)
    with torch.no_grad():
        model.decoder.classifier.bias[2] = float("nan")  # every pixel's logits: NaN for class 2
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((36, 40, 3), 90, np.uint8)).save(tmp_path / "in" / f"{name}.png")
    for mode in ((), ("--mode", "slide", "--crop", "32", "--stride", "24")):
        out = tmp_path / f"out{len(mode)}"
        assert predict.predict_main(_predict_args(tmp_path, "--out", str(out), "--workers", "0", *mode)) == 1
        err = capsys.readouterr().err.splitlines()
        for name in ("a", "b"):
            assert sum(f"{name}.png" in line and "non-finite logits" in line for line in err) == 2  # warning + list
        assert not out.exists() or not any(out.iterdir())


class NaNWhenBright(torch.nn.Module):
    """3-class logits from the 4×4 block means; NaN in one pixel's logits of a bright image."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))

    def forward(self, x):
        logits = torch.nn.functional.avg_pool2d(x, 4, ceil_mode=True).mean(1, keepdim=True) * self.w[:, None, None]
        bright = x.flatten(1).mean(1) > 1.0
        logits[bright, :, 0, 0] = float("nan")
        return logits


def test_predict_reports_only_the_image_whose_logits_are_nan(tmp_path, monkeypatch, capsys):
    import fastseg.inference

    monkeypatch.setattr(fastseg.inference, "load_model", lambda *a, **k: (NaNWhenBright(), {}))
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((36, 40, 3), 250, np.uint8)).save(tmp_path / "in" / "bright.png")
    Image.fromarray(np.full((36, 40, 3), 20, np.uint8)).save(tmp_path / "in" / "dark.png")
    args = _predict_args(tmp_path, "--out", str(tmp_path / "out"), "--workers", "0", "--batch", "2")
    assert predict.predict_main(args) == 1
    err = capsys.readouterr().err
    assert "bright.png: non-finite logits" in err and "dark.png" not in err and "1 of 2 image(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dark.png"]


def test_eval_warns_per_image_with_nan_logits_and_leaves_it_out(tmp_path, monkeypatch, capsys):
    import json

    import fastseg.inference
    from fastseg import evaluate

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    for name, value in (("bright", 250), ("dark", 20)):
        Image.fromarray(np.full((36, 40, 3), value, np.uint8)).save(tmp_path / "data" / "images" / f"{name}.png")
        Image.fromarray(np.ones((36, 40), np.uint8)).save(tmp_path / "data" / "labels" / f"{name}.png")
    monkeypatch.setattr(fastseg.inference, "load_model", lambda *a, **k: (NaNWhenBright(), {}))
    p = argparse.ArgumentParser()
    evaluate.add_eval_arguments(p)
    args = p.parse_args(["--checkpoint", str(tmp_path), "--dataset", "folder", "--data-root", str(tmp_path / "data"),
                         "--num-classes", "3", "--workers", "0", "--quiet", "--out", str(tmp_path / "e.json")])
    assert evaluate.eval_main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "bright.png: non-finite logits" in line]) == 1
    assert not any("dark.png" in line for line in err)
    record = json.loads((tmp_path / "e.json").read_text())
    assert [p.endswith("bright.png") for p in record["non_finite_images"]] == [True]
    assert record["pixels"] == 36 * 40  # the dark image only


# --- stage timing, output names, the background writer, torchrun ------------------------------------

def _images(folder, names, size=(36, 44), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / name)


def test_predict_timing_prints_every_stage_and_writes_the_json_record(tmp_path, capsys):
    import json

    from fastseg.stage_timing import STAGE_TITLES, STAGES

    tiny_segformer(4).save_pretrained(tmp_path / "model")
    _images(tmp_path / "in", ["a.png", "b.jpg", "c.png"])
    (tmp_path / "in" / "d.png").write_bytes(b"broken")
    args = _predict_args(tmp_path, "--out", str(tmp_path / "out"), "--workers", "1", "--batch", "2", "--timing",
                         "--timing-json", str(tmp_path / "t" / "timing.json"))
    assert predict.predict_main(args) == 1
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if any(line.startswith(STAGE_TITLES[s]) for s in STAGES)]
    assert len(table) == len(STAGES)
    assert any("images/s end to end" in line and line.startswith("4 image(s)") for line in out)
    record = json.loads((tmp_path / "t" / "timing.json").read_text())
    assert record["schema"] == "fastseg-predict-timing/1" and record["images"] == 4 and record["failed"] == 1
    assert list(record["stages"]) == list(STAGES)
    assert record["stages"]["decode"]["images"] == 4  # the broken file was read too
    for stage in ("resize", "forward", "labels", "encode"):
        assert record["stages"][stage]["images"] == 3, stage
    assert all(r["total_s"] >= 0 and r["ms_per_image"] >= 0 for r in record["stages"].values())
    assert abs(sum(r["share"] for r in record["stages"].values()) - 1) < 1e-9
    assert record["wall_s"] > 0 and record["images_per_s"] > 0 and set(record["waits_s"]) == {"input", "output"}
    assert record["world_size"] == 1 and record["workers"] == 1 and record["batch"] == 2
    assert not [p for p in (tmp_path / "t").iterdir() if p.name != "timing.json"]  # atomic: no temporary left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]


def test_two_inputs_that_would_write_one_file_are_refused_before_anything_runs(tmp_path, monkeypatch):
    import fastseg.inference

    def no_model(*a, **k):
        raise AssertionError("the clash must be found before the model is loaded")

    monkeypatch.setattr(fastseg.inference, "load_model", no_model)
    _images(tmp_path / "a", ["x.jpg", "y.jpg"])
    _images(tmp_path / "b", ["x.png"])
    p = argparse.ArgumentParser()
    predict.add_predict_arguments(p)
    args = p.parse_args([str(tmp_path / "a"), str(tmp_path / "b"), "--checkpoint", str(tmp_path / "m"),
                         "--out", str(tmp_path / "out"), "--quiet"])
    with pytest.raises(ValueError, match=r"inputs .*a/x\.jpg and .*b/x\.png would both write .*x\.png"):
        predict.predict_main(args)
    assert not (tmp_path / "out").exists()
    # names that differ in case only, and a derived name: one file on some filesystems / with --overlay
    _images(tmp_path / "c", ["Q.jpg", "q.png"])
    with pytest.raises(ValueError, match="Q.jpg and .*q.png would both write"):
        predict.check_output_names(predict.collect_images([tmp_path / "c"]), tmp_path / "out", False, False)
    _images(tmp_path / "d", ["z.jpg", "z_overlay.jpg"])
    files = predict.collect_images([tmp_path / "d"])
    predict.check_output_names(files, tmp_path / "out", False, False)  # no overlay: no clash
    with pytest.raises(ValueError, match="z.jpg and .*z_overlay.jpg would both write .*z_overlay.png"):
        predict.check_output_names(files, tmp_path / "out", True, False)
    # an output that would replace an input, and the same file given twice (runs once)
    _images(tmp_path / "e", ["w.png"])
    with pytest.raises(ValueError, match="would overwrite the input"):
        predict.check_output_names(predict.collect_images([tmp_path / "e"]), tmp_path / "e", False, False)
    assert predict.collect_images([tmp_path / "e", tmp_path / "e" / "w.png"]) == [tmp_path / "e" / "w.png"]


def test_a_write_failure_names_its_image_and_the_others_are_written_atomically_under_the_umask(tmp_path, capsys):
    import os

    tiny_segformer(4).save_pretrained(tmp_path / "model")
    _images(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    (tmp_path / "out" / "b.png").mkdir(parents=True)  # b's mask cannot replace a folder
    (tmp_path / "out" / "b.png" / "keep").write_text("x")
    old = os.umask(0o027)
    try:
        args = _predict_args(tmp_path, "--out", str(tmp_path / "out"), "--workers", "0", "--write-threads", "2",
                             "--save-labels")
        assert predict.predict_main(args) == 1
    finally:
        os.umask(old)
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("  ")]
    assert len(failed) == 1 and "b.png: could not write its outputs (IsADirectoryError" in failed[0]
    assert "1 of 4 image(s) failed" in captured.err and "wrote 3 mask(s)" in captured.out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a.png", "a_labels.png", "b.png", "c.png", "c_labels.png", "d.png", "d_labels.png"]
    for name in names:
        if name != "b.png":
            assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640, name
            Image.open(tmp_path / "out" / name).load()  # a whole PNG


def test_predict_under_torchrun_writes_each_mask_once_and_every_rank_fails_alike(tmp_path):
    """2 CPU processes (gloo): each rank runs every second image, every mask exists once, the bad
    image is named in rank 0's list, and both ranks return 1 (each rank's return value is recorded
    by the launcher below: torchrun itself stops the others once one rank exits non-zero)."""
    import os
    import subprocess
    import sys

    tiny_segformer(4).save_pretrained(tmp_path / "model")
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    _images(tmp_path / "in", names)
    (tmp_path / "in" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    launch = ("import os, sys\nfrom fastseg.cli import main\nrc = main(sys.argv[1:])\n"
              "open(f'rc.{os.environ[\"RANK\"]}', 'w').write(str(rc))\nsys.exit(rc)\n")
    (tmp_path / "launch.py").write_text(launch)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "launch.py"), "predict", str(tmp_path / "in"), "--checkpoint", str(tmp_path / "model"),
           "--out", str(tmp_path / "out"), "--workers", "0", "--device", "cpu", "--quiet", "--save-labels"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert (tmp_path / "rc.0").read_text() == "1" and (tmp_path / "rc.1").read_text() == "1", proc.stderr[-3000:]
    assert "wrote 4 mask(s)" in proc.stdout
    failed = [line for line in proc.stderr.splitlines() if line.startswith("  ") and "c.png" in line]
    assert len(failed) == 1 and "1 of 5 image(s) failed" in proc.stderr, proc.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{n[0]}{s}.png" for n in names if n != "c.png" for s in ("", "_labels"))
    for n in "abde":  # each a whole image of its input's size
        assert np.asarray(Image.open(tmp_path / "out" / f"{n}.png")).shape == (36, 44, 3)


def test_the_mask_writer_holds_at_most_its_byte_budget(tmp_path):
    """The writer's queue is bounded in bytes, not only in images: with room for one and a half
    images' arrays it never holds two, and every mask is still written."""
    from fastseg.data import generated_palette
    from fastseg.mask_writer import MaskWriter

    labels = [np.full((60, 80), i, dtype=np.uint8) for i in range(6)]
    probe = MaskWriter(tmp_path, generated_palette(6))
    cost = probe.cost(labels[0], None)
    probe.close()
    writer = MaskWriter(tmp_path, generated_palette(6), threads=2, pending=4, pending_bytes=cost * 3 // 2)
    for i, lab in enumerate(labels):
        writer.submit(i, f"m{i}", lab, None)
    done = writer.close()
    assert sorted(key for key, _, error in done if error is None) == list(range(6))
    assert cost <= writer.peak_bytes <= cost * 3 // 2
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"m{i}.png" for i in range(6)]
    big = MaskWriter(tmp_path / "big", generated_palette(6), pending_bytes=1)  # one image always fits
    (tmp_path / "big").mkdir()
    big.submit(0, "x", labels[0], None)
    assert big.close()[0][2] is None and (tmp_path / "big" / "x.png").exists()
