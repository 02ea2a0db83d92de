"""Shared set-up of the benchmark suites: sizes per mode, timing, parity, and a ratio summary.

Modes (environment):
  FASTSEG_BENCH_QUICK=1    tiny sizes, one round: what CI runs so the suite cannot rot
  (default)                small CPU sizes; on GPU 512² batch 1 and 8 and 1024×2048 batch 1
  FASTSEG_BENCH_FULL=1     every variant b0/b2/b5 at every size
  FASTSEG_BENCH_COMPILE=1  add torch.compile on CPU too (on GPU it is always included)
"""
from __future__ import annotations

import os

import pytest
import torch

from fastseg import cpu_info, parity
from fastseg.timing import PeakMemory, measure, median

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTSEG_BENCH_QUICK") == "1"
FULL = os.environ.get("FASTSEG_BENCH_FULL") == "1"
COMPILE = DEVICE.type == "cuda" or os.environ.get("FASTSEG_BENCH_COMPILE") == "1"
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

if QUICK:
    MODEL_CASES = [("b0", 1, 64, 64)]
    OP_IMAGE_SIZES = [(1, 64, 64)]
elif DEVICE.type == "cuda":
    variants = ["b0", "b2", "b5"] if FULL else ["b0", "b2"]
    MODEL_CASES = [(v, b, h, w) for v in variants for b, h, w in [(1, 512, 512), (8, 512, 512), (1, 1024, 2048)]]
    OP_IMAGE_SIZES = [(1, 512, 512), (8, 512, 512), (1, 1024, 2048)]
else:
    MODEL_CASES = [("b0", 1, 512, 512), ("b2", 1, 512, 512)] if FULL else [("b0", 1, 256, 256)]
    OP_IMAGE_SIZES = [(1, 512, 512)] if FULL else [(1, 256, 256)]

ROUNDS = 1 if QUICK else (20 if DEVICE.type == "cuda" else 3)
# Cheap calls get more rounds, up to this many or about this much time per benchmark: a median
# of 3 millisecond-scale CPU calls on a shared machine swings by tens of percent.
MAX_ROUNDS = 1 if QUICK else 100
ROUND_BUDGET_S = 0.5
WARMUP = 0 if QUICK else (5 if DEVICE.type == "cuda" else 1)

_records: list[dict] = []


def case_id(case) -> str:
    return "-".join(str(c) for c in case)


def check_parity(got: torch.Tensor, want: torch.Tensor, what: str, gold: torch.Tensor | None = None) -> float:
    """Relative max error of ``got`` vs ``want``; fails the benchmark if they disagree.

    With ``gold`` (the eager model's output in fp32) a low-precision ``got`` is judged by
    :mod:`fastseg.parity` instead: its error against the gold must stay within 2x eager's own
    (``want``'s); the returned error is then ``got``'s relative RMS error against the gold."""
    if gold is not None and want.dtype != torch.float32:
        mine, eager = parity.errors(got, gold), parity.errors(want, gold)
        ok, why = parity.judge(mine, eager, low_precision=True)
        assert ok, f"{what}: {why}"
        return mine["rms_rel_err"]
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    limit = 1e-3 if got.dtype == torch.float32 and DTYPE == torch.float32 else 5e-2
    assert err < limit, f"{what}: fused and eager disagree (max relative error {err:.2e})"
    return err


def run_benchmark(benchmark, fn, *, group: str, impl: str, cost=None, error: float | None = None):
    """Time ``fn`` with pytest-benchmark (synchronised on GPU) and with CUDA events / perf_counter
    for the median we report; attach achieved rates when the op's cost is known."""
    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = group
    one_call_s = median(measure(call, DEVICE, warmup=0, repeats=1)) / 1e3  # also a warm-up
    rounds = max(ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(one_call_s, 1e-6))))
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=WARMUP, iterations=1)
    ms = median(measure(fn, DEVICE, warmup=1 if not QUICK else 0, repeats=rounds))
    with PeakMemory(DEVICE) as mem:
        fn()
    info = {"impl": impl, "median_ms": ms, "peak_mem_mb": mem.peak / 2**20}
    if cost is not None:
        info.update(cost.rates(ms, DEVICE))
    if error is not None:
        info["max_rel_err"] = error
    benchmark.extra_info.update(info)
    _records.append({"group": group, **info})


def pytest_terminal_summary(terminalreporter):
    if not _records:
        return
    tr = terminalreporter
    tr.section(f"fastseg: fused vs eager on {DEVICE} ({str(DTYPE).replace('torch.', '')})")
    tr.write_line(f"CPU: {cpu_info.short(cpu_info.record())}")
    groups: dict[str, dict] = {}
    for r in _records:
        groups.setdefault(r["group"], {})[r["impl"]] = r
    tr.write_line(f"{'group':58s} {'eager ms':>9s} {'fused ms':>9s} {'speedup':>8s} {'compile ms':>10s} "
                  f"{'sdpa ms':>8s} {'peak MB e/f':>12s}  fused rates")
    for name, impls in groups.items():
        eager, fused, comp, sdpa = (impls.get(k) for k in ("eager", "fused", "compile", "sdpa"))
        if not eager or not fused:
            continue
        rates = ""
        if "GB/s" in fused:
            rates = f"{fused['GB/s']:.1f} GB/s, {fused['TFLOP/s']:.3f} TFLOP/s"
            if "mem_frac" in fused:
                rates += f" ({100 * fused['mem_frac']:.0f}% mem, {100 * fused['flop_frac']:.0f}% matmul ceiling)"
        mem = f"{eager['peak_mem_mb']:.0f}/{fused['peak_mem_mb']:.0f}"
        tr.write_line(f"{name:58s} {eager['median_ms']:9.2f} {fused['median_ms']:9.2f} "
                      f"{eager['median_ms'] / fused['median_ms']:7.2f}x "
                      f"{comp['median_ms'] if comp else float('nan'):10.2f} "
                      f"{sdpa['median_ms'] if sdpa else float('nan'):8.2f} {mem:>12s}  {rates}")
    tr.write_line("peak MB: CUDA allocator peak on GPU; sampled process RSS growth on CPU (approximate)")


def pytest_benchmark_update_machine_info(config, machine_info):
    """--benchmark-json records carry fastseg's CPU identity (ISA flags, oneDNN's ISA, threads)."""
    machine_info["fastseg_cpu"] = cpu_info.record()


@pytest.fixture
def device():
    return DEVICE
