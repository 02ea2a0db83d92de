"""Upsample-concat-fuse of the SegFormer All-MLP decoder (Xie et al., 2021, "SegFormer: Simple and
Efficient Design for Semantic Segmentation with Transformers"), forward and backward, in Triton.

The NVlabs head computes, at 1/4 resolution H x W,

    y = F · concat(up(L4 c4), up(L3 c3), up(L2 c2), L1 c1)      then BN, ReLU, classifier.

Bilinear resizing (align_corners=False) and per-pixel linear maps commute, and the bilinear
weights of each output pixel sum to 1, so y = Σᵢ up(Pᵢ) + b with Pᵢ = cᵢ Mᵢᵀ computed at each
stage's own low resolution (fastseg/ops does that with cuBLAS and folds eval-mode BN into Mᵢ and
b). The kernels here do the full-resolution part in one pass, so neither the 4E-channel concat
nor the upsampled E-channel maps ever exist in memory:

    s[b, y, x, :] = Σᵢ resizeᵢ(Pᵢ)[b, y, x, :] + bias        (then ReLU if asked)
    logits        = s Wᵀ + b_cls                             (optional classifier, same pass)

resize is torch.nn.functional.interpolate(mode="bilinear", align_corners=False, size=(H, W)),
reproduced in fp32 the way aten computes it, per axis (rows shown; columns likewise):

    scale = float32(Hᵢ) / float32(H)
    src   = max(scale * (y + 0.5) - 0.5, 0)
    y0    = floor(src),  y1 = min(y0 + 1, Hᵢ - 1),  λ = src - y0
    up(P)[y, x] = (1-λy) ((1-λx) P[y0, x0] + λx P[y0, x1]) + λy ((1-λx) P[y1, x0] + λx P[y1, x1])

It is generic bilinear: any up- or down-sampling ratio. A map already at (H, W) is added as is.

Backward (training: no classifier, no ReLU; BN with batch statistics follows in PyTorch): the
adjoint of the sum of resizes, dPᵢ = resizeᵢᵀ(dout), computed as a GATHER — each low-res pixel
(i, j) sums w_y(y, i) w_x(x, j) dout[y, x] over a window of output pixels, recomputing the
interpolation weights exactly as the forward does (w_y(y, i) = (1-λy)[y0 = i] + λy[y1 = i], zero
for outputs that do not reference row i). No atomics: deterministic, one write per element.

Window bound (rows; columns likewise). Let s = Hᵢ/H. In exact arithmetic output row y touches
row i (with non-zero weight) only if i-1 <= src(y) < i+1, i.e. y lies in a half-open real
interval of length 2/s = 2H/Hᵢ that starts at ((2i-1)H - Hᵢ) / (2Hᵢ). (Rows clamped at src = 0
have λ = 0 and only touch row 0, which satisfies the same bound.) So the rows are among the
ceil(2H/Hᵢ) integers from lo = ceil(max(0, (2i-1)H - Hᵢ) / (2Hᵢ)) on, computed in exact integer
arithmetic. The kernel's float32 src differs from the exact one by a few ulps of Hᵢ
(<= ~3·Hᵢ·2⁻²⁴), far less than the step s between consecutive output rows for any H < 2²¹, so
rounding can flip floor(src) for at most the one output row on each side of that range. The
window is therefore rows [lo - 1, lo + ceil(2H/Hᵢ)], i.e. WIN = ceil(2H/Hᵢ) + 2 rows, starting at
max(lo - 1, 0) and capped at H rows (the whole axis). Extra rows in the window get weight 0 from
the recomputed weights, so a loose window costs time, never correctness. For x2 upsampling that
is 6 x 6 candidates (16 non-zero), for x8 18 x 18 (256 non-zero); loads are masked where the
weight is 0, so only the contributing dout pixels are read.

This file holds kernels and host launchers only: no autograd.Function, no dispatch policy
(see fastseg/ops/decoder_upsample_fuse.py).
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastseg.kernels import (check_interpreter_ready, dot_precision, interpreter_enabled, launch_device)

__all__ = ["upsample_sum_fwd", "upsample_sum_bwd", "SUPPORTED_DTYPES", "MAX_MAPS"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_MAPS = 4


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _axis_taps(o, n_in, scale, stride):
    """Bilinear taps along one axis for output coordinates o (int32 vector), aten's fp32 formula.

    Returns (i0 * stride, i1 * stride) as int64 offsets and λ (fp32): value = (1-λ) v[i0] + λ v[i1].
    """
    src = scale * (o.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)  # src >= 0, so truncation is floor
    lam = src - i0.to(tl.float32)
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0.to(tl.int64) * stride, i1.to(tl.int64) * stride, lam


@triton.jit
def _add_resized(acc, M, b, oy, ox, offs_e, mask,
                 Hi, Wi, scale_h, scale_w, stride_b, stride_y, stride_x,
                 SAME: tl.constexpr):
    """acc (BLOCK_P, BLOCK_E) fp32 += resize(M)[b, oy, ox, offs_e] for one (B, Hi, Wi, E) map M.

    SAME: the map is already at the output size; one load per pixel instead of four taps.
    """
    base = M + b * stride_b
    e = offs_e[None, :]
    if SAME:
        off = oy.to(tl.int64) * stride_y + ox.to(tl.int64) * stride_x
        acc += tl.load(base + off[:, None] + e, mask=mask, other=0.0).to(tl.float32)
    else:
        ry0, ry1, ly = _axis_taps(oy, Hi, scale_h, stride_y)
        rx0, rx1, lx = _axis_taps(ox, Wi, scale_w, stride_x)
        v00 = tl.load(base + (ry0 + rx0)[:, None] + e, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(base + (ry0 + rx1)[:, None] + e, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(base + (ry1 + rx0)[:, None] + e, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(base + (ry1 + rx1)[:, None] + e, mask=mask, other=0.0).to(tl.float32)
        lx = lx[:, None]
        ly = ly[:, None]
        top = (1.0 - lx) * v00 + lx * v01
        bot = (1.0 - lx) * v10 + lx * v11
        acc += (1.0 - ly) * top + ly * bot
    return acc


@triton.jit
def _resized_sum_tile(b, oy, ox, offs_e, mask, BIAS, stride_bias, E,
                      M0, M1, M2, M3,
                      H0, W0, H1, W1, H2, W2, H3, W3,
                      sh0, sw0, sh1, sw1, sh2, sw2, sh3, sw3,
                      s0b, s0y, s0x, s1b, s1y, s1x, s2b, s2y, s2x, s3b, s3y, s3x,
                      NUM_MAPS: tl.constexpr, SAME0: tl.constexpr, SAME1: tl.constexpr,
                      SAME2: tl.constexpr, SAME3: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """s (BLOCK_P, BLOCK_E) fp32 = Σᵢ resize(Mᵢ) + bias, ReLU'd if RELU; 0 outside mask."""
    s = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    s = _add_resized(s, M0, b, oy, ox, offs_e, mask, H0, W0, sh0, sw0, s0b, s0y, s0x, SAME0)
    if NUM_MAPS > 1:
        s = _add_resized(s, M1, b, oy, ox, offs_e, mask, H1, W1, sh1, sw1, s1b, s1y, s1x, SAME1)
    if NUM_MAPS > 2:
        s = _add_resized(s, M2, b, oy, ox, offs_e, mask, H2, W2, sh2, sw2, s2b, s2y, s2x, SAME2)
    if NUM_MAPS > 3:
        s = _add_resized(s, M3, b, oy, ox, offs_e, mask, H3, W3, sh3, sw3, s3b, s3y, s3x, SAME3)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_e * stride_bias, mask=offs_e < E, other=0.0).to(tl.float32)
        s += bias[None, :]
    if RELU:  # not tl.maximum(s, 0): it returns 0 for NaN (maxnum), torch.relu keeps NaN
        s = tl.where(s < 0.0, 0.0, s)
    # Padded pixels/channels must be exactly 0 (bias or ReLU could make them non-zero), so the
    # classifier dot sees nothing from outside the tile.
    return tl.where(mask, s, 0.0)


@triton.jit
def _upsample_sum_fwd_kernel(
    M0, M1, M2, M3, BIAS, OUT,
    H, W, E,
    H0, W0, H1, W1, H2, W2, H3, W3,
    sh0, sw0, sh1, sw1, sh2, sw2, sh3, sw3,
    s0b, s0y, s0x, s1b, s1y, s1x, s2b, s2y, s2x, s3b, s3y, s3x,
    stride_bias, stride_ob, stride_oy, stride_ox,
    NUM_MAPS: tl.constexpr, SAME0: tl.constexpr, SAME1: tl.constexpr, SAME2: tl.constexpr,
    SAME3: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program: BLOCK_P output pixels (row-major over H x W) x BLOCK_E channels of one image.

    Mᵢ: (B, Hᵢ, Wᵢ, E), channel stride 1, strides (sᵢb, sᵢy, sᵢx); shᵢ, swᵢ = fp32 Hᵢ/H, Wᵢ/W.
    BIAS: (E,) (stride_bias) or unused; OUT: (B, H, W, E), channel stride 1.
    OUT = Σᵢ resize(Mᵢ) + BIAS, ReLU'd if RELU, stored in OUT's dtype.
    Grid: (cdiv(H * W, BLOCK_P), cdiv(E, BLOCK_E), B).
    """
    b = tl.program_id(2).to(tl.int64)  # int64: b * stride_b can pass 2**31
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    p_mask = offs_p < H * W
    mask = p_mask[:, None] & (offs_e < E)[None, :]
    oy = offs_p // W
    ox = offs_p % W

    s = _resized_sum_tile(b, oy, ox, offs_e, mask, BIAS, stride_bias, E,
                          M0, M1, M2, M3, H0, W0, H1, W1, H2, W2, H3, W3,
                          sh0, sw0, sh1, sw1, sh2, sw2, sh3, sw3,
                          s0b, s0y, s0x, s1b, s1y, s1x, s2b, s2y, s2x, s3b, s3y, s3x,
                          NUM_MAPS, SAME0, SAME1, SAME2, SAME3, HAS_BIAS, RELU, BLOCK_P, BLOCK_E)

    o_off = b * stride_ob + oy.to(tl.int64) * stride_oy + ox.to(tl.int64) * stride_ox
    tl.store(OUT + o_off[:, None] + offs_e[None, :], s.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_sum_cls_fwd_kernel(
    M0, M1, M2, M3, BIAS, CW, CB, OUT,
    H, W, E, K,
    H0, W0, H1, W1, H2, W2, H3, W3,
    sh0, sw0, sh1, sw1, sh2, sw2, sh3, sw3,
    s0b, s0y, s0x, s1b, s1y, s1x, s2b, s2y, s2x, s3b, s3y, s3x,
    stride_bias, stride_cwk, stride_cwe, stride_cb, stride_ob, stride_oy, stride_ox,
    NUM_MAPS: tl.constexpr, SAME0: tl.constexpr, SAME1: tl.constexpr, SAME2: tl.constexpr,
    SAME3: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_CLS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_P output pixels x BLOCK_K classes of one image, looping over E.

    Mᵢ, BIAS as in _upsample_sum_fwd_kernel; CW: (K, E) classifier weight (strides cwk, cwe) in
    the maps' dtype; CB: (K,) (stride_cb) or unused; OUT: (B, H, W, K), class stride 1.
    For each E chunk: s = ReLU?(Σᵢ resize(Mᵢ) + BIAS) (fp32, registers only), cast to the maps'
    dtype for the tensor cores, acc (BLOCK_P, BLOCK_K) fp32 += s · CW[k, e]ᵀ.  OUT = acc + CB.
    Grid: (cdiv(H * W, BLOCK_P), cdiv(K, BLOCK_K), B); with K <= BLOCK_K, s is computed once.
    """
    b = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    p_mask = offs_p < H * W
    k_mask = offs_k < K
    oy = offs_p // W
    ox = offs_p % W

    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    for e_start in range(0, E, BLOCK_E):
        offs_e = e_start + tl.arange(0, BLOCK_E)
        e_mask = offs_e < E
        s = _resized_sum_tile(b, oy, ox, offs_e, p_mask[:, None] & e_mask[None, :], BIAS, stride_bias, E,
                              M0, M1, M2, M3, H0, W0, H1, W1, H2, W2, H3, W3,
                              sh0, sw0, sh1, sw1, sh2, sw2, sh3, sw3,
                              s0b, s0y, s0x, s1b, s1y, s1x, s2b, s2y, s2x, s3b, s3y, s3x,
                              NUM_MAPS, SAME0, SAME1, SAME2, SAME3, HAS_BIAS, RELU, BLOCK_P, BLOCK_E)
        # Wᵀ chunk loaded already transposed, (BLOCK_E, BLOCK_K): the dot needs no tl.trans.
        wt = tl.load(CW + offs_k[None, :].to(tl.int64) * stride_cwk + offs_e[:, None] * stride_cwe,
                     mask=e_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(s.to(wt.dtype), wt, input_precision=DOT_PRECISION)

    if HAS_CLS_BIAS:
        cb = tl.load(CB + offs_k * stride_cb, mask=k_mask, other=0.0).to(tl.float32)
        acc += cb[None, :]
    o_off = b * stride_ob + oy.to(tl.int64) * stride_oy + ox.to(tl.int64) * stride_ox
    tl.store(OUT + o_off[:, None] + offs_k[None, :], acc.to(OUT.dtype.element_ty),
             mask=p_mask[:, None] & k_mask[None, :])


@triton.jit
def _adjoint_weight(o, i, n_out, n_in, scale):
    """Weight with which output coordinate o (vector) reads input coordinate i (vector) along
    one axis: (1-λ)[i0 = i] + λ[i1 = i], from the same fp32 taps as the forward; 0 for o >= n_out."""
    src = scale * (o.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)
    lam = src - i0.to(tl.float32)
    i1 = tl.minimum(i0 + 1, n_in - 1)
    w = tl.where(i0 == i, 1.0 - lam, 0.0) + tl.where(i1 == i, lam, 0.0)
    return tl.where(o < n_out, w, 0.0)


@triton.jit
def _window_start(i, n_out, n_in):
    """First output coordinate of the adjoint window of input coordinate i (vector):
    max(lo - 1, 0), lo = ceil(max(0, (2i-1) n_out - n_in) / (2 n_in)) (see the module docstring)."""
    num = tl.maximum((2 * i.to(tl.int64) - 1) * n_out - n_in, 0)
    den = 2 * n_in
    lo = (num + den - 1) // den  # num >= 0: integer ceil
    return tl.maximum(lo - 1, 0).to(tl.int32)


@triton.jit
def _resize_adjoint_kernel(
    DOUT, DM,
    H, W, E, Hi, Wi, scale_h, scale_w, WIN_H, WIN_W,
    stride_db, stride_dy, stride_dx, stride_gb, stride_gy, stride_gx,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program: BLOCK_P low-res pixels (row-major over Hi x Wi) x BLOCK_E channels of one image.

    DOUT: (B, H, W, E), channel stride 1; DM: (B, Hi, Wi, E), channel stride 1.
    scale_h, scale_w: fp32 Hi/H, Wi/W as in the forward. WIN_H, WIN_W: window lengths (rows,
    columns) = min(ceil(2H/Hi) + 2, H), min(ceil(2W/Wi) + 2, W).
    DM[b, i, j] = Σ_{y, x in window} w_y(y, i) w_x(x, j) DOUT[b, y, x]  (fp32 accumulate) —
    the adjoint of the bilinear resize (Hi, Wi) -> (H, W), what aten's
    upsample_bilinear2d_backward computes, without atomics.
    Grid: (cdiv(Hi * Wi, BLOCK_P), cdiv(E, BLOCK_E), B).
    """
    b = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    p_mask = offs_p < Hi * Wi
    e_mask = offs_e < E
    iy = offs_p // Wi
    ix = offs_p % Wi
    y_start = _window_start(iy, H, Hi)
    x_start = _window_start(ix, W, Wi)

    base = DOUT + b * stride_db + offs_e[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
    for dy in range(0, WIN_H):
        y = y_start + dy
        wy = _adjoint_weight(y, iy, H, Hi, scale_h)
        wy = tl.where(p_mask, wy, 0.0)
        row = y.to(tl.int64) * stride_dy
        for dx in range(0, WIN_W):
            # _adjoint_weight along x, written out: this loop body is the hot spot of the
            # interpreter, where each helper call costs as much as a dozen tensor ops.
            x = x_start + dx
            src = tl.maximum(scale_w * (x.to(tl.float32) + 0.5) - 0.5, 0.0)
            x0 = src.to(tl.int32)
            lam = src - x0.to(tl.float32)
            x1 = tl.minimum(x0 + 1, Wi - 1)
            wx = tl.where(x0 == ix, 1.0 - lam, 0.0) + tl.where(x1 == ix, lam, 0.0)
            w = tl.where(x < W, wy * wx, 0.0)
            # Only the output pixels that really reference this one are read.
            m = (w != 0.0)[:, None] & e_mask[None, :]
            g = tl.load(base + (row + x.to(tl.int64) * stride_dx)[:, None], mask=m, other=0.0)
            acc += w[:, None] * g.to(tl.float32)

    g_off = b * stride_gb + iy.to(tl.int64) * stride_gy + ix.to(tl.int64) * stride_gx
    tl.store(DM + g_off[:, None] + offs_e[None, :], acc.to(DM.dtype.element_ty),
             mask=p_mask[:, None] & e_mask[None, :])


# --------------------------------------------------------------------------------------------
# Block-size choices
# --------------------------------------------------------------------------------------------
# Under the interpreter every program runs as numpy code: one small fixed config, small enough
# that the tests' E = 24/40, K = 19 and 165-192 pixel images cross pixel, channel and class tiles.
_INTERP_FWD = dict(BLOCK_P=32, BLOCK_E=16, num_warps=4, num_stages=1)
_INTERP_CLS = dict(BLOCK_P=32, BLOCK_E=16, BLOCK_K=16, num_warps=4, num_stages=1)
_INTERP_BWD = dict(BLOCK_P=32, BLOCK_E=16, num_warps=4, num_stages=1)


# GPU configs below were checked by compiling for sm_90 (ptxas resource usage, pointers and
# strides specialised as the JIT does for E = 256 channels-last tensors): no register spills,
# <= ~130 registers per thread for the gathers, <= ~200 for the classifier. They have not been
# timed; each is a small function of (E, K, element size) so tuning stays in one place.
_TAP_TILE_BYTES = 4096  # one (BLOCK_P, BLOCK_E) tap tile per program: 8-16 elements per thread


def _gather_tile(E: int, dtype: torch.dtype, max_p: int) -> tuple[int, int]:
    # Channel tile up to 128 (256-512 contiguous bytes per pixel: 16-byte vector loads), pixel
    # tile filling _TAP_TILE_BYTES. Bigger tiles spill: the compiler keeps the 4 taps x 4 maps
    # of loads in flight at once (32 fp32 per thread per tap already needs > 255 registers).
    block_e = max(16, min(triton.next_power_of_2(E), 128))
    elem = torch.empty((), dtype=dtype).element_size()
    block_p = max(8, min(max_p, _TAP_TILE_BYTES // (block_e * elem)))
    return block_p, block_e


def _fwd_config(E: int, dtype: torch.dtype) -> dict:
    """No-classifier forward: a memory-bound gather + store, 4 warps per program. A 512x512
    image (128x128 at 1/4) still gives >= 2k programs per image."""
    if interpreter_enabled():
        return dict(_INTERP_FWD)
    block_p, block_e = _gather_tile(E, dtype, 128)
    return dict(BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4, num_stages=1)


def _cls_config(E: int, K: int, dtype: torch.dtype) -> dict:
    """Classifier forward: one program owns a (BLOCK_P, BLOCK_K) fp32 accumulator and loops over
    E in BLOCK_E chunks (the dot's reduction dim). K up to 256 (ADE20K's 150 -> 256) is one
    class tile, so s is computed once per pixel; beyond that the grid splits K and recomputes s
    (cheap: the maps are small and stay in L2). Wide class tiles get 8 warps; fp32 uses
    (32, 16) pixel x E chunks to stay clear of spills."""
    if interpreter_enabled():
        return dict(_INTERP_CLS)
    return _cls_tile(max(16, min(triton.next_power_of_2(K), 256)), dtype)


def _cls_tile(block_k: int, dtype: torch.dtype) -> dict:
    wide = block_k >= 128
    if dtype == torch.float32:  # (64, 16) / (32, 32) spilled on sm_90 in some epilogues (aot_check)
        block_p, block_e = 32, 16
    else:
        block_p, block_e = 64, 32
    # fp32 with a wide class tile spilled at 2 stages on sm_90 (tf32, no classifier bias).
    return dict(BLOCK_P=block_p, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=8 if wide else 4,
                num_stages=1 if wide and dtype == torch.float32 else 2)


def _bwd_config(E: int, dtype: torch.dtype) -> dict:
    """Adjoint gather: per program BLOCK_P low-res pixels x BLOCK_E channels and a window loop of
    masked (BLOCK_P, BLOCK_E) loads (one tile live at a time: ~50 registers). The low-res maps
    are small (16x16 pixels at stage 4 of a 512x512 image), so the pixel tile is kept small to
    give the SMs enough programs."""
    if interpreter_enabled():
        return dict(_INTERP_BWD)
    block_p, block_e = _gather_tile(E, dtype, 64)
    return dict(BLOCK_P=block_p, BLOCK_E=block_e, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------
# Every GPU config the launchers can pick, for ahead-of-time compilation
# (python -m fastseg.kernels.aot_check): the same rules as above, enumerated over E and K.
# --------------------------------------------------------------------------------------------
_BLOCK_ES = (16, 32, 64, 128)  # every channel tile _gather_tile returns
_BLOCK_KS = (16, 32, 64, 128, 256)  # every class tile _cls_config returns


def fwd_config_space(dtype: torch.dtype) -> list[dict]:
    return [dict(zip(("BLOCK_P", "BLOCK_E"), _gather_tile(e, dtype, 128)), num_warps=4, num_stages=1)
            for e in _BLOCK_ES]


def cls_config_space(dtype: torch.dtype) -> list[dict]:
    return [_cls_tile(k, dtype) for k in _BLOCK_KS]


def bwd_config_space(dtype: torch.dtype) -> list[dict]:
    return [dict(zip(("BLOCK_P", "BLOCK_E"), _gather_tile(e, dtype, 64)), num_warps=4, num_stages=1)
            for e in _BLOCK_ES]


def _aot_map_args(ptr: str, num_maps: int, H: int, W: int, E: int) -> dict:
    """Kernel arguments of the 4 map slots for a SegFormer-like launch: map 0 at the output size,
    maps 1-3 at 1/2, 1/4, 1/8 of it; unused slots repeat map 0 (as _map_args does)."""
    sizes = [(H, W), (H // 2, W // 2), (H // 4, W // 4), (H // 8, W // 8)][:num_maps]
    sizes += [sizes[0]] * (MAX_MAPS - num_maps)
    args = {}
    for i, (hi, wi) in enumerate(sizes):
        args.update({f"M{i}": ptr, f"H{i}": hi, f"W{i}": wi, f"sh{i}": _f32(hi / H), f"sw{i}": _f32(wi / W),
                     f"s{i}b": hi * wi * E, f"s{i}y": wi * E, f"s{i}x": E})
    return args


def aot_variants():
    """Yields (kernel, args) for every compiled variant the launchers can pick (see
    fastseg.kernels.aot_check): every tile config in every dtype with the model's flags (4 maps,
    map 0 at full size, bias, ReLU in the classifier form), and the epilogue variants (1-4 maps,
    with / without bias, ReLU, classifier bias, a first map that is resized too) at E = 256 / K = 150."""
    H, W, E, K = 128, 128, 256, 150
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        ptr = "*" + name
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        out = dict(stride_bias=1, stride_ob=H * W * E, stride_oy=W * E, stride_ox=E)
        model = (4, True, True, False)  # maps, SAME0, HAS_BIAS, RELU (training form)
        epilogues = [(n, same0, bias, relu) for n in (1, 2, 3, 4) for same0 in (True, False)
                     for bias in (True, False) for relu in (False, True)
                     if (n, same0, bias, relu) != model and (n == 4 or (same0 and bias and not relu))]
        for cfg in fwd_config_space(dtype):
            for n, same0, bias, relu in [model] + (epilogues if cfg["BLOCK_E"] == 128 else []):
                yield _upsample_sum_fwd_kernel, dict(
                    **_aot_map_args(ptr, n, H, W, E), BIAS="*fp32" if bias else ptr, OUT=ptr, H=H, W=W, E=E, **out,
                    NUM_MAPS=n, SAME0=same0, SAME1=False, SAME2=False, SAME3=False, HAS_BIAS=bias, RELU=relu,
                    **cfg)
        cls_out = dict(stride_bias=1, stride_cwk=E, stride_cwe=1, stride_cb=1, stride_ob=H * W * K,
                       stride_oy=W * K, stride_ox=K)
        for precision in precisions:
            for cfg in cls_config_space(dtype):
                variants = [(True, True, True)]  # HAS_BIAS, RELU, HAS_CLS_BIAS: eval with folded BN
                if cfg["BLOCK_K"] == 256:
                    variants += [(b, r, cb) for b in (True, False) for r in (True, False) for cb in (True, False)
                                 if (b, r, cb) != (True, True, True)]
                for bias, relu, cls_bias in variants:
                    yield _upsample_sum_cls_fwd_kernel, dict(
                        **_aot_map_args(ptr, 4, H, W, E), BIAS="*fp32" if bias else ptr, CW=ptr, CB=ptr, OUT=ptr,
                        H=H, W=W, E=E, K=K, **cls_out, NUM_MAPS=4, SAME0=True, SAME1=False, SAME2=False,
                        SAME3=False, HAS_BIAS=bias, RELU=relu, HAS_CLS_BIAS=cls_bias, DOT_PRECISION=precision,
                        **cfg)
        for cfg in bwd_config_space(dtype):
            hi, wi = H // 4, W // 4
            yield _resize_adjoint_kernel, dict(
                DOUT=ptr, DM=ptr, H=H, W=W, E=E, Hi=hi, Wi=wi, scale_h=_f32(hi / H), scale_w=_f32(wi / W),
                WIN_H=10, WIN_W=10, stride_db=H * W * E, stride_dy=W * E, stride_dx=E,
                stride_gb=hi * wi * E, stride_gy=wi * E, stride_gx=E, **cfg)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"decoder_upsample_fuse: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"decoder_upsample_fuse: {name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_channel_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"decoder_upsample_fuse: {name} must have stride 1 in its channel (last) "
                         f"dim, got strides {tuple(t.stride())}")


def _check_device(name: str, t: torch.Tensor, device: torch.device, ref: str) -> None:
    if t.device != device:
        raise ValueError(f"decoder_upsample_fuse: {name} is on {t.device} but {ref} is on {device}")


def _check_backend_device(device: torch.device) -> None:
    if device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError("decoder_upsample_fuse: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
        check_interpreter_ready("decoder_upsample_fuse", _upsample_sum_fwd_kernel)
    elif device.type != "cuda":
        raise ValueError(f"decoder_upsample_fuse: unsupported device {device}")


def _check_out_hw(out_hw) -> tuple[int, int]:
    ok = (isinstance(out_hw, (tuple, list, torch.Size)) and len(out_hw) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in out_hw))
    if not ok:
        raise ValueError(f"decoder_upsample_fuse: out_hw must be a pair of positive ints (H, W), got {out_hw!r}")
    return int(out_hw[0]), int(out_hw[1])


def _validate_maps(maps) -> tuple[int, int, torch.dtype, torch.device]:
    """Returns (B, E, dtype, device) of the 1-4 maps or raises naming the problem."""
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence):
        raise TypeError(f"decoder_upsample_fuse: maps must be a list of 1 to {MAX_MAPS} tensors, "
                        f"got {type(maps).__name__}")
    if not 1 <= len(maps) <= MAX_MAPS:
        raise ValueError(f"decoder_upsample_fuse: maps must hold 1 to {MAX_MAPS} tensors, got {len(maps)}")
    for i, m in enumerate(maps):
        _check_tensor(f"maps[{i}]", m, 4)
    m0 = maps[0]
    if m0.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"decoder_upsample_fuse: maps dtype must be one of {SUPPORTED_DTYPES}, got {m0.dtype}")
    B, E = m0.shape[0], m0.shape[3]
    for i, m in enumerate(maps):
        if m.dtype != m0.dtype:
            raise TypeError(f"decoder_upsample_fuse: maps[{i}] dtype {m.dtype} does not match maps[0] dtype {m0.dtype}")
        _check_device(f"maps[{i}]", m, m0.device, "maps[0]")
        if m.shape[0] != B:
            raise ValueError(f"decoder_upsample_fuse: maps[{i}] batch {m.shape[0]} != maps[0] batch {B}")
        if m.shape[3] != E:
            raise ValueError(f"decoder_upsample_fuse: maps[{i}] has {m.shape[3]} channels, maps[0] has {E} "
                             f"(all maps must have E channels, channels-last (B, Hi, Wi, E))")
        if m.numel() == 0:
            raise ValueError(f"decoder_upsample_fuse: empty input, maps[{i}] has shape {tuple(m.shape)}")
        _check_channel_stride(f"maps[{i}]", m)
    _check_backend_device(m0.device)
    return B, E, m0.dtype, m0.device


def _check_vector(name: str, t, length: int, dtypes: tuple, device: torch.device) -> None:
    _check_tensor(name, t, 1)
    if t.shape[0] != length:
        raise ValueError(f"decoder_upsample_fuse: {name} must have shape ({length},), got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"decoder_upsample_fuse: {name} dtype must be one of {dtypes}, got {t.dtype}")
    _check_device(name, t, device, "maps[0]")


def _check_out(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    _check_tensor(name, t, len(shape))
    if tuple(t.shape) != shape:
        raise ValueError(f"decoder_upsample_fuse: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"decoder_upsample_fuse: {name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"decoder_upsample_fuse: {name} is on {t.device}, inputs are on {device}")
    _check_channel_stride(name, t)


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (returned as a Python float holding that value). For a
    quotient of ints, double -> float rounding equals direct float division (53 >= 2*24 + 2), so
    _f32(a / b) is aten's float32 a / b."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _map_args(maps: Sequence[torch.Tensor], H: int, W: int) -> tuple[list, list, list, list, dict]:
    """Kernel arguments for 4 map slots (unused slots repeat maps[0]; they are never read)."""
    slots = list(maps) + [maps[0]] * (MAX_MAPS - len(maps))
    ptrs, sizes, scales, strides, same = [], [], [], [], {}
    for i, m in enumerate(slots):
        hi, wi = m.shape[1], m.shape[2]
        ptrs.append(m)
        sizes += [hi, wi]
        scales += [_f32(hi / H), _f32(wi / W)]
        strides += [m.stride(0), m.stride(1), m.stride(2)]
        # Unused slots say False: one compiled variant per real combination of flags.
        same[f"SAME{i}"] = i < len(maps) and (hi, wi) == (H, W)
    return ptrs, sizes, scales, strides, same


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def upsample_sum_fwd(maps: Sequence[torch.Tensor], out_hw: tuple[int, int],
                     bias: torch.Tensor | None = None, relu: bool = False,
                     classifier_weight: torch.Tensor | None = None,
                     classifier_bias: torch.Tensor | None = None, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of bilinearly resized maps (+ bias, ReLU, classifier) at (H, W) in one pass.

    maps:   list of 1 to 4 tensors (B, Hᵢ, Wᵢ, E), channels-last images: channel stride 1, any
            other strides (read in place, no copies); same B, E, dtype and device. A map with
            (Hᵢ, Wᵢ) == (H, W) is added as is; the others are resized like
            F.interpolate(mode="bilinear", align_corners=False, size=(H, W)) (any ratio).
    out_hw: (H, W) output size
    bias:   optional (E,), float32 or the maps' dtype, any stride
    relu:   apply ReLU after the bias
    classifier_weight: optional (K, E) in the maps' dtype, any strides
    classifier_bias:   optional (K,), float32 or the maps' dtype (only with classifier_weight)
    out:    optional buffer in the maps' dtype, channel stride 1, of the returned shape
    Returns, computed in fp32 and stored in the maps' dtype:
        s = ReLU?(Σᵢ resizeᵢ(mapsᵢ) + bias)               (B, H, W, E) without classifier
        logits = s · classifier_weightᵀ + classifier_bias  (B, H, W, K) with it
    dtypes: float32, float16, bfloat16. With a classifier, s is rounded to the maps' dtype before
    the GEMM (fp32 GEMM follows torch.get_float32_matmul_precision: TF32 unless "highest").
    """
    B, E, dtype, device = _validate_maps(maps)
    H, W = _check_out_hw(out_hw)
    if not isinstance(relu, bool):
        raise TypeError(f"decoder_upsample_fuse: relu must be a bool, got {type(relu).__name__}")
    if bias is not None:
        _check_vector("bias", bias, E, (torch.float32, dtype), device)
    if classifier_weight is None and classifier_bias is not None:
        raise ValueError("decoder_upsample_fuse: classifier_bias given without classifier_weight")
    K = None
    if classifier_weight is not None:
        _check_tensor("classifier_weight", classifier_weight, 2)
        K = classifier_weight.shape[0]
        if classifier_weight.shape[1] != E or K == 0:
            raise ValueError(f"decoder_upsample_fuse: classifier_weight must have shape (K, E={E}) "
                             f"with K >= 1, got {tuple(classifier_weight.shape)}")
        if classifier_weight.dtype != dtype:
            raise TypeError(f"decoder_upsample_fuse: classifier_weight dtype {classifier_weight.dtype} "
                            f"does not match the maps' dtype {dtype}")
        _check_device("classifier_weight", classifier_weight, device, "maps[0]")
        if classifier_bias is not None:
            _check_vector("classifier_bias", classifier_bias, K, (torch.float32, dtype), device)

    C_out = E if K is None else K
    if out is None:
        out = torch.empty((B, H, W, C_out), dtype=dtype, device=device)
    else:
        _check_out("out", out, (B, H, W, C_out), dtype, device)

    ptrs, sizes, scales, map_strides, same = _map_args(maps, H, W)
    flags = dict(NUM_MAPS=len(maps), HAS_BIAS=bias is not None, RELU=relu, **same)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    bias_stride = bias.stride(0) if bias is not None else 0
    with launch_device(maps[0]):
        if K is None:
            cfg = _fwd_config(E, dtype)
            grid = (triton.cdiv(H * W, cfg["BLOCK_P"]), triton.cdiv(E, cfg["BLOCK_E"]), B)
            _upsample_sum_fwd_kernel[grid](
                *ptrs, bias_arg, out,
                H, W, E, *sizes, *scales, *map_strides,
                bias_stride, out.stride(0), out.stride(1), out.stride(2),
                **flags, **cfg,
            )
        else:
            cfg = _cls_config(E, K, dtype)
            cb = classifier_bias
            grid = (triton.cdiv(H * W, cfg["BLOCK_P"]), triton.cdiv(K, cfg["BLOCK_K"]), B)
            _upsample_sum_cls_fwd_kernel[grid](
                *ptrs, bias_arg, classifier_weight, cb if cb is not None else out, out,
                H, W, E, K, *sizes, *scales, *map_strides,
                bias_stride, classifier_weight.stride(0), classifier_weight.stride(1),
                cb.stride(0) if cb is not None else 0, out.stride(0), out.stride(1), out.stride(2),
                HAS_CLS_BIAS=cb is not None, DOT_PRECISION=dot_precision(dtype), **flags, **cfg,
            )
    return out


def _parse_map_shape(i: int, shape, B: int, E: int) -> tuple[int, int]:
    """(Hᵢ, Wᵢ) from (Hᵢ, Wᵢ) or (B, Hᵢ, Wᵢ, E) (e.g. a saved map.shape)."""
    ok = (isinstance(shape, (tuple, list, torch.Size)) and len(shape) in (2, 4)
          and all(isinstance(v, int) and not isinstance(v, bool) for v in shape))
    if not ok:
        raise ValueError(f"decoder_upsample_fuse: map_shapes[{i}] must be (Hi, Wi) or (B, Hi, Wi, E) "
                         f"ints, got {shape!r}")
    if len(shape) == 4:
        if shape[0] != B or shape[3] != E:
            raise ValueError(f"decoder_upsample_fuse: map_shapes[{i}] = {tuple(shape)} does not match "
                             f"dout's batch {B} / channels {E}")
        shape = shape[1:3]
    if shape[0] <= 0 or shape[1] <= 0:
        raise ValueError(f"decoder_upsample_fuse: map_shapes[{i}] has an empty size {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def upsample_sum_bwd(dout: torch.Tensor, map_shapes: Sequence, *,
                     out: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Adjoint of s = Σᵢ resizeᵢ(mapᵢ) (the no-bias, no-ReLU, no-classifier forward).

    dout:       (B, H, W, E) upstream gradient of s; float32/float16/bfloat16. Channel stride 1 is
                read in place; any other channel stride (e.g. an expanded gradient) is copied to
                contiguous first.
    map_shapes: list of 1 to 4 shapes, each (Hᵢ, Wᵢ) or the map's full (B, Hᵢ, Wᵢ, E)
    out:        optional list (one entry per map, None allowed) of (B, Hᵢ, Wᵢ, E) buffers in
                dout's dtype, channel stride 1, to write into
    Returns [dmapᵢ], each (B, Hᵢ, Wᵢ, E) in dout's dtype (accumulated in fp32), contiguous unless
    a buffer was given:
      - (Hᵢ, Wᵢ) == (H, W): dmapᵢ = dout. Without a buffer this is dout ITSELF (aliased, no copy)
        when dout is contiguous, else a contiguous copy; with a buffer, dout is copied into it.
      - otherwise the exact adjoint of the bilinear resize (aten's upsample_bilinear2d_backward),
        as a deterministic gather over a window of ceil(2H/Hᵢ) + 2 rows x ceil(2W/Wᵢ) + 2
        columns per low-res pixel (module docstring: why that window is enough for any ratio).
    """
    _check_tensor("dout", dout, 4)
    if dout.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"decoder_upsample_fuse: dout dtype must be one of {SUPPORTED_DTYPES}, got {dout.dtype}")
    if dout.numel() == 0:
        raise ValueError(f"decoder_upsample_fuse: empty input, dout has shape {tuple(dout.shape)}")
    _check_backend_device(dout.device)
    B, H, W, E = dout.shape
    if isinstance(map_shapes, (torch.Tensor, str)) or not isinstance(map_shapes, Sequence):
        raise TypeError(f"decoder_upsample_fuse: map_shapes must be a list of shapes, got {type(map_shapes).__name__}")
    if not 1 <= len(map_shapes) <= MAX_MAPS:
        raise ValueError(f"decoder_upsample_fuse: map_shapes must hold 1 to {MAX_MAPS} shapes, got {len(map_shapes)}")
    sizes = [_parse_map_shape(i, s, B, E) for i, s in enumerate(map_shapes)]
    if out is None:
        out = [None] * len(sizes)
    elif isinstance(out, torch.Tensor) or not isinstance(out, Sequence) or len(out) != len(sizes):
        raise ValueError(f"decoder_upsample_fuse: out must be a list of {len(sizes)} buffers (or None entries)")
    for i, ((hi, wi), buf) in enumerate(zip(sizes, out)):
        if buf is not None:
            _check_out(f"out[{i}]", buf, (B, hi, wi, E), dout.dtype, dout.device)
    if E > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()

    cfg = _bwd_config(E, dout.dtype)
    grads = []
    with launch_device(dout):
        for (hi, wi), buf in zip(sizes, out):
            if (hi, wi) == (H, W):
                if buf is not None:
                    grads.append(buf.copy_(dout))
                else:
                    grads.append(dout if dout.is_contiguous() else dout.contiguous())
                continue
            dm = buf if buf is not None else torch.empty((B, hi, wi, E), dtype=dout.dtype, device=dout.device)
            win_h = min(triton.cdiv(2 * H, hi) + 2, H)
            win_w = min(triton.cdiv(2 * W, wi) + 2, W)
            grid = (triton.cdiv(hi * wi, cfg["BLOCK_P"]), triton.cdiv(E, cfg["BLOCK_E"]), B)
            _resize_adjoint_kernel[grid](
                dout, dm,
                H, W, E, hi, wi, _f32(hi / H), _f32(wi / W), win_h, win_w,
                dout.stride(0), dout.stride(1), dout.stride(2), dm.stride(0), dm.stride(1), dm.stride(2),
                **cfg,
            )
            grads.append(dm)
    return grads
