"""This CPU's GEMM rate — aten against oneDNN, fp32 and bf16 — and how much of it a model gets.

Two GEMM paths exist for an inference linear on CPU:
  ``aten``    ``torch.addmm(bias, x, wᵀ)``: what ``F.linear`` runs (MKL or oneDNN, as torch's
              build and heuristics pick; MKL runs at about half speed on some AMD CPUs)
  ``onednn``  ``torch.ops.mkldnn._linear_pointwise`` with the weight packed once by
              ``torch.ops.mkldnn._reorder_linear_weight`` (what inductor's freezing pass emits)
:func:`measure` times one of them on one shape; :func:`peak` is the best rate on
:data:`PEAK_SHAPE`, measured once per (CPU, flags, torch, threads) and cached on disk, so that
``fastseg bench`` can state a model's GEMM GFLOP/s against it. :func:`profile_gemms` counts
what a forward actually spends in GEMMs (FLOPs from the recorded shapes, wall time from
``torch.profiler``). ``benchmarks/gemm_peak.py`` writes the whole table (peak and SegFormer's
own shapes) to ``benchmarks/results``.

Timings are best-of and median of repeats within a time budget; a shared machine makes them
noisy, and the records say under which CPU and thread count they were taken.
"""
from __future__ import annotations

import json
import time

import torch

from fastseg import cpu_info

IMPLS = ("aten", "onednn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (M, K, N) of x (M×K) · wᵀ (K×N): a large square-ish shape for the peak ...
PEAK_SHAPE = (2048, 1024, 1024)
# ... and SegFormer's own linears at 512², batch 1 (M = tokens of the stage).
SEGFORMER_SHAPES = {
    "b0 stage 1 fc1 (16384×32·32×128)": (16384, 32, 128),
    "b2 stage 1 fc1 (16384×64·64×256)": (16384, 64, 256),
    "b2 stage 1 fc2 (16384×256·256×64)": (16384, 256, 64),
    "b2 stage 2 fc1 (4096×128·128×512)": (4096, 128, 512),
    "b2 stage 3 fc1 (1024×320·320×1280)": (1024, 320, 1280),
    "b2 stage 4 fc1 (256×512·512×2048)": (256, 512, 2048),
    "b2 decoder classifier (16384×768·768×150)": (16384, 768, 150),
}
# The profiler names of the ops that are linear-layer GEMMs (attention's batched GEMMs are not
# counted: SDPA on CPU runs them inside one fused op).
GEMM_OPS = ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear")


class Unsupported(RuntimeError):
    """This implementation cannot run this dtype on this CPU (the message says why)."""


def gemm_fn(impl: str, shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0):
    """A callable running one ``impl`` GEMM of ``shape`` (M, K, N) with bias; raises :class:`Unsupported`."""
    if impl not in IMPLS:
        raise ValueError(f"GEMM implementation must be one of {IMPLS}, got {impl!r}")
    m, k, n = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    if impl == "aten":
        return lambda: torch.addmm(b, x, w.t())
    if not torch.backends.mkldnn.is_available():
        raise Unsupported("torch is built without oneDNN")
    mkldnn = torch.ops.mkldnn
    try:
        packed = mkldnn._reorder_linear_weight(w, m)
        mkldnn._linear_pointwise(x[:1], packed, b, "none", [], "")
    except (RuntimeError, AttributeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if dtype == torch.bfloat16 and not cpu_info.onednn_bf16():
            why = "oneDNN has no bf16 GEMM on this CPU (needs AVX512BW/VL/DQ, AVX-NE-CONVERT or AMX)"
        raise Unsupported(why) from None
    return lambda: mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def measure(impl: str, shape: tuple[int, int, int], dtype: torch.dtype, budget_s: float = 0.3,
            min_repeats: int = 3, max_repeats: int = 50) -> dict:
    """GFLOP/s of ``impl`` on ``shape``: ``best`` (the least disturbed repeat) and ``median``.

    One warm-up call, then repeats until ``budget_s`` has passed (at least ``min_repeats``).
    An implementation that cannot run returns ``{"unsupported": reason}``."""
    try:
        fn = gemm_fn(impl, shape, dtype)
    except Unsupported as e:
        return {"unsupported": str(e)}
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    flops = 2.0 * shape[0] * shape[1] * shape[2]
    times.sort()
    median = times[len(times) // 2]
    return {"best_gflops": flops / times[0] / 1e9, "median_gflops": flops / median / 1e9,
            "median_ms": median * 1e3, "repeats": len(times)}


def sweep(shapes: dict, dtypes=("fp32", "bf16"), impls=IMPLS, budget_s: float = 0.3) -> list[dict]:
    """One row per (shape, dtype, impl): :func:`measure`'s fields plus what was measured."""
    rows = []
    for name, shape in shapes.items():
        for dt_name in dtypes:
            for impl in impls:
                rows.append({"shape_name": name, "shape": list(shape), "dtype": dt_name, "impl": impl,
                             **measure(impl, shape, DTYPES[dt_name], budget_s)})
    return rows


# --- the cached peak ------------------------------------------------------------------------------

def _cache_path():
    from fastseg.tune import cache_dir

    return cache_dir() / "gemm_peak.json"


def _peak_key(dtype_name: str) -> str:
    rec = cpu_info.record(probe_onednn=False)
    flags = ",".join(f for f, on in rec["isa_flags"].items() if on)
    return f"{rec['label']}|{flags}|torch {torch.__version__}|{rec['threads']} threads|{dtype_name}"


def peak_from_rows(rows: list[dict], dtype_name: str) -> dict | None:
    """The peak record of ``dtype_name`` from :func:`sweep` rows of :data:`PEAK_SHAPE`."""
    rows = [r for r in rows if r["dtype"] == dtype_name and tuple(r["shape"]) == PEAK_SHAPE]
    rates = {r["impl"]: r.get("best_gflops") for r in rows}
    ran = {k: v for k, v in rates.items() if v is not None}
    if not ran:
        return None
    best = max(ran, key=ran.get)
    return {"dtype": dtype_name, "shape": list(PEAK_SHAPE), "impl": best, "gflops": ran[best],
            "by_impl": rates, "unsupported": {r["impl"]: r["unsupported"] for r in rows if "unsupported" in r},
            "cpu": cpu_info.short(cpu_info.record()), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def store_peak(peak: dict) -> dict:
    """Keep ``peak`` in the cache unless a higher one for the same key is there; returns the kept one.

    A peak is a maximum: a measurement on a busy machine must not lower it for every later run."""
    from fastseg.io import save_json_atomic

    path = _cache_path()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    key = _peak_key(peak["dtype"])
    if isinstance(table.get(key), dict) and table[key].get("gflops", 0) >= peak["gflops"]:
        return table[key]
    table[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_json_atomic(table, path)
    except OSError:
        pass  # a read-only home only costs the measurement again
    return peak


def peak(dtype: torch.dtype | str, measure_if_missing: bool = True, budget_s: float = 0.3) -> dict | None:
    """This machine's best GEMM rate for ``dtype`` over :data:`IMPLS` on :data:`PEAK_SHAPE`.

    Read from the cache (``$FASTSEG_CACHE_DIR`` or ``~/.cache/fastseg``/gemm_peak.json, keyed by
    CPU, flags, torch version and thread count); measured (about a second per implementation)
    and stored when missing, unless ``measure_if_missing`` is False (then None). Measured on a
    busy machine it reads low; ``benchmarks/gemm_peak.py`` on a quiet one raises it."""
    name = dtype if isinstance(dtype, str) else next((k for k, v in DTYPES.items() if v == dtype), None)
    if name not in DTYPES:
        return None
    try:
        cached = json.loads(_cache_path().read_text()).get(_peak_key(name))
        if cached:
            return cached
    except (OSError, ValueError, AttributeError):
        pass
    if not measure_if_missing:
        return None
    result = peak_from_rows(sweep({"peak": PEAK_SHAPE}, dtypes=(name,), budget_s=budget_s), name)
    return store_peak(result) if result is not None else None


# --- what a model run gets ------------------------------------------------------------------------

def _flops(name: str, shapes: list) -> float:
    """FLOPs of one GEMM event from its recorded input shapes (0 when they are not recorded)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
        elif name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
        else:  # linear-like: x (..., K), w (N, K) — packed weights keep their logical (N, K) sizes
            x, w = shapes[0], shapes[1]
            k, n = x[-1], w[0]
            m = 1
            for d in x[:-1]:
                m *= d
        return 2.0 * m * k * n
    except (IndexError, TypeError, ValueError):
        return 0.0


def profile_gemms(fn, forward_ms: float | None = None) -> dict:
    """Profile one call of ``fn`` and sum its linear-layer GEMMs (:data:`GEMM_OPS`).

    Returns calls, GFLOP (from the recorded shapes), ms (wall time inside the GEMM ops, each op
    counted once even when one GEMM op calls another), achieved GFLOP/s, the per-op split, and
    the GEMMs' share of the profiled call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        fn()
        wall_ms = (time.perf_counter() - t) * 1e3
    by_op: dict[str, dict] = {}
    for evt in prof.events():
        if evt.name not in GEMM_OPS:
            continue
        parent, nested = evt.cpu_parent, False
        while parent is not None:
            if parent.name in GEMM_OPS:
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        op = by_op.setdefault(evt.name, {"calls": 0, "gflop": 0.0, "ms": 0.0})
        op["calls"] += 1
        op["gflop"] += _flops(evt.name, evt.input_shapes) / 1e9
        op["ms"] += evt.cpu_time_total / 1e3
    gflop = sum(o["gflop"] for o in by_op.values())
    ms = sum(o["ms"] for o in by_op.values())
    return {"calls": sum(o["calls"] for o in by_op.values()), "gflop": gflop, "ms": ms,
            "gflops": gflop / (ms / 1e3) if ms > 0 else None, "profiled_ms": wall_ms,
            "share_of_forward": ms / wall_ms if wall_ms > 0 else None, "by_op": by_op}


def against_peak(gemms: dict, peak_rec: dict | None) -> dict:
    """``gemms`` (from :func:`profile_gemms`) with the peak it is judged against and the fraction."""
    out = dict(gemms)
    if peak_rec is not None and gemms.get("gflops"):
        out["peak_gflops"] = peak_rec["gflops"]
        out["peak_impl"] = peak_rec["impl"]
        out["peak_date"] = peak_rec.get("date")  # measured once, possibly on a busier or quieter machine
        out["frac_of_peak"] = gemms["gflops"] / peak_rec["gflops"]
    return out
