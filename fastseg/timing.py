"""Timing and cost accounting shared by ``fastseg bench`` and the pytest-benchmark suites.

GPU: CUDA events around each call after warm-up; CPU: ``time.perf_counter``. Medians, never
means. Costs (bytes moved and FLOPs of each fused op at its minimum: every input read once,
every output written once) give achieved GB/s and TFLOP/s, and the fraction of the device's
ceilings where the device is known.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

# Dense peak numbers from the vendor sheets (SXM parts): memory bytes/s, 16-bit tensor FLOP/s.
DEVICE_CEILINGS = {
    "H100": (3.35e12, 989e12),
    "H200": (4.8e12, 989e12),
    "A100": (2.0e12, 312e12),
}


def ceilings(device: torch.device) -> tuple[float, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DEVICE_CEILINGS.items():
        if key in name:
            return value
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from fastseg import cpu_info

    return f"CPU {cpu_info.identity()['model_name']} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int = 2, repeats: int = 10, on_step=None) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
        if on_step:
            on_step()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if on_step:
            on_step()
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def interleaved(calls: dict, rounds: int, warmup: int = 1, device: torch.device = torch.device("cpu")) -> dict:
    """{name: [ms of each round]}: ``warmup`` untimed calls of each, then ``rounds`` rounds that
    call every one once, in an order that rotates each round, so drift in the machine's speed
    (other load, clocks) falls on every call alike. ``calls``: {name: fn()}."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    sync(device)
    times: dict = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            times[name].extend(measure(calls[name], device, warmup=0, repeats=1))
    return times


class PeakMemory:
    """Peak memory of the code inside the ``with`` block, in bytes above the level at entry.

    CUDA: the caching allocator's peak. CPU: the process's resident set, sampled every 1 ms by
    a thread (after returning freed heap to the OS with glibc's malloc_trim, where available) —
    an approximation, labelled as such in reports.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = _rss()
            self._high = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._high = max(self._high, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, _rss()) - self._base
        return False


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- minimum cost of each fused op ----------------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    def rates(self, ms: float, device: torch.device) -> dict:
        """Achieved GB/s and TFLOP/s at ``ms``, and the fraction of the device's ceilings."""
        seconds = ms / 1e3
        out = {"GB/s": self.bytes / seconds / 1e9, "TFLOP/s": self.flops / seconds / 1e12}
        ceil = ceilings(device)
        if ceil:
            out["mem_frac"] = self.bytes / seconds / ceil[0]
            out["flop_frac"] = self.flops / seconds / ceil[1]
        return out


def attention_cost(B, N, Nkv, C, heads, itemsize) -> Cost:
    """q (B,N,C), kv (B,Nkv,2C) read once, out (B,N,C) written once; QKᵀ and PV GEMMs."""
    return Cost((2 * B * N * C + 2 * B * Nkv * C) * itemsize, 4 * B * N * Nkv * C)


def dwconv_gelu_cost(B, N, C, itemsize) -> Cost:
    """One read and one write of the (B, N, C) tensor; 9 multiply-adds + bias + GELU (~10 FLOP)."""
    return Cost(2 * B * N * C * itemsize + 10 * C * itemsize, B * N * C * (18 + 1 + 10))


def decoder_cost(B, H, W, E, K, small_pixels, itemsize) -> Cost:
    """The small projected maps read once and the logits written once (the rewrite's floor);
    bilinear resize (4 multiply-adds per map per channel) and the classifier GEMM."""
    read = B * (H * W + small_pixels) * E * itemsize
    flops = B * H * W * E * (3 * 8 + 2) + 2 * B * H * W * E * K
    return Cost(read + B * H * W * K * itemsize, flops)


def patch_embed_cost(B, Hi, Wi, Cin, Ho, Wo, C, k, itemsize) -> Cost:
    return Cost((B * Hi * Wi * Cin + B * Ho * Wo * C + C * Cin * k * k) * itemsize,
                2 * B * Ho * Wo * C * Cin * k * k + 8 * B * Ho * Wo * C)
