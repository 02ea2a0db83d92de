"""Overlapping patch embedding: strided conv, flatten to tokens, LayerNorm over C.

    tokens = LayerNorm(conv2d(x, weight, bias, stride, padding=k // 2))   x: (B, Cin, H, W)
    returns tokens (B, Ho·Wo, C), Ho, Wo
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.ops import dispatch


def overlap_patch_embed_reference(x, weight, bias, stride: int, ln_weight, ln_bias, eps: float):
    x = F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)
    _, _, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    return F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), H, W


def overlap_patch_embed(x, weight, bias, stride: int, ln_weight, ln_bias, eps: float):
    impl = dispatch.resolve("overlap_patch_embed", device=x.device, dtype=x.dtype)
    return impl(x, weight, bias, stride, ln_weight, ln_bias, eps)


dispatch.register_reference("overlap_patch_embed", overlap_patch_embed_reference)
