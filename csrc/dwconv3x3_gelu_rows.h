// Shared by the C++ CPU kernels that run the Mix-FFN depthwise 3x3 conv + bias + GELU on tokens
// (dwconv3x3_gelu_cpu.cpp, mix_ffn_cpu.cpp): the GELU math, the per-pixel conv loops, one output
// row, and the per-call tap / border-bias tables. The numerics are documented in
// dwconv3x3_gelu_cpu.cpp; the functions here were moved from there unchanged.
//
// Everything is FASTSEG_INLINE: it is compiled into each caller's FASTSEG_CLONES functions, so
// it vectorises for the widest ISA the CPU has.
#pragma once

#include "cpu_simd.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

namespace fastseg {
namespace dwconv {

FASTSEG_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FASTSEG_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

FASTSEG_INLINE float load(const float* p) { return *p; }
FASTSEG_INLINE float load(const bf16_bits* p) { return bf16_to_float(*p); }

FASTSEG_INLINE void store(float* p, float v) { *p = v; }
FASTSEG_INLINE void store(bf16_bits* p, float v) { *p = float_to_bf16(v); }

// exp(v) for v in float: see the file comment. Vectorisable (no calls, no branches).
FASTSEG_INLINE float exp_approx(float v_in) {
  float v = std::min(std::max(v_in, -80.0f), 88.0f);  // see the file comment: no subnormal result
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kf = (v * 1.44269504088896341f + kShift) - kShift;
  const float r = (v - kf * 0.693145751953125f) - kf * 1.428606765330187045e-06f;  // ln 2 = hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k = int32_t(kf);
  // Past the clamp the true exp overflows: +inf, so GELU(-inf) = -inf / inf is NaN, as in torch.
  return v_in > 88.0f ? INFINITY : p * bits_to_float(uint32_t(k + 127) << 23);
}

// 1 / v for v >= 1: Newton's iteration r <- r (2 - v r) from a first guess made on the bits (about
// 4 correct bits; each step doubles them). Vectorises to multiply-adds, where a division is one
// long-latency instruction that the whole GELU loop would wait on.
FASTSEG_INLINE float reciprocal(float v) {
  float r = bits_to_float(0x7EF311C3u - float_to_bits(v));
  r = r * (2.0f - v * r);
  r = r * (2.0f - v * r);
  r = r * (2.0f - v * r);
  return r;
}

// 1 + erf(s), Abramowitz-Stegun 7.1.28: 1 - erf(a) = P(a)^-16 for a = |s| (|error| <= 3e-7), so
// the negative tail is q itself, with no cancellation; no exp. a is clamped to 9, where q is
// ~4e-28 (true erfc(9) ~ 4e-37): GELU changes by < 1e-26 absolute, and q never goes subnormal
// (whose microcode assists would slow the whole loop several times).
FASTSEG_INLINE float one_plus_erf(float s) {
  const float a = std::min(std::fabs(s), 9.0f);
  float p = 0.0000430638f;
  p = p * a + 0.0002765672f;
  p = p * a + 0.0001520143f;
  p = p * a + 0.0092705272f;
  p = p * a + 0.0422820123f;
  p = p * a + 0.0705230784f;
  p = p * a + 1.0f;
  const float r = reciprocal(p);
  const float r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  // 1 - erf(a); exactly 0 past the clamp (erfc(9) < 1e-36), so GELU(-inf) = -inf * 0 is NaN and a
  // huge negative z gives 0, as torch (not z * q(9)). NaN keeps q NaN (the compare is false).
  const float q = std::fabs(s) > 9.0f ? 0.0f : r8 * r8;
  return s < 0.0f ? q : 2.0f - q;
}

template <bool TANH>
FASTSEG_INLINE float gelu(float z) {
  if constexpr (TANH) {
    const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    return z / (1.0f + exp_approx(-2.0f * u));  // 0.5 z (1 + tanh u) = z sigmoid(2u)
  } else {
    return 0.5f * z * one_plus_erf(z * 0.7071067811865476f);
  }
}

// The pre-activation of one output pixel, channels [0, C), into z. up/mid/down point at column w
// of the three input rows (only the ones that exist are read); LEFT / RIGHT: whether columns
// w - 1 / w + 1 exist. wt: (9, C) taps, tap ky*3 + kx; eb: the bias of this border case. One
// partial sum per kernel row keeps the dependent FMA chains short.
template <typename T, bool UP, bool DOWN, bool LEFT, bool RIGHT>
FASTSEG_INLINE void conv_pixel(const T* __restrict__ up, const T* __restrict__ mid, const T* __restrict__ down,
                                  int64_t sn, const float* __restrict__ wt, const float* __restrict__ eb,
                                  float* __restrict__ z, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    float a0 = 0.0f, a1 = eb[c], a2 = 0.0f;
    if constexpr (UP) {
      if constexpr (LEFT) a0 += wt[c] * load(up - sn + c);
      a0 += wt[C + c] * load(up + c);
      if constexpr (RIGHT) a0 += wt[2 * C + c] * load(up + sn + c);
    }
    if constexpr (LEFT) a1 += wt[3 * C + c] * load(mid - sn + c);
    a1 += wt[4 * C + c] * load(mid + c);
    if constexpr (RIGHT) a1 += wt[5 * C + c] * load(mid + sn + c);
    if constexpr (DOWN) {
      if constexpr (LEFT) a2 += wt[6 * C + c] * load(down - sn + c);
      a2 += wt[7 * C + c] * load(down + c);
      if constexpr (RIGHT) a2 += wt[8 * C + c] * load(down + sn + c);
    }
    z[c] = (a0 + a2) + a1;
  }
}

// Two neighbouring interior pixels (w, w + 1) at once: they share the nine weights and two of
// their three columns, so 21 loads make two outputs instead of 36.
template <typename T, bool UP, bool DOWN>
FASTSEG_INLINE void conv_pixel_pair(const T* __restrict__ up, const T* __restrict__ mid,
                                       const T* __restrict__ down, int64_t sn, const float* __restrict__ wt,
                                       const float* __restrict__ eb, float* __restrict__ z, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    float p0 = 0.0f, p1 = eb[c], p2 = 0.0f, q0 = 0.0f, q1 = eb[c], q2 = 0.0f;
    if constexpr (UP) {
      const float a = load(up - sn + c), b = load(up + c), d = load(up + sn + c), e = load(up + 2 * sn + c);
      p0 += wt[c] * a + wt[C + c] * b + wt[2 * C + c] * d;
      q0 += wt[c] * b + wt[C + c] * d + wt[2 * C + c] * e;
    }
    {
      const float a = load(mid - sn + c), b = load(mid + c), d = load(mid + sn + c), e = load(mid + 2 * sn + c);
      p1 += wt[3 * C + c] * a + wt[4 * C + c] * b + wt[5 * C + c] * d;
      q1 += wt[3 * C + c] * b + wt[4 * C + c] * d + wt[5 * C + c] * e;
    }
    if constexpr (DOWN) {
      const float a = load(down - sn + c), b = load(down + c), d = load(down + sn + c), e = load(down + 2 * sn + c);
      p2 += wt[6 * C + c] * a + wt[7 * C + c] * b + wt[8 * C + c] * d;
      q2 += wt[6 * C + c] * b + wt[7 * C + c] * d + wt[8 * C + c] * e;
    }
    z[c] = (p0 + p2) + p1;
    z[C + c] = (q0 + q2) + q1;
  }
}

// out[i] = GELU(z[i]) for i in [0, n): a separate loop over a short fp32 buffer, so the long
// dependent chain of the GELU is overlapped across iterations by the out-of-order core.
template <typename T, bool TANH>
FASTSEG_INLINE void gelu_store(const float* __restrict__ z, T* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(out + i, gelu<TANH>(z[i]));
}


// Border case of a pixel: bit 0 = no up row, bit 1 = no down row, bit 2 = no left column,
// bit 3 = no right column. eb_table holds 16 rows of C.
FASTSEG_INLINE int64_t border_case(bool up, bool down, bool left, bool right) {
  return (up ? 0 : 1) | (down ? 0 : 2) | (left ? 0 : 4) | (right ? 0 : 8);
}

// One output row of W pixels: the pre-activations of `chunk` pixels at a time into z (chunk * C
// floats), then their GELU into out (W * C, contiguous). up / mid / down point at column 0 of the
// three input rows (up / down are read only when UP / DOWN say the row exists), with token
// stride sn; each may live in a different buffer.
template <typename T, bool UP, bool DOWN, bool TANH>
FASTSEG_INLINE void row_cols(const T* up, const T* mid, const T* down, int64_t sn, int64_t W, int64_t C,
                             int64_t chunk, T* out, const float* wt, const float* eb_table, float* z) {
  const float* eb_inner = eb_table + border_case(UP, DOWN, true, true) * C;
  for (int64_t w0 = 0; w0 < W; w0 += chunk) {
    const int64_t w1 = std::min(W, w0 + chunk);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t o = w * sn;
      float* zw = z + (w - w0) * C;
      const bool left = w > 0, right = w < W - 1;  // a branch per pixel, none per element
      if (left && w + 1 < std::min(w1, W - 1)) {  // w and w + 1 both interior, in this chunk
        conv_pixel_pair<T, UP, DOWN>(up + o, mid + o, down + o, sn, wt, eb_inner, zw, C);
        ++w;
      } else if (left && right)
        conv_pixel<T, UP, DOWN, true, true>(up + o, mid + o, down + o, sn, wt, eb_inner, zw, C);
      else if (right)
        conv_pixel<T, UP, DOWN, false, true>(up + o, mid + o, down + o, sn, wt,
                                             eb_table + border_case(UP, DOWN, false, true) * C, zw, C);
      else if (left)
        conv_pixel<T, UP, DOWN, true, false>(up + o, mid + o, down + o, sn, wt,
                                             eb_table + border_case(UP, DOWN, true, false) * C, zw, C);
      else
        conv_pixel<T, UP, DOWN, false, false>(up + o, mid + o, down + o, sn, wt,
                                              eb_table + border_case(UP, DOWN, false, false) * C, zw, C);
    }
    gelu_store<T, TANH>(z, out + w0 * C, (w1 - w0) * C);
  }
}

// row_cols with the row cases chosen at run time: up / down null when that row is outside the image.
template <typename T, bool TANH>
FASTSEG_INLINE void row(const T* up, const T* mid, const T* down, int64_t sn, int64_t W, int64_t C, int64_t chunk,
                        T* out, const float* wt, const float* eb_table, float* z) {
  if (up != nullptr && down != nullptr)
    row_cols<T, true, true, TANH>(up, mid, down, sn, W, C, chunk, out, wt, eb_table, z);
  else if (up != nullptr)
    row_cols<T, true, false, TANH>(up, mid, mid, sn, W, C, chunk, out, wt, eb_table, z);
  else if (down != nullptr)
    row_cols<T, false, true, TANH>(mid, mid, down, sn, W, C, chunk, out, wt, eb_table, z);
  else
    row_cols<T, false, false, TANH>(mid, mid, mid, sn, W, C, chunk, out, wt, eb_table, z);
}

// Pixels per pass of row_cols: a few KB of pre-activations (at least two pixels, at most W).
inline int64_t chunk_pixels(int64_t W, int64_t C) { return std::min<int64_t>(W, std::max<int64_t>(2, 4096 / C)); }

// The per-call tables: taps wt (9, C) fp32 (tap ky*3 + kx), and eb (16, C) fp32, the bias of each
// border case: bias + in_bias * (sum of the taps that exist). in_bias is the bias of the Linear
// before the conv (see dwconv3x3_gelu_cpu.cpp); bias / in_bias may be absent.
struct Taps {
  at::Tensor wt, eb;
};

inline at::Tensor float_vector(const std::optional<at::Tensor>& t, int64_t C, const at::TensorOptions& opts) {
  if (t.has_value() && t->defined()) return t->to(at::kFloat).contiguous();
  return at::zeros({C}, opts.dtype(at::kFloat));
}

inline Taps make_taps(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& in_bias, int64_t C, const at::TensorOptions& opts) {
  Taps t;
  t.wt = weight.to(at::kFloat).reshape({C, 9}).t().contiguous();
  const at::Tensor b32 = float_vector(bias, C, opts);
  const bool has_in_bias = in_bias.has_value() && in_bias->defined();
  t.eb = at::empty({16, C}, opts.dtype(at::kFloat));
  const float* w = t.wt.const_data_ptr<float>();
  const float* bb = b32.const_data_ptr<float>();
  const at::Tensor ib32 = float_vector(in_bias, C, opts);
  const float* ib = ib32.const_data_ptr<float>();
  float* e = t.eb.data_ptr<float>();
  for (int64_t k = 0; k < 16; ++k) {
    const bool ky_ok[3] = {!(k & 1), true, !(k & 2)};
    const bool kx_ok[3] = {!(k & 4), true, !(k & 8)};
    for (int64_t c = 0; c < C; ++c) {
      float wsum = 0.0f;
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx)
          if (ky_ok[ky] && kx_ok[kx]) wsum += w[(ky * 3 + kx) * C + c];
      e[k * C + c] = has_in_bias ? bb[c] + ib[c] * wsum : bb[c];
    }
  }
  return t;
}

}  // namespace dwconv
}  // namespace fastseg
