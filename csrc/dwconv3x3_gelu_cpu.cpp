// CPU kernel of the Mix-FFN middle step (forward): depthwise 3x3 conv (zero padding 1) + bias +
// GELU on tokens, with fc1's bias folded in, float32 and bfloat16, one pass over the tokens.
//
//   z[b, h, w, c] = bias[c] + sum_{ky, kx in 0..2, tap inside the image}
//                             weight[c, 0, ky, kx] * (x[b, h + ky - 1, w + kx - 1, c] + in_bias[c])
//   y = GELU(z)        exact: 0.5 z (1 + erf(z / sqrt 2));  tanh: z / (1 + exp(-2 u)),
//                      u = sqrt(2 / pi) (z + 0.044715 z^3)
//
// x, y: (B, N = H*W, C) tokens (a channels-last image; token n = h*W + w), channel stride 1, any
// batch / token strides for x; y is contiguous. in_bias is fc1's bias: the fused Mix-FFN runs fc1
// without it (addmm would first copy the bias into its whole output). Adding it to every in-image
// tap and not to the padding is exactly conv2d(x + in_bias) with zero padding; since the taps
// that exist depend only on whether the pixel is on the image's top/bottom row and left/right
// column, it is folded into a per-border-case bias, bias + in_bias * sum(weights of existing taps),
// computed once per call (16 cases x C).
//
// Loops: rows (b, h) over threads (at::parallel_for); per row the output columns, and per pixel
// the channels innermost (contiguous in x, y and the (9, C) fp32 weight copy). Image borders are
// template cases (which of the up/down rows and left/right columns exist), never per-element
// branches, so the channel loop is straight-line code that GCC vectorises; it is compiled for
// AVX-512, AVX2+FMA and baseline x86-64 (target_clones) and the loader picks the widest.
//
// Numerics: fp32 throughout. bfloat16 is loaded by shifting its bits up and stored with
// round-to-nearest-even on the bits (NaN kept NaN), both vectorisable. erf (exact GELU) is
// Abramowitz-Stegun 7.1.28, 1 - erf(a) = P(a)^-16 (|error| <= 3e-7; measured max |GELU error|
// 8.1e-7 on [-12, 12] in fp32, against 1.2e-6 for stock fp32 F.gelu), evaluated as
// 1 + erf(s) = q for s < 0 and 2 - q for s >= 0, so the negative tail has no cancellation; it
// needs no exp and its reciprocal is Newton's iteration, not a division: no long-latency
// instruction in the loop. tanh GELU: z / (1 + exp(-2u)) with exp(v) = 2^k exp(r),
// k = round(v / ln 2), r = v - k ln 2 (two-part ln 2), exp(r) by its degree-7 Taylor polynomial
// (relative error < 1e-8 on |r| <= ln2 / 2), 2^k built in the exponent bits; v is clamped to
// [-80, 88], which keeps every intermediate out of the subnormal range (microcode assists made
// the whole loop several times slower) and does not change the fp32 result. Non-finite z: NaN
// stays NaN, GELU(+inf) = +inf and GELU(-inf) = NaN, as F.gelu (exp past 88 is +inf, erfc past 9 is 0).
#include "dwconv3x3_gelu.h"

#include "cpu_simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace fastseg {
namespace {

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

struct Geometry {
  int64_t H, W, C, sb, sn;  // x's batch and token strides (elements); y is contiguous
  int64_t chunk;            // output pixels per pass (chunk * C floats of z stay in L1)
};

// Border case of a pixel: bit 0 = no up row, bit 1 = no down row, bit 2 = no left column,
// bit 3 = no right column. eb_table holds 16 rows of C.
FASTSEG_INLINE int64_t border_case(bool up, bool down, bool left, bool right) {
  return (up ? 0 : 1) | (down ? 0 : 2) | (left ? 0 : 4) | (right ? 0 : 8);
}

// One output row: the pre-activations of `chunk` pixels at a time into z, then their GELU.
template <typename T, bool UP, bool DOWN, bool TANH>
FASTSEG_INLINE void row_cols(const T* x, T* y, const Geometry& g, int64_t b, int64_t h, const float* wt,
                                const float* eb_table, float* z) {
  const int64_t W = g.W, C = g.C, sn = g.sn;
  const T* mid = x + b * g.sb + h * W * sn;
  const T* up = UP ? mid - W * sn : mid;
  const T* down = DOWN ? mid + W * sn : mid;
  T* out = y + (b * g.H + h) * W * C;
  const float* eb_inner = eb_table + border_case(UP, DOWN, true, true) * C;
  for (int64_t w0 = 0; w0 < W; w0 += g.chunk) {
    const int64_t w1 = std::min(W, w0 + g.chunk);
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

// Output rows r in [r0, r1) of the B*H rows (r = b*H + h); z: chunk * C floats of scratch.
template <typename T, bool TANH>
FASTSEG_INLINE void rows_impl(const T* x, T* y, const Geometry& g, int64_t r0, int64_t r1, const float* wt,
                                 const float* eb_table, float* z) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.H, h = r - b * g.H;
    const bool up = h > 0, down = h < g.H - 1;
    if (up && down)
      row_cols<T, true, true, TANH>(x, y, g, b, h, wt, eb_table, z);
    else if (up)
      row_cols<T, true, false, TANH>(x, y, g, b, h, wt, eb_table, z);
    else if (down)
      row_cols<T, false, true, TANH>(x, y, g, b, h, wt, eb_table, z);
    else
      row_cols<T, false, false, TANH>(x, y, g, b, h, wt, eb_table, z);
  }
}

FASTSEG_CLONES void dw_rows(const float* x, float* y, const Geometry& g, int64_t r0, int64_t r1,
                               const float* wt, const float* eb_table, bool tanh, float* z) {
  if (tanh)
    rows_impl<float, true>(x, y, g, r0, r1, wt, eb_table, z);
  else
    rows_impl<float, false>(x, y, g, r0, r1, wt, eb_table, z);
}

FASTSEG_CLONES void dw_rows(const bf16_bits* x, bf16_bits* y, const Geometry& g, int64_t r0, int64_t r1,
                               const float* wt, const float* eb_table, bool tanh, float* z) {
  if (tanh)
    rows_impl<bf16_bits, true>(x, y, g, r0, r1, wt, eb_table, z);
  else
    rows_impl<bf16_bits, false>(x, y, g, r0, r1, wt, eb_table, z);
}

void check_vector(const char* name, const std::optional<at::Tensor>& t, int64_t C, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "dwconv3x3_gelu_fwd: ", name, " must have shape (", C,
              ",), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == x.scalar_type(), "dwconv3x3_gelu_fwd: ", name,
              " must be float32 or x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), "dwconv3x3_gelu_fwd: ", name, " is on ", t->device(), ", x on the CPU");
}

// (C,) float32 copy of an optional vector, or zeros.
at::Tensor float_vector(const std::optional<at::Tensor>& t, int64_t C, const at::Tensor& x) {
  if (t.has_value() && t->defined()) return t->to(at::kFloat).contiguous();
  return at::zeros({C}, x.options().dtype(at::kFloat));
}

}  // namespace

at::Tensor dwconv3x3_gelu_fwd_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_bias,
                                  std::string_view approximate) {
  TORCH_CHECK(x.dim() == 3, "dwconv3x3_gelu_fwd: x must be tokens (B, N, C), got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "dwconv3x3_gelu_fwd: this kernel takes CPU tensors, x is on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "dwconv3x3_gelu_fwd: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "dwconv3x3_gelu_fwd: approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(H >= 1 && W >= 1 && H * W == N, "dwconv3x3_gelu_fwd: ", N, " tokens do not form a ", H, "x", W,
              " map");
  TORCH_CHECK(C == 1 || x.stride(2) == 1, "dwconv3x3_gelu_fwd: x must have stride 1 over channels, got strides ",
              x.strides());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "dwconv3x3_gelu_fwd: weight must be (", C, ", 1, 3, 3), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type(),
              "dwconv3x3_gelu_fwd: weight must be float32 or x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device().is_cpu(), "dwconv3x3_gelu_fwd: weight is on ", weight.device(), ", x on the CPU");
  check_vector("bias", bias, C, x);
  check_vector("in_bias", in_bias, C, x);

  at::Tensor y = at::empty({B, N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;

  // Taps as (9, C) fp32, and the bias of each of the 16 border cases (see border_case).
  const at::Tensor wt = weight.to(at::kFloat).reshape({C, 9}).t().contiguous();
  const at::Tensor b32 = float_vector(bias, C, x);
  const bool has_in_bias = in_bias.has_value() && in_bias->defined();
  at::Tensor eb = at::empty({16, C}, x.options().dtype(at::kFloat));
  {
    const float* w = wt.const_data_ptr<float>();
    const float* bb = b32.const_data_ptr<float>();
    const at::Tensor ib32 = float_vector(in_bias, C, x);
    const float* ib = ib32.const_data_ptr<float>();
    float* e = eb.data_ptr<float>();
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
  }

  // z scratch per task: a few KB of pixels' pre-activations (at least one pixel).
  const Geometry g{H, W, C, x.stride(0), x.stride(1), std::min<int64_t>(W, std::max<int64_t>(2, 4096 / C))};
  const bool tanh = approximate == "tanh";
  const float* wp = wt.const_data_ptr<float>();
  const float* ep = eb.const_data_ptr<float>();
  // About 64K output elements per task at least: small maps stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, W * C));
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.const_data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, B * H, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> z(g.chunk * C);
      dw_rows(xp, yp, g, r0, r1, wp, ep, tanh, z.data());
    });
  } else {
    const auto* xp = reinterpret_cast<const bf16_bits*>(x.const_data_ptr<at::BFloat16>());
    auto* yp = reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>());
    at::parallel_for(0, B * H, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> z(g.chunk * C);
      dw_rows(xp, yp, g, r0, r1, wp, ep, tanh, z.data());
    });
  }
  return y;
}

}  // namespace fastseg
