"""Mix-FFN depthwise 3x3 conv + bias + GELU of SegFormer (Xie et al., 2021, "SegFormer: Simple
and Efficient Design for Semantic Segmentation with Transformers"), forward and backward, in
Triton.

Between the two Linear layers of a Mix-FFN the hidden activation x is a (B, N, C) token tensor
of an H x W map (N = H * W, token n = h * W + w): a channels-last image. We compute

    z[b, h, w, c] = bias[c] + sum_{ky, kx in 0..2} weight[c, 0, ky, kx] * x[b, h + ky - 1, w + kx - 1, c]
    y = GELU(z)        exact:  0.5 z (1 + erf(z / sqrt 2))
                       tanh:   0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))  =  z * sigmoid(2 u)

with zero padding 1 (PyTorch's Conv2d(C, C, 3, padding=1, groups=C) then F.gelu), straight on
tokens: x is read through its strides (channel stride 1) and y is written as (B, N, C). No NCHW
copy, no stored pre-activation. All arithmetic is fp32; loads/stores are in the tensors' dtypes.

Backward (recomputes z; nothing 4C-wide is kept from the forward or written in between):

    dz = dy * GELU'(z)          exact: Phi(z) + z phi(z);   tanh: s + 2 z s (1 - s) u',  s = sigmoid(2u)
    dx[h, w]  = sum_{ky, kx} weight[ky, kx] * dz[h - ky + 1, w - kx + 1]   (transposed conv)
    dweight[c, 0, ky, kx] = sum_{b, h, w} dz[b, h, w, c] * x[b, h + ky - 1, w + kx - 1, c]
    dbias[c] = sum_{b, h, w} dz[b, h, w, c]

One backward program walks down a column strip of the image one row at a time. Per step it
recomputes one dz row at three column offsets (-1, 0, +1; registers cannot be shifted sideways,
so the neighbours' dz are recomputed rather than exchanged), adds that row's share to the three
dx rows it touches (the finished one is stored) and to per-program dweight/dbias accumulators.
Those are written as fp32 partial sums and a second small kernel adds them up in a fixed order:
deterministic, no atomics.

Memory-bound (ROOFLINE.md): the forward floor is one read of x and one write of y; the
backward reads x and dy and writes dx once from DRAM, the 3x3 halo coming from L1/L2.

This file holds kernels and host launchers only: no autograd.Function, no dispatch policy
(see fastseg/ops/dwconv3x3_gelu.py).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from fastseg.kernels import (check_interpreter_ready, interpreter_enabled, launch_device, sm_count)

__all__ = ["dwconv3x3_gelu_fwd", "dwconv3x3_gelu_bwd", "SUPPORTED_DTYPES", "GELU_FORMS"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GELU_FORMS = ("none", "tanh")

# --------------------------------------------------------------------------------------------
# GELU and its derivative (fp32 in, fp32 out). Constants: 1/sqrt(2), 1/sqrt(2 pi), sqrt(2/pi).
# --------------------------------------------------------------------------------------------
@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        # 0.5 z (1 + tanh u) = z * sigmoid(2u); exp overflow gives inf -> 0, never NaN.
        return z / (1.0 + tl.exp(-2.0 * u))
    else:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        # d/dz [z s(2u)] = s + z * 2 s (1 - s) u'   (1 - tanh^2 = 4 s (1 - s))
        return s + 2.0 * z * s * (1.0 - s) * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return cdf + z * pdf


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _dwconv3x3_gelu_fwd_kernel(
    X, WGT, BIAS, Y,
    H, W, C,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_wc, stride_wky, stride_wkx, stride_bc,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: a BLOCK_H x BLOCK_W pixel tile x BLOCK_C channels of one image.

    X, Y: (B, H*W, C), channel stride 1; WGT: (C, 1, 3, 3) (strides c, ky, kx); BIAS: (C,).
    Y = GELU(BIAS + sum_{ky,kx} WGT[:, 0, ky, kx] * X[h + ky - 1, w + kx - 1]), zero padding.
    The nine shifted tiles are masked loads of the same neighbourhood: the centre tile comes
    from DRAM, the other eight mostly from L1 (the halo from L2).
    Grid: (cdiv(H, BLOCK_H) * cdiv(W, BLOCK_W), cdiv(C, BLOCK_C), B).
    """
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # int64: b * stride_b passes 2**31 on big batches
    tiles_w = tl.cdiv(W, BLOCK_W)
    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    h = (pid_s // tiles_w) * BLOCK_H + offs_p // BLOCK_W
    w = (pid_s % tiles_w) * BLOCK_W + offs_p % BLOCK_W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    pix = (h * W + w).to(tl.int64)  # token index; times the row stride it needs 64 bits

    x_base = X + pid_b * stride_xb
    acc = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], dtype=tl.float32)
    for ky in tl.static_range(3):
        row_ok = (h + (ky - 1) >= 0) & (h + (ky - 1) < H)
        for kx in tl.static_range(3):
            ok = row_ok & (w + (kx - 1) >= 0) & (w + (kx - 1) < W)
            src = (pix + ((ky - 1) * W + (kx - 1))) * stride_xn
            xv = tl.load(x_base + src[:, None] + offs_c[None, :],
                         mask=ok[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(WGT + offs_c * stride_wc + ky * stride_wky + kx * stride_wkx,
                         mask=c_mask, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_c * stride_bc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    y = _gelu(acc, APPROX_TANH)

    p_mask = (h < H) & (w < W)
    dst = Y + pid_b * stride_yb + (pix * stride_yn)[:, None] + offs_c[None, :]
    tl.store(dst, y.to(Y.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _load_row5(row_ptr, row_ok, stride_n, m0, m1, m2, m3, m4):
    """One x row at columns w-2 .. w+2: five (BLOCK_W, BLOCK_C) fp32 tiles, zero outside the
    image (the conv's zero padding). row_ptr: (BLOCK_W, BLOCK_C) pointers at column w;
    row_ok: (BLOCK_W, 1) row-in-image; m0..m4: column/channel masks of the five shifts."""
    x0 = tl.load(row_ptr - stride_n - stride_n, mask=row_ok & m0, other=0.0)
    x1 = tl.load(row_ptr - stride_n, mask=row_ok & m1, other=0.0)
    x2 = tl.load(row_ptr, mask=row_ok & m2, other=0.0)
    x3 = tl.load(row_ptr + stride_n, mask=row_ok & m3, other=0.0)
    x4 = tl.load(row_ptr + stride_n + stride_n, mask=row_ok & m4, other=0.0)
    return x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32), x4.to(tl.float32)


@triton.jit
def _dwconv3x3_gelu_bwd_kernel(
    X, DY, WGT, BIAS, DX, WS,
    H, W, C, ROWS,
    stride_xb, stride_xh, stride_xn, stride_dyb, stride_dyh, stride_dyn, stride_dxb, stride_dxh, stride_dxn,
    stride_wc, stride_wky, stride_wkx, stride_bc, stride_wsp, stride_wst,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: rows [h0, h0 + ROWS) x columns [w0, w0 + BLOCK_W) x BLOCK_C channels of one
    image; it walks the rows top to bottom.

    X, DY, DX: (B, H*W, C), channel stride 1; stride_*h = W * stride_*n (one image row).
    WGT: (C, 1, 3, 3); BIAS: (C,).
    WS: (P, 9 + HAS_BIAS, C) fp32 partial sums, P = B * tiles, row p = b * tiles + tile:
        WS[p, ky*3 + kx, c] = sum over this program's pixels of dz * x[h + ky - 1, w + kx - 1]
        WS[p, 9, c]         = sum over this program's pixels of dz            (with a bias)
    Step r (r = h0 - 1 .. h_end) recomputes z on dz row r at columns w-1, w, w+1 from x rows
    r-1..r+1 (columns w-2..w+2), forms dz = dy * GELU'(z) (dy masked to the image: dz is zero
    outside it, the padding of the transposed conv), then
        dx row r-1 += sum_kx WGT[0, kx] dz[r, w + 1 - kx]   -> now complete, stored
        dx row r   += sum_kx WGT[1, kx] dz[r, w + 1 - kx]   (carried)
        dx row r+1  = sum_kx WGT[2, kx] dz[r, w + 1 - kx]   (carried)
    and, for r inside the program's rows, adds dz[r, w] * x[r + ky - 1, w + kx - 1] to the
    dweight accumulators. Rows h0 - 1 and h_end are halo steps (dz needed by dx, not owned).
    Grid: (cdiv(H, ROWS) * cdiv(W, BLOCK_W), cdiv(C, BLOCK_C), B).
    """
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, ROWS) * tiles_w
    # int64 rows: the loop index times the row stride must not wrap at 2**31.
    h0 = ((pid_s // tiles_w) * ROWS).to(tl.int64)
    h_end = tl.minimum(h0 + ROWS, H)
    w = (pid_s % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    cm = c_mask[None, :]
    b64 = pid_b.to(tl.int64)

    # Loop-invariant parts of every address and mask: the column offsets (64-bit: a token
    # index times the token stride) and the masks of the column shifts -2 .. +2.
    w64 = w.to(tl.int64)
    x_cols = X + b64 * stride_xb + (w64 * stride_xn)[:, None] + offs_c[None, :]
    dy_cols = DY + b64 * stride_dyb + (w64 * stride_dyn)[:, None] + offs_c[None, :]
    dx_cols = DX + b64 * stride_dxb + (w64 * stride_dxn)[:, None] + offs_c[None, :]
    m_m2 = ((w >= 2) & (w - 2 < W))[:, None] & cm
    m_m1 = ((w >= 1) & (w - 1 < W))[:, None] & cm
    m_0 = (w < W)[:, None] & cm
    m_p1 = (w + 1 < W)[:, None] & cm
    m_p2 = (w + 2 < W)[:, None] & cm

    # The nine taps and the bias in fp32, broadcast once to the tile.
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    wp = WGT + offs_c * stride_wc
    w00 = zero + tl.load(wp, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w01 = zero + tl.load(wp + stride_wkx, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w02 = zero + tl.load(wp + 2 * stride_wkx, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w10 = zero + tl.load(wp + stride_wky, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w11 = zero + tl.load(wp + stride_wky + stride_wkx, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w12 = zero + tl.load(wp + stride_wky + 2 * stride_wkx, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w20 = zero + tl.load(wp + 2 * stride_wky, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w21 = zero + tl.load(wp + 2 * stride_wky + stride_wkx, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    w22 = zero + tl.load(wp + 2 * stride_wky + 2 * stride_wkx, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bv = zero + tl.load(BIAS + offs_c * stride_bc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    else:
        bv = zero

    dx_cur = zero   # dx row r (two of its three contributions still to come)
    dx_next = zero  # dx row r + 1
    g00 = zero
    g01 = zero
    g02 = zero
    g10 = zero
    g11 = zero
    g12 = zero
    g20 = zero
    g21 = zero
    g22 = zero
    gb = zero
    for r in range(h0 - 1, h_end + 1):
        # Row masks as (BLOCK_W, 1) vectors (the Triton interpreter mis-types a scalar mask
        # combined with a vector one): x rows r-1 / r / r+1 inside the image.
        rv = (w * 0 + r)[:, None]
        ok_a = (rv >= 1) & (rv <= H)
        ok_b = (rv >= 0) & (rv < H)
        ok_c = (rv >= -1) & (rv < H - 1)
        # z at dz row r, columns w-1 (zm), w (z0), w+1 (zp), from x rows r-1 (a), r (b), r+1 (c).
        x_row = x_cols + r * stride_xh
        a0, a1, a2, a3, a4 = _load_row5(x_row - stride_xh, ok_a, stride_xn, m_m2, m_m1, m_0, m_p1, m_p2)
        zm = bv + w00 * a0 + w01 * a1 + w02 * a2
        z0 = bv + w00 * a1 + w01 * a2 + w02 * a3
        zp = bv + w00 * a2 + w01 * a3 + w02 * a4
        b0, b1, b2, b3, b4 = _load_row5(x_row, ok_b, stride_xn, m_m2, m_m1, m_0, m_p1, m_p2)
        zm += w10 * b0 + w11 * b1 + w12 * b2
        z0 += w10 * b1 + w11 * b2 + w12 * b3
        zp += w10 * b2 + w11 * b3 + w12 * b4
        c0, c1, c2, c3, c4 = _load_row5(x_row + stride_xh, ok_c, stride_xn, m_m2, m_m1, m_0, m_p1, m_p2)
        zm += w20 * c0 + w21 * c1 + w22 * c2
        z0 += w20 * c1 + w21 * c2 + w22 * c3
        zp += w20 * c2 + w21 * c3 + w22 * c4

        dy_row = dy_cols + r * stride_dyh
        dym = tl.load(dy_row - stride_dyn, mask=ok_b & m_m1, other=0.0).to(tl.float32)
        dy0 = tl.load(dy_row, mask=ok_b & m_0, other=0.0).to(tl.float32)
        dyp = tl.load(dy_row + stride_dyn, mask=ok_b & m_p1, other=0.0).to(tl.float32)
        dzm = dym * _gelu_grad(zm, APPROX_TANH)
        dz0 = dy0 * _gelu_grad(z0, APPROX_TANH)
        dzp = dyp * _gelu_grad(zp, APPROX_TANH)

        # Weight/bias gradients from the pixels this program owns (halo rows belong to others).
        own = tl.where((rv >= h0) & (rv < h_end), dz0, 0.0)
        g00 += own * a1
        g01 += own * a2
        g02 += own * a3
        g10 += own * b1
        g11 += own * b2
        g12 += own * b3
        g20 += own * c1
        g21 += own * c2
        g22 += own * c3
        gb += own

        # Transposed conv: dz row r feeds dx rows r-1, r, r+1; row r-1 is then complete.
        dx_done = dx_cur + (w00 * dzp + w01 * dz0 + w02 * dzm)
        dx_cur = dx_next + (w10 * dzp + w11 * dz0 + w12 * dzm)
        dx_next = w20 * dzp + w21 * dz0 + w22 * dzm
        st_mask = (rv > h0) & (rv <= h_end) & m_0
        tl.store(dx_cols + (r - 1) * stride_dxh, dx_done.to(DX.dtype.element_ty), mask=st_mask)

    ws = WS + (pid_b * tiles + pid_s).to(tl.int64) * stride_wsp + offs_c
    tl.store(ws, tl.sum(g00, 0), mask=c_mask)
    tl.store(ws + stride_wst, tl.sum(g01, 0), mask=c_mask)
    tl.store(ws + 2 * stride_wst, tl.sum(g02, 0), mask=c_mask)
    tl.store(ws + 3 * stride_wst, tl.sum(g10, 0), mask=c_mask)
    tl.store(ws + 4 * stride_wst, tl.sum(g11, 0), mask=c_mask)
    tl.store(ws + 5 * stride_wst, tl.sum(g12, 0), mask=c_mask)
    tl.store(ws + 6 * stride_wst, tl.sum(g20, 0), mask=c_mask)
    tl.store(ws + 7 * stride_wst, tl.sum(g21, 0), mask=c_mask)
    tl.store(ws + 8 * stride_wst, tl.sum(g22, 0), mask=c_mask)
    if HAS_BIAS:
        tl.store(ws + 9 * stride_wst, tl.sum(gb, 0), mask=c_mask)


@triton.jit
def _wgrad_reduce_kernel(
    WS, DW, DB,
    P, C,
    stride_wsp, stride_wst, stride_dwc, stride_dbc,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the backward's fp32 partials over programs, in a fixed order (deterministic).

    WS: (P, T, C) fp32 with T = 9 (+1 with a bias); DW: (C, 1, 3, 3) contiguous per channel
    (tap t = ky*3 + kx at DW + c*stride_dwc + t); DB: (C,).
    DW[c, 0, t // 3, t % 3] = sum_p WS[p, t, c] (t < 9);  DB[c] = sum_p WS[p, 9, c].
    Grid: (cdiv(C, BLOCK_C), T).
    """
    pid_c = tl.program_id(0)
    t = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_p = tl.arange(0, BLOCK_P)
    base = WS + t * stride_wst + offs_c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # BLOCK_P partials per step: independent loads, and few steps even with thousands of tiles.
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + offs_p
        acc += tl.load(base + (rows.to(tl.int64) * stride_wsp)[:, None],
                       mask=(rows < P)[:, None] & c_mask[None, :], other=0.0)
    total = tl.sum(acc, 0)
    if t < 9:
        tl.store(DW + offs_c * stride_dwc + t, total.to(DW.dtype.element_ty), mask=c_mask)
    else:
        tl.store(DB + offs_c * stride_dbc, total.to(DB.dtype.element_ty), mask=c_mask)


# --------------------------------------------------------------------------------------------
# Block-size choices
# --------------------------------------------------------------------------------------------
# Under the interpreter every program runs as numpy code, so cost grows with the number of
# programs, not the tile size: one fixed config, still small enough that the tests' shapes
# (e.g. 7x9, 13x11, C = 40) cross tile edges in H, W and C and give several partials to reduce.
_INTERP_FWD = dict(BLOCK_H=4, BLOCK_W=8, BLOCK_C=64, num_warps=4, num_stages=1)
_INTERP_BWD = dict(ROWS=4, BLOCK_W=8, BLOCK_C=64, num_warps=4, num_stages=1)
_INTERP_REDUCE = dict(BLOCK_P=4, BLOCK_C=64, num_warps=4, num_stages=1)


def _block_c(C: int) -> int:
    # 64 channels: 128 B (16-bit) / 256 B (fp32) contiguous per pixel, full cache lines, and
    # SegFormer's hidden widths (128 .. 2048) are all multiples of it. At least 16 so that no
    # tile dimension degenerates to 1 on toy widths.
    return max(16, min(64, triton.next_power_of_2(C)))


def _block_w(W: int) -> int:
    return max(2, min(8, triton.next_power_of_2(W)))


_BLOCK_CS = (16, 32, 64)  # every value _block_c returns
_BLOCK_WS = (2, 4, 8)  # every value _block_w returns
_FWD_TILE_ELEMS = 2048  # BLOCK_H * BLOCK_W * BLOCK_C of the forward, at most
_BWD_MAX_BLOCK_C = 32


def _fwd_config(B: int, H: int, W: int, C: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Forward launch config {BLOCK_H, BLOCK_W, BLOCK_C, num_warps, num_stages}.

    4 x 8 pixels x 64 channels (2048 elements, 16 per thread at 4 warps): 16-byte loads, and
    ptxas (sm_90, Triton 3.9) gives ~150 registers, 3 CTAs per SM. An 8 x 8 tile cuts the halo
    re-reads from L2 (1.56x vs 1.88x of the tile) but needs 190-245 registers (2 CTAs per SM);
    not measured on a GPU yet. Small maps with few tiles (late stages at batch 1) get shorter
    tiles so the grid still covers the SMs twice."""
    if interpreter_enabled():
        return dict(_INTERP_FWD)
    block_c = _block_c(C)
    block_w = _block_w(W)
    block_h = max(1, min(triton.next_power_of_2(H), _FWD_TILE_ELEMS // (block_c * block_w)))
    sms = sm_count(device)
    c_tiles = triton.cdiv(C, block_c)
    while block_h > 1 and B * c_tiles * triton.cdiv(H, block_h) * triton.cdiv(W, block_w) < 2 * sms:
        block_h //= 2
    return dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
                num_warps=_fwd_warps(block_h, block_w, block_c), num_stages=1)


def _fwd_warps(block_h: int, block_w: int, block_c: int) -> int:
    # 4 warps on 1024-element tiles of 32 channels spilled on sm_80 in fp16 (aot_check); 2 do
    # not. (Fewer warps on every smaller tile spilled elsewhere: ptxas is not monotone here.)
    return 2 if block_c == 32 and block_h * block_w * block_c == 1024 else 4


def _bwd_config(B: int, H: int, W: int, C: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Backward launch config {ROWS, BLOCK_W, BLOCK_C, num_warps, num_stages}.

    The row walk keeps many (BLOCK_W, BLOCK_C) fp32 tiles live (15 x loads, 3 z / dz, 2 carried
    dx rows, 10 weight/bias accumulators), so the tile is small: 8 columns x 32 channels, 2
    elements per thread at 4 warps, ~150 registers (sm_90, Triton 3.9), 3 CTAs per SM. 8 x 64
    needs ~225 registers (2 CTAs per SM); not measured on a GPU yet. ROWS trades halo
    recomputation ((ROWS + 2) dz rows for ROWS) and the partial-sum buffer against
    parallelism: start long and halve until the grid covers the SMs about four times."""
    if interpreter_enabled():
        return dict(_INTERP_BWD)
    block_c = min(_BWD_MAX_BLOCK_C, _block_c(C))
    block_w = _block_w(W)
    rows = 32
    sms = sm_count(device)
    c_tiles = triton.cdiv(C, block_c)
    while rows > 4 and B * c_tiles * triton.cdiv(H, rows) * triton.cdiv(W, block_w) < 4 * sms:
        rows //= 2
    return dict(ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4, num_stages=1)


def _reduce_config(P: int, C: int) -> dict:
    if interpreter_enabled():
        return dict(_INTERP_REDUCE)
    return dict(_GPU_REDUCE)


# 64 partials x 64 channels per step: a few steps even for thousands of programs.
_GPU_REDUCE = dict(BLOCK_P=64, BLOCK_C=64, num_warps=4, num_stages=2)


# --------------------------------------------------------------------------------------------
# Every GPU config the launchers can pick, for ahead-of-time compilation
# (python -m fastseg.kernels.aot_check): the same constants and rules as above, enumerated.
# --------------------------------------------------------------------------------------------
def fwd_config_space() -> list[dict]:
    """BLOCK_C, BLOCK_W from their rules; BLOCK_H any power of two from the largest the tile
    budget allows down to 1 (the occupancy loop halves it)."""
    out = []
    for block_c in _BLOCK_CS:
        for block_w in _BLOCK_WS:
            block_h = _FWD_TILE_ELEMS // (block_c * block_w)
            while block_h >= 1:
                out.append(dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
                                num_warps=_fwd_warps(block_h, block_w, block_c), num_stages=1))
                block_h //= 2
    return out


def bwd_config_space() -> list[dict]:
    # ROWS is a runtime argument: one compiled variant per (BLOCK_W, BLOCK_C).
    return [dict(BLOCK_W=bw, BLOCK_C=bc, num_warps=4, num_stages=1)
            for bc in _BLOCK_CS if bc <= _BWD_MAX_BLOCK_C for bw in _BLOCK_WS]


def aot_variants():
    """Yields (kernel, args) for every compiled variant the launchers can pick (see
    fastseg.kernels.aot_check). Every tile config in every dtype with the model's flags (bias,
    exact GELU, weights in x's dtype); the other flag / weight-dtype combinations at the tile
    SegFormer's widths get (BLOCK_C 64 forward, 32 backward, BLOCK_W 8)."""
    H, W, C = 128, 128, 256
    N = H * W
    for name in ("fp32", "fp16", "bf16"):
        ptr = "*" + name
        model = [(True, False, ptr)]
        others = [(bias, tanh, wd) for bias in (True, False) for tanh in (False, True)
                  for wd in dict.fromkeys((ptr, "*fp32")) if (bias, tanh, wd) != model[0]]
        for cfg in fwd_config_space():
            default = cfg["BLOCK_C"] == 64 and cfg["BLOCK_W"] == 8 and cfg["BLOCK_H"] == 4
            for has_bias, tanh, wd in model + (others if default else []):
                yield _dwconv3x3_gelu_fwd_kernel, dict(
                    X=ptr, WGT=wd, BIAS=wd, Y=ptr, H=H, W=W, C=C, stride_xb=N * C, stride_xn=C,
                    stride_yb=N * C, stride_yn=C, stride_wc=9, stride_wky=3, stride_wkx=1, stride_bc=1,
                    HAS_BIAS=has_bias, APPROX_TANH=tanh, **cfg)
        for cfg in bwd_config_space():
            default = cfg["BLOCK_C"] == 32 and cfg["BLOCK_W"] == 8
            for has_bias, tanh, wd in model + (others if default else []):
                taps = 9 + has_bias
                yield _dwconv3x3_gelu_bwd_kernel, dict(
                    X=ptr, DY=ptr, WGT=wd, BIAS=wd, DX=ptr, WS="*fp32", H=H, W=W, C=C, ROWS=8,
                    stride_xb=N * C, stride_xh=W * C, stride_xn=C, stride_dyb=N * C, stride_dyh=W * C,
                    stride_dyn=C, stride_dxb=N * C, stride_dxh=W * C, stride_dxn=C, stride_wc=9, stride_wky=3,
                    stride_wkx=1, stride_bc=1, stride_wsp=taps * C, stride_wst=C,
                    HAS_BIAS=has_bias, APPROX_TANH=tanh, **cfg)
        for wd in dict.fromkeys((ptr, "*fp32")):
            yield _wgrad_reduce_kernel, dict(WS="*fp32", DW=wd, DB=wd, P=512, C=C, stride_wsp=10 * C,
                                             stride_wst=C, stride_dwc=9, stride_dbc=1, **_GPU_REDUCE)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _err(msg: str) -> str:
    return f"dwconv3x3_gelu: {msg}"


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(_err(f"{name} must be a torch.Tensor, got {type(t).__name__}"))
    if t.dim() != ndim:
        raise ValueError(_err(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}"))


def _check_channel_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(_err(f"{name} must have stride 1 in its channel (last) dim, "
                              f"got strides {tuple(t.stride())}"))


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(_err(f"{name} is on {t.device} but x is on {device}"))


def _check_no_alias(name: str, t: torch.Tensor, others) -> None:
    # The conv reads neighbours of every pixel, so writing into an input corrupts the result.
    for other_name, o in others:
        if t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr():
            raise ValueError(_err(f"{name} must not share memory with {other_name}"))


def _check_buffer(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    _check_tensor(name, t, len(shape))
    if tuple(t.shape) != shape:
        raise ValueError(_err(f"{name} must have shape {shape}, got {tuple(t.shape)}"))
    if t.dtype != dtype:
        raise TypeError(_err(f"{name} must have dtype {dtype}, got {t.dtype}"))
    _check_device(name, t, device)
    _check_channel_stride(name, t)


def _check_size(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(_err(f"{name} must be an int, got {type(v).__name__} {v!r}"))
    if v < 1:
        raise ValueError(_err(f"{name} must be >= 1, got {v}"))
    return v


def _validate(x, H, W, weight, bias, approximate) -> tuple[int, int, int]:
    """Returns (B, N, C) or raises ValueError/TypeError naming the problem."""
    _check_tensor("x", x, 3)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(_err(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}"))
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(_err(f"unsupported device {x.device}"))
    H, W = _check_size("H", H), _check_size("W", W)
    if not isinstance(approximate, str) or approximate not in GELU_FORMS:
        raise ValueError(_err(f"approximate must be one of {GELU_FORMS}, got {approximate!r}"))
    B, N, C = x.shape
    if B == 0 or N == 0 or C == 0:
        raise ValueError(_err(f"empty input, x shape {tuple(x.shape)}"))
    if N != H * W:
        raise ValueError(_err(f"x has N = {N} tokens but H * W = {H} * {W} = {H * W}"))
    if N >= 2 ** 31:
        raise ValueError(_err(f"N = {N} tokens per image is too many (max {2 ** 31 - 1})"))
    _check_channel_stride("x", x)

    _check_tensor("weight", weight, 4)
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(_err(f"weight must have shape {(C, 1, 3, 3)} (depthwise 3x3 over C = {C} "
                              f"channels), got {tuple(weight.shape)}"))
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(_err(f"weight dtype must be x's dtype {x.dtype} or torch.float32, "
                             f"got {weight.dtype}"))
    _check_device("weight", weight, x.device)
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if tuple(bias.shape) != (C,):
            raise ValueError(_err(f"bias must have shape {(C,)}, got {tuple(bias.shape)}"))
        if bias.dtype not in (x.dtype, torch.float32):
            raise TypeError(_err(f"bias dtype must be x's dtype {x.dtype} or torch.float32, "
                                 f"got {bias.dtype}"))
        _check_device("bias", bias, x.device)

    if x.device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError(_err("CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"))
        check_interpreter_ready("dwconv3x3_gelu", _dwconv3x3_gelu_fwd_kernel)
    return B, N, C


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def dwconv3x3_gelu_fwd(x: torch.Tensor, H: int, W: int, weight: torch.Tensor,
                       bias: torch.Tensor | None, approximate: str = "none", *,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise 3x3 conv (zero padding 1) + bias + GELU on tokens, forward.

    x:      (B, N, C)      tokens of an H x W map, N = H * W (token n = h * W + w); any batch
                           and token strides, channel stride 1; float32 / float16 / bfloat16
    H, W:   ints >= 1
    weight: (C, 1, 3, 3)   depthwise Conv2d weight (groups = C), x's dtype or float32, any strides
    bias:   (C,) or None   x's dtype or float32
    approximate: "none" (exact erf GELU) or "tanh", as in torch.nn.functional.gelu
    out:    optional (B, N, C) buffer in x's dtype, channel stride 1, not sharing memory with x
    Returns y: (B, N, C) in x's dtype (contiguous unless `out` was given),
        y[b, h*W + w, c] = GELU(bias[c] + sum_{ky,kx} weight[c, 0, ky, kx] * x[b, (h+ky-1)*W + (w+kx-1), c])
    with out-of-image neighbours taken as zero. Computed in fp32.
    """
    B, N, C = _validate(x, H, W, weight, bias, approximate)
    if out is None:
        out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    else:
        _check_buffer("out", out, (B, N, C), x.dtype, x.device)
        _check_no_alias("out", out, [("x", x)])

    cfg = _fwd_config(B, H, W, C, x.dtype, x.device)
    block_h, block_w, block_c = cfg.pop("BLOCK_H"), cfg.pop("BLOCK_W"), cfg.pop("BLOCK_C")
    grid = (triton.cdiv(H, block_h) * triton.cdiv(W, block_w), triton.cdiv(C, block_c), B)
    b_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    with launch_device(x):
        _dwconv3x3_gelu_fwd_kernel[grid](
            x, weight, b_arg, out,
            H, W, C,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            weight.stride(0), weight.stride(2), weight.stride(3), bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
            BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, **cfg,
        )
    return out


def dwconv3x3_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, H: int, W: int, weight: torch.Tensor,
                       bias: torch.Tensor | None, approximate: str = "none", *,
                       dx: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Depthwise 3x3 conv + bias + GELU on tokens, backward (recomputes the pre-activation z).

    dy:     (B, N, C)      upstream gradient of y, x's dtype; a channel stride other than 1
                           (e.g. an expanded gradient) is copied to contiguous first
    x, H, W, weight, bias, approximate: as given to dwconv3x3_gelu_fwd
    dx:     optional (B, N, C) buffer in x's dtype, channel stride 1, not sharing memory with
            x or dy
    Returns (dx, dweight, dbias):
        dz = dy * GELU'(z),  z = bias + dwconv3x3(x)           (fp32, never stored)
        dx[b, h, w, c]        = sum_{ky,kx} weight[c, 0, ky, kx] * dz[b, h-ky+1, w-kx+1, c]
                                (B, N, C) in x's dtype (contiguous unless `dx` was given)
        dweight[c, 0, ky, kx] = sum_{b,h,w} dz[b, h, w, c] * x[b, h+ky-1, w+kx-1, c]
                                (C, 1, 3, 3) contiguous, weight's dtype
        dbias[c]              = sum_{b,h,w} dz[b, h, w, c]; (C,) in bias's dtype, None without bias
    dweight/dbias are summed in fp32 from per-program partials in a fixed order: bitwise
    reproducible run to run for the same shapes and device.
    """
    B, N, C = _validate(x, H, W, weight, bias, approximate)
    _check_tensor("dy", dy, 3)
    if tuple(dy.shape) != (B, N, C):
        raise ValueError(_err(f"dy must have shape {(B, N, C)}, got {tuple(dy.shape)}"))
    if dy.dtype != x.dtype:
        raise TypeError(_err(f"dy dtype {dy.dtype} does not match x dtype {x.dtype}"))
    _check_device("dy", dy, x.device)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    if dx is None:
        dx = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    else:
        _check_buffer("dx", dx, (B, N, C), x.dtype, x.device)
        _check_no_alias("dx", dx, [("x", x), ("dy", dy)])

    cfg = _bwd_config(B, H, W, C, x.dtype, x.device)
    rows, block_w, block_c = cfg.pop("ROWS"), cfg.pop("BLOCK_W"), cfg.pop("BLOCK_C")
    tiles = triton.cdiv(H, rows) * triton.cdiv(W, block_w)
    taps = 9 + (bias is not None)
    # fp32 partial sums of (dweight taps, dbias) per program: (B * tiles, taps, C).
    ws = torch.empty((B * tiles, taps, C), dtype=torch.float32, device=x.device)
    dweight = torch.empty((C, 1, 3, 3), dtype=weight.dtype, device=x.device)
    dbias = torch.empty((C,), dtype=bias.dtype, device=x.device) if bias is not None else None
    b_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    with launch_device(x):
        _dwconv3x3_gelu_bwd_kernel[(tiles, triton.cdiv(C, block_c), B)](
            x, dy, weight, b_arg, dx, ws,
            H, W, C, rows,
            x.stride(0), W * x.stride(1), x.stride(1), dy.stride(0), W * dy.stride(1), dy.stride(1),
            dx.stride(0), W * dx.stride(1), dx.stride(1),
            weight.stride(0), weight.stride(2), weight.stride(3),
            bias.stride(0) if bias is not None else 0, ws.stride(0), ws.stride(1),
            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
            BLOCK_W=block_w, BLOCK_C=block_c, **cfg,
        )
        rcfg = _reduce_config(B * tiles, C)
        block_p, block_c = rcfg.pop("BLOCK_P"), rcfg.pop("BLOCK_C")
        _wgrad_reduce_kernel[(triton.cdiv(C, block_c), taps)](
            ws, dweight, dbias if dbias is not None else dweight,
            B * tiles, C,
            ws.stride(0), ws.stride(1), 9, dbias.stride(0) if dbias is not None else 0,
            BLOCK_P=block_p, BLOCK_C=block_c, **rcfg,
        )
    return dx, dweight, dbias
