"""`fastseg bench` end to end at a tiny size, and the benchmark suite in its quick mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

from fastseg.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_fastseg_bench_writes_json_table_and_plot(tmp_path, capsys):
    results = tmp_path / "benchmarks" / "results"
    readme = tmp_path / "benchmarks" / "README.md"
    readme.parent.mkdir(parents=True)
    readme.write_text("# results\n<!-- results:begin -->\n<!-- results:end -->\n")
    code = main(["bench", "--height", "64", "--width", "48", "--repeats", "2", "--warmup", "1",
                 "--out", str(results), "--quiet", "--no-gemm-profile"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| eager |" in printed and "| fused |" in printed
    record = json.loads(next(results.glob("*.json")).read_text())
    assert record["schema"] == "fastseg-bench/1"
    assert {"date", "command", "device", "versions", "config", "backends", "results"} <= set(record)
    assert record["config"]["height"] == 64 and record["config"]["batch"] == 1
    modes = {r["mode"]: r for r in record["results"]}
    assert set(modes) == {"eager", "fused"}
    for r in modes.values():
        assert {"median_ms", "images_per_s", "speedup", "max_rel_err", "argmax_agreement", "peak_mem_mb"} <= set(r)
        assert r["median_ms"] > 0 and r["finite"]
    assert modes["fused"]["argmax_agreement"] >= 0.999
    png = next(results.glob("*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert next(results.glob("*.md")).read_text().count("|") > 10
    assert "SegFormer-b0" in readme.read_text() and "fused ms" in readme.read_text()


def test_benchmark_suite_quick_mode_runs():
    env = dict(os.environ, FASTSEG_BENCH_QUICK="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fastseg: fused vs eager" in proc.stdout
    for group in ("sr_attention", "dwconv3x3_gelu", "decoder", "overlap_patch_embed", "SegFormer forward"):
        assert group in proc.stdout


def test_fastseg_bench_peers_rows_share_the_weights(tmp_path):
    """--peers: HF eager and both ONNX files in both runtimes, on the same weights and input,
    every row judged by the parity rule, and fused's ratio over each row recorded."""
    import pytest

    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    # In its own process: the ONNX Runtime and OpenVINO thread pools stay out of the test runner.
    proc = subprocess.run([sys.executable, "-m", "fastseg", "bench", "--height", "64", "--width", "96", "--repeats",
                           "1", "--warmup", "0", "--peers", "--out", str(tmp_path), "--quiet", "--no-plot",
                           "--no-gemm-profile"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {r["mode"]: r for r in record["results"]}
    assert set(rows) == {"eager", "fused", "HF eager", "ONNX Runtime on HF ONNX", "ONNX Runtime on fastseg ONNX",
                         "OpenVINO on HF ONNX", "OpenVINO on fastseg ONNX"}
    for r in rows.values():
        assert r["parity"] and r["max_rel_err"] < 1e-4, r
        assert r["fused_speedup_over"] > 0
    assert rows["fused"]["fused_speedup_over"] == 1.0
    assert "interleaved" in record["timing"] and record["notes"] == []
    ratios = record["peer_ratios"]
    assert ratios["fused vs OpenVINO (HF ONNX)"] == rows["OpenVINO on HF ONNX"]["fused_speedup_over"]
    assert ratios["fused vs OpenVINO (fastseg ONNX)"] == rows["OpenVINO on fastseg ONNX"]["fused_speedup_over"]


def test_fastseg_bench_peers_refuses_what_it_cannot_compare(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--peers"):
        main(["bench", "--height", "64", "--width", "64", "--peers", "--backward", "--out", str(tmp_path), "--quiet"])


def test_openvino_runs_bf16_only_where_the_cpu_has_it(tmp_path):
    """OpenVINO compiles f32 whatever the hint says on a CPU without bf16: the peer refuses that
    (a note in the table) instead of timing an f32 run under a bf16 label."""
    import pytest
    import torch

    ov = pytest.importorskip("openvino")
    from fastseg import peers

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 9, 9),), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    shape = (1, 3, 9, 9)
    assert peers._session(path, "openvino", torch.float32, shape)(torch.randn(shape).numpy()).shape == (1, 4, 7, 7)
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert peers._session(path, "openvino", torch.bfloat16, shape)(torch.randn(shape).numpy()).shape == (1, 4, 7, 7)
    else:
        with pytest.raises(peers.PrecisionUnavailable, match="no bf16 on this CPU"):
            peers._session(path, "openvino", torch.bfloat16, shape)
