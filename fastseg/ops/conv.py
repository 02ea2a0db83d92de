"""``conv2d``: F.conv2d with a guard against a oneDNN bfloat16 bug on CPU.

On torch 2.13's CPU build (oneDNN), a bf16 ``conv2d`` whose output is one column wide (Wo == 1,
any Ho) returns garbage — values up to 1e36, NaN, or different results on repeated calls — and
its weight gradient does too, for strided convs like SegFormer's spatial-reduction (k = s = 2)
and patch-embedding (k3 s2 p1) convs. An image narrow enough to make a late stage's map one
column wide hits it (e.g. 61×47 at batch 2, or any width < 32·sr at stage 3). fp32 and fp16 are
unaffected, and so are depthwise convs. Such a conv is tiny (one column), so it runs in fp32 and
casts back: the result is bf16 as the caller expects, with autograd through the casts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _computes_in_cpu_bf16(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return True
    return (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _out_width(width: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (width + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0, dilation: int = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with int arguments;
    x: (B, Cin, H, W) in any memory format, weight: (C, Cin/groups, k, k)."""
    if (groups == 1 and x.dim() == 4 and _computes_in_cpu_bf16(x)
            and _out_width(x.shape[-1], weight.shape[-1], stride, padding, dilation) == 1):
        with torch.autocast("cpu", enabled=False):
            y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                         stride, padding, dilation, groups)
        return y.to(torch.bfloat16)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
