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


def dwconv3x3_gelu_torch(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """Stock ops on the channels-last view of the tokens: no transpose copies in or out."""
    B, N, C = x.shape
    img = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # (B, C, H, W) view, channels-last strides
    y = F.conv2d(img, weight, bias, padding=1, groups=C)
    return F.gelu(y.permute(0, 2, 3, 1).reshape(B, N, C), approximate=approximate)


def dwconv3x3_gelu(
    x: torch.Tensor, H: int, W: int, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    impl = dispatch.resolve("dwconv3x3_gelu", device=x.device, dtype=x.dtype)
    return impl(x, H, W, weight, bias, approximate)


dispatch.register_reference("dwconv3x3_gelu", dwconv3x3_gelu_reference)
dispatch.register("dwconv3x3_gelu", dispatch.Backend(
    "torch", lambda dtype, **_: [] if dtype.is_floating_point else [f"dtype {dtype}"], dwconv3x3_gelu_torch))
