"""One command that turns a GPU machine into results: build, CUDA tests, op and model benchmarks,
the training step, with a timeout per step inside a global budget.

    python -m fastseg.gpu_check --out OUTDIR [--budget 480] [--cpu-rehearsal]
    benchmarks/gpu_check.sh OUTDIR                       (the same, from the repository root)

Steps, in order (each one a subprocess with its own timeout, so a hang loses one step, not the run):
  1. build   the extension for sm_90 only with all cores (pip, offline, editable)
  2. tests   the test files that run CUDA kernels, JUnit XML (no -x)
  3. ops     the per-op benchmarks (eager / fused / SDPA; torch.compile where the budget allows)
  4. bench   ``fastseg bench`` for b0 / b2 / b5 bf16 batch 8 at 512x512 and b2 1024x2048 batch 1:
             eager, fused and torch.compile (compile while the budget allows)
  5. train   the training step, b2 512x512 batch 8 bf16 (forward + backward, eager vs fused)
  6. tune    fastseg.tune on b2 512x512 batch 8 bf16: where measurement beats the static order
OUTDIR gets at most 6 flat files: gpu_check.json (everything), gpu_check.md (the tables),
gpu_check.log (every step's command and output), junit.xml, op_benchmarks.json and
environment.txt. The last thing printed is the summary table.

``--cpu-rehearsal`` runs the same script without a GPU: tiny sizes, the Triton kernels under
Triton's interpreter in the tests and ops steps (the model steps use the CPU backends: a whole
model interpreted takes minutes), the CUDA-only steps reported as skipped. The test suite runs it, so the
script is known to work before a GPU runs it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480
# Test files that run CUDA kernels when a GPU is present (their CPU cases run too: cheap).
CUDA_TEST_FILES = ("tests/test_sr_attention_kernel.py", "tests/test_dwconv3x3_gelu_kernel.py",
                   "tests/test_decoder_upsample_fuse_kernel.py", "tests/test_sr_attention_op.py",
                   "tests/test_dwconv3x3_gelu_op.py", "tests/test_overlap_patch_embed.py",
                   "tests/test_upsample_argmax.py", "tests/test_fused_segformer.py")
# The least time each later step gets (s): a step's timeout leaves this much for the ones after it.
MIN_TESTS, MIN_OPS, MIN_BENCH, MIN_TRAIN = 60, 45, 30, 40
BENCH_STEPS = 4


def _session_timeout(seconds: float) -> list[str]:
    """pytest-timeout's --session-timeout (2.3+), where installed: pytest stops after the
    current test and still writes its JUnit / benchmark JSON, so a slow step keeps its results."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(v) for v in version("pytest-timeout").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return []
    return ["--session-timeout", str(int(max(10, seconds - 15)))] if (major, minor) >= (2, 3) else []


# ROOFLINE.md's rule for a floor: max(FLOPs / 790 TFLOP/s, minimum bytes / 3.0 TB/s).
ROOF_FLOPS, ROOF_BYTES = 790e12, 3.0e12


class Run:
    def __init__(self, out: Path, budget_s: float, rehearsal: bool):
        self.out = out
        self.rehearsal = rehearsal
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.work = Path(tempfile.mkdtemp(prefix="fastseg-gpu-check-"))
        self.steps: list[dict] = []
        self.log = open(out / "gpu_check.log", "w", encoding="utf-8")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def env(self, triton: bool = False, **extra) -> dict:
        """The steps' environment; in the rehearsal no GPU is visible and Triton interprets, and
        ``triton`` makes the fused ops run the Triton kernels (not the CPU torch backends)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.rehearsal:
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
            if triton:
                env["FASTSEG_BACKEND"] = "triton"
        return env

    def skip(self, name: str, why: str, **info) -> dict:
        step = {"name": name, "status": "skipped", "why": why, "seconds": 0.0, **info}
        self.steps.append(step)
        self._say(f"== {name}: skipped ({why})")
        return step

    def step(self, name: str, cmd: list[str], timeout: float, env: dict | None = None, **info) -> dict:
        """Run ``cmd`` with a timeout (never past the budget); output goes to the log."""
        timeout = min(timeout, self.left())
        if timeout < 5:
            return self.skip(name, "global budget spent", cmd=" ".join(cmd), **info)
        self._say(f"== {name} (timeout {timeout:.0f} s): {' '.join(cmd)}")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env or self.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
            output, rc = proc.stdout, proc.returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, status = None, "timeout"
        seconds = time.monotonic() - t0
        self.log.write(output + f"\n== {name}: {status} (exit code {rc}) in {seconds:.1f} s\n\n")
        self.log.flush()
        tail = "\n".join(output.splitlines()[-3:])
        self._say(f"   {status} in {seconds:.0f} s" + (f"\n{tail}" if status != "ok" else ""))
        step = {"name": name, "status": status, "returncode": rc, "seconds": round(seconds, 1),
                "cmd": " ".join(cmd), **info}
        self.steps.append(step)
        return step

    def _say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()


# --- facts ---------------------------------------------------------------------------------------

def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        return out.splitlines()[-1].strip() if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch

    facts = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
             "cuda_runtime": torch.version.cuda, "cpus": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("triton", "pytest", "pytest-benchmark"):
        try:
            facts[pkg] = version(pkg)
        except PackageNotFoundError:
            facts[pkg] = None
    try:
        facts["fastseg"] = version("fastseg")
    except PackageNotFoundError:
        from fastseg.version import __version__
        facts["fastseg"] = __version__
    from fastseg import cpu_info

    facts["cpu"] = cpu_info.short(cpu_info.record())  # the host: it runs the CPU rehearsal and the data loading
    facts["git"] = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    facts["nvcc"] = _first_line(["nvcc", "--version"]) if shutil.which("nvcc") else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                     capability=f"{p.major}.{p.minor}")
        facts["driver"] = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        facts.update(gpu=None, driver=None)
    return facts


# --- steps ---------------------------------------------------------------------------------------

def build(run: Run, cuda: bool) -> None:
    if not cuda:
        run.skip("build", "no CUDA device (the CPU rehearsal uses the extension already installed)")
        return
    jobs = str(os.cpu_count() or 16)
    run.step("build", [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps",
                       "-e", "."], 200, env=run.env(FASTSEG_CUDA_ARCHS="9.0", MAX_JOBS=jobs, FASTSEG_REQUIRE_EXT="1"))


def junit_groups(path: Path) -> dict:
    """{test file: {passed, failed, skipped}} from a JUnit XML file."""
    groups: dict[str, dict] = {}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return groups
    for case in root.iter("testcase"):
        name = (case.get("classname") or "?").split(".")
        group = next((part for part in name if part.startswith("test_")), name[-1])
        g = groups.setdefault(group, {"passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            g["failed"] += 1
        elif case.find("skipped") is not None:
            g["skipped"] += 1
        else:
            g["passed"] += 1
    return groups


def tests(run: Run, cuda: bool) -> None:
    junit = run.out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o",
           "junit_family=xunit1"]
    if cuda:
        timeout = max(MIN_TESTS, min(120.0, run.left() - MIN_OPS - BENCH_STEPS * MIN_BENCH - MIN_TRAIN))
        cmd += list(CUDA_TEST_FILES) + _session_timeout(timeout)
    else:  # rehearsal: one small file's Triton cases under the interpreter (its CUDA cases skip)
        cmd += ["tests/test_dwconv3x3_gelu_kernel.py", "-k", "strided_inputs"]
        timeout = 60
    step = run.step("tests", cmd, timeout)
    step["groups"] = junit_groups(junit)


def op_benchmarks(run: Run, cuda: bool) -> None:
    path = run.out / "op_benchmarks.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_op_benchmarks.py",
           "--benchmark-only", f"--benchmark-json={path}"]
    env = run.env(triton=True)
    if cuda:
        # Full sizes: b0/b2 shapes at 512x512 batch 8 and 1024x2048 batch 1 (bf16); torch.compile
        # of every op only with room to spare in the budget.
        reserve = BENCH_STEPS * MIN_BENCH + MIN_TRAIN
        with_compile = run.left() - reserve > 300
        cmd += ["-k", "(8-512-512 or 1-1024-2048)" + ("" if with_compile else " and not compile")]
        timeout = max(MIN_OPS, min(240.0 if with_compile else 120.0, run.left() - reserve))
        step = run.step("ops", cmd + _session_timeout(timeout), timeout, env=env, compile=with_compile)
    else:
        env["FASTSEG_BENCH_QUICK"] = "1"
        cmd += ["-k", "test_sr_attention and b0-s1 and not compile"]  # the cheapest op to interpret
        step = run.step("ops", cmd, 60, env=env, compile=False,
                        backend=f"FASTSEG_BACKEND={env['FASTSEG_BACKEND']} TRITON_INTERPRET={env['TRITON_INTERPRET']}")
    step["ops"] = op_rows(path)


def op_rows(path: Path) -> list[dict]:
    """Per benchmark group: eager / fused / compile / sdpa ms and the fused op against its floor."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    groups: dict[str, dict] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        impl, ms = info.get("impl"), info.get("median_ms")
        if impl is None or ms is None:
            continue
        g = groups.setdefault(b.get("group") or b["name"], {"group": b.get("group") or b["name"]})
        g[f"{impl}_ms"] = ms
        if impl == "fused" and "GB/s" in info:
            seconds = ms / 1e3
            nbytes, flops = info["GB/s"] * 1e9 * seconds, info["TFLOP/s"] * 1e12 * seconds
            g["floor_ms"] = max(flops / ROOF_FLOPS, nbytes / ROOF_BYTES) * 1e3
            g["vs_floor"] = ms / g["floor_ms"] if g["floor_ms"] > 0 else None
    return list(groups.values())


def model_bench(run: Run, cuda: bool, name: str, variant: str, h: int, w: int, batch: int, backward: bool,
                later_steps: int) -> None:
    dtype = "bf16" if cuda else "fp32"
    out = run.work / name
    cmd = [sys.executable, "-m", "fastseg", "bench", "--variant", variant, "--height", str(h), "--width", str(w),
           "--batch", str(batch), "--dtype", dtype, "--out", str(out), "--no-plot", "--quiet"]
    if backward:
        cmd.append("--backward")
    if cuda:
        cmd += ["--warmup", "3", "--repeats", "10"]
        reserve = MIN_BENCH * max(0, later_steps - 1) + (0 if backward else MIN_TRAIN)
        # torch.compile of a whole model takes 30-90 s: only while the budget has room for it.
        with_compile = not backward and run.left() - reserve > 150
        if with_compile:
            cmd.append("--compile")
        timeout = max(float(MIN_TRAIN if backward else MIN_BENCH),
                      min(180.0 if with_compile else 75.0, run.left() - reserve))
        step = run.step(name, cmd, timeout, compile=with_compile)
        if step["status"] == "timeout" and with_compile and run.left() - reserve > 45:
            cmd.remove("--compile")  # keep eager / fused numbers at least
            step = run.step(name + " (no compile)", cmd, min(75.0, run.left() - reserve), compile=False)
    else:
        cmd += ["--warmup", "0", "--repeats", "1", "--no-gemm-profile"]
        # The whole model under the interpreter takes minutes: CPU backends here; the tests and
        # ops steps ran the Triton kernels.
        step = run.step(name, cmd, 60, compile=False)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))] if out.exists() else []
    step["record"] = records[-1] if records else None


_TUNE_SCRIPT = """
import json, sys, torch, fastseg
variant, size, batch, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = fastseg.SegFormer(variant, num_classes=150).to(device, dtype).eval().set_fused(True)
report = fastseg.tune(model, torch.randn(batch, 3, size, size, device=device, dtype=dtype), save_cache=False)
print("TUNE " + json.dumps(report))
"""


def tune_step(run: Run, cuda: bool) -> None:
    """Where measurement and the static order disagree (fastseg.tune on the b2 512x512 model)."""
    args = ["b2", "512", "8", "bfloat16"] if cuda else ["b0", "32", "1", "float32"]
    if run.left() < 20:
        run.skip("tune", "global budget spent")
        return
    env = run.env(FASTSEG_CACHE_DIR=str(run.work / "tune-cache"))
    step = run.step("tune " + " ".join(args[:3]), [sys.executable, "-c", _TUNE_SCRIPT, *args], min(60.0, run.left()),
                    env=env)
    text = (run.out / "gpu_check.log").read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.startswith("TUNE ")]
    report = json.loads(lines[-1][5:]) if lines and step["status"] == "ok" else {}
    step["tuned"] = [{"op": op, "shape": shape, "backend": e["backend"], "static": e["static"],
                      "timings_ms": e["timings_ms"], "rejected": e["rejected"]}
                     for op, entries in report.items() for shape, e in entries.items()]


def _ms(record: dict | None, mode: str) -> float | None:
    if not record:
        return None
    return next((r["median_ms"] for r in record["results"] if r["mode"] == mode), None)


# --- report --------------------------------------------------------------------------------------

def _fmt(v, spec=".2f", suffix="") -> str:
    return "–" if v is None else format(v, spec) + suffix


def summary_tables(result: dict) -> str:
    lines = [f"fastseg GPU check — {result['environment'].get('gpu') or 'CPU rehearsal (no GPU)'}, "
             f"driver {result['environment'].get('driver') or '–'}, torch {result['environment']['torch']}, "
             f"triton {result['environment'].get('triton')}, {result['environment']['date']}, "
             f"{result['seconds']:.0f} s of {result['budget_s']:.0f} s", ""]
    lines += ["| step | status | s |", "|---|---|---:|"]
    for s in result["steps"]:
        lines.append(f"| {s['name']} | {s['status']}{' (' + s['why'] + ')' if s.get('why') else ''} | {s['seconds']:.0f} |")
    tests = next((s for s in result["steps"] if s["name"] == "tests"), None)
    if tests and tests.get("groups"):
        lines += ["", "| test group | passed | failed | skipped |", "|---|---:|---:|---:|"]
        for g, c in sorted(tests["groups"].items()):
            lines.append(f"| {g} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    ops = next((s for s in result["steps"] if s["name"] == "ops"), None)
    if ops and ops.get("ops"):
        lines += ["", "| op benchmark | eager ms | fused ms | compile ms | sdpa ms | eager/fused | floor ms | fused/floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for g in ops["ops"]:
            ratio = g["eager_ms"] / g["fused_ms"] if g.get("eager_ms") and g.get("fused_ms") else None
            lines.append(f"| {g['group']} | {_fmt(g.get('eager_ms'), '.3f')} | {_fmt(g.get('fused_ms'), '.3f')} | "
                         f"{_fmt(g.get('compile_ms'), '.3f')} | {_fmt(g.get('sdpa_ms'), '.3f')} | "
                         f"{_fmt(ratio, suffix='x')} | {_fmt(g.get('floor_ms'), '.3g')} | "
                         f"{_fmt(g.get('vs_floor'), '.3g', 'x')} |")
    models = [s for s in result["steps"] if s.get("record")]
    if models:
        lines += ["", "| model | pass | eager ms | fused ms | compile ms | eager/fused | compile/fused | fused parity |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for s in models:
            r = s["record"]
            c = r["config"]
            e, f, k = _ms(r, "eager"), _ms(r, "fused"), _ms(r, "compile")
            fused = next((x for x in r["results"] if x["mode"] == "fused"), {})
            parity = "ok" if fused.get("finite", True) and fused.get("argmax_agreement", 1) >= 0.999 else "CHECK"
            lines.append(f"| {c['variant']} {c['height']}x{c['width']} b{c['batch']} {c['dtype']} | {c['pass']} | "
                         f"{_fmt(e)} | {_fmt(f)} | {_fmt(k)} | {_fmt(e / f if e and f else None, suffix='x')} | "
                         f"{_fmt(k / f if k and f else None, suffix='x')} | {parity} |")
    tuned = [t for s in result["steps"] for t in s.get("tuned", [])]
    if tuned:
        lines += ["", "| tuned op (shape class) | tuned | static | timings ms |", "|---|---|---|---|"]
        for t in tuned:
            times = ", ".join(f"{k} {v:.3g}" for k, v in sorted(t["timings_ms"].items(), key=lambda kv: kv[1]))
            lines.append(f"| {t['op']} ({t['shape']}) | {t['backend']} | {t['static']} | {times} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastseg.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (flat: JSON, Markdown, logs)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="global budget in seconds (default 480)")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="no GPU: tiny sizes, Triton under its interpreter, CUDA steps skipped")
    p.add_argument("--skip-build", action="store_true", help="use the extension already built")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget, args.cpu_rehearsal)
    env = environment()
    cuda = env["gpu"] is not None and not args.cpu_rehearsal
    if not cuda and not args.cpu_rehearsal:
        print("gpu_check: no CUDA device; use --cpu-rehearsal to rehearse on CPU", file=sys.stderr)
        return 2
    (out / "environment.txt").write_text("\n".join(f"{k}: {v}" for k, v in env.items()) + "\n")
    try:
        if args.skip_build:
            run.skip("build", "--skip-build")
        else:
            build(run, cuda)
        tests(run, cuda)
        op_benchmarks(run, cuda)
        if cuda:
            configs = [("bench b0 512 b8", "b0", 512, 512, 8), ("bench b2 512 b8", "b2", 512, 512, 8),
                       ("bench b5 512 b8", "b5", 512, 512, 8), ("bench b2 1024x2048 b1", "b2", 1024, 2048, 1)]
        else:
            configs = [("bench b0 32 b1", "b0", 32, 32, 1)]
        for i, (name, variant, h, w, b) in enumerate(configs):
            model_bench(run, cuda, name, variant, h, w, b, False, later_steps=len(configs) - i)
        if cuda:
            model_bench(run, cuda, "train b2 512 b8", "b2", 512, 512, 8, True, later_steps=0)
        else:
            model_bench(run, cuda, "train b0 32 b1", "b0", 32, 32, 1, True, later_steps=0)
        tune_step(run, cuda)
    finally:
        run.log.close()
        shutil.rmtree(run.work, ignore_errors=True)
    result = {"schema": "fastseg-gpu-check/1", "rehearsal": args.cpu_rehearsal, "budget_s": args.budget,
              "seconds": round(time.monotonic() - run.t0, 1), "environment": env,
              "command": "python -m fastseg.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": run.steps}
    from fastseg.io import atomic_write

    with atomic_write(out / "gpu_check.json", "w") as f:
        json.dump(result, f, indent=1)
    table = summary_tables(result)
    with atomic_write(out / "gpu_check.md", "w") as f:
        f.write(f"# fastseg GPU check\n\n- command: `{result['command']}`\n"
                + "".join(f"- {k}: {v}\n" for k, v in env.items()) + "\n" + table + "\n")
    print()
    print(table)
    bad = [s["name"] for s in run.steps if s["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
