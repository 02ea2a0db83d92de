"""Mix-FFN depthwise 3×3 conv (padding 1) + bias + GELU, on tokens.

    y = GELU(dwconv3x3(x) + b)      x, y: (B, N, C) tokens of an H×W map (N = H·W)

Backends: ``triton`` (``fastseg.kernels.dwconv3x3_gelu``, one pass forward, backward recomputing
the pre-activation; custom ops ``fastseg::dwconv3x3_gelu_fwd``/``_bwd``), ``torch`` (stock conv
on the channels-last view of the tokens), reference (the official transpose/conv/GELU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch
from fastseg.ops.sr_attention import triton_auto_reasons


def dwconv3x3_gelu_reference(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """The official math: tokens → NCHW view, depthwise conv, back to tokens, then GELU."""
    B, N, C = x.shape
    x = x.transpose(1, 2).view(B, C, H, W)
    x = F.conv2d(x, weight, bias, stride=1, padding=1, groups=C)
    x = x.flatten(2).transpose(1, 2)
    return F.gelu(x, approximate=approximate)


def dwconv3x3_gelu_torch(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """Stock ops on the channels-last view of the tokens: no transpose copies in or out."""
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


def dwconv3x3_gelu_triton(x, H, W, weight, bias, approximate="none"):
    x = x if x.stride(-1) == 1 else x.contiguous()
    return DWConvGELUFunction.apply(x, H, W, weight, bias, approximate)


def _triton_reasons(device: torch.device, dtype: torch.dtype, **_) -> list[str]:
    from fastseg.ops.sr_attention import triton_device_reasons

    kernels = _kernels()
    if isinstance(kernels, str):
        return [f"triton is not importable ({kernels})"]
    reasons = [] if dtype in kernels.SUPPORTED_DTYPES else [f"dtype {dtype}"]
    return reasons + triton_device_reasons(device, dtype)


def check_inputs(x, H: int, W: int, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError("dwconv3x3_gelu: x must be tokens (B, N, C)")
    if not x.is_floating_point():
        raise TypeError(f"dwconv3x3_gelu: x must be floating point, got {x.dtype}")
    B, N, C = x.shape
    if H * W != N:
        raise ValueError(f"dwconv3x3_gelu: {N} tokens do not form a {H}x{W} map")
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"dwconv3x3_gelu: weight must be ({C}, 1, 3, 3), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"dwconv3x3_gelu: bias must be ({C},), got {tuple(bias.shape)}")


def dwconv3x3_gelu(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """Fused depthwise 3×3 conv + bias + GELU on tokens x: (B, H·W, C) → (B, H·W, C); differentiable."""
    check_inputs(x, H, W, weight, bias)
    impl = dispatch.resolve("dwconv3x3_gelu", device=x.device, dtype=x.dtype)
    return impl(x, H, W, weight, bias, approximate)


dispatch.register_reference("dwconv3x3_gelu", dwconv3x3_gelu_reference)
dispatch.register("dwconv3x3_gelu", dispatch.Backend(
    "triton", _triton_reasons, dwconv3x3_gelu_triton, auto_reasons=lambda device, **_: triton_auto_reasons(device)))
dispatch.register("dwconv3x3_gelu", dispatch.Backend(
    "torch", lambda dtype, **_: [] if dtype.is_floating_point else [f"dtype {dtype}"], dwconv3x3_gelu_torch))
