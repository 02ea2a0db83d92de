"""Mix-FFN depthwise 3×3 conv (padding 1) + bias + GELU, on tokens.

    y = GELU(dwconv3x3(x) + b)      x, y: (B, N, C) tokens of an H×W map (N = H·W)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch


def dwconv3x3_gelu_reference(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """The official math: tokens → NCHW view, depthwise conv, back to tokens, then GELU."""
    B, N, C = x.shape
    x = x.transpose(1, 2).view(B, C, H, W)
    x = F.conv2d(x, weight, bias, stride=1, padding=1, groups=C)
    x = x.flatten(2).transpose(1, 2)
    return F.gelu(x, approximate=approximate)


def dwconv3x3_gelu(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    impl = dispatch.resolve("dwconv3x3_gelu", device=x.device, dtype=x.dtype)
    return impl(x, H, W, weight, bias, approximate)


dispatch.register_reference("dwconv3x3_gelu", dwconv3x3_gelu_reference)
