"""Residual add + bias + LayerNorm, fused: the passes around the GEMMs of a transformer block.

    s = x + (h + h_bias)                              the new residual stream
    y = LayerNorm_C(s) * weight + bias                statistics in float32 (float64 for float64)

x: (..., C) the residual stream; h: (..., C) the output of the preceding GEMM *without* its bias
(``F.linear(a, W)``), h_bias: (C,) that GEMM's bias, or None; weight, bias: (C,) the LayerNorm's.
Returns ``(s, y)``: s has the dtype eager PyTorch gives ``x + h`` (type promotion; under
``torch.autocast('cpu', bfloat16)`` the residual may be float32 while h is the bfloat16 GEMM
output), y has ``out_dtype`` if given, else s's dtype. y is the LayerNorm of s *as stored* (rounded
to s's dtype), as eager computes ``norm(x + branch)``.

In eager SegFormer this is four passes over the tokens: addmm copies the bias into its output
before the GEMM, ``x + branch``, and LayerNorm's two (statistics, normalise). The ``cpp`` kernel
makes one pass per row with the row in cache (``csrc/add_layer_norm_cpu.cpp``).

Backends (:mod:`fastseg.ops.dispatch`):

- ``cpp``: the extension's C++ CPU kernel ``fastseg_ext::add_layer_norm_fwd`` / ``_bwd``: rows over
  threads, vectorised (AVX-512 / AVX2 / baseline clones), float32 and bfloat16 inputs in any mix,
  bfloat16 conversions with round-to-nearest-even. Backward in C++ from the saved s and the float32
  mean / rstd: dL/dx = dL/dh = grad_s + the analytic LayerNorm backward; weight, bias and h_bias
  gradients as deterministic column sums. float64 is declined (the ``torch`` backend keeps it, so
  the fp64 checks of the fused model hold to 1e-10).
- ``torch``: stock ops (``x + (h + h_bias)``, ``F.layer_norm``); any float dtype, any device.
- reference: :func:`add_layer_norm_reference`, the same math in plain PyTorch in float32 / float64.

Writing s into h (``reuse_h=True``). h is usually a fresh GEMM output that nobody but the caller
holds; in inference the kernel may then write s into h's memory instead of allocating s. That is
a promise only the caller can make, so it is opt-in, and even then it is done only when it is
safe: no gradient is needed (``torch.is_inference_mode_enabled()``, or grad mode off, or no input
requires grad), h has s's dtype, is contiguous, is not a view of another tensor and shares no
memory with x, h_bias, weight or bias, nothing is being traced by ``torch.compile`` and tuned
dispatch (which re-runs backends on the same inputs) is off. Otherwise s is a new tensor and h is
left untouched. When it is done, the returned s *is* h (same storage).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch

OP = "add_layer_norm"
CPP_DTYPES = (torch.float32, torch.bfloat16)


def result_dtypes(x: torch.Tensor, h: torch.Tensor, out_dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """(s's dtype, y's dtype): s as eager's ``x + h``, y as ``out_dtype`` or s's."""
    s_dtype = torch.promote_types(x.dtype, h.dtype)
    return s_dtype, out_dtype if out_dtype is not None else s_dtype


def add_layer_norm_reference(x, h, h_bias, weight, bias, eps: float, out_dtype=None):
    """Plain PyTorch: the sum and the LayerNorm in float32 (float64 if any input is float64).

    x, h: (..., C); h_bias: (C,) or None; weight, bias: (C,). Returns (s, y), dtypes as the op's.
    """
    s_dtype, y_dtype = result_dtypes(x, h, out_dtype)
    tensors = [t for t in (x, h, h_bias, weight, bias) if t is not None]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    branch = h.to(acc) if h_bias is None else h.to(acc) + h_bias.to(acc)
    s = (x.to(acc) + branch).to(s_dtype)
    y = F.layer_norm(s.to(acc), (x.shape[-1],), weight.to(acc), bias.to(acc), eps)
    return s, y.to(y_dtype)


def check_inputs(x, h, h_bias, weight, bias, eps, out_dtype) -> None:
    """Shapes, dtypes and devices, named in the error."""
    where = "add_layer_norm"
    tensors = {"x": x, "h": h, "weight": weight, "bias": bias}
    if h_bias is not None:
        tensors["h_bias"] = h_bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{where}: x must be (..., C) with a channel dim, got a scalar")
    if x.shape != h.shape:
        raise ValueError(f"{where}: x {tuple(x.shape)} and h {tuple(h.shape)} must have the same shape (..., C)")
    C = x.shape[-1]
    if x.numel() == 0:
        raise ValueError(f"{where}: empty input, x has shape {tuple(x.shape)}")
    for name in ("weight", "bias", "h_bias"):
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{where}: {name} must have shape ({C},) for {C} channels, got {tuple(t.shape)}")
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"{where}: out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{where}: eps must be a number >= 0, got {eps!r}")


# --- cpp backend ------------------------------------------------------------------------------------

def _has_cpp_op() -> bool:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    return not extension_op_reasons("add_layer_norm_fwd")


_fakes_registered = False


def _register_fakes() -> None:
    """Shapes and dtypes of the extension ops' outputs, for FakeTensor tracing (compile / export)."""
    global _fakes_registered
    if _fakes_registered or not _has_cpp_op():
        return
    _fakes_registered = True

    def stats(x):
        rows = x.numel() // x.shape[-1]
        return x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)

    @torch.library.register_fake("fastseg_ext::add_layer_norm_fwd")
    def _(x, h, h_bias, weight, bias, eps, out_dtype):
        s_dtype, y_dtype = result_dtypes(x, h, out_dtype)
        return (x.new_empty(x.shape, dtype=s_dtype), x.new_empty(x.shape, dtype=y_dtype)) + stats(x)

    @torch.library.register_fake("fastseg_ext::add_layer_norm_fwd_")
    def _(x, h, h_bias, weight, bias, eps, out_dtype):
        _, y_dtype = result_dtypes(x, h, out_dtype)
        return (x.new_empty(x.shape, dtype=y_dtype),) + stats(x)

    @torch.library.register_fake("fastseg_ext::add_layer_norm_bwd")
    def _(grad_y, grad_s, s, weight, mean, rstd):
        C = s.shape[-1]
        return (s.new_empty(s.shape), s.new_empty((C,), dtype=torch.float32),
                s.new_empty((C,), dtype=torch.float32), s.new_empty((C,), dtype=torch.float32))


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class AddLayerNormFunction(torch.autograd.Function):
    """The C++ forward, keeping s and the float32 mean / rstd; the C++ backward from them."""

    @staticmethod
    def forward(ctx, x, h, h_bias, weight, bias, eps: float, out_dtype):
        s, y, mean, rstd = torch.ops.fastseg_ext.add_layer_norm_fwd(x, h, h_bias, weight, bias, eps, out_dtype)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.dtypes = (x.dtype, h.dtype, None if h_bias is None else h_bias.dtype, weight.dtype, bias.dtype)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros pass
        return s, y

    @staticmethod
    def backward(ctx, grad_s, grad_y):
        s, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        x_dtype, h_dtype, hb_dtype, w_dtype, b_dtype = ctx.dtypes
        if grad_y is None and grad_s is None:
            return None, None, None, None, None, None, None
        if grad_y is None:  # only s was used: the LayerNorm contributes nothing
            gsum, dweight, dbias = grad_s, None, None
            dh_bias = grad_s.reshape(-1, s.shape[-1]).sum(0, dtype=torch.float32) if need[2] else None
        else:
            gsum, dweight, dbias, dh_bias = torch.ops.fastseg_ext.add_layer_norm_bwd(
                grad_y, grad_s, s, weight, mean, rstd)
        return (_cast(gsum, x_dtype) if need[0] else None, _cast(gsum, h_dtype) if need[1] else None,
                _cast(dh_bias, hb_dtype) if need[2] else None, _cast(dweight, w_dtype) if need[3] else None,
                _cast(dbias, b_dtype) if need[4] else None, None, None)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def add_layer_norm_cpp(x, h, h_bias, weight, bias, eps: float, out_dtype=None):
    if _needs_grad(x, h, h_bias, weight, bias):
        return AddLayerNormFunction.apply(x, h, h_bias, weight, bias, float(eps), out_dtype)
    s, y = torch.ops.fastseg_ext.add_layer_norm_fwd(x, h, h_bias, weight, bias, float(eps), out_dtype)[:2]
    return s, y


def _add_layer_norm_cpp_into_h(x, h, h_bias, weight, bias, eps: float, out_dtype=None):
    """The kernel writing s into h (see the module docstring for when this is allowed)."""
    y = torch.ops.fastseg_ext.add_layer_norm_fwd_(x, h, h_bias, weight, bias, float(eps), out_dtype)[0]
    return h, y


def _cpp_reasons(device: torch.device, dtype: torch.dtype, dtypes: tuple = (), **_) -> list[str]:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    reasons = extension_op_reasons("add_layer_norm_fwd")
    if reasons:
        return reasons
    reasons = []
    if device.type != "cpu":
        reasons.append(f"device type {device.type!r} (the C++ kernel takes CPU tensors)")
    bad = sorted({str(t) for t in (dtype, *dtypes) if t is not None and t not in CPP_DTYPES})
    if bad:
        reasons.append(f"dtype {', '.join(bad)} (the C++ kernel computes in float32 from float32/bfloat16; "
                       f"the torch backend keeps float64)")
    return reasons


# --- torch backend ----------------------------------------------------------------------------------

def _layer_norm_params(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # F.layer_norm takes float32 parameters for bf16/fp16 input (and computes in float32), and
    # otherwise parameters of the input's dtype.
    if t.dtype == s.dtype or (t.dtype == torch.float32 and s.dtype in (torch.bfloat16, torch.float16)):
        return t
    return t.to(s.dtype)


def add_layer_norm_torch(x, h, h_bias, weight, bias, eps: float, out_dtype=None):
    """Stock ops: ``x + (h + h_bias)``, then ``F.layer_norm``."""
    branch = h if h_bias is None else h + h_bias.to(h.dtype)  # the bias in h's dtype, as linear's
    s = x + branch
    return s, _torch_norm(s, weight, bias, eps, out_dtype)


def _torch_norm(s, weight, bias, eps, out_dtype):
    y = F.layer_norm(s, (s.shape[-1],), _layer_norm_params(s, weight), _layer_norm_params(s, bias), eps)
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


def _add_layer_norm_torch_into_h(x, h, h_bias, weight, bias, eps: float, out_dtype=None):
    if h_bias is not None:
        h.add_(h_bias.to(h.dtype))
    s = h.add_(x)
    return s, _torch_norm(s, weight, bias, eps, out_dtype)


def _torch_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    return [] if dtype.is_floating_point else [f"dtype {dtype}"]


# --- the op -----------------------------------------------------------------------------------------

_INTO_H = {"cpp": _add_layer_norm_cpp_into_h, "torch": _add_layer_norm_torch_into_h}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tuning_active() -> bool:
    """Tuned dispatch may re-run the backends on one call's inputs: h must stay intact then."""
    if dispatch.tuning_hooks() is None:
        return False
    import sys

    tune = sys.modules.get("fastseg.tune")
    return tune is None or tune.active()


def _may_write_into_h(x, h, h_bias, weight, bias, s_dtype) -> bool:
    """Whether s may be written into h's memory (the caller said h is scratch): see the module doc."""
    if torch.compiler.is_compiling() or _tuning_active():
        return False
    if not (torch.is_inference_mode_enabled() or not _needs_grad(x, h, h_bias, weight, bias)):
        return False
    if h.dtype != s_dtype or not h.is_contiguous() or h._base is not None:
        return False
    mine = _storage(h)
    return all(_storage(t) != mine for t in (x, h_bias, weight, bias) if t is not None)


def add_layer_norm(x: torch.Tensor, h: torch.Tensor, h_bias: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None, *,
                   reuse_h: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + (h + h_bias)``, ``y = LayerNorm(s) * weight + bias``; returns ``(s, y)``.

    x, h: (..., C) of one shape, any strides, float dtypes may differ (s gets their promotion);
    h_bias: (C,) or None; weight, bias: (C,); out_dtype: y's dtype (default s's). Differentiable in
    every tensor. ``reuse_h=True``: h is scratch the caller will not read again, so s may be
    written into it in inference (only where safe; see the module docstring).
    """
    check_inputs(x, h, h_bias, weight, bias, eps, out_dtype)
    s_dtype, _ = result_dtypes(x, h, out_dtype)
    dtypes = tuple(t.dtype for t in (x, h, h_bias, weight, bias) if t is not None) + (out_dtype,)
    choice = dispatch.choose(OP, device=x.device, dtype=s_dtype, dtypes=dtypes)
    if reuse_h and choice.backend in _INTO_H and _may_write_into_h(x, h, h_bias, weight, bias, s_dtype):
        return _INTO_H[choice.backend](x, h, h_bias, weight, bias, eps, out_dtype)
    return dispatch.implementation(OP, choice.backend)(x, h, h_bias, weight, bias, eps, out_dtype)


_register_fakes()
dispatch.register_reference(OP, add_layer_norm_reference)
dispatch.register(OP, dispatch.Backend("cpp", _cpp_reasons, add_layer_norm_cpp))
dispatch.register(OP, dispatch.Backend("torch", _torch_reasons, add_layer_norm_torch))
