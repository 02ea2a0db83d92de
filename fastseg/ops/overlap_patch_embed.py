"""Overlapping patch embedding of the MiT encoder: strided conv, flatten to tokens, LayerNorm over C.

    y      = conv2d(x, weight, bias, stride, padding=k // 2)        (B, C, Ho, Wo)
    tokens = LayerNorm_C(y.flatten(2).transpose(1, 2)) * ln_weight + ln_bias      (B, Ho·Wo, C)
    Ho     = (H + 2·(k // 2) − k) // stride + 1, likewise Wo

Stage 1 is k7 s4 from the (B, 3, H, W) image; stages 2–4 are k3 s2 from the previous stage's
tokens (B, H·W, Cin), passed with ``hw=(H, W)``: tokens are a channels-last image, and every
backend reads them as the NCHW view ``x.view(B, H, W, Cin).permute(0, 3, 1, 2)`` without a copy.

Backends (chosen by :mod:`fastseg.ops.dispatch`):

- ``cuda``: the compiled extension's CUDA kernel (``csrc/``): the conv as an implicit GEMM that
  reads the image / token input in place, bias + LayerNorm in the epilogue, tokens out; backward
  recomputes the conv rows and runs the LayerNorm backward in one kernel, then the conv's input
  and weight gradients through ``at::convolution_backward`` (cuDNN). fp32, fp16, bf16.
- ``cpp``: the extension's C++ CPU kernel: the conv by oneDNN on the channels-last view (token
  input read in place; its output is the tokens), then a fused LayerNorm pass; an im2col + GEMM
  engine where oneDNN is missing. Inference (no gradient needed, fp32) passes the weight
  pre-packed in oneDNN's blocked layout, cached per weight version (:func:`packed_cpu_weight`),
  so the conv skips its per-call weight reorder. Backward: fused LayerNorm backward, oneDNN conv
  gradients. fp32 and fp64; bf16 forward (inference: refused when a gradient is needed): im2col
  in bf16, the GEMM on fp32-widened chunks (bf16 products, fp32 accumulation), bias and
  LayerNorm in fp32, tokens rounded to bf16 once.
- ``torch``: stock ops without layout copies: conv on the channels-last (token) view, whose
  output flattens to tokens as a view, then ``F.layer_norm``. The fallback when the extension is
  not built, the choice for fp16 on CPU and for bf16 training.
- reference: the official NVlabs code, op for op.

The extension's ops are ``torch.ops.fastseg_ext.overlap_patch_embed_fwd`` / ``_bwd``, defined in
C++ with ``TORCH_LIBRARY``; their fake implementations are registered here, so ``torch.compile``
and ``torch.export`` trace the op without graph breaks. If the extension cannot be loaded
(not built, ``FASTSEG_SKIP_EXT=1``, built for another torch), the automatic choice falls back to
``torch`` with one warning, and ``python -m fastseg info`` gives the reason.
"""
from __future__ import annotations

import importlib
import os
import warnings
import weakref

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch
from fastseg.ops.conv import conv2d

OP = "overlap_patch_embed"
CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CPP_BACKWARD_DTYPES = (torch.float32, torch.float64)  # bfloat16 is forward-only (inference)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_CHANNELS = 1024  # one CUDA program holds whole rows of C for the LayerNorm epilogue


def _as_image(x: torch.Tensor, hw) -> torch.Tensor:
    """Tokens (B, H·W, Cin) with hw=(H, W) → the (B, Cin, H, W) view of the same memory; an image as is."""
    if hw is None:
        return x
    H, W = hw
    B, _, Cin = x.shape
    return x.view(B, H, W, Cin).permute(0, 3, 1, 2)


def _out_size(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def overlap_patch_embed_reference(x, weight, bias, stride: int, ln_weight, ln_bias, eps: float, hw=None):
    """The official NVlabs math: conv, flatten(2).transpose(1, 2), F.layer_norm.

    x: (B, Cin, H, W) image, or tokens (B, H·W, Cin) with hw=(H, W) (viewed as an image, no copy).
    Returns tokens (B, Ho·Wo, C), Ho, Wo.
    """
    if hw is not None:
        x = _as_image(x, hw)
    x = conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)
    _, _, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    return F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), H, W


def check_inputs(x, weight, bias, stride, ln_weight, ln_bias, hw=None, mixed_dtypes: bool = False) -> None:
    """Ranks, channel counts, kernel and stride, dtypes and devices, named in the error.
    ``mixed_dtypes``: under autocast the tensors may differ in dtype (the conv casts them)."""
    where = "overlap_patch_embed"
    tensors = {"x": x, "weight": weight, "ln_weight": ln_weight, "ln_bias": ln_bias}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hw is None:
        if x.ndim != 4:
            raise ValueError(f"{where}: x must be an image (B, Cin, H, W), or tokens (B, H·W, Cin) with hw=(H, W); "
                             f"got shape {tuple(x.shape)} and no hw")
    else:
        if x.ndim != 3:
            raise ValueError(f"{where}: with hw={hw!r}, x must be tokens (B, H·W, Cin), got shape {tuple(x.shape)}")
        if len(hw) != 2 or any(not isinstance(v, int) and not isinstance(v, torch.SymInt) for v in hw):
            raise TypeError(f"{where}: hw must be a pair of ints (H, W), got {hw!r}")
        if hw[0] < 1 or hw[1] < 1 or hw[0] * hw[1] != x.shape[1]:
            raise ValueError(f"{where}: hw={tuple(hw)} does not match the {x.shape[1]} tokens of x {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be floating point, got {x.dtype}")
    if weight.ndim != 4:
        raise ValueError(f"{where}: weight must be a conv weight (C, Cin, k, k), got shape {tuple(weight.shape)}")
    C, cin_w, kh, kw = weight.shape
    cin = x.shape[1] if hw is None else x.shape[2]
    if kh != kw:
        raise ValueError(f"{where}: only square kernels are supported, got a {kh}x{kw} kernel")
    if cin != cin_w:
        raise ValueError(f"{where}: x has {cin} channels but weight {tuple(weight.shape)} expects {cin_w}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{where}: stride must be an int >= 1, got {stride!r}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{where}: empty input, x has shape {tuple(x.shape)}")
    for name in ("ln_weight", "ln_bias", "bias"):
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{where}: {name} must have shape ({C},) for {C} output channels, got {tuple(t.shape)}")
    for name, t in tensors.items():
        if t.dtype != x.dtype and not mixed_dtypes:
            raise TypeError(f"{where}: {name} is {t.dtype} but x is {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}; move them to one device")


# --- the compiled extension ---------------------------------------------------------------------

_extension_state = None  # the loaded module, or the reason it is unavailable (a str); loaded once
_fallback_warned = False


def _load_extension():
    if os.environ.get("FASTSEG_SKIP_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        return "FASTSEG_SKIP_EXT is set"
    try:
        module = importlib.import_module("fastseg._C")
    except ModuleNotFoundError:
        return ("fastseg._C is not installed: it was built with FASTSEG_SKIP_EXT=1 or without a working "
                "compiler; reinstall with `pip install --no-build-isolation -e .`")
    except (ImportError, OSError) as e:  # e.g. built against another torch: undefined symbols
        return f"fastseg._C failed to load: {e}; rebuild it against this torch"
    _register_fakes()
    return module


def extension():
    """The compiled extension module ``fastseg._C``, or a str saying why it is unavailable."""
    global _extension_state
    if _extension_state is None:
        _extension_state = _load_extension()
    return _extension_state


def extension_op_reasons(op_name: str) -> list[str]:
    """Why ``torch.ops.fastseg_ext.<op_name>`` cannot be called (empty: the loaded extension has
    it). Every op with a ``cpp`` backend starts its reasons here."""
    ext = extension()
    if isinstance(ext, str):
        return [f"extension not built ({ext})"]
    if not hasattr(torch.ops.fastseg_ext, op_name):
        return [f"the built extension predates {op_name}; rebuild with `pip install --no-build-isolation -e .`"]
    return []


def _register_fakes() -> None:
    """Shapes, dtypes and strides of the extension ops' outputs, for FakeTensor tracing."""

    @torch.library.register_fake("fastseg_ext::overlap_patch_embed_fwd")
    def _(x, weight, bias, ln_weight, ln_bias, stride, padding, eps, keep_y, packed_weight=None):
        B, _, H, W = x.shape
        C, _, k, _ = weight.shape
        Ho = (H + 2 * padding - k) // stride + 1
        Wo = (W + 2 * padding - k) // stride + 1
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.new_empty((B, Ho * Wo, C)) if keep_y else x.new_empty((0,))
        return (x.new_empty((B, Ho * Wo, C)), x.new_empty((B * Ho * Wo,), dtype=stat),
                x.new_empty((B * Ho * Wo,), dtype=stat), y)

    @torch.library.register_fake("fastseg_ext::overlap_patch_embed_bwd")
    def _(grad_out, x, weight, bias, ln_weight, mean, rstd, y, stride, padding, needs_dx, needs_dweight):
        C = weight.shape[0]
        dx = torch.empty_like(x) if needs_dx else x.new_empty((0,))  # the kernels keep x's layout
        dweight = weight.new_empty(weight.shape) if needs_dweight else weight.new_empty((0,))
        return dx, dweight, weight.new_empty((C,)), ln_weight.new_empty((C,)), ln_weight.new_empty((C,))


class OverlapPatchEmbedFunction(torch.autograd.Function):
    """The extension's forward and backward.

    keep_y (CPU, when a gradient will be needed): the forward also returns the conv rows, which the
    backward then reuses, as eager keeps its LayerNorm input. Otherwise (CUDA) the backward kernel
    recomputes them: no pre-LayerNorm copy is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ln_weight, ln_bias, stride: int, eps: float, keep_y: bool):
        padding = weight.shape[-1] // 2
        out, mean, rstd, y = torch.ops.fastseg_ext.overlap_patch_embed_fwd(
            x, weight, bias, ln_weight, ln_bias, stride, padding, eps, keep_y)
        ctx.save_for_backward(x, weight, bias, ln_weight, mean, rstd, y if keep_y else None)
        ctx.stride, ctx.padding = stride, padding
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, ln_weight, mean, rstd, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dweight, dbias, dln_weight, dln_bias = torch.ops.fastseg_ext.overlap_patch_embed_bwd(
            grad_out, x, weight, bias, ln_weight, mean, rstd, y, ctx.stride, ctx.padding, need[0], need[1])
        return (dx if need[0] else None, dweight if need[1] else None,
                dbias if bias is not None and need[2] else None,
                dln_weight if need[3] else None, dln_bias if need[4] else None, None, None, None)


# --- oneDNN-packed conv weights for CPU inference ----------------------------------------------

_PACKED_LIMIT = 64  # weights with a packed copy at once (MiT has 4 patch embeddings per model)
_packed_weights: dict[int, tuple] = {}  # id(weight) -> (weakref to weight, key, packed copy)


def _can_pack() -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and os.environ.get("FASTSEG_CPU_CONV", "") != "im2col")


def packed_cpu_weight(weight: torch.Tensor, x4: torch.Tensor, stride: int):
    """The conv weight in oneDNN's blocked layout, for the C++ kernel's inference forward, or None.

    Without it oneDNN reorders the dense weight on every call (up to a third of the conv's time at
    stages 3-4). The copy is cached per weight and keyed on its version counter (bumped by
    optimiser steps, ``load_state_dict``, any in-place change) and storage, so it never serves
    stale values; it is dropped when the weight is freed. float32 only (oneDNN's CPU conv);
    never while compiling (the traced op takes the dense weight).
    """
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if not _can_pack():
        return None
    try:
        version = weight._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter: nothing to key on
        return None
    key = (version, weight.data_ptr(), x4.shape[1], stride)
    wid = id(weight)
    entry = _packed_weights.get(wid)
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    pad = weight.shape[-1] // 2
    with torch.no_grad():
        packed = torch.ops.aten.mkldnn_reorder_conv2d_weight(
            weight.detach().to_mkldnn(), [pad, pad], [stride, stride], [1, 1], 1, list(x4.shape))
    if wid not in _packed_weights and len(_packed_weights) >= _PACKED_LIMIT:
        _packed_weights.pop(next(iter(_packed_weights)))  # the oldest
    # The callback runs when the weight is freed, before its id can be reused.
    _packed_weights[wid] = (weakref.ref(weight, lambda _, wid=wid: _packed_weights.pop(wid, None)), key, packed)
    return packed


def overlap_patch_embed_extension(x, weight, bias, stride: int, ln_weight, ln_bias, eps: float, hw=None):
    """The ``cuda`` / ``cpp`` backends: one kernel forward, reading x in place (any strides)."""
    x4 = _as_image(x, hw)
    if x4.device.type == "cpu" and not x4.is_contiguous(memory_format=torch.channels_last):
        # The CPU kernel convolves channels-last (an NCHW image is copied once, 3 channels at
        # stage 1): copying here lets autograd keep the copy for the backward instead of redoing it.
        x4 = x4.contiguous(memory_format=torch.channels_last)
    k = weight.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x4, weight, bias, ln_weight, ln_bias))
    if needs_grad:
        keep_y = x4.device.type == "cpu"
        out = OverlapPatchEmbedFunction.apply(x4, weight, bias, ln_weight, ln_bias, int(stride), float(eps), keep_y)
    else:  # inference: the op alone, without autograd bookkeeping
        packed = packed_cpu_weight(weight, x4, int(stride)) if x4.device.type == "cpu" else None
        out = torch.ops.fastseg_ext.overlap_patch_embed_fwd(
            x4, weight, bias, ln_weight, ln_bias, int(stride), k // 2, float(eps), False, packed)[0]
    return out, _out_size(x4.shape[2], k, stride), _out_size(x4.shape[3], k, stride)


# --- torch backend ------------------------------------------------------------------------------

def overlap_patch_embed_torch(x, weight, bias, stride: int, ln_weight, ln_bias, eps: float, hw=None):
    """Stock ops, no layout copies: the conv runs channels-last, so its output is tokens as a view."""
    x4 = _as_image(x, hw)
    if not x4.is_contiguous(memory_format=torch.channels_last):
        # An NCHW image (3 channels at stage 1): one small copy, so the conv writes channels-last
        # output and the transposed copy of its C-times-larger output disappears.
        x4 = x4.contiguous(memory_format=torch.channels_last)
    y = conv2d(x4, weight, bias, stride=stride, padding=weight.shape[-1] // 2)
    B, C, Ho, Wo = y.shape
    tokens = y.permute(0, 2, 3, 1).reshape(B, Ho * Wo, C)  # a view of channels-last output
    return F.layer_norm(tokens, (C,), ln_weight, ln_bias, eps), Ho, Wo


# --- dispatch -----------------------------------------------------------------------------------

def _extension_reasons() -> list[str]:
    ext = extension()
    return [f"extension not built ({ext})"] if isinstance(ext, str) else []


def _autocast_reasons(autocast: bool) -> list[str]:
    return ["autocast is on (the torch backend follows its casting rules)"] if autocast else []


def _cpp_reasons(device: torch.device, dtype: torch.dtype, autocast: bool = False, needs_grad: bool = False,
                 **_) -> list[str]:
    reasons = _extension_reasons()
    if reasons:
        return reasons
    if device.type != "cpu":
        reasons.append(f"device type {device.type!r} (the C++ kernel takes CPU tensors)")
    if dtype not in CPP_DTYPES:
        reasons.append(f"dtype {dtype} (the C++ kernel computes in float32/float64, bfloat16 forward-only)")
    elif needs_grad and dtype not in CPP_BACKWARD_DTYPES:
        reasons.append(f"a gradient is needed in {dtype} (the C++ backward computes in float32/float64)")
    return reasons + _autocast_reasons(autocast)


def _cuda_reasons(device: torch.device, dtype: torch.dtype, out_channels: int | None = None,
                  autocast: bool = False, **_) -> list[str]:
    reasons = _extension_reasons()
    if reasons:
        return reasons
    if not extension().with_cuda:
        return ["extension built without CUDA (torch without CUDA, or no nvcc, at build time)"]
    if device.type != "cuda":
        reasons.append(f"device type {device.type!r}")
    elif torch.cuda.get_device_capability(device)[0] < 8:
        reasons.append("compute capability < 8.0 (the kernel is built for sm_80 and newer)")
    if dtype not in CUDA_DTYPES:
        reasons.append(f"dtype {dtype} (supports float32, float16, bfloat16)")
    if out_channels is not None and out_channels > CUDA_MAX_CHANNELS:
        reasons.append(f"{out_channels} output channels (the kernel holds rows of at most {CUDA_MAX_CHANNELS})")
    return reasons + _autocast_reasons(autocast)


def _torch_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    return [] if dtype.is_floating_point else [f"dtype {dtype}"]


# Loaded at import (cheap: torch is loaded already), never first inside a torch.compile trace.
extension()

dispatch.register_reference(OP, overlap_patch_embed_reference)
dispatch.register(OP, dispatch.Backend("cuda", _cuda_reasons, overlap_patch_embed_extension))
dispatch.register(OP, dispatch.Backend("cpp", _cpp_reasons, overlap_patch_embed_extension))
dispatch.register(OP, dispatch.Backend("torch", _torch_reasons, overlap_patch_embed_torch))


def _warn_if_extension_missing(choice: dispatch.Choice) -> None:
    """One warning per process when the automatic choice passed over the extension because it is
    not built (never while torch.compile traces: the eager call has warned already)."""
    global _fallback_warned
    if _fallback_warned or choice.forced or choice.backend not in ("torch", dispatch.REFERENCE):
        return
    if torch.compiler.is_compiling():
        return
    why = [r for name in ("cuda", "cpp") for r in choice.skipped.get(name, []) if r.startswith("extension not built")]
    if why:
        _fallback_warned = True
        warnings.warn(f"fastseg: the compiled patch-embedding kernels are unavailable: {why[0]}; "
                      f"overlap_patch_embed uses the {choice.backend!r} backend instead", RuntimeWarning, stacklevel=3)


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 took no device type
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def overlap_patch_embed(x, weight, bias, stride: int, ln_weight, ln_bias, eps: float, hw=None):
    """Fused overlapping patch embedding; the backend is chosen by :mod:`fastseg.ops.dispatch`.

    x: image (B, Cin, H, W) in any memory format, or tokens (B, H·W, Cin) with ``hw=(H, W)``;
    weight: (C, Cin, k, k), bias: (C,) or None, stride: int, ln_weight / ln_bias: (C,), eps: float.
    Returns tokens (B, Ho·Wo, C) (contiguous), Ho, Wo. Differentiable in x and every parameter.
    """
    autocast = _autocast_on(x.device)
    check_inputs(x, weight, bias, stride, ln_weight, ln_bias, hw, mixed_dtypes=autocast)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, ln_weight, ln_bias))
    choice = dispatch.choose(OP, device=x.device, dtype=x.dtype, out_channels=weight.shape[0], autocast=autocast,
                             needs_grad=needs_grad)
    _warn_if_extension_missing(choice)
    return dispatch.implementation(OP, choice.backend)(x, weight, bias, stride, ln_weight, ln_bias, eps, hw)
