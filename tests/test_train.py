"""Training: learning on the synthetic task, fused vs reference, exact resume, atomic checkpoints,
the recipe's optimiser/schedule, auxiliary losses, --init, logging, and DDP with gloo on CPU."""
import argparse
import csv
import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastseg import SegFormer, SegFormerConfig
from fastseg import train
from fastseg.io import CheckpointError

TINY = '{"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "decoder_dim": 64}'
REPO = Path(__file__).resolve().parents[1]


def parse(tmp_path, *extra) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    base = ["--dataset", "synthetic", "--model-config", TINY, "--workers", "0", "--batch", "4",
            "--out", str(tmp_path), "--quiet", "--no-tensorboard", "--no-save-final", "--log-every", "1",
            "--eval-every", "0", "--ckpt-every", "0", "--synthetic-images", "32", "--device", "cpu"]
    return p.parse_args(base + [str(e) for e in extra])


def losses(out_dir) -> list[float]:
    with open(Path(out_dir) / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def test_synthetic_training_learns(tmp_path):
    summary = train.run(parse(tmp_path, "--iters", 40, "--batch", 8, "--lr", 2e-3, "--warmup-iters", 3,
                              "--eval-every", 40, "--synthetic-images", 64, "--eval-max-images", 16))
    curve = losses(tmp_path)
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve)
    start, end = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert end < 0.6 * start, curve
    # Chance (all background) is ~0.2 mIoU with 4 classes.
    assert summary["metrics"]["mIoU"] > 0.35, summary["metrics"]
    assert summary["ranks_identical"]


def test_fused_and_reference_give_the_same_loss_curve(tmp_path):
    curves = {}
    for flag in ("--fused", "--no-fused"):
        out = tmp_path / flag
        s = train.run(parse(out, flag, "--iters", 4, "--lr", 1e-3, "--warmup-iters", 2))
        assert s["fused"] == (flag == "--fused")
        curves[flag] = losses(out)
    torch.testing.assert_close(torch.tensor(curves["--fused"]), torch.tensor(curves["--no-fused"]),
                               rtol=1e-3, atol=1e-4)


def _final_model(out_dir) -> dict:
    path = train.checkpoint_paths(Path(out_dir) / "checkpoints")[-1]
    return train.load_checkpoint(path)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    common = ("--iters", 6, "--ckpt-every", 3, "--lr", 1e-3, "--warmup-iters", 2, "--accum", 2)
    train.run(parse(tmp_path / "straight", *common))

    # The second run "crashes" right after writing its iteration-3 checkpoint, then resumes.
    real_save = train.save_checkpoint

    def save_then_crash(state, directory, iteration, keep):
        path = real_save(state, directory, iteration, keep)
        if iteration == 3:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(parse(tmp_path / "resumed", *common))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.run(parse(tmp_path / "resumed", *common, "--resume", "auto"))

    a, b = _final_model(tmp_path / "straight"), _final_model(tmp_path / "resumed")
    assert a["iteration"] == b["iteration"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert losses(tmp_path / "straight")[3:] == losses(tmp_path / "resumed")[-3:]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    first = {"format": "fastseg-train/1", "iteration": 1, "w": torch.randn(64, 64)}
    good = train.save_checkpoint(first, directory, 1, keep=1)
    before = good.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint({**first, "iteration": 2}, directory, 2, keep=1)
    assert sorted(p.name for p in directory.iterdir()) == [good.name]  # no partial or temporary file
    assert good.read_bytes() == before
    assert torch.equal(train.load_checkpoint(good)["w"], first["w"])


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    train.save_checkpoint({"format": "fastseg-train/1", "iteration": 1}, directory, 1, keep=0)
    (directory / "iter_00000002.pth").write_bytes(b"truncated")
    notes = []
    path, ckpt = train.find_resume("auto", directory, notes.append)
    assert path.name == "iter_00000001.pth" and ckpt["iteration"] == 1
    assert "iter_00000002.pth" in notes[0]
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        train.find_resume(str(tmp_path / "nope.pth"), directory, notes.append)
    torch.save({"model": {}}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="--init"):
        train.find_resume(str(tmp_path / "plain.pth"), directory, notes.append)


def test_checkpoints_keep_last_n_and_hold_everything(tmp_path):
    train.run(parse(tmp_path, "--iters", 4, "--ckpt-every", 1, "--keep", 2, "--amp", "bf16"))
    paths = train.checkpoint_paths(tmp_path / "checkpoints")
    assert [p.name for p in paths] == ["iter_00000003.pth", "iter_00000004.pth"]
    ckpt = train.load_checkpoint(paths[-1])
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "iteration", "args", "model_config"):
        assert key in ckpt, key
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    assert ckpt["args"]["amp"] == "bf16" and ckpt["scheduler"]["iteration"] == 4


def test_param_groups_follow_the_recipe():
    model = SegFormer(config=SegFormerConfig(num_classes=3, embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                                             num_heads=(1, 2, 4, 8), decoder_dim=32, variant=None))
    groups = {g["name"]: g for g in train.param_groups(model, 6e-5, 0.01, 10.0)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head"}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in groups["backbone_no_decay"]["params"])
    assert all(names[id(p)].startswith("decoder.") for p in groups["head"]["params"])
    assert groups["head"]["lr"] == pytest.approx(6e-4) and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_poly_schedule_with_linear_warmup():
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0},
                             {"params": [nn.Parameter(torch.zeros(1))], "lr": 10.0}])
    sched = train.PolyWarmup(opt, total=100, warmup=10, warmup_ratio=1e-6, power=1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        sched.step()
    assert lrs[5][0] == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lrs[10][0] == pytest.approx(0.9) and lrs[50][1] == pytest.approx(5.0)
    assert opt.param_groups[0]["lr"] == 0.0
    clone = train.PolyWarmup(opt, total=100, warmup=10)
    clone.load_state_dict({"iteration": 50, "base_lrs": [1.0, 10.0]})
    assert opt.param_groups[1]["lr"] == pytest.approx(5.0)


class AuxNet(nn.Module):
    """A SETR-like toy: training returns (main, [aux, aux]) at lower resolutions."""

    aux_weights = (0.4, 0.4)

    def __init__(self, num_classes=4):
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.decode_head = nn.Conv2d(8, num_classes, 1)
        self.aux_heads = nn.ModuleList(nn.Conv2d(8, num_classes, 1) for _ in range(2))

    def forward(self, x):
        f = F.relu(self.backbone(x))
        main = self.decode_head(f)
        if not self.training:
            return main
        return main, [h(F.avg_pool2d(f, 2)) for h in self.aux_heads]


def test_auxiliary_losses_are_weighted_and_resized():
    torch.manual_seed(0)
    main, aux = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    target = torch.randint(0, 4, (2, 32, 32))
    target[0, :5] = 255
    up = lambda t: F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up(main), target, ignore_index=255) + 0.4 * F.cross_entropy(up(aux), target, ignore_index=255)
    torch.testing.assert_close(train.seg_loss((main, [aux]), target, [0.4]), want)
    torch.testing.assert_close(train.seg_loss((main, [aux]), target), want)  # 0.4 by default
    with pytest.raises(ValueError, match="auxiliary"):
        train.seg_loss((main, [aux]), target, [0.4, 0.4])
    assert train.seg_loss(main, torch.full((2, 32, 32), 255)).item() == 0.0  # no labelled pixel: 0, not NaN


def test_training_a_model_with_auxiliary_heads(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_model", lambda name, k, **kw: AuxNet(k))
    s = train.run(parse(tmp_path, "--model", "setr-toy", "--iters", 3, "--eval-every", 3, "--head-keys", "head"))
    assert math.isfinite(s["final_loss"]) and s["metrics"] is not None and s["model"] == "setr-toy"
    with pytest.raises(ValueError, match="no fused path"):
        train.run(parse(tmp_path / "f", "--model", "setr-toy", "--iters", 1, "--fused"))


SETR_TINY = ('{"embed_dim": 32, "depth": 4, "num_heads": 2, "head_channels": 16, "aux_channels": 16, '
             '"drop_rate": 0.0}')


def test_training_setr_with_its_auxiliary_heads(tmp_path):
    pytest.importorskip("fastseg.models.setr")
    from fastseg.inference import load_model

    s = train.run(parse(tmp_path, "--model", "setr-naive", "--model-config", SETR_TINY, "--iters", 2,
                        "--eval-every", 2, "--ckpt-every", 2, "--fused"))
    assert math.isfinite(s["final_loss"]) and s["model"] == "setr-naive" and s["fused"]
    model, info = load_model(train.checkpoint_paths(tmp_path / "checkpoints")[-1])
    assert type(model).__name__ == "SETR" and model.config.img_size == (64, 64) and info["dataset"] == "synthetic"


def test_model_factory_errors(monkeypatch):
    import fastseg
    from fastseg.inference import build_model

    with pytest.raises(ValueError, match="unknown model"):
        build_model("segformer-b9", 150)
    with pytest.raises(ValueError, match="unknown SETR model"):
        build_model("setr-fancy", 150)
    monkeypatch.delattr(fastseg, "SETR", raising=False)
    with pytest.raises(ValueError, match="SETR is not available"):
        build_model("setr-pup", 150)


def test_init_from_a_pretrained_checkpoint(tmp_path):
    cfg = SegFormerConfig(num_classes=7, embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                          num_heads=(1, 2, 4, 8), decoder_dim=32, variant=None)
    SegFormer(config=cfg).save_pretrained(tmp_path / "pre")
    with pytest.warns(UserWarning, match="re-initialised"):
        s = train.run(parse(tmp_path / "run", "--init", tmp_path / "pre", "--model-config", "", "--iters", 1))
    assert s["num_classes"] == 4 and s["model"] == "segformer-custom"


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = train.RunLog(tmp_path, True, True, print)
    log.write(5, loss=0.5, lr=1e-4, images_per_s=10.0)
    log.write(5, mIoU=0.25, aAcc=0.5, mAcc=0.3)
    log.close()
    assert ("train/loss", 0.5, 5) in scalars and ("val/mIoU", 0.25, 5) in scalars
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert rows[0]["loss"] == "0.5" and rows[1]["mIoU"] == "0.25"


def test_tensorboard_missing_is_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    notes = []
    train.RunLog(tmp_path, True, True, notes.append).close()
    assert len(notes) == 1 and "tensorboard is not installed" in notes[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_clean_exit(proc) -> None:
    """A finished run exits 0 on every rank, and no rank aborts in its teardown: an abort there
    ("terminate called ...", SIGABRT from a C++ thread still running at exit) can leave exit code
    0 on another rank, so the stderr text is checked as well as the code."""
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    for sign in ("terminate called", "Aborted", "SIGABRT", "ChildFailedError"):
        assert sign not in proc.stderr, f"{sign!r} in stderr:\n{output}"


def test_ddp_two_cpu_processes_with_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastseg.train",
           "--dataset", "synthetic", "--model-config", TINY, "--workers", "0", "--batch", "2", "--iters", "3",
           "--lr", "1e-3", "--warmup-iters", "1", "--eval-every", "3", "--ckpt-every", "3", "--device", "cpu",
           "--out", str(out), "--quiet", "--no-tensorboard", "--no-save-final", "--synthetic-images", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert_clean_exit(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["weights_sha256"]) == 2 and summary["ranks_identical"], summary["weights_sha256"]
    assert summary["final_loss"] is not None and math.isfinite(summary["final_loss"])
    assert math.isfinite(summary["metrics"]["aAcc"])
    assert "SyncBatchNorm off" in proc.stdout and "gloo" in proc.stdout
    ckpt = train.load_checkpoint(train.checkpoint_paths(out / "checkpoints")[-1])
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_ddp_equals_the_equivalent_single_process_run(tmp_path):
    """2 ranks x batch 1 == 1 process x batch 1 x 2 accumulation steps: the same samples in the
    same pairs, BatchNorm statistics per micro-batch in both (no SyncBN on CPU), gradients
    averaged over the pair. No stochastic layers, so the weights must agree to rounding."""
    config = TINY[:-1] + ', "drop_path_rate": 0.0, "decoder_dropout": 0.0}'
    common = ["--dataset", "synthetic", "--model-config", config, "--workers", "0", "--batch", "1",
              "--iters", "3", "--lr", "1e-3", "--warmup-iters", "1", "--eval-every", "0", "--ckpt-every", "3",
              "--device", "cpu", "--quiet", "--no-tensorboard", "--no-save-final", "--synthetic-images", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "fastseg.train",
           *common, "--out", str(tmp_path / "ddp")]
    single = [sys.executable, "-m", "fastseg.train", *common, "--accum", "2", "--out", str(tmp_path / "single")]
    for cmd in (ddp, single):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert_clean_exit(proc)
    weights = [train.load_checkpoint(train.checkpoint_paths(tmp_path / run / "checkpoints")[-1])["model"]
               for run in ("ddp", "single")]
    params = [k for k, v in weights[0].items() if v.is_floating_point() and "running" not in k]
    assert params
    for key in params:
        a, b = weights[0][key], weights[1][key]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"{key}: max diff {(a - b).abs().max():.2e}"
