"""The one-command GPU validation (python -m fastseg.gpu_check): its CPU rehearsal runs end to end
(tiny sizes, Triton under the interpreter, CUDA steps skipped), and its parsers and report read
the files the steps write."""
import json
import os
import subprocess
import sys
from pathlib import Path

from fastseg import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_cpu_rehearsal_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "fastseg.gpu_check", "--out", str(out), "--cpu-rehearsal",
                           "--budget", "150"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8, files  # flat, few files
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log", "junit.xml"} <= set(files)

    result = json.loads((out / "gpu_check.json").read_text())
    assert result["rehearsal"] and result["environment"]["gpu"] is None
    assert result["environment"]["torch"] and result["environment"]["date"]
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["build"]["status"] == "skipped"
    assert [s["status"] for s in result["steps"] if s["name"] != "build"] == ["ok"] * (len(steps) - 1)
    groups = steps["tests"]["groups"]
    assert groups and sum(g["passed"] for g in groups.values()) >= 1
    assert sum(g["skipped"] for g in groups.values()) >= 1  # the CUDA cases
    assert steps["ops"]["ops"] and all(g.get("fused_ms") for g in steps["ops"]["ops"])
    benches = [s for s in result["steps"] if s.get("record")]
    assert len(benches) == 2 and {s["record"]["config"]["pass"] for s in benches} == {"forward", "forward+backward"}
    assert steps["ops"]["backend"] == "FASTSEG_BACKEND=triton TRITON_INTERPRET=1"  # Triton kernels, interpreted

    # The summary table is the last thing printed.
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("| ") and any(line.startswith("| model |") for line in tail)
    assert "| step | status |" in proc.stdout and "CPU rehearsal" in proc.stdout


def test_junit_groups_and_op_rows(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="t1"/>'
        '<testcase classname="tests.test_a" name="t2"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="t3"><skipped message="no gpu"/></testcase>'
        '</testsuite></testsuites>')
    assert gpu_check.junit_groups(junit) == {"test_a": {"passed": 1, "failed": 1, "skipped": 0},
                                             "test_b": {"passed": 0, "failed": 0, "skipped": 1}}
    assert gpu_check.junit_groups(tmp_path / "missing.xml") == {}

    bench = tmp_path / "b.json"
    # fused: 1 GB and 0.079 TFLOP in 1 ms -> floor max(1e9 / 3e12, 7.9e10 / 7.9e14) s = 1/3 ms
    bench.write_text(json.dumps({"benchmarks": [
        {"group": "op g", "name": "x", "extra_info": {"impl": "eager", "median_ms": 4.0}},
        {"group": "op g", "name": "y", "extra_info": {"impl": "fused", "median_ms": 1.0, "GB/s": 1000.0,
                                                       "TFLOP/s": 79.0}},
    ]}))
    (row,) = gpu_check.op_rows(bench)
    assert row["eager_ms"] == 4.0 and row["fused_ms"] == 1.0
    assert abs(row["floor_ms"] - 1 / 3) < 1e-9 and abs(row["vs_floor"] - 3.0) < 1e-9
    assert gpu_check.op_rows(tmp_path / "missing.json") == []


def test_summary_reports_ratios():
    record = {"config": {"variant": "b2", "height": 512, "width": 512, "batch": 8, "dtype": "bf16",
                         "pass": "forward"},
              "results": [{"mode": "eager", "median_ms": 30.0}, {"mode": "fused", "median_ms": 10.0,
                                                                  "finite": True, "argmax_agreement": 1.0},
                          {"mode": "compile", "median_ms": 20.0}]}
    result = {"environment": {"gpu": "NVIDIA H200", "driver": "580", "torch": "2.11", "triton": "3.6",
                              "date": "2026-12-01"}, "seconds": 400.0, "budget_s": 480.0,
              "steps": [{"name": "bench b2 512 b8", "status": "ok", "seconds": 60.0, "record": record},
                        {"name": "tests", "status": "ok", "seconds": 100.0,
                         "groups": {"test_x": {"passed": 3, "failed": 1, "skipped": 0}}}]}
    text = gpu_check.summary_tables(result)
    assert "NVIDIA H200" in text and "| test_x | 3 | 1 | 0 |" in text
    assert "| b2 512x512 b8 bf16 | forward | 30.00 | 10.00 | 20.00 | 3.00x | 2.00x | ok |" in text


def test_shell_wrapper_calls_the_module():
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert "-m fastseg.gpu_check --out" in text
