"""Mix-FFN depthwise 3×3 conv (padding 1) + bias + GELU, on tokens, with fc1's bias folded in.

    y = GELU(dwconv3x3(x + in_bias) + b)      x, y: (B, N, C) tokens of an H×W map (N = H·W)

``in_bias`` (C,) is the bias of the Linear before the conv (fc1): the fused Mix-FFN runs fc1
without it, since addmm would first copy the bias into its whole (B, N, 4C) output, and the op
adds it to every in-image tap (the zero padding stays zero): exactly ``conv2d(x + in_bias)``.

Backends: ``triton`` (``fastseg.kernels.dwconv3x3_gelu``, one pass forward, backward recomputing
the pre-activation; custom ops ``fastseg::dwconv3x3_gelu_fwd``/``_bwd``; ``in_bias`` is added
before the kernel), ``cpp`` (the extension's C++ CPU kernel ``fastseg_ext::dwconv3x3_gelu_fwd``,
``csrc/dwconv3x3_gelu_cpu.cpp``: one pass over the tokens, fp32/bf16, ``in_bias`` in-kernel;
backward by stock ops recomputing the pre-activation in fp32), ``torch`` (stock conv on the
channels-last view of the tokens), reference (the official transpose/conv/GELU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch
from fastseg.ops.sr_attention import triton_auto_reasons


def _add_in_bias(x: torch.Tensor, in_bias: torch.Tensor | None) -> torch.Tensor:
    return x if in_bias is None else x + in_bias.to(x.dtype)


def dwconv3x3_gelu_reference(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
    in_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official math: tokens → NCHW view, depthwise conv, back to tokens, then GELU
    (``x + in_bias`` first, as fc1 with its bias would give)."""
    x = _add_in_bias(x, in_bias)
    B, N, C = x.shape
    x = x.transpose(1, 2).view(B, C, H, W)
    x = F.conv2d(x, weight, bias, stride=1, padding=1, groups=C)
    x = x.flatten(2).transpose(1, 2)
    return F.gelu(x, approximate=approximate)


def dwconv3x3_gelu_torch(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
    in_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stock ops on the channels-last view of the tokens: no transpose copies in or out."""
    x = _add_in_bias(x, in_bias)
    B, N, C = x.shape
    img = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # (B, C, H, W) view, channels-last strides
    y = F.conv2d(img, weight, bias, padding=1, groups=C)
    return F.gelu(y.permute(0, 2, 3, 1).reshape(B, N, C), approximate=approximate)


# --- triton backend -------------------------------------------------------------------------------

_kernel_module = None


def _kernels():
    """The Triton kernel module, or the ImportError text (imported once)."""
    global _kernel_module
    if _kernel_module is None:
        try:
            from fastseg.kernels import dwconv3x3_gelu as module
        except ImportError as e:
            module = str(e)
        _kernel_module = module
    return _kernel_module


@torch.library.custom_op("fastseg::dwconv3x3_gelu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None,
            approximate: str) -> torch.Tensor:
    return _kernels().dwconv3x3_gelu_fwd(x, H, W, weight, bias, approximate)


@_fwd_op.register_fake
def _(x, H, W, weight, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastseg::dwconv3x3_gelu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None,
            approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dweight, dbias = _kernels().dwconv3x3_gelu_bwd(dy, x, H, W, weight, bias, approximate)
    # custom ops return tensors only: an empty dbias stands for "no bias"
    return dx, dweight, dbias if dbias is not None else weight.new_empty(0)


@_bwd_op.register_fake
def _(dy, x, H, W, weight, bias, approximate):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(0 if bias is None else bias.shape[0])


class DWConvGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, H: int, W: int, weight, bias, approximate: str):
        ctx.save_for_backward(x, weight, bias)
        ctx.H, ctx.W, ctx.approximate = H, W, approximate
        return torch.ops.fastseg.dwconv3x3_gelu_fwd(x, H, W, weight, bias, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.fastseg.dwconv3x3_gelu_bwd(dy, x, ctx.H, ctx.W, weight, bias, ctx.approximate)
        return dx, None, None, dweight, dbias if bias is not None else None, None


def dwconv3x3_gelu_triton(x, H, W, weight, bias, approximate="none", in_bias=None):
    x = _add_in_bias(x, in_bias)  # one extra pass; differentiable through the stock add
    x = x if x.stride(-1) == 1 else x.contiguous()
    return DWConvGELUFunction.apply(x, H, W, weight, bias, approximate)


def _triton_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    from fastseg.ops.sr_attention import triton_device_reasons

    kernels = _kernels()
    if isinstance(kernels, str):
        return [f"triton is not importable ({kernels})"]
    reasons = [] if dtype in kernels.SUPPORTED_DTYPES else [f"dtype {dtype}"]
    return reasons + triton_device_reasons(device, dtype)


GELU_FORMS = ("none", "tanh")


def check_inputs(x, H: int, W: int, weight, bias, in_bias=None, approximate: str = "none") -> None:
    """Ranks, shapes, dtypes and devices, named in the error. weight / bias / in_bias may be x's
    dtype or float32 (autocast gives bf16 activations with fp32 parameters)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError("dwconv3x3_gelu: x must be tokens (B, N, C)")
    if not x.is_floating_point():
        raise TypeError(f"dwconv3x3_gelu: x must be floating point, got {x.dtype}")
    B, N, C = x.shape
    if H * W != N:
        raise ValueError(f"dwconv3x3_gelu: {N} tokens do not form a {H}x{W} map")
    if x.numel() == 0:
        raise ValueError(f"dwconv3x3_gelu: empty input, x has shape {tuple(x.shape)}")
    if not isinstance(approximate, str) or approximate not in GELU_FORMS:
        raise ValueError(f"dwconv3x3_gelu: approximate must be one of {GELU_FORMS}, got {approximate!r}")
    for name, t, shape in (("weight", weight, (C, 1, 3, 3)), ("bias", bias, (C,)), ("in_bias", in_bias, (C,))):
        if t is None and name != "weight":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dwconv3x3_gelu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"dwconv3x3_gelu: {name} must be {shape}, got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"dwconv3x3_gelu: {name} is {t.dtype}; it must be x's dtype {x.dtype} or torch.float32")
        if t.device != x.device:
            raise ValueError(f"dwconv3x3_gelu: {name} is on {t.device} but x is on {x.device}")


def dwconv3x3_gelu(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
    in_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused depthwise 3×3 conv + bias + GELU on tokens; differentiable in x and every parameter.

    x: (B, H·W, C) tokens, any strides; weight: (C, 1, 3, 3); bias: (C,) or None; in_bias: (C,)
    or None, added to x before the conv (fc1's bias); approximate: "none" (erf) or "tanh".
    Returns (B, H·W, C) in x's dtype.
    """
    check_inputs(x, H, W, weight, bias, in_bias, approximate)
    impl = dispatch.resolve("dwconv3x3_gelu", device=x.device, dtype=x.dtype)
    return impl(x, H, W, weight, bias, approximate, in_bias=in_bias)


# Backends that add in_bias inside the kernel; the others add it in a pass of their own.
IN_BIAS_IN_KERNEL = ("cpp",)


def folds_in_bias(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether handing fc1's bias to this op (``in_bias``) saves work for these inputs: only when
    the backend that will run adds it in-kernel. Elsewhere fc1 should keep its bias (on GPUs the
    GEMM's epilogue adds it for free, and a separate ``x + in_bias`` pass would cost one more
    read and write of the 4C-channel hidden tensor)."""
    return dispatch.choose("dwconv3x3_gelu", device=device, dtype=dtype).backend in IN_BIAS_IN_KERNEL


# --- cpp backend -----------------------------------------------------------------------------------

CPP_DTYPES = (torch.float32, torch.bfloat16)


def _has_cpp_op() -> bool:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    return not extension_op_reasons("dwconv3x3_gelu_fwd")


_cpp_fake_registered = False


def _register_cpp_fake() -> None:
    global _cpp_fake_registered
    if _cpp_fake_registered or not _has_cpp_op():
        return
    _cpp_fake_registered = True

    @torch.library.register_fake("fastseg_ext::dwconv3x3_gelu_fwd")
    def _(x, H, W, weight, bias, in_bias, approximate):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # the kernel writes contiguous y


def _as_image(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H·W, C) → the (B, C, H, W) channels-last view of the same memory (a copy only if the
    token strides cannot be viewed so)."""
    return t.unflatten(1, (H, W)).permute(0, 3, 1, 2)


def dwconv3x3_gelu_backward(dy, x, H: int, W: int, weight, bias, in_bias, approximate: str, needs):
    """Gradients of y = GELU(dwconv3x3(x + in_bias) + bias) with stock ops, in fp32: the
    pre-activation z is recomputed (oneDNN depthwise conv), dz = gelu_backward(dy, z), then the
    conv's input / weight / bias gradients (``aten.convolution_backward``); d in_bias is the sum of
    the conv input's gradient over batch and tokens. ``needs``: (x, weight, bias, in_bias).
    Returns (dx, dweight, dbias, din_bias), None where not needed, each in its input's dtype."""
    need_x, need_w, need_b, need_ib = needs
    B, N, C = x.shape
    f32 = torch.float32
    xin = x.to(f32) if in_bias is None else x.to(f32) + in_bias.to(f32)
    img = _as_image(xin, H, W)
    w32 = weight.to(f32)
    z = F.conv2d(img, w32, None if bias is None else bias.to(f32), padding=1, groups=C)
    dz = torch.ops.aten.gelu_backward(_as_image(dy.to(f32), H, W), z, approximate=approximate)
    need_in = need_x or (in_bias is not None and need_ib)
    dimg, dweight, dbias = torch.ops.aten.convolution_backward(
        dz, img, w32, None if bias is None else [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C,
        [need_in, need_w, bias is not None and need_b])
    dx = dimg.permute(0, 2, 3, 1).reshape(B, N, C).to(x.dtype) if need_x else None
    din_bias = dimg.sum((0, 2, 3)).to(in_bias.dtype) if in_bias is not None and need_ib else None
    return (dx, dweight.to(weight.dtype) if need_w else None,
            dbias.to(bias.dtype) if bias is not None and need_b else None, din_bias)


class DWConvGELUCppFunction(torch.autograd.Function):
    """Forward: the C++ kernel; backward: :func:`dwconv3x3_gelu_backward` (stock ops)."""

    @staticmethod
    def forward(ctx, x, H: int, W: int, weight, bias, in_bias, approximate: str):
        ctx.save_for_backward(x, weight, bias, in_bias)
        ctx.H, ctx.W, ctx.approximate = H, W, approximate
        return torch.ops.fastseg_ext.dwconv3x3_gelu_fwd(x, H, W, weight, bias, in_bias, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, in_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dweight, dbias, din_bias = dwconv3x3_gelu_backward(
            dy, x, ctx.H, ctx.W, weight, bias, in_bias, ctx.approximate, (need[0], need[3], need[4], need[5]))
        return dx, None, None, dweight, dbias, din_bias, None


def dwconv3x3_gelu_cpp(x, H, W, weight, bias, approximate="none", in_bias=None):
    """The ``cpp`` backend: one pass of the C++ kernel (x read in place when its channel stride is 1)."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, in_bias)):
        return DWConvGELUCppFunction.apply(x, H, W, weight, bias, in_bias, approximate)
    return torch.ops.fastseg_ext.dwconv3x3_gelu_fwd(x, H, W, weight, bias, in_bias, approximate)


def _cpp_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    from fastseg.ops.overlap_patch_embed import extension_op_reasons

    reasons = extension_op_reasons("dwconv3x3_gelu_fwd")
    if reasons:
        return reasons
    reasons = []
    if device.type != "cpu":
        reasons.append(f"device type {device.type!r} (the C++ kernel takes CPU tensors)")
    if dtype not in CPP_DTYPES:
        reasons.append(f"dtype {dtype} (the C++ kernel computes float32 and bfloat16)")
    return reasons


_register_cpp_fake()
dispatch.register_reference("dwconv3x3_gelu", dwconv3x3_gelu_reference)
dispatch.register("dwconv3x3_gelu", dispatch.Backend(
    "triton", _triton_reasons, dwconv3x3_gelu_triton, auto_reasons=lambda device, **_: triton_auto_reasons(device)))
dispatch.register("dwconv3x3_gelu", dispatch.Backend("cpp", _cpp_reasons, dwconv3x3_gelu_cpp))
dispatch.register("dwconv3x3_gelu", dispatch.Backend(
    "torch", lambda dtype, **_: [] if dtype.is_floating_point else [f"dtype {dtype}"], dwconv3x3_gelu_torch))
