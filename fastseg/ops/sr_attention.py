"""Spatial-reduction attention of the MiT encoder, after the linear projections.

    out = softmax(q_h k_hᵀ · scale) v_h   for every head h, written back as tokens

q: (B, N, C) from the q projection; kv: (B, Nkv, 2C) from the kv projection (k = kv[..., :C],
v = kv[..., C:]); head h owns channels [h·D, (h+1)·D) with D = C / heads; out: (B, N, C).
"""
from __future__ import annotations

import torch

from fastseg.ops import dispatch


def sr_attention_reference(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The official NVlabs math: head split by permutes, full score matrix, softmax, transpose back."""
    B, N, C = q.shape
    head_dim = C // num_heads
    q = q.reshape(B, N, num_heads, head_dim).permute(0, 2, 1, 3)
    kv = kv.reshape(B, -1, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def sr_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The fused op: the backend is chosen by :mod:`fastseg.ops.dispatch`."""
    choice = dispatch.choose(
        "sr_attention", device=q.device, dtype=q.dtype, head_dim=q.shape[-1] // num_heads
    )
    if choice.backend == dispatch.REFERENCE:
        return sr_attention_reference(q, kv, num_heads, scale)
    return dispatch.implementation("sr_attention", choice.backend)(q, kv, num_heads, scale)
