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

#include "dwconv3x3_gelu_rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace fastseg {
namespace {

struct Geometry {
  int64_t H, W, C, sb, sn;  // x's batch and token strides (elements); y is contiguous
  int64_t chunk;            // output pixels per pass (chunk * C floats of z stay in L1)
};

// Output rows r in [r0, r1) of the B*H rows (r = b*H + h); z: chunk * C floats of scratch.
template <typename T, bool TANH>
FASTSEG_INLINE void rows_impl(const T* x, T* y, const Geometry& g, int64_t r0, int64_t r1, const float* wt,
                                 const float* eb_table, float* z) {
  const int64_t row_stride = g.W * g.sn;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.H, h = r - b * g.H;
    const T* mid = x + b * g.sb + h * row_stride;
    dwconv::row<T, TANH>(h > 0 ? mid - row_stride : nullptr, mid, h < g.H - 1 ? mid + row_stride : nullptr, g.sn,
                         g.W, g.C, g.chunk, y + r * g.W * g.C, wt, eb_table, z);
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

  // Taps as (9, C) fp32, and the bias of each of the 16 border cases (see dwconv::border_case).
  const dwconv::Taps taps = dwconv::make_taps(weight, bias, in_bias, C, x.options());
  const at::Tensor& wt = taps.wt;
  const at::Tensor& eb = taps.eb;

  // z scratch per task: a few KB of pixels' pre-activations (at least one pixel).
  const Geometry g{H, W, C, x.stride(0), x.stride(1), dwconv::chunk_pixels(W, C)};
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
