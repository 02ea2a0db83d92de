"""Tuned dispatch (fastseg.tune): picks the fastest backend that passes parity, caches it in
process and on disk, ignores stale caches, and leaves static dispatch alone when unused.

The ranking tests use a test-only op whose backends sleep for known times, so the expected
winner cannot flake; no test asserts on the wall time of a real kernel."""
import importlib
import json
import time

import pytest
import torch

from fastseg import SegFormer, SegFormerConfig
from fastseg.ops import dispatch

T = importlib.import_module("fastseg.tune")  # the module (fastseg.tune is the function)
OP = "tune_test_op"


@pytest.fixture(autouse=True)
def clean_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTSEG_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTSEG_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_tuning", None)
    T.clear()
    yield
    T.clear()


@pytest.fixture
def test_op(monkeypatch):
    """An op with a known ranking: triton (preferred statically) sleeps 40 ms, the reference
    20 ms, torch is instant, cpp is instant but wrong. Returns (call, counts)."""
    counts = {"triton": 0, "torch": 0, "cpp": 0, "reference": 0}

    def backend(name, delay=0.0, wrong=False):
        def impl(x):
            counts[name] += 1
            if delay:
                time.sleep(delay)
            return x * 2 + (1.0 if wrong else 0.0)
        return impl

    monkeypatch.setitem(dispatch._registry, OP, [])
    dispatch._registry[OP] = [
        dispatch.Backend("triton", lambda **_: [], backend("triton", 0.04)),
        dispatch.Backend("cpp", lambda **_: [], backend("cpp", wrong=True)),
        dispatch.Backend("torch", lambda **_: [], backend("torch")),
        dispatch.Backend("reference", lambda **_: [], backend("reference", 0.02)),
    ]

    def call(x):
        return dispatch.resolve(OP, device=x.device, dtype=x.dtype)(x)

    return call, counts


class OpModel(torch.nn.Module):
    def __init__(self, call):
        super().__init__()
        self.call = call

    def forward(self, x):
        return self.call(x)


def test_static_dispatch_unchanged_without_tuning(test_op):
    call, counts = test_op
    x = torch.randn(4, 8)
    call(x)
    assert counts["triton"] == 1 and sum(counts.values()) == 1
    assert dispatch.choose(OP, device=x.device, dtype=x.dtype).tuned == ""


def test_tune_picks_the_fastest_backend_that_passes_parity(test_op, tmp_path):
    call, counts = test_op
    x = torch.randn(4, 8)
    report = T.tune(OpModel(call), x)
    (entry,) = report[OP].values()
    assert entry["backend"] == "torch"
    assert entry["static"] == "triton"
    assert set(entry["timings_ms"]) == {"triton", "torch", "reference"}  # cpp failed parity: never timed
    assert "cpp" in entry["rejected"] and "parity" in entry["rejected"]["cpp"]
    assert entry["timings_ms"]["torch"] < entry["timings_ms"]["reference"] < entry["timings_ms"]["triton"]

    # The tuned choice is used from now on, for this shape class.
    before = dict(counts)
    out = call(torch.randn(3, 7))  # buckets to the same class (4 x 8)
    assert counts["torch"] == before["torch"] + 1 and counts["triton"] == before["triton"]
    assert torch.isfinite(out).all()
    assert "torch (torch" in dispatch.choose(OP, device=x.device, dtype=x.dtype).describe()

    # On disk, keyed by device, dtype, versions and shape class.
    data = json.loads((tmp_path / "cache" / "tune.json").read_text())
    assert data["schema"] == T.SCHEMA
    (key, saved), = data["entries"].items()
    assert saved["backend"] == "torch" and saved["versions"] == T.versions()
    assert "float32" in key and "4x8" in key and f"torch {torch.__version__}" in key


def test_never_picks_a_backend_that_fails_parity(test_op, monkeypatch):
    call, counts = test_op
    # Everything but the wrong backend is slow: it still must not win.
    dispatch._registry[OP][2] = dispatch.Backend("torch", lambda **_: [], dispatch._registry[OP][3].impl)
    report = T.tune(OpModel(call), torch.randn(4, 8))
    (entry,) = report[OP].values()
    assert entry["backend"] != "cpp" and "cpp" not in entry["timings_ms"]


def test_disk_cache_is_reused_and_stale_entries_are_ignored(test_op, tmp_path):
    call, counts = test_op
    x = torch.randn(4, 8)
    T.tune(OpModel(call), x)
    path = tmp_path / "cache" / "tune.json"
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()

    # A later process (same versions) reuses the file without measuring again.
    T.clear()
    T.install()
    T._enabled = True
    counts.update(dict.fromkeys(counts, 0))
    call(x)
    assert counts == {"triton": 0, "torch": 1, "cpp": 0, "reference": 0}

    # Same key, other versions (a stale cache): ignored, so static dispatch (triton) runs.
    entry_stale = dict(entry, backend="reference", versions={**entry["versions"], "torch": "0.0.1"})
    path.write_text(json.dumps({"schema": T.SCHEMA, "entries": {key: entry_stale}}))
    T.clear()
    assert T.load() == 0
    T.install()
    T._enabled = True
    counts.update(dict.fromkeys(counts, 0))
    call(x)
    assert counts["reference"] == 0 and counts["triton"] == 1
    # A foreign or corrupt file is ignored too.
    path.write_text("{not json")
    T.clear()
    assert T.load() == 0


def test_autotune_env_measures_on_first_use(test_op, monkeypatch, tmp_path):
    call, counts = test_op
    monkeypatch.setenv("FASTSEG_AUTOTUNE", "1")
    T.install()
    x = torch.randn(4, 8)
    call(x)  # measured now, then run with the winner
    assert counts["reference"] > 0 and counts["torch"] >= 1
    n = dict(counts)
    call(x)
    assert counts["torch"] == n["torch"] + 1 and counts["triton"] == n["triton"]
    assert (tmp_path / "cache" / "tune.json").exists()


def test_forced_backend_beats_tuning(test_op):
    call, counts = test_op
    x = torch.randn(4, 8)
    T.tune(OpModel(call), x)
    with dispatch.use_backend("triton"):
        n = counts["triton"]
        call(x)
        assert counts["triton"] == n + 1


def test_tune_a_real_model_on_cpu():
    """torch / cpp / reference candidates of every SegFormer op on CPU: every choice passed
    parity, the tuned model computes what it did, and backends() shows the timings."""
    torch.manual_seed(0)
    cfg = SegFormerConfig(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                          decoder_dim=32, num_classes=5)
    model = SegFormer(config=cfg).eval().set_fused(True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = T.tune(model, x)
    assert set(report) >= {"sr_attention", "mix_ffn", "decoder_upsample_fuse", "overlap_patch_embed"}
    for op, entries in report.items():
        for entry in entries.values():
            assert entry["backend"] in entry["timings_ms"], (op, entry)
            assert "triton" not in entry["timings_ms"]  # the interpreter is never a candidate
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)
    text = model.backends()["sr_attention"].describe()
    assert "tuned:" in text and " ms" in text
