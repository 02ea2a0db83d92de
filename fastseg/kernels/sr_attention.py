"""Spatial-reduction attention of SegFormer (Xie et al., 2021, "SegFormer: Simple and Efficient
Design for Semantic Segmentation with Transformers"), forward and backward, in Triton.

After the q and kv Linear layers of an efficient self-attention block we have

    q  : (B, N, C)      C = heads * D, head h owns channels [h*D, (h+1)*D)
    kv : (B, Nkv, 2C)   k = kv[..., :C], v = kv[..., C:], same head split

and compute, per batch b and head h,

    S   = q_h k_hᵀ * scale                          (N, Nkv), never stored
    out[b, :, h*D:(h+1)*D] = softmax(S) v_h          written as (B, N, C)
    lse[b, h, :] = logsumexp(S, dim=-1)              (B, heads, N) fp32, for the backward

q and kv are read through their strides (only the last dim must be contiguous) and the output
is written straight in the (B, N, C) layout the output projection reads: no permute copies.

Q is long (N = H*W / 16 at stage 1) and KV short (Nkv = N / sr**2, 256 at a 512**2 image), so
the forward is a flash-style online softmax over KV blocks; when Nkv fits one block the loop
runs once and this is an exact single-pass softmax. Softmax and accumulators are fp32; the
kernels work in base 2 (exp2) with log2(e) folded into the scale.

Backward (flash-style recomputation from q, k and lse; no N x Nkv tensor in global memory):

    P  = exp(S - lse)            dV = Pᵀ dO           dP = dO Vᵀ
    delta = rowsum(dO * O)       dS = P * (dP - delta)
    dQ = dS K * scale            dK = dSᵀ Q * scale

This file holds kernels and host launchers only: no autograd.Function, no dispatch policy
(see fastseg/ops/sr_attention.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastseg.kernels import (check_interpreter_ready, dot_precision, interpreter_enabled, launch_device,
                             sm_count)

__all__ = ["sr_attention_fwd", "sr_attention_bwd", "SUPPORTED_DTYPES", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sr_attn_fwd_kernel(
    Q, KV, O, LSE,
    N, NKV, H, HEAD_DIM, qk_scale,
    stride_qb, stride_qn, stride_kvb, stride_kvn, stride_ob, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head); loops over all KV blocks.

    Q: (B, N, C), KV: (B, NKV, 2C), O: (B, N, C), LSE: (B, H, N) fp32 contiguous.
    qk_scale = scale * log2(e).  O = softmax(Q_h K_hᵀ scale) V_h,  LSE = ln(sum exp(S)).
    Grid: (cdiv(N, BLOCK_M), B * H).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b can pass 2**31 at large batch/images
    h = pid_bh % H
    C = H * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < HEAD_DIM  # BLOCK_D is HEAD_DIM rounded up to a power of two

    q_ptrs = Q + b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qn + (h * HEAD_DIM + offs_d)[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = KV + b * stride_kvb + h * HEAD_DIM
    v_base = KV + b * stride_kvb + C + h * HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, NKV, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < NKV
        rows_kv = cols.to(tl.int64) * stride_kvn
        # K is loaded already transposed (BLOCK_D, BLOCK_N) so the dot needs no tl.trans.
        kt = tl.load(k_base + rows_kv[None, :] + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        # Every block holds at least one real key (start_n < NKV), so m_new stays finite.
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows_kv[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        # P in the input dtype for the second GEMM (fp16/bf16 tensor cores), fp32 accumulate.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + offs_m.to(tl.int64)[:, None] * stride_on + (h * HEAD_DIM + offs_d)[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=m_mask)


@triton.jit
def _sr_attn_bwd_dq_kernel(
    Q, KV, O, DO, LSE, DELTA, DQ,
    N, NKV, H, HEAD_DIM, qk_scale, scale,
    stride_qb, stride_qn, stride_kvb, stride_kvn, stride_ob, stride_on,
    stride_dob, stride_don, stride_dqb, stride_dqn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head); computes delta and dQ.

    Q, O, DO, DQ: (B, N, C); KV: (B, NKV, 2C); LSE, DELTA: (B, H, N) fp32 contiguous.
    delta = rowsum(dO * O) (stored for the dK/dV kernel, which runs after this one: fusing the
    "preprocess" here saves a launch and a second read of dO).
    dQ = scale * sum_j dS_j K_j,  dS = P * (dO Vᵀ - delta),  P = exp(S - lse).
    Grid: (cdiv(N, BLOCK_M), B * H).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    C = H * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    cols_d = (h * HEAD_DIM + offs_d)[None, :]

    q = tl.load(Q + b * stride_qb + rows * stride_qn + cols_d, mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + rows * stride_don + cols_d, mask=md_mask, other=0.0)
    o = tl.load(O + b * stride_ob + rows * stride_on + cols_d, mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_stat = pid_bh.to(tl.int64) * N + offs_m
    tl.store(DELTA + row_stat, delta, mask=m_mask)
    lse2 = tl.load(LSE + row_stat, mask=m_mask, other=0.0) * 1.4426950408889634

    k_base = KV + b * stride_kvb + h * HEAD_DIM
    v_base = KV + b * stride_kvb + C + h * HEAD_DIM
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, NKV, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < NKV
        nd_mask = n_mask[:, None] & d_mask[None, :]
        rows_kv = cols.to(tl.int64)[:, None] * stride_kvn
        k = tl.load(k_base + rows_kv + offs_d[None, :], mask=nd_mask, other=0.0)
        v = tl.load(v_base + rows_kv + offs_d[None, :], mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)  # padded keys have s = 0, not -inf
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + rows * stride_dqn + cols_d, dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _sr_attn_bwd_dkdv_kernel(
    Q, KV, DO, LSE, DELTA, DKV,
    N, NKV, H, HEAD_DIM, qk_scale, scale, ROWS_PER_SPLIT,
    stride_qb, stride_qn, stride_kvb, stride_kvn, stride_dob, stride_don,
    stride_dkvs, stride_dkvb, stride_dkvn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_N KV rows of one (batch, head), over one split of the query rows.

    Q, DO: (B, N, C); KV: (B, NKV, 2C); LSE, DELTA: (B, H, N) fp32 contiguous.
    DKV: (SPLITS, B, NKV, 2C) with split stride stride_dkvs: either dKV itself (one split,
    stride 0, stored in its dtype) or an fp32 workspace of per-split partial sums.
    Over query rows i in [split * ROWS_PER_SPLIT, min(N, (split + 1) * ROWS_PER_SPLIT)):
        dV_j += P_ijᵀ dO_i,   dK_j += scale * dS_ijᵀ Q_i,   dS = P * (dO Vᵀ - delta).
    Works on transposed scores (BLOCK_N, BLOCK_M) so dV and dK come out of plain dots.
    Grid: (cdiv(NKV, BLOCK_N), B * H, SPLITS).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    C = H * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < NKV
    d_mask = offs_d < HEAD_DIM
    nd_mask = n_mask[:, None] & d_mask[None, :]
    rows_kv = offs_n.to(tl.int64)[:, None]
    cols_d = (h * HEAD_DIM + offs_d)[None, :]

    k = tl.load(KV + b * stride_kvb + rows_kv * stride_kvn + cols_d, mask=nd_mask, other=0.0)
    v = tl.load(KV + b * stride_kvb + rows_kv * stride_kvn + C + cols_d, mask=nd_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_begin = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(N, m_begin + ROWS_PER_SPLIT)
    q_base = Q + b * stride_qb + h * HEAD_DIM
    do_base = DO + b * stride_dob + h * HEAD_DIM
    stat_base = pid_bh.to(tl.int64) * N
    for start_m in range(m_begin, m_end, BLOCK_M):
        rows = start_m + offs_m
        m_mask = rows < m_end
        md_mask = m_mask[:, None] & d_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        q = tl.load(q_base + rows64 * stride_qn + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_base + rows64 * stride_don + offs_d[None, :], mask=md_mask, other=0.0)
        lse2 = tl.load(LSE + stat_base + rows, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + rows, mask=m_mask, other=0.0)

        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.exp2(st - lse2[None, :])
        pt = tl.where(m_mask[None, :], pt, 0.0)  # padded query rows have q = 0, lse = 0
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * scale
    dst_ptrs = DKV + pid_s.to(tl.int64) * stride_dkvs + b * stride_dkvb + rows_kv * stride_dkvn + cols_d
    tl.store(dst_ptrs, dk.to(DKV.dtype.element_ty), mask=nd_mask)
    tl.store(dst_ptrs + C, dv.to(DKV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _sum_splits_kernel(
    WS, DKV,
    ROWS, NKV, WIDTH, SPLITS,
    stride_wss, stride_dkvb, stride_dkvn,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dKV[b, n, c] = sum_s WS[s, b, n, c] in fp32, cast to dKV's dtype.

    WS: (SPLITS, B, NKV, WIDTH) fp32 contiguous (stride_wss = B * NKV * WIDTH);
    DKV: (B, NKV, WIDTH), last-dim stride 1. ROWS = B * NKV. Grid: (cdiv(ROWS, BLOCK_R),
    cdiv(WIDTH, BLOCK_C)). A fixed summation order keeps the backward deterministic.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < ROWS)[:, None] & (offs_c < WIDTH)[None, :]
    r64 = offs_r.to(tl.int64)
    ws_ptrs = WS + r64[:, None] * WIDTH + offs_c[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for _ in range(0, SPLITS):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += stride_wss  # 64-bit pointer arithmetic: no int32 product to overflow
    dst = DKV + (r64 // NKV)[:, None] * stride_dkvb + (r64 % NKV)[:, None] * stride_dkvn + offs_c[None, :]
    tl.store(dst, acc.to(DKV.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Block-size choices
# --------------------------------------------------------------------------------------------
# Under the interpreter every program runs as numpy code: one small fixed config (kept small
# enough that the tests cross block edges, split the backward and mask KV blocks).
_INTERP_FWD = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
_INTERP_DQ = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
_INTERP_DKDV = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
_INTERP_ROWS_PER_SPLIT = 64


HEAD_DIM_BUCKETS = (16, 32, 64, 128)  # BLOCK_D: the head dim rounded up to a power of two


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _kv_block(nkv: int, cap: int) -> int:
    # Short KV: one block that just covers it (Nkv = 1 or 5 should not pay for 64 columns).
    return min(cap, max(16, triton.next_power_of_2(nkv)))


def _kv_blocks(cap: int) -> list[int]:
    """Every BLOCK_N that _kv_block can return under this cap."""
    return [b for b in (16, 32, 64, 128) if b <= max(16, cap)]


# GPU tiles, (BLOCK_M, BLOCK_N cap, num_warps) per (low precision?, BLOCK_D). Chosen as the
# largest FlashAttention-like tiles that Triton 3.9 compiles for sm_80 and sm_90 without
# register spills (ptxas resource usage, checked offline: no GPU was available to time them).
# fp32 runs its dots as exact IEEE FMAs, which need many more registers, hence the smaller
# tiles. fastseg.kernels.aot_check compiles every config these tables and rules can produce and
# fails on a spill; it found spills in some of the smaller configs the occupancy rule reaches
# (e.g. 8 warps on 32-row tiles of D = 16), hence 4 warps for D = 16 in the backward, the
# fp32 entries for D = 64 / 128 that start smaller and the stage counts of _fwd_stages.
_FWD_TILES = {
    (True, 16): (128, 64, 4), (True, 32): (128, 64, 4), (True, 64): (128, 64, 8), (True, 128): (128, 64, 8),
    (False, 16): (64, 64, 8), (False, 32): (64, 64, 8), (False, 64): (64, 32, 8), (False, 128): (32, 32, 8),
}
_DQ_TILES = {
    (True, 16): (128, 64, 4), (True, 32): (128, 64, 8), (True, 64): (128, 32, 8), (True, 128): (64, 32, 8),
    (False, 16): (64, 64, 8), (False, 32): (64, 64, 8), (False, 64): (32, 32, 8), (False, 128): (32, 32, 8),
}
# dK/dV: (query rows per step BLOCK_M, KV rows per program BLOCK_N cap, num_warps).
_DKDV_TILES = {
    (True, 16): (64, 64, 4), (True, 32): (64, 64, 8), (True, 64): (64, 64, 8), (True, 128): (32, 32, 8),
    (False, 16): (32, 32, 8), (False, 32): (32, 32, 4), (False, 64): (32, 32, 8), (False, 128): (16, 32, 4),
}
_MIN_BLOCK_M = 32


def _rows_block_for_occupancy(block_m: int, n: int, programs_per_tile: int, sms: int) -> int:
    # Batch 1 and the late stages have few row tiles: halve BLOCK_M (down to 32) until the grid
    # covers every SM once.
    while block_m > _MIN_BLOCK_M and triton.cdiv(n, block_m) * programs_per_tile < sms:
        block_m //= 2
    return block_m


def _rows_blocks(block_m: int) -> list[int]:
    """Every BLOCK_M that _rows_block_for_occupancy can return from this start."""
    out = [block_m]
    while out[-1] > _MIN_BLOCK_M:
        out.append(out[-1] // 2)
    return out


def _fwd_stages(lowp: bool, block_d: int, block_m: int) -> int:
    # Where aot_check saw spills: fp16/bf16 D = 32 with 64-row tiles at 3 stages and 128-row
    # tiles at 2 (sm_80); fp32 D = 16 at 2 stages (sm_90) and D = 128 at 2 stages (sm_80).
    if lowp:
        if block_d == 32:
            return 3 if block_m == 128 else 2
        return 3 if block_d <= 64 else 2
    return 1 if block_d in (16, 128) else 2


def _fwd_config(n: int, nkv: int, head_dim: int, dtype: torch.dtype, programs_per_tile: int,
                device: torch.device) -> dict:
    """Forward launch config {BLOCK_M, BLOCK_N, num_warps, num_stages}."""
    if interpreter_enabled():
        return dict(_INTERP_FWD)
    lowp, block_d = dtype != torch.float32, _block_d(head_dim)
    block_m, cap_n, warps = _FWD_TILES[(lowp, block_d)]
    block_m = _rows_block_for_occupancy(block_m, n, programs_per_tile, sm_count(device))
    return dict(BLOCK_M=block_m, BLOCK_N=_kv_block(nkv, cap_n), num_warps=warps,
                num_stages=_fwd_stages(lowp, block_d, block_m))


def _split_rows(n: int, nkv: int, kv_m: int, kv_n: int, programs_per_tile: int, sms: int) -> int:
    base = triton.cdiv(nkv, kv_n) * programs_per_tile
    min_rows = 4 * kv_m  # keep a few row steps per program, or the partial sums dominate
    splits = max(1, min(triton.cdiv(2 * sms, base), triton.cdiv(n, min_rows)))
    return triton.cdiv(n, splits)


def _bwd_configs(n: int, nkv: int, head_dim: int, dtype: torch.dtype, programs_per_tile: int,
                 device: torch.device) -> tuple[dict, dict, int]:
    """(dq config, dkdv config, rows per split). The dQ kernel keeps a (BLOCK_M, D) fp32 tile
    and streams KV; the dK/dV kernel keeps two (BLOCK_N, D) fp32 tiles and streams Q.

    Split of the dK/dV kernel: Nkv is short, so cdiv(Nkv, BLOCK_N) * B * heads programs can be
    far fewer than the SMs while each loops over all N (16k+) rows. We split N into chunks so
    the grid fills the GPU about twice, each program writes fp32 partials, and a small kernel
    sums them in a fixed order (deterministic; fp32 atomics into one buffer would save that
    pass but make gradients run-to-run different). The workspace is SPLITS * B * Nkv * 2C fp32,
    a few MB at SegFormer sizes; with a single split dKV is written directly, no workspace."""
    if interpreter_enabled():
        return dict(_INTERP_DQ), dict(_INTERP_DKDV), _INTERP_ROWS_PER_SPLIT
    lowp, block_d = dtype != torch.float32, _block_d(head_dim)
    sms = sm_count(device)
    dq_m, dq_n, dq_w = _DQ_TILES[(lowp, block_d)]
    dq_cfg = dict(BLOCK_M=_rows_block_for_occupancy(dq_m, n, programs_per_tile, sms),
                  BLOCK_N=_kv_block(nkv, dq_n), num_warps=dq_w, num_stages=2)
    kv_m, kv_n, kv_w = _DKDV_TILES[(lowp, block_d)]
    kv_n = _kv_block(nkv, kv_n)
    dkdv_cfg = dict(BLOCK_M=kv_m, BLOCK_N=kv_n, num_warps=kv_w, num_stages=2)
    return dq_cfg, dkdv_cfg, _split_rows(n, nkv, kv_m, kv_n, programs_per_tile, sms)


def _sum_splits_config(width: int) -> dict:
    return dict(BLOCK_R=32, BLOCK_C=min(128, triton.next_power_of_2(width)))


# --------------------------------------------------------------------------------------------
# Every GPU config the launchers can pick, for ahead-of-time compilation
# (python -m fastseg.kernels.aot_check): the same tables and rules as above, enumerated.
# --------------------------------------------------------------------------------------------
_AOT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _dot_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    # fp32 dots follow torch.get_float32_matmul_precision (dot_precision): both can be picked.
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def fwd_config_space(dtype: torch.dtype, block_d: int) -> list[dict]:
    lowp = dtype != torch.float32
    block_m, cap_n, warps = _FWD_TILES[(lowp, block_d)]
    return [dict(BLOCK_M=m, BLOCK_N=bn, num_warps=warps, num_stages=_fwd_stages(lowp, block_d, m))
            for m in _rows_blocks(block_m) for bn in _kv_blocks(cap_n)]


def dq_config_space(dtype: torch.dtype, block_d: int) -> list[dict]:
    block_m, cap_n, warps = _DQ_TILES[(dtype != torch.float32, block_d)]
    return [dict(BLOCK_M=m, BLOCK_N=bn, num_warps=warps, num_stages=2)
            for m in _rows_blocks(block_m) for bn in _kv_blocks(cap_n)]


def dkdv_config_space(dtype: torch.dtype, block_d: int) -> list[dict]:
    block_m, cap_n, warps = _DKDV_TILES[(dtype != torch.float32, block_d)]
    return [dict(BLOCK_M=block_m, BLOCK_N=bn, num_warps=warps, num_stages=2) for bn in _kv_blocks(cap_n)]


def sum_splits_config_space() -> list[dict]:
    # width = 2C >= 2 * MIN_HEAD_DIM
    return [_sum_splits_config(w) for w in (32, 64, 128)]


def aot_variants():
    """Yields (kernel, args) for every compiled variant the launchers can pick: args names every
    kernel argument (pointers as "*dtype", scalars as sample values of a SegFormer-like launch,
    constexprs, num_warps and num_stages as the launcher chooses them)."""
    for dtype, name in _AOT_DTYPES.items():
        ptr = "*" + name
        for block_d in HEAD_DIM_BUCKETS:
            C = 2 * block_d
            sizes = dict(N=16384, NKV=256, H=2, HEAD_DIM=block_d, qk_scale=0.18)
            for precision in _dot_precisions(dtype):
                for cfg in fwd_config_space(dtype, block_d):
                    yield _sr_attn_fwd_kernel, dict(
                        Q=ptr, KV=ptr, O=ptr, LSE="*fp32", **sizes,
                        stride_qb=16384 * C, stride_qn=C, stride_kvb=256 * 2 * C, stride_kvn=2 * C,
                        stride_ob=16384 * C, stride_on=C, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg)
                for cfg in dq_config_space(dtype, block_d):
                    yield _sr_attn_bwd_dq_kernel, dict(
                        Q=ptr, KV=ptr, O=ptr, DO=ptr, LSE="*fp32", DELTA="*fp32", DQ=ptr, **sizes, scale=0.125,
                        stride_qb=16384 * C, stride_qn=C, stride_kvb=256 * 2 * C, stride_kvn=2 * C,
                        stride_ob=16384 * C, stride_on=C, stride_dob=16384 * C, stride_don=C,
                        stride_dqb=16384 * C, stride_dqn=C, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg)
                for cfg in dkdv_config_space(dtype, block_d):
                    # One split writes dKV in its dtype (split stride 0); several, fp32 partials.
                    for dkv, stride_s in ((ptr, 0), ("*fp32", 256 * 2 * C * 2)):
                        yield _sr_attn_bwd_dkdv_kernel, dict(
                            Q=ptr, KV=ptr, DO=ptr, LSE="*fp32", DELTA="*fp32", DKV=dkv, **sizes, scale=0.125,
                            ROWS_PER_SPLIT=2048, stride_qb=16384 * C, stride_qn=C, stride_kvb=256 * 2 * C,
                            stride_kvn=2 * C, stride_dob=16384 * C, stride_don=C, stride_dkvs=stride_s,
                            stride_dkvb=256 * 2 * C, stride_dkvn=2 * C, BLOCK_D=block_d,
                            DOT_PRECISION=precision, **cfg)
        for cfg in sum_splits_config_space():
            yield _sum_splits_kernel, dict(
                WS="*fp32", DKV=ptr, ROWS=512, NKV=256, WIDTH=256, SPLITS=4, stride_wss=512 * 256,
                stride_dkvb=256 * 256, stride_dkvn=256, num_warps=4, num_stages=3, **cfg)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sr_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"sr_attention: {name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_last_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"sr_attention: {name} must have stride 1 in its last dim, got strides {tuple(t.stride())}")


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"sr_attention: {name} is on {t.device} but q is on {device}")


def _check_out(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    _check_tensor(name, t, len(shape))
    if tuple(t.shape) != shape:
        raise ValueError(f"sr_attention: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"sr_attention: {name} must have dtype {dtype}, got {t.dtype}")
    _check_device(name, t, device)
    _check_last_stride(name, t)


def _validate_qkv(q, kv, num_heads, scale) -> tuple[int, int, int, int, int]:
    """Returns (B, N, Nkv, C, D) or raises ValueError/TypeError naming the problem."""
    _check_tensor("q", q, 3)
    _check_tensor("kv", kv, 3)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"sr_attention: q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if kv.dtype != q.dtype:
        raise TypeError(f"sr_attention: kv dtype {kv.dtype} does not match q dtype {q.dtype}")
    _check_device("kv", kv, q.device)
    if q.device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError("sr_attention: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
        check_interpreter_ready("sr_attention", _sr_attn_fwd_kernel)
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"sr_attention: unsupported device {q.device}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"sr_attention: num_heads must be a positive int, got {num_heads!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"sr_attention: scale must be a finite float, got {scale!r}")
    B, N, C = q.shape
    Bk, Nkv, C2 = kv.shape
    if Bk != B:
        raise ValueError(f"sr_attention: q batch {B} != kv batch {Bk}")
    if B == 0 or N == 0 or Nkv == 0:
        raise ValueError(f"sr_attention: empty input, q {tuple(q.shape)}, kv {tuple(kv.shape)}")
    if C % num_heads != 0:
        raise ValueError(f"sr_attention: q channels {C} not divisible by num_heads {num_heads}")
    if C2 != 2 * C:
        raise ValueError(f"sr_attention: kv last dim must be 2 * C = {2 * C}, got {C2}")
    D = C // num_heads
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"sr_attention: head dim {D} (= {C} / {num_heads}) outside "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    _check_last_stride("q", q)
    _check_last_stride("kv", kv)
    return B, N, Nkv, C, D


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def sr_attention_fwd(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float, *,
                     out: torch.Tensor | None = None,
                     lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial-reduction attention forward.

    q:   (B, N, C)       any strides, last-dim stride 1; C = num_heads * D, 16 <= D <= 128
    kv:  (B, Nkv, 2C)    k = kv[..., :C], v = kv[..., C:]; any strides, last-dim stride 1
    out: optional (B, N, C) buffer in q's dtype (last-dim stride 1) to write into
    lse: optional (B, num_heads, N) contiguous fp32 buffer to write into
    Returns (out, lse): out[b, n, h*D:(h+1)*D] = softmax(q_h k_hᵀ * scale) v_h in q's dtype,
    lse[b, h, n] = logsumexp_j(q_h k_hᵀ * scale)[n, j] in fp32 (natural log).
    dtypes: float32, float16, bfloat16 (q and kv equal).
    """
    B, N, Nkv, C, D = _validate_qkv(q, kv, num_heads, scale)
    if out is None:
        out = torch.empty((B, N, C), dtype=q.dtype, device=q.device)
    else:
        _check_out("out", out, (B, N, C), q.dtype, q.device)
    if lse is None:
        lse = torch.empty((B, num_heads, N), dtype=torch.float32, device=q.device)
    else:
        _check_out("lse", lse, (B, num_heads, N), torch.float32, q.device)
        if not lse.is_contiguous():
            raise ValueError("sr_attention: lse buffer must be contiguous")

    cfg = _fwd_config(N, Nkv, D, q.dtype, B * num_heads, q.device)
    block_m = cfg.pop("BLOCK_M")
    grid = (triton.cdiv(N, block_m), B * num_heads)
    with launch_device(q):
        _sr_attn_fwd_kernel[grid](
            q, kv, out, lse,
            N, Nkv, num_heads, D, float(scale) * _LOG2E,
            q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_D=_block_d(D), DOT_PRECISION=dot_precision(q.dtype), **cfg,
        )
    return out, lse


def sr_attention_bwd(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, num_heads: int, scale: float, *,
                     dq: torch.Tensor | None = None, dkv: torch.Tensor | None = None,
                     num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial-reduction attention backward (flash-style recomputation, nothing N x Nkv stored).

    do:  (B, N, C)            upstream gradient of out; a last-dim stride other than 1 (e.g. an
                              expanded gradient) is copied to contiguous first
    q:   (B, N, C), kv: (B, Nkv, 2C), out: (B, N, C)  as given to / returned by sr_attention_fwd
    lse: (B, num_heads, N)    fp32, from sr_attention_fwd
    dq, dkv: optional output buffers, (B, N, C) / (B, Nkv, 2C) in q's dtype, last-dim stride 1
    num_splits: split of the N rows in the dK/dV kernel; None picks it from the sizes (tests
                force both paths with it)
    Returns (dq, dkv) in q's / kv's dtype (contiguous unless buffers were given), with
        P = softmax(q_h k_hᵀ scale), dv_h = Pᵀ do_h, dS = P * (do_h v_hᵀ - rowsum(do_h * out_h)),
        dq_h = dS k_h * scale, dk_h = dSᵀ q_h * scale; dkv = [dk | dv] along the last dim.
    """
    B, N, Nkv, C, D = _validate_qkv(q, kv, num_heads, scale)
    _check_tensor("do", do, 3)
    _check_tensor("out", out, 3)
    _check_tensor("lse", lse, 3)
    for name, t in (("do", do), ("out", out)):
        if tuple(t.shape) != (B, N, C):
            raise ValueError(f"sr_attention: {name} must have shape {(B, N, C)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"sr_attention: {name} dtype {t.dtype} does not match q dtype {q.dtype}")
        _check_device(name, t, q.device)
    _check_last_stride("out", out)
    if tuple(lse.shape) != (B, num_heads, N) or lse.dtype != torch.float32:
        raise ValueError(f"sr_attention: lse must be float32 of shape {(B, num_heads, N)}, "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    _check_device("lse", lse, q.device)
    if do.stride(-1) != 1:
        do = do.contiguous()
    lse = lse.contiguous()
    if dq is None:
        dq = torch.empty((B, N, C), dtype=q.dtype, device=q.device)
    else:
        _check_out("dq", dq, (B, N, C), q.dtype, q.device)
    if dkv is None:
        dkv = torch.empty((B, Nkv, 2 * C), dtype=kv.dtype, device=q.device)
    else:
        _check_out("dkv", dkv, (B, Nkv, 2 * C), kv.dtype, q.device)

    dq_cfg, dkdv_cfg, rows_per_split = _bwd_configs(N, Nkv, D, q.dtype, B * num_heads, q.device)
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"sr_attention: num_splits must be a positive int, got {num_splits!r}")
        rows_per_split = triton.cdiv(N, num_splits)
    # Each split is a whole number of row blocks, so only the last one has a ragged end.
    rows_per_split = triton.cdiv(rows_per_split, dkdv_cfg["BLOCK_M"]) * dkdv_cfg["BLOCK_M"]
    splits = triton.cdiv(N, rows_per_split)

    delta = torch.empty((B, num_heads, N), dtype=torch.float32, device=q.device)
    block_d = _block_d(D)
    precision = dot_precision(q.dtype)
    scale = float(scale)
    with launch_device(q):
        # 1) dQ, and delta = rowsum(dO * O) as a side product (the dK/dV kernel needs it).
        cfg = dict(dq_cfg)
        block_m = cfg.pop("BLOCK_M")
        _sr_attn_bwd_dq_kernel[(triton.cdiv(N, block_m), B * num_heads)](
            q, kv, out, do, lse, delta, dq,
            N, Nkv, num_heads, D, scale * _LOG2E, scale,
            q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), out.stride(0), out.stride(1),
            do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
            BLOCK_M=block_m, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg,
        )
        # 2) dK, dV: straight into dkv, or per-split fp32 partials then a fixed-order sum.
        cfg = dict(dkdv_cfg)
        block_n = cfg.pop("BLOCK_N")
        if splits == 1:
            dst, dst_strides = dkv, (0, dkv.stride(0), dkv.stride(1))
        else:
            dst = torch.empty((splits, B, Nkv, 2 * C), dtype=torch.float32, device=q.device)
            dst_strides = dst.stride()[:3]
        _sr_attn_bwd_dkdv_kernel[(triton.cdiv(Nkv, block_n), B * num_heads, splits)](
            q, kv, do, lse, delta, dst,
            N, Nkv, num_heads, D, scale * _LOG2E, scale, rows_per_split,
            q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), do.stride(0), do.stride(1),
            *dst_strides,
            BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg,
        )
        if splits > 1:
            rows, width = B * Nkv, 2 * C
            sum_cfg = _sum_splits_config(width)
            block_r, block_c = sum_cfg["BLOCK_R"], sum_cfg["BLOCK_C"]
            _sum_splits_kernel[(triton.cdiv(rows, block_r), triton.cdiv(width, block_c))](
                dst, dkv,
                rows, Nkv, width, splits,
                dst.stride(0), dkv.stride(0), dkv.stride(1),
                BLOCK_R=block_r, BLOCK_C=block_c,
            )
    return dq, dkv
