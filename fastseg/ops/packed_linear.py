"""CPU inference GEMMs through oneDNN with weights packed once: ``y = act(x Wᵀ + b)``.

torch's ``F.linear`` on CPU runs MKL's ``addmm``, which on AMD CPUs takes a generic path at about
half oneDNN's rate for SegFormer's shapes (issue 21). oneDNN's inner product reaches full speed
with the weight in its own blocked layout; reordering it costs a pass over the weight, so this
module packs each weight once and reuses the packed copy.

Public API (the fused SegFormer path and the C++ kernels that want packed weights use these):

``linear(x, weight, bias=None, activation="none") -> Tensor``
    x: (..., K) any strides; weight: (N, K); bias: (N,) or None. Returns (..., N) in the compute
    dtype (autocast's on CPU when autocast is on, else x's). ``activation`` ("none", "relu",
    "gelu" — exact erf GELU) is fused into the GEMM as a oneDNN post-op, bias likewise. Routing:
    autograd (grad mode on and any input requires grad), non-CPU tensors, fp64 and any case
    oneDNN cannot take keep aten's ``F.linear``; otherwise the custom op ``fastseg::packed_linear``
    (registered with a fake impl, so ``torch.compile(fullgraph=True)`` traces through it).

``packed_weight(weight, dtype=None) -> Tensor | None``
    The oneDNN-packed copy of ``weight`` (N, K) in ``dtype`` (default: its own), for passing to
    ``torch.ops.mkldnn._linear_pointwise`` (or, from C++, ``mkldnn::_linear_pointwise``); None when
    oneDNN cannot compute in ``dtype`` on this CPU (see :func:`reasons`).

``weight_in(tensor, dtype) -> Tensor``
    ``tensor`` cast to ``dtype``, cached like the packs (bf16 biases, and dense bf16 weights on CPUs
    whose oneDNN has no bf16 GEMM), so that autocast inference casts no weight per call.

``memory() -> (count, bytes)``, ``clear()``, ``reasons(dtype)``, ``state_key(t)``, ``set_enabled(…)``.

When oneDNN runs: bf16 wherever oneDNN has a bf16 GEMM on the CPU; fp32 automatically where
ATen dispatches AVX-512 kernels (on AVX2-only CPUs MKL runs the same kind of kernels and stays).
``FASTSEG_PACKED_LINEAR=1`` forces oneDNN for fp32 on any CPU, ``=0`` keeps aten everywhere.

Cache: per weight tensor (a view, e.g. ``weight.flatten(1)``, under its base; weakly referenced:
a freed model frees its packs) and per dtype, keyed on what changes when the weight does: its
version counter (bumped by optimiser steps, ``load_state_dict``, ``with torch.no_grad():
w.add_(1)``), data pointer, shape, strides and dtype (``module.to()`` gives a parameter new
memory; the copies of the old memory are dropped), plus a 64-element probe of its bits, which catches writes through
``w.data`` (a view with its own version counter that autograd does not track either: whole-tensor
edits such as ``w.data.mul_(2)`` or ``w.data.copy_(…)`` change the probe; an edit through
``.data`` of only elements the probe does not sample needs :func:`clear`). Weights made under
``torch.inference_mode()`` have no version counter: they are never cached and take aten.
Thread-safe: concurrent callers may pack the same weight twice; one copy wins.
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "gelu")
ENV = "FASTSEG_PACKED_LINEAR"  # "0": aten everywhere; "1": oneDNN for fp32 on any CPU; unset: auto
_PROBE = 8  # probe rows × columns: 64 sampled elements


def _env_setting() -> bool | None:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    return True if value in ("1", "on", "true", "yes") else None


_enabled = _env_setting()  # None: automatic (see _fp32_auto_reasons)


def set_enabled(enabled: bool | None) -> None:
    """True: oneDNN for every dtype it computes here; False: aten's F.linear everywhere (autocast
    casting weights as usual); None: automatic. Read from ``FASTSEG_PACKED_LINEAR`` (1 / 0 /
    unset) at import; e.g. to time one against the other."""
    global _enabled
    _enabled = None if enabled is None else bool(enabled)


def _fp32_auto_reasons() -> list[str]:
    """fp32 in automatic mode: oneDNN where ATen dispatches AVX-512 kernels (there MKL's sgemm
    takes a generic AVX2 path on AMD CPUs, at half oneDNN's rate: issue 21's Zen 4 figures).
    On an AVX2-only CPU MKL and oneDNN both run AVX2 kernels: measured at parity there (Zen 3,
    loaded machine; oneDNN's per-call overhead costs at small M), so aten stays."""
    if _enabled is not None:
        return []
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    if not str(cap).upper().startswith("AVX512"):
        return [f"fp32 on a {cap} CPU: MKL runs the same kernels as oneDNN here ({ENV}=1 forces oneDNN)"]
    return []


def _mkldnn_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


_static_reasons: list[str] | None = None
_bf16_gemm: bool | None = None


def _base_reasons() -> list[str]:
    """Why oneDNN's packed linear cannot run at all in this torch build (checked once)."""
    global _static_reasons, _bf16_gemm
    if _static_reasons is None:
        r = []
        if not torch.backends.mkldnn.is_available():
            r.append("torch is built without oneDNN (torch.backends.mkldnn.is_available() is False)")
        for name in ("_linear_pointwise", "_reorder_linear_weight"):
            if not hasattr(torch.ops.mkldnn, name):
                r.append(f"this torch lacks torch.ops.mkldnn.{name}")
        _static_reasons = r
        _bf16_gemm = not r and _mkldnn_bf16()
    r = list(_static_reasons)
    if not torch.backends.mkldnn.enabled:
        r.append("oneDNN is disabled (torch.backends.mkldnn.enabled is False)")
    if _enabled is False:
        r.append(f"switched off ({ENV}=0 or set_enabled(False))")
    return r


def reasons(dtype: torch.dtype = torch.float32) -> list[str]:
    """Why :func:`linear` cannot run its oneDNN GEMM in ``dtype`` here (empty: it can)."""
    r = _base_reasons()
    if r:
        return r
    if dtype == torch.bfloat16 and not _bf16_gemm:
        return ["oneDNN has no bf16 GEMM on this CPU (needs AVX512-BW/VL/DQ or AVX-NE-CONVERT): "
                "bf16 uses a cached bf16 weight with aten"]
    if dtype not in (torch.float32, torch.bfloat16):
        return [f"dtype {dtype} (oneDNN's CPU linear here: float32, bfloat16)"]
    return _fp32_auto_reasons() if dtype == torch.float32 else []


# --- the cache --------------------------------------------------------------------------------

_lock = threading.RLock()  # re-entrant: a weakref callback may run while this thread holds it
_cache: dict[int, tuple] = {}  # id(weight) -> (weakref to weight, {(kind, dtype): (key, copy)})


def _probe(t: torch.Tensor) -> torch.Tensor:
    """Up to 64 elements of ``t`` sampled on a grid, as raw bits (NaN compares equal to itself):
    a view, cloned only when stored."""
    t = t.detach()
    if t.ndim == 2:
        sample = t[:: max(1, t.shape[0] // _PROBE), :: max(1, t.shape[1] // _PROBE)]
    else:
        flat = t.reshape(-1) if t.is_contiguous() else t.flatten()
        sample = flat[:: max(1, flat.numel() // (_PROBE * _PROBE))]
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    return sample.view(bits)


def _key(t: torch.Tensor):
    """What identifies ``t``'s values now, or None when it has no version counter."""
    try:
        version = t._version
    except RuntimeError:  # an inference-mode tensor: nothing to key on
        return None
    return (version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def state_key(t: torch.Tensor) -> tuple:
    """A hashable key that changes when ``t``'s values do, as the cache sees it (version counter,
    storage, geometry, dtype and the values of the probe); for tensors with a version counter."""
    return _key(t) + (tuple(_probe(t).tolist()),)


def _owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose lifetime a cached copy of ``t`` follows: a view's base (``weight.flatten(1)``
    and slices are new objects on every call, their base is the parameter; they share its
    version counter), else ``t``."""
    base = t._base
    return t if base is None else base


def _forget(wid: int) -> None:
    with _lock:
        _cache.pop(wid, None)


def _cached(t: torch.Tensor, kind: str, dtype: torch.dtype, make):
    """``make(t)`` cached per (t, kind, dtype) until ``t`` changes; None for uncacheable tensors."""
    key = _key(t)
    if key is None:
        return None
    owner = _owner(t)
    wid = id(owner)
    entry = _cache.get(wid)
    slot = (kind, dtype, t.storage_offset(), tuple(t.shape), t.stride())
    if entry is not None and entry[0]() is owner:
        hit = entry[1].get(slot)
        # hit[2] is a view of t's memory (same data pointer and strides, as the key says): one
        # comparison with the bits it held at packing time.
        if hit is not None and hit[0] == key and torch.equal(hit[1], hit[2]):
            return hit[3]
    # A normal tensor even inside torch.inference_mode(): the copy outlives the call.
    with torch.inference_mode(False), torch.no_grad():
        value = make(t.detach())
        view = _probe(t)
        probe = view.clone()
    with _lock:
        entry = _cache.get(wid)
        if entry is None or entry[0]() is not owner:
            # The callback runs when the owner is freed, before its id can be reused.
            entry = (weakref.ref(owner, lambda _, wid=wid: _forget(wid)), {})
            _cache[wid] = entry
        # Copies of memory the owner no longer holds (``module.to()`` and ``p.data = …`` give a
        # parameter new memory): dropped, or they would keep the old memory alive.
        memory = owner.untyped_storage().data_ptr()
        for old in [k for k, v in entry[1].items() if v[2].untyped_storage().data_ptr() != memory]:
            del entry[1][old]
        entry[1][slot] = (key, probe, view, value)
    return value


def _pack(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous())


def packed_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``weight`` (N, K) packed for oneDNN in ``dtype`` (default its own), cached; None when oneDNN
    cannot compute in that dtype here, the weight is not a 2-D CPU tensor, or it cannot be
    cached (an inference-mode tensor)."""
    dtype = dtype or weight.dtype
    if weight.ndim != 2 or weight.device.type != "cpu" or reasons(dtype):
        return None
    return _cached(weight, "packed", dtype, lambda w: _pack(w, dtype))


def weight_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous: itself when it is already, else a cached copy (made afresh
    for tensors that cannot be cached)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    hit = _cached(t, "dense", dtype, lambda w: w.to(dtype).contiguous())
    return hit if hit is not None else t.to(dtype).contiguous()


def memory() -> tuple[int, int]:
    """(number of cached packed / cast copies alive, their bytes; a packed copy counts its logical
    size, oneDNN may pad it to its block size)."""
    count = nbytes = 0
    with _lock:
        entries = [e for e in _cache.values() if e[0]() is not None]
        for e in entries:
            for *_, value in e[1].values():
                count += 1
                nbytes += value.numel() * value.element_size()
    return count, nbytes


def clear() -> None:
    """Drop every cached copy (e.g. after writing weights through ``.data`` in a way the probe
    may not see)."""
    with _lock:
        _cache.clear()


# --- the op -----------------------------------------------------------------------------------

def _apply(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """act(x Wᵀ + b) in x's dtype with W (and b) cached in that dtype: oneDNN with the packed
    weight where it computes that dtype, else aten with the cached cast weight."""
    dtype = x.dtype
    b = None if bias is None else weight_in(bias, dtype)
    packed = packed_weight(weight, dtype)
    if packed is None:
        return _apply(F.linear(x, weight_in(weight, dtype), b), activation)
    # attr "gelu" with algorithm "none" is the exact (erf) GELU.
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, b, activation, [],
                                              "none" if activation == "gelu" else "")


@torch.library.custom_op("fastseg::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      activation: str) -> torch.Tensor:
    return _packed_linear(x, weight, bias, activation)


@_packed_linear_op.register_fake
def _(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype F.linear computes in here, or None where it would not run (mixed dtypes outside
    autocast: F.linear raises its own error)."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if x.is_floating_point() and weight.is_floating_point():
            return dtype
    return x.dtype if x.dtype == weight.dtype else None


def _use_aten(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.ndim != 2:
        return True
    if x.ndim == 0 or x.shape[-1] != weight.shape[1] or (bias is not None and tuple(bias.shape) != weight.shape[:1]):
        return True  # F.linear raises its own error naming the shapes
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return True  # training / autograd keeps aten
    if _base_reasons():
        return True
    if not torch.compiler.is_compiling() and (weight.is_inference() or (bias is not None and bias.is_inference())):
        return True  # no version counter to key a cache on
    return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """``act(x Wᵀ + b)`` — x: (..., K), weight: (N, K), bias: (N,) or None → (..., N). See the
    module docstring for where it runs oneDNN with a packed weight and where aten."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    dtype = None if _use_aten(x, weight, bias) else _compute_dtype(x, weight)
    if dtype not in (torch.float32, torch.bfloat16):
        return _apply(F.linear(x, weight, bias), activation)
    if x.dtype != dtype:
        x = x.to(dtype)
    if torch.compiler.is_compiling():  # the registered op: traced as one node, no graph break
        return torch.ops.fastseg.packed_linear(x, weight, bias, activation)
    # Eager: the same function without the custom op's Python dispatch (~tens of µs a call).
    return _packed_linear(x, weight, bias, activation)


@dataclass(frozen=True)
class LinearChoice:
    """What ``model.backends()`` reports for the linears (duck-types :class:`dispatch.Choice`)."""

    op: str
    backend: str
    skipped: dict
    packs: int
    nbytes: int

    def describe(self) -> str:
        text = f"{self.backend}  [{self.packs} cached weight copies, {self.nbytes / 2**20:.1f} MiB]"
        if self.skipped:
            text += "  [passed over: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in self.skipped.items()) + "]"
        return text


def choice(device: torch.device, dtype: torch.dtype) -> LinearChoice:
    """The backend :func:`linear` takes for inference on (device, dtype), with the cache's size."""
    count, nbytes = memory()
    device = torch.device(device)
    if device.type != "cpu":
        return LinearChoice("linear", "aten", {"onednn": [f"device type {device.type!r}"]}, count, nbytes)
    r = reasons(dtype)
    if not r:
        return LinearChoice("linear", "onednn", {}, count, nbytes)
    return LinearChoice("linear", "aten", {"onednn": r}, count, nbytes)
