"""Fused bilinear upsample + argmax over classes (inference), in Triton.

    labels[b, y, x] = argmax_k up(logits)[b, k, y, x]     first maximum wins; NaN is the maximum
    scores[b, y, x] = up(logits)[b, labels[b, y, x], y, x]             (optional)

up is ``F.interpolate(mode="bilinear", align_corners=False, size=(H, W))``; the (B, K, H, W)
tensor never exists. One program owns one output row and BLOCK_W columns; it walks the K
classes, interpolating each from its four corners, and keeps a running maximum and argmax in
registers. Per axis (rows shown), in fp32 (the arithmetic of the C++ kernel,
``csrc/upsample_argmax_cpu.cpp``):

    scale = float32(h) / float32(H)
    src   = max(fma(scale, y + 0.5, -0.5), 0)
    y0    = min(floor(src), h - 1),  y1 = y0 + (y0 < h - 1),  l1 = clamp(src - y0, 0, 1),  l0 = 1 - l1
    (h == H: y0 = y1 = y, l0 = 1, l1 = 0)
    r0 = fma(v[y0, x0], lx0, v[y0, x1] lx1),  r1 = likewise for y1,  value = fma(r0, ly0, r1 ly1)

fp16/bf16 logits are read and interpolated in fp32. Logits may have any strides (NCHW or the
channels-last view the fused SegFormer returns). Offsets are int64.

Kernels and the host launcher only: no dispatch policy (see fastseg/ops/upsample_argmax.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseg.kernels import check_interpreter_ready, launch_device

__all__ = ["upsample_argmax_fwd", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _taps(o, n_in, n_out, scale):
    """Bilinear taps for output coordinates o (int32): (i0, i1) int64 and (l0, l1) fp32."""
    src = tl.fma(scale, o.to(tl.float32) + 0.5, -0.5)
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), n_in - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + (i0 < n_in - 1).to(tl.int32)
    same = n_in == n_out
    i0 = tl.where(same, o, i0)
    i1 = tl.where(same, o, i1)
    l1 = tl.where(same, 0.0, l1)
    return i0.to(tl.int64), i1.to(tl.int64), 1.0 - l1, l1


@triton.jit
def _upsample_argmax_kernel(
    x_ptr, labels_ptr, scores_ptr,
    K, h, w, H, W,
    sb, sk, sh, sw,
    scale_h, scale_w,
    WRITE_SCORES: tl.constexpr, BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0)  # b * H + y
    b = row // H
    oy = row % H
    ox = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = ox < W

    # Row taps: the same for the whole program (computed on a 1-vector, then reduced to scalars).
    oy_vec = tl.full((1,), 0, tl.int32) + oy
    y0, y1, ly0, ly1 = _taps(oy_vec, h, H, scale_h)
    y0 = tl.sum(y0, 0)
    y1 = tl.sum(y1, 0)
    ly0 = tl.sum(ly0, 0)
    ly1 = tl.sum(ly1, 0)
    x0, x1, lx0, lx1 = _taps(ox, w, W, scale_w)

    base = x_ptr + b.to(tl.int64) * sb
    p00 = base + y0 * sh + x0 * sw
    p01 = base + y0 * sh + x1 * sw
    p10 = base + y1 * sh + x0 * sw
    p11 = base + y1 * sh + x1 * sw

    v00 = tl.load(p00, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(p01, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(p10, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(p11, mask=mask, other=0.0).to(tl.float32)
    r0 = tl.fma(v00, lx0, v01 * lx1)
    r1 = tl.fma(v10, lx0, v11 * lx1)
    best = tl.fma(r0, ly0, r1 * ly1)
    arg = tl.zeros((BLOCK_W,), dtype=tl.int64)
    for k in range(1, K):
        off = k * sk  # int64: sk is passed as an int64 argument
        v00 = tl.load(p00 + off, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(p01 + off, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(p10 + off, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(p11 + off, mask=mask, other=0.0).to(tl.float32)
        r0 = tl.fma(v00, lx0, v01 * lx1)
        r1 = tl.fma(v10, lx0, v11 * lx1)
        v = tl.fma(r0, ly0, r1 * ly1)
        take = (v > best) | ((v != v) & (best == best))
        best = tl.where(take, v, best)
        arg = tl.where(take, k, arg)

    out = row.to(tl.int64) * W + ox
    tl.store(labels_ptr + out, arg, mask=mask)
    if WRITE_SCORES:
        tl.store(scores_ptr + out, best.to(scores_ptr.dtype.element_ty), mask=mask)


def upsample_argmax_fwd(logits: torch.Tensor, size, return_scores: bool = False):
    """logits (B, K, h, w) (any strides; fp32/fp16/bf16) → labels (B, H, W) int64 and, with
    ``return_scores``, the winning interpolated logit (B, H, W) in the logits' dtype (else None)."""
    check_interpreter_ready("upsample_argmax", _upsample_argmax_kernel)
    B, K, h, w = logits.shape
    H, W = int(size[0]), int(size[1])
    labels = torch.empty((B, H, W), dtype=torch.int64, device=logits.device)
    scores = torch.empty((B, H, W), dtype=logits.dtype, device=logits.device) if return_scores else None
    if B == 0:
        return labels, scores
    scale_h = float(torch.tensor(h, dtype=torch.float32) / torch.tensor(H, dtype=torch.float32))
    scale_w = float(torch.tensor(w, dtype=torch.float32) / torch.tensor(W, dtype=torch.float32))
    block_w = min(256, triton.next_power_of_2(W))
    grid = (B * H, triton.cdiv(W, block_w))
    sb, sk, sh, sw = logits.stride()
    with launch_device(logits):
        _upsample_argmax_kernel[grid](
            logits, labels, scores if scores is not None else labels,
            K, h, w, H, W,
            sb, sk, sh, sw,
            scale_h, scale_w,
            WRITE_SCORES=return_scores, BLOCK_W=block_w,
            num_warps=4 if block_w >= 128 else 1,
        )
    return labels, scores
