"""Tuned dispatch: choose each op's backend by measurement, per shape class.

    fastseg.tune(model, example_input)      # tune every op the model calls on inputs like this
    FASTSEG_AUTOTUNE=1                       # tune on first use of each (op, shape class)

Static dispatch (:mod:`fastseg.ops.dispatch`) ranks backends by a fixed priority. Tuning
instead takes every backend that can run the call automatically (plus the reference), checks
each one's output against a gold (the reference on fp32 copies of the inputs: fp32 within
``FP32_RMS`` relative RMS error, fp16 / bf16 within 2x the eager low-precision error, never NaN),
times the ones that pass once (median of a few calls after a warm-up, forward only) and picks
the fastest. So the fused path is never slower than the ``torch`` backend on any shape, on
hardware nobody measured before.

The choice is kept in process and on disk (``$FASTSEG_CACHE_DIR`` or ``~/.cache/fastseg``,
``tune.json``, written atomically), keyed by device name, dtype, torch / triton / fastseg
versions and shape class; entries of other versions are never used. A forced backend
(``FASTSEG_BACKEND``, ``use_backend``) always wins over tuning. Without tuning (no
``fastseg.tune`` call, no ``FASTSEG_AUTOTUNE=1``) dispatch is exactly the static order.
``model.backends()`` and ``fastseg info`` show the tuned choices and their timings.

``fastseg.tune`` is the function (exported by the package); this module's other names are
reached with ``from fastseg.tune import load, save, clear, ...`` (``import fastseg.tune as m``
would bind the function).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from pathlib import Path

import torch

from fastseg.ops import dispatch

SCHEMA = "fastseg-tune/1"
CACHE_FILE = "tune.json"
FP32_RMS = 1e-4  # DESIGN.md: fp32 fused vs reference within 1e-4 (TF32 off)
LOW_PRECISION_FACTOR = 2.0
RMS_FLOOR = 1e-6
WARMUP, REPEATS = 1, 5

_lock = threading.RLock()
_state = threading.local()  # .busy: inside a tuning measurement (no nested tuning)
_entries: dict[str, dict] = {}  # key -> entry, this process (loaded from / saved to disk)
_loaded_from: Path | None = None
_enabled = False  # set by tune(); FASTSEG_AUTOTUNE=1 enables measuring too


# --- keys -------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("FASTSEG_CACHE_DIR") or Path.home() / ".cache" / "fastseg")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import fastseg

    try:  # the version only: importing triton here would fix its mode before fastseg.kernels does
        triton = version("triton")
    except PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton, "fastseg": fastseg.__version__}


def device_label(device: torch.device) -> str:
    from fastseg.timing import device_name

    return device_name(device) if device.type != "cpu" else device_name(device).split(" (")[0]


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length() if n > 0 else 0


def shape_class(args) -> str:
    """The call's shapes with every size rounded up to a power of two, and its other scalar
    arguments: calls in one class are timed once."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append("x".join(str(_bucket(d)) for d in a.shape) or "scalar")
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            parts.append("[" + ",".join("x".join(str(_bucket(d)) for d in t.shape) for t in a) + "]")
        elif isinstance(a, (bool, int, str)) or a is None:
            parts.append(repr(a))
        elif isinstance(a, float):
            parts.append("f")
        elif isinstance(a, (list, tuple)):
            parts.append(repr(tuple(_bucket(v) if isinstance(v, int) else v for v in a)))
        else:
            parts.append(type(a).__name__)
    return ";".join(parts)


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def make_key(op: str, device: torch.device, dtype: torch.dtype, shapes: str, vers: dict | None = None) -> str:
    v = vers or versions()
    return " | ".join([op, device_label(device), str(dtype).replace("torch.", ""),
                       f"torch {v['torch']}", f"triton {v['triton']}", f"fastseg {v['fastseg']}", shapes])


# --- disk cache ---------------------------------------------------------------------------------

def load(path: Path | None = None) -> int:
    """Merge the entries of the cache file that match this process's versions; returns how many.
    A missing, unreadable or foreign file, and entries of other versions, are ignored."""
    global _loaded_from
    path = Path(path) if path else cache_dir() / CACHE_FILE
    with _lock:
        _loaded_from = path
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return 0
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
            return 0
        now, n = versions(), 0
        for key, entry in data["entries"].items():
            if isinstance(entry, dict) and entry.get("versions") == now and isinstance(entry.get("backend"), str):
                _entries.setdefault(key, entry)
                n += 1
        return n


def save(path: Path | None = None) -> Path:
    """Write this process's entries (merged over the file's current ones) atomically."""
    from fastseg.io import atomic_write

    path = Path(path) if path else cache_dir() / CACHE_FILE
    with _lock:
        entries = {}
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("schema") == SCHEMA and isinstance(data.get("entries"), dict):
                entries.update(data["entries"])
        except (OSError, ValueError):
            pass
        entries.update(_entries)
        with atomic_write(path, "w") as f:
            json.dump({"schema": SCHEMA, "entries": entries}, f, indent=1, sort_keys=True)
    return path


def clear(memory_only: bool = True) -> None:
    """Forget the tuned choices of this process (and switch tuning off)."""
    global _enabled, _loaded_from
    with _lock:
        _entries.clear()
        _enabled = False
        _loaded_from = None
    if not memory_only:
        with contextlib.suppress(FileNotFoundError):
            (cache_dir() / CACHE_FILE).unlink()


# --- measuring ---------------------------------------------------------------------------------

def autotune_env() -> bool:
    return os.environ.get("FASTSEG_AUTOTUNE", "0") not in ("", "0")


def active() -> bool:
    """Whether dispatch consults tuned choices (after fastseg.tune or with FASTSEG_AUTOTUNE=1)."""
    return _enabled or autotune_env()


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _rms_rel(out: torch.Tensor, gold: torch.Tensor) -> float:
    out, gold = out.detach().double(), gold.detach().double()
    if out.shape != gold.shape:
        return math.inf
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return ((out - gold).norm() / gold.norm().clamp_min(1e-30)).item()


def _upcast(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype in (torch.float16, torch.bfloat16):
        return a.detach().float()
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, list):
        return [_upcast(t) for t in a]
    if isinstance(a, tuple):
        return tuple(_upcast(t) for t in a)
    return a


def _detach(a):
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, list):
        return [_detach(t) for t in a]
    if isinstance(a, tuple):
        return tuple(_detach(t) for t in a)
    return a


def _time_ms(fn, device: torch.device) -> float:
    from fastseg.timing import measure, median

    return median(measure(fn, device, warmup=WARMUP, repeats=REPEATS))


def candidates(op: str, facts: dict) -> list[str]:
    """Backends that may run this call automatically (no refusal, no reason against an automatic
    choice), in priority order, then the reference."""
    names = []
    for b in dispatch.backends_of(op):
        if b.name == dispatch.REFERENCE:
            continue
        if b.not_supported_reasons(**facts):
            continue
        if b.auto_reasons is not None and b.auto_reasons(**facts):
            continue
        names.append(b.name)
    return names + [dispatch.REFERENCE]


def measure_op(op: str, facts: dict, args: tuple, kwargs: dict) -> dict:
    """Check and time every candidate on these arguments; returns the cache entry."""
    impls = {b.name: b.impl for b in dispatch.backends_of(op)}
    names = candidates(op, facts)
    args, kwargs = _detach(args), {k: _detach(v) for k, v in kwargs.items()}
    t = _first_tensor(args)
    device = t.device if t is not None else torch.device("cpu")
    dtype = t.dtype if t is not None else torch.float32
    lowp = dtype in (torch.float16, torch.bfloat16)
    timings, errors, rejected = {}, {}, {}
    _state.busy = True
    try:
        with torch.no_grad():
            ref = impls[dispatch.REFERENCE]
            gold = _tensors(ref(*_upcast(args), **{k: _upcast(v) for k, v in kwargs.items()}))
            eager = _tensors(ref(*args, **kwargs))
            eager_err = max((_rms_rel(o, g) for o, g in zip(eager, gold)), default=0.0)
            if lowp:
                limit = max(LOW_PRECISION_FACTOR * eager_err, RMS_FLOOR)
            else:
                limit = FP32_RMS if torch.get_float32_matmul_precision() == "highest" else 5e-3
            for name in names:
                fn = impls[name]
                try:
                    out = _tensors(fn(*args, **kwargs))
                except Exception as e:  # a backend that crashes on this call is not a candidate
                    rejected[name] = f"raised {type(e).__name__}: {e}"[:200]
                    continue
                err = (max((_rms_rel(o, g) for o, g in zip(out, gold)), default=0.0)
                       if len(out) == len(gold) else math.inf)
                errors[name] = err
                if not err <= limit:  # NaN fails too
                    rejected[name] = f"parity: relative RMS error {err:.2e} > {limit:.2e}"
                    continue
                timings[name] = _time_ms(lambda: fn(*args, **kwargs), device)
    finally:
        _state.busy = False
    static = dispatch.choose(op, **facts).backend if not dispatch.forced_backend() else names[0]
    best = min(timings, key=timings.get) if timings else static
    return {"op": op, "backend": best, "static": static, "timings_ms": timings, "errors": errors,
            "rejected": rejected, "device": device_label(device), "dtype": str(dtype).replace("torch.", ""),
            "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def lookup(op: str, args: tuple) -> tuple[str, dict | None]:
    t = _first_tensor(args)
    device = t.device if t is not None else torch.device("cpu")
    dtype = t.dtype if t is not None else torch.float32
    key = make_key(op, device, dtype, shape_class(args))
    return key, _entries.get(key)


def _tuned_call(op: str, backend: str, impl):
    """What dispatch.implementation returns while tuning is active: on each call, the tuned
    backend of the call's shape class (measured now if unknown and measuring is on)."""
    if torch.compiler.is_compiling():  # traced graphs keep the static choice
        return impl
    facts = dispatch.last_facts(op)

    def call(*args, **kwargs):
        if (torch.compiler.is_compiling() or facts is None or getattr(_state, "busy", False)
                or dispatch.forced_backend()):
            return impl(*args, **kwargs)
        with _lock:
            key, entry = lookup(op, args)
            if entry is None and (_measuring or autotune_env()):
                try:
                    entry = measure_op(op, facts, args, kwargs)
                except Exception as e:  # tuning must never break a forward
                    warnings.warn(f"fastseg.tune: could not tune {op}: {e}", RuntimeWarning, stacklevel=2)
                    entry = None
                if entry is not None:
                    _entries[key] = entry
                    if autotune_env() and not _measuring:
                        _save_quietly()
        if entry is None or entry["backend"] == backend:
            return impl(*args, **kwargs)
        return {b.name: b.impl for b in dispatch.backends_of(op)}.get(entry["backend"], impl)(*args, **kwargs)

    return call


def _save_quietly() -> None:
    try:
        save()
    except OSError as e:
        warnings.warn(f"fastseg.tune: could not write the cache in {cache_dir()}: {e}", RuntimeWarning, stacklevel=3)


def _describe(op: str, facts: dict) -> str:
    """Tuned choices of ``op`` for this device / dtype, for Choice.describe()."""
    if not active() and not _entries:
        return ""
    device, dtype = facts.get("device"), facts.get("dtype")
    label = device_label(torch.device(device)) if device is not None else None
    dt = str(dtype).replace("torch.", "") if dtype is not None else None
    parts = []
    for entry in _entries.values():
        if entry["op"] != op or (label and entry["device"] != label) or (dt and entry["dtype"] != dt):
            continue
        times = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(entry["timings_ms"].items(), key=lambda kv: kv[1]))
        parts.append(f"{entry['backend']} ({times})")
    return "; ".join(parts)


_measuring = False


def install() -> None:
    """Hook tuning into dispatch (idempotent); loads the disk cache once."""
    with _lock:
        if dispatch.tuning_hooks() is None:
            dispatch.set_tuning_hooks(_tuned_call, _describe)
        if _loaded_from is None:
            load()


def tune(model: torch.nn.Module, example_input, *, save_cache: bool = True) -> dict:
    """Time every candidate backend of every op ``model`` calls on ``example_input`` (one forward
    under no_grad), pick the fastest that passes parity per op and shape class, and keep using
    those choices in this process (and, with ``save_cache``, in later ones through the disk
    cache). Returns {op: entry} for the calls made: backend, timings_ms, rejected, static."""
    global _enabled, _measuring
    install()
    with _lock:
        before = set(_entries)
        _enabled = True
        _measuring = True
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        _measuring = False
    report = {}
    for key, entry in _entries.items():
        report.setdefault(entry["op"], {})[key.rsplit(" | ", 1)[-1]] = entry
    if save_cache and set(_entries) != before:
        _save_quietly()
    return report


def summary_lines() -> list[str]:
    """One line per tuned (op, shape class): the choice, the static choice and the timings."""
    lines = []
    for key, e in sorted(_entries.items()):
        times = ", ".join(f"{k} {v:.3g}" for k, v in sorted(e["timings_ms"].items(), key=lambda kv: kv[1]))
        lines.append(f"{e['op']} {e['dtype']} [{key.rsplit(' | ', 1)[-1]}]: {e['backend']} "
                     f"(static {e['static']}; ms: {times})"
                     + (f"; rejected: {', '.join(e['rejected'])}" if e["rejected"] else ""))
    return lines


if autotune_env():
    install()
