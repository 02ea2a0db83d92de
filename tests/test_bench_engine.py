"""`fastseg bench --engine DIR` / `--runtime R --precision P`: the engine row beside the torch modes,
judged by its own precision; and whether INT8 pays off (`engine.report["int8_payoff"]`), decided
from injected latencies (nothing here is timed for its result)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import fastseg  # noqa: E402
from fastseg import SegFormer, SegFormerConfig  # noqa: E402
from fastseg.cli import main  # noqa: E402
from fastseg.deploy import cache, payoff  # noqa: E402
from fastseg.deploy import engine as engine_mod  # noqa: E402

BENCH = ["--height", "64", "--width", "64", "--repeats", "1", "--warmup", "0", "--quiet", "--no-plot",
         "--no-gemm-profile"]


def tiny_model(seed: int = 0) -> SegFormer:
    torch.manual_seed(seed)
    cfg = SegFormerConfig.from_variant("b0", num_classes=5, embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                                       num_heads=(1, 2, 4, 8), decoder_dim=64)
    return SegFormer(config=cfg).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_engine") / "tiny"
    tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """$FASTSEG_CACHE_DIR for the module: engines land in its engines/ (the deploy default)."""
    return tmp_path_factory.mktemp("fastseg_cache")


def calibration():
    return [torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.fixture(scope="module")
def int8_engine(checkpoint, cache_root):
    """The tiny model at int8 in ONNX Runtime, every group int8, not timed against fp32."""
    engine = fastseg.deploy(SegFormer.from_pretrained(checkpoint), "onnxruntime", "int8", calibration=calibration(),
                            input_size=(64, 64), int8_goal=0.0, int8_timing=False, cache_dir=cache_root / "engines")
    assert not list((cache_root / "engines").glob("onnxruntime-fp32-*"))  # no fp32 engine built for nothing
    return engine


def _record(out_dir):
    return json.loads(next(out_dir.glob("*.json")).read_text())


def test_bench_times_an_engine_folder_beside_fused(checkpoint, int8_engine, tmp_path, capsys):
    """An int8 engine folder with the checkpoint it came from: its row is judged by the pixel
    agreement of its labels with the fp32 gold's (the verdict and exit code follow it)."""
    folder = int8_engine.save(tmp_path / "eng")
    out = tmp_path / "results"
    code = main(["bench", "--checkpoint", str(checkpoint), "--engine", str(folder), *BENCH, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| engine onnxruntime int8 |" in printed and "engine row 'engine onnxruntime int8'" in printed
    record = _record(out)
    rows = {r["mode"]: r for r in record["results"]}
    assert list(rows) == ["eager", "fused", "engine onnxruntime int8"]
    row = rows["engine onnxruntime int8"]
    assert row["finite"] and 0 <= row["agreement"] <= 1 and 0 <= row["miou_vs_fp32"] <= 100
    assert row["agreement"] == pytest.approx(row["argmax_agreement"])
    assert row["parity"] is (row["agreement"] >= 0.995) and "labels agree with fp32's" in row["parity_note"]
    assert code == (0 if row["parity"] else 1)
    assert row["median_ms"] > 0 and row["fused_speedup_over"] > 0
    assert record["engine"]["runtime"] == "onnxruntime" and record["engine"]["source"] == f"--engine {folder}"
    assert record["engine"]["trained_weights"] and "pixel agreement of its labels" in record["parity_rule"]
    assert record["cpu"]["label"]
    md = next(out.glob("*.md")).read_text()
    assert "| engine onnxruntime int8 |" in md and "engine row" in md


def test_bench_deploys_at_runtime_and_precision(checkpoint, cache_root, monkeypatch, tmp_path, capsys):
    """--runtime/--precision deploy the bench model into the default engine cache; fp32 within
    the fp32 rule of every other row."""
    monkeypatch.setenv("FASTSEG_CACHE_DIR", str(cache_root))
    out = tmp_path / "results"
    assert main(["bench", "--checkpoint", str(checkpoint), "--runtime", "onnxruntime", *BENCH, "--out", str(out)]) == 0
    assert "| engine onnxruntime fp32 |" in capsys.readouterr().out
    record = _record(out)
    row = next(r for r in record["results"] if r["mode"] == "engine onnxruntime fp32")
    assert row["parity"] is True and row["max_rel_err"] < 1e-4 and row["agreement"] >= 0.999
    info = record["engine"]
    assert info["precision"] == "fp32" and info["source"].startswith("fastseg.deploy(runtime='onnxruntime'")
    assert info["folder"].startswith(str(cache_root / "engines"))
    assert "int8_payoff" not in info["report"]


def test_bench_fp16_engine_is_judged_against_eager_fp16(checkpoint, cache_root, monkeypatch, tmp_path, capsys):
    """An fp16 engine in an fp32 bench: its bound is eager fp16's own error against the fp32 gold."""
    monkeypatch.setenv("FASTSEG_CACHE_DIR", str(cache_root))
    out = tmp_path / "results"
    code = main(["bench", "--checkpoint", str(checkpoint), "--runtime", "onnxruntime", "--precision", "fp16", *BENCH,
                 "--out", str(out)])
    capsys.readouterr()
    record = _record(out)
    row = next(r for r in record["results"] if r["mode"] == "engine onnxruntime fp16")
    assert row["parity"] is True and code == 0, row["parity_note"]
    assert "eager" in row["parity_note"] and 0 < row["rms_rel_err"] < 1e-2
    assert "RMS error vs the fp32 gold <= 2x eager fp16's own" in record["parity_rule"]


def test_engine_rows_are_judged_by_their_precision():
    from fastseg import parity

    ok = {"finite": True, "argmax_agreement": 1.0, "agreement": 0.999, "rms_rel_err": 1e-3, "max_rel_err": 1e-3}
    low = dict(ok, agreement=0.98)
    assert parity.judge_engine(ok, "int8")[0] is True
    verdict, note = parity.judge_engine(low, "int8")
    assert verdict is False and "98.000%" in note and "99.5%" in note
    verdict, note = parity.judge_engine(low, "int8", trained=False)
    assert verdict is None and "not judged" in note
    assert parity.judge_engine(dict(ok, finite=False), "int8", trained=False)[0] is False
    assert parity.judge_engine(dict(ok, argmax_agreement=0.99), "fp32")[0] is False
    eager = {"finite": True, "rms_rel_err": 1e-3}
    assert parity.judge_engine(dict(ok, rms_rel_err=1.5e-3), "fp16", eager)[0] is True
    assert parity.judge_engine(dict(ok, rms_rel_err=3e-3), "bf16", eager)[0] is False
    with pytest.raises(ValueError, match="unknown engine precision"):
        parity.judge_engine(ok, "int4")


def test_bench_engine_bad_combinations_are_one_line_errors(checkpoint, tmp_path, capsys):
    cases = [
        (["--engine", str(tmp_path)], "needs --checkpoint"),
        (["--checkpoint", str(checkpoint), "--engine", str(tmp_path), "--runtime", "torch"], "already has both"),
        (["--runtime", "torch", "--backward"], "drop --backward"),
        (["--runtime", "torch", "--calibrate", str(tmp_path)], "--calibrate is for --precision int8"),
    ]
    for extra, needle in cases:
        assert main(["bench", *BENCH, "--out", str(tmp_path / "r"), *extra]) == 1, extra
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("fastseg bench: error: ") and needle in err[0], (extra, err)


def test_bench_refuses_an_engine_of_other_weights(checkpoint, tmp_path, capsys):
    other = fastseg.deploy(tiny_model(seed=1), "torch", "fp32", cache_dir=tmp_path / "cache")
    assert main(["bench", "--checkpoint", str(checkpoint), "--engine", str(other.folder), *BENCH,
                 "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastseg bench: error: ") and "other weights" in err and "\n" not in err


def test_bench_with_a_folder_that_is_not_an_engine_is_one_line(checkpoint, tmp_path):
    from test_cli_errors import fastseg as run_cli, one_line_error

    folder = tmp_path / "not_an_engine"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not an engine")
    result = run_cli("bench", "--checkpoint", checkpoint, "--engine", folder, *BENCH, "--out", tmp_path / "r")
    one_line_error(result, "bench", "not a complete engine folder", str(folder))


# --- does int8 pay off --------------------------------------------------------------------------------

def test_payoff_verdict_from_latencies():
    cpu = "Some CPU (family 1 model 2, Zen 9), no VNNI / AMX-INT8"
    slow = payoff.verdict(110.0, 100.0, runtime="openvino", shape="1x3x512x512", cpu=cpu)
    assert slow["pays_off"] is False and slow["speedup"] == pytest.approx(100 / 110, abs=1e-3)
    assert slow["int8_ms"] == 110.0 and slow["fp32_ms"] == 100.0
    assert "\n" not in slow["warning"] and cpu in slow["warning"] and "fp32 100.0 ms" in slow["warning"]
    tied = payoff.verdict(98.0, 100.0, runtime="openvino", shape="1x3x512x512", cpu=cpu)
    assert tied["pays_off"] is False  # 1.02x is within the noise of a few rounds: not faster
    fast = payoff.verdict(60.0, 100.0, runtime="onnxruntime", shape="1x3x64x64", cpu=cpu)
    assert fast["pays_off"] is True and "warning" not in fast and fast["speedup"] == pytest.approx(1.667, abs=1e-3)
    assert "WARNING" in payoff.line(slow) and "WARNING" not in payoff.line(fast)
    with pytest.warns(payoff.Int8SlowerWarning, match="not faster than fp32"):
        payoff.warn(slow)
    with pytest.raises(ValueError, match="positive"):
        payoff.verdict(0.0, 100.0, runtime="openvino", shape="1x3x8x8", cpu=cpu)
    assert "VNNI" in payoff.cpu_description() or "INT8" in payoff.cpu_description()


def test_int8_deploy_records_the_payoff_and_warns(int8_engine, cache_root, monkeypatch):
    """deploy(int8) builds the same runtime at fp32, records both latencies (injected here) in the
    report and engine.json, and warns when int8 is not faster; int8_timing=False (the fixture)
    skipped it without building fp32, and a later deploy takes the measurement."""
    assert "int8_payoff" not in int8_engine.report
    timed = []

    def fake_times(engines, size, rounds=engine_mod.AUTO_ROUNDS):
        timed.append(({n: (e.runtime, e.precision) for n, e in engines.items()}, size))
        return {"int8": 12.0, "fp32": 10.0}

    monkeypatch.setattr(engine_mod, "time_engines", fake_times)
    kw = dict(calibration=calibration(), input_size=(64, 64), int8_goal=0.0, cache_dir=cache_root / "engines")
    with pytest.warns(payoff.Int8SlowerWarning, match=r"int8 12\.0 ms vs fp32 10\.0 ms at 1x3x64x64"):
        engine = fastseg.deploy(tiny_model(), "onnxruntime", "int8", **kw)
    assert engine.folder == int8_engine.folder  # the cached int8 engine, measured now
    assert timed == [({"int8": ("onnxruntime", "int8"), "fp32": ("onnxruntime", "fp32")}, (64, 64))]
    entry = engine.report["int8_payoff"]
    assert {"int8_ms", "fp32_ms", "speedup", "pays_off", "cpu", "shape", "runtime"} <= set(entry)
    assert entry["pays_off"] is False and entry["fp32_ms"] == 10.0 and entry["runtime"] == "onnxruntime"
    assert "WARNING: int8 is not faster" in engine.report.summary()
    saved = json.loads((engine.folder / cache.MARKER).read_text())["report"]["int8_payoff"]
    assert saved == entry
    # a cache hit keeps the measurement (no second timing) and still warns
    with pytest.warns(payoff.Int8SlowerWarning):
        again = fastseg.deploy(tiny_model(), "onnxruntime", "int8", **kw)
    assert len(timed) == 1 and again.report["int8_payoff"] == entry
    assert fastseg.load_engine(engine.folder).report["int8_payoff"] == entry
