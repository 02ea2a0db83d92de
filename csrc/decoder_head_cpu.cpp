// The SegFormer decoder head on CPU, inference form:
//
//   out = ReLU(Σᵢ resize(Pᵢ) + X·Wᵀ + b) · Wclsᵀ + bcls        (B, H, W, K), channels last
//
// Pᵢ are the stages' folded projections at their own resolution (fastseg/ops/decoder_upsample_fuse.py
// derives them); X·Wᵀ is the projection of the stage that is already at output size, which is
// the largest map of all (B·H·W·E: 50 MB for a b2 at 512², 400 MB at 2048×1024), so it is never
// built whole either. The work runs over bands of output rows, one band per thread at a time:
//   1. acc = X_band · Wᵀ                     (a small GEMM, single-threaded in the band: oneDNN with
//                                             a packed W when the caller passes one, else ATen/MKL)
//   2. acc += bilinear taps of every Pᵢ      (rows mixed, then columns; vectorised over E)
//   3. acc = ReLU(acc + b)
//   4. out_band = acc · Wclsᵀ + bcls         (a small GEMM)
// so the band (≤ ~1 MB) stays in L2 between the steps and only K-channel logits reach memory.
//
// Bilinear weights are ATen's (align_corners=False, no scale factor): scale = in / out as float,
// src = max(scale·(o + ½) − ½, 0), i₀ = ⌊src⌋, i₁ = i₀ + (i₀ < in − 1), λ₁ = src − i₀.
// bfloat16: maps, X, W and the classifier are bf16 (the GEMMs run on oneDNN's bf16 / AMX path);
// the sum, bias and ReLU are fp32, rounded to bf16 once for the classifier GEMM.
#include "decoder_head.h"

#include "cpu_simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastseg {
namespace {

// Output pixels per band: acc is band × E floats (768 KB at E = 768), within a core's L2.
constexpr int64_t kBandPixels = 256;

struct Tap {
  int64_t i0, i1;
  float l0, l1;
};

Tap source_tap(int64_t o, int64_t in, int64_t out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  float src = std::fma(scale, static_cast<float>(o) + 0.5f, -0.5f);  // contracted, as ATen's x86 builds
  src = src < 0.f ? 0.f : src;
  const int64_t i0 = std::min<int64_t>(static_cast<int64_t>(src), in - 1);
  const float l1 = src - static_cast<float>(i0);
  return {i0, i0 + (i0 < in - 1 ? 1 : 0), 1.f - l1, l1};
}

// dst[e] = wa·a[e] + wb·b[e]: the vertical (row) mix of two source rows, into fp32.
FASTSEG_CLONES void mix_rows(float* __restrict dst, const float* a, const float* b, float wa, float wb, int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] = wa * a[e] + wb * b[e];
}

FASTSEG_CLONES void mix_rows(float* __restrict dst, const uint16_t* a, const uint16_t* b, float wa, float wb,
                             int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] = wa * bf16_to_float(a[e]) + wb * bf16_to_float(b[e]);
}

// acc[e] += wa·a[e] + wb·b[e]: the horizontal mix of the row-mixed source pixels.
FASTSEG_CLONES void add_mix(float* __restrict acc, const float* a, const float* b, float wa, float wb, int64_t n) {
  for (int64_t e = 0; e < n; ++e) acc[e] += wa * a[e] + wb * b[e];
}

FASTSEG_CLONES void add_row(float* __restrict acc, const float* a, int64_t n) {
  for (int64_t e = 0; e < n; ++e) acc[e] += a[e];
}

FASTSEG_CLONES void add_row(float* __restrict acc, const uint16_t* a, int64_t n) {
  for (int64_t e = 0; e < n; ++e) acc[e] += bf16_to_float(a[e]);
}

FASTSEG_CLONES void widen(float* __restrict dst, const uint16_t* src, int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] = bf16_to_float(src[e]);
}

// acc = [ReLU](acc + bias), in place (fp32 output) or rounded into dst (bf16 output).
FASTSEG_CLONES void finish(float* __restrict acc, const float* bias, bool relu, int64_t n) {
  if (relu) {
    for (int64_t e = 0; e < n; ++e) {
      const float v = acc[e] + bias[e];
      acc[e] = v < 0.f ? 0.f : v;  // not `v > 0 ? v : 0`: NaN must pass, as torch.relu
    }
  } else {
    for (int64_t e = 0; e < n; ++e) acc[e] += bias[e];
  }
}

FASTSEG_CLONES void finish(uint16_t* __restrict dst, const float* acc, const float* bias, bool relu, int64_t n) {
  if (relu) {
    for (int64_t e = 0; e < n; ++e) {
      const float v = acc[e] + bias[e];
      dst[e] = float_to_bf16(v < 0.f ? 0.f : v);  // NaN passes
    }
  } else {
    for (int64_t e = 0; e < n; ++e) dst[e] = float_to_bf16(acc[e] + bias[e]);
  }
}

// y = x · Wᵀ (+ b) by oneDNN with W already in its packed layout (the Python side caches it per
// weight version): mkldnn::_linear_pointwise, which skips the per-call weight reorder and runs at
// oneDNN's rate where MKL's sgemm does not (AMD CPUs). Called boxed through the dispatcher, as
// overlap_patch_embed_cpu.cpp calls the packed conv: its schema has no C++ types that changed
// across torch versions.
class PackedLinear {
 public:
  PackedLinear() : op_(c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""})) {}
  bool available() const { return op_.has_value(); }
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) const {
    torch::jit::Stack stack;
    stack.reserve(6);
    stack.emplace_back(x);
    stack.emplace_back(packed);
    stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
    stack.emplace_back(std::string("none"));  // no fused activation
    stack.emplace_back(c10::impl::GenericList(c10::OptionalType::create(c10::NumberType::get())));
    stack.emplace_back(c10::IValue());  // algorithm
    op_->callBoxed(&stack);
    return stack.at(0).toTensor();
  }

 private:
  std::optional<c10::OperatorHandle> op_;
};

const PackedLinear& packed_linear() {
  static const PackedLinear op;
  return op;
}

void check_packed(const char* name, const std::optional<at::Tensor>& packed, const at::Tensor& weight) {
  if (!packed) return;
  TORCH_CHECK_VALUE(packed_linear().available(), "decoder_head: ", name, " needs ATen's mkldnn::_linear_pointwise, "
                    "which this torch lacks; pass None");
  TORCH_CHECK_VALUE(packed->is_mkldnn(), "decoder_head: ", name, " must be a weight in oneDNN's layout "
                    "(torch.ops.mkldnn._reorder_linear_weight), got a ", packed->layout(), " tensor");
  TORCH_CHECK_VALUE(packed->sizes() == weight.sizes() && packed->scalar_type() == weight.scalar_type(),
                    "decoder_head: ", name, " ", packed->sizes(), " ", packed->scalar_type(), " does not match its weight ",
                    weight.sizes(), " ", weight.scalar_type());
}

template <typename T>
const T* as_raw(const at::Tensor& t);
template <>
const float* as_raw<float>(const at::Tensor& t) { return t.data_ptr<float>(); }
template <>
const uint16_t* as_raw<uint16_t>(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

struct MapView {
  int64_t h, w;
  bool full;  // already at output size: added as is
  std::vector<Tap> rows, cols;
};

template <typename T>
void run_bands(at::TensorList maps, const std::vector<MapView>& views, const std::optional<at::Tensor>& x,
               const at::Tensor& x_weight_t, int64_t B, int64_t H, int64_t W, int64_t E, const float* bias,
               bool relu, const std::optional<at::Tensor>& cls_weight_t, const std::optional<at::Tensor>& cls_bias,
               const std::optional<at::Tensor>& x_packed, const std::optional<at::Tensor>& cls_packed,
               at::Tensor& out) {
  constexpr bool kLow = std::is_same<T, uint16_t>::value;
  const auto opts = out.options();
  const int64_t rows_per_band = std::max<int64_t>(1, kBandPixels / W);
  const at::Tensor x_flat = x ? x->view({B * H * W, -1}) : at::Tensor();
  const at::Tensor out_flat = out.view({B * H * W, out.size(3)});
  int64_t widest = 1;
  for (const auto& v : views) widest = std::max(widest, v.w);
  std::vector<const T*> bases;
  for (const auto& m : maps) bases.push_back(as_raw<T>(m));

  // The bands call ATen ops (the GEMMs) from OpenMP's worker threads, which do not inherit the
  // caller's grad / inference mode: carry them over, or writing into tensors made under
  // torch.inference_mode() raises.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, B * H, rows_per_band, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    const int64_t cap = std::min(end - begin, rows_per_band) * W;
    at::Tensor acc = at::empty({cap, E}, opts.dtype(at::kFloat));
    at::Tensor low = kLow ? at::empty({cap, E}, opts) : at::Tensor();
    const std::vector<float> zeros(bias ? 0 : E, 0.f);  // "no bias" adds zeros
    std::vector<float> mixed(widest * E);  // one row-mixed source row of a map
    for (int64_t r0 = begin; r0 < end; r0 += rows_per_band) {
      const int64_t r1 = std::min(end, r0 + rows_per_band);
      const int64_t P = (r1 - r0) * W, p0 = r0 * W;
      at::Tensor band = acc.narrow(0, 0, P);
      // 1. the full-size stage's projection, for this band only. fp32 with a packed weight:
      // oneDNN's output is the band's accumulator itself (it writes a fresh tensor).
      const bool onednn_band = !kLow && x && x_packed;
      if (onednn_band) band = packed_linear()(x_flat.narrow(0, p0, P), *x_packed, std::nullopt);
      float* accp = band.data_ptr<float>();
      if (x && !onednn_band) {
        const at::Tensor xb = x_flat.narrow(0, p0, P);
        if constexpr (kLow) {
          const at::Tensor proj = x_packed ? packed_linear()(xb, *x_packed, std::nullopt) : at::mm(xb, x_weight_t);
          widen(accp, as_raw<uint16_t>(proj), P * E);
        } else {
          at::mm_out(band, xb, x_weight_t);
        }
      } else if (!x) {
        std::fill(accp, accp + P * E, 0.f);
      }
      for (int64_t r = r0; r < r1; ++r) {  // 2. bilinear taps of every map
        const int64_t b = r / H, y = r % H;
        float* acc_row = accp + (r - r0) * W * E;
        for (size_t i = 0; i < views.size(); ++i) {
          const MapView& v = views[i];
          const T* img = bases[i] + b * v.h * v.w * E;
          if (v.full) {
            add_row(acc_row, img + y * W * E, W * E);
            continue;
          }
          // Rows first (once per source column), then columns: 2 + 2·w/W multiply-adds per
          // output value instead of 4, and bf16 is widened once per source value and row.
          const Tap& ty = v.rows[y];
          mix_rows(mixed.data(), img + ty.i0 * v.w * E, img + ty.i1 * v.w * E, ty.l0, ty.l1, v.w * E);
          for (int64_t xo = 0; xo < W; ++xo) {
            const Tap& tx = v.cols[xo];
            add_mix(acc_row + xo * E, mixed.data() + tx.i0 * E, mixed.data() + tx.i1 * E, tx.l0, tx.l1, E);
          }
        }
      }
      const float* bvec = bias ? bias : zeros.data();
      at::Tensor ready;  // 3. bias + ReLU, rounded once for a bf16 classifier
      if constexpr (kLow) {
        uint16_t* lowp = reinterpret_cast<uint16_t*>(low.data_ptr<at::BFloat16>());
        for (int64_t p = 0; p < P; ++p) finish(lowp + p * E, accp + p * E, bvec, relu, E);
        ready = low.narrow(0, 0, P);
      } else {
        for (int64_t p = 0; p < P; ++p) finish(accp + p * E, bvec, relu, E);
        ready = band;
      }
      at::Tensor dst = out_flat.narrow(0, p0, P);  // 4. classifier, straight into the logits
      if (!cls_weight_t) {
        dst.copy_(ready);
      } else if (cls_packed) {
        dst.copy_(packed_linear()(ready, *cls_packed, cls_bias));
      } else if (cls_bias) {
        at::addmm_out(dst, *cls_bias, ready, *cls_weight_t);
      } else {
        at::mm_out(dst, ready, *cls_weight_t);
      }
    }
  });
}

}  // namespace

at::Tensor decoder_head_fwd_cpu(at::TensorList maps, const std::optional<at::Tensor>& x,
                                const std::optional<at::Tensor>& x_weight, int64_t H, int64_t W,
                                const std::optional<at::Tensor>& bias, bool relu,
                                const std::optional<at::Tensor>& cls_weight,
                                const std::optional<at::Tensor>& cls_bias,
                                const std::optional<at::Tensor>& x_weight_packed,
                                const std::optional<at::Tensor>& cls_weight_packed) {
  TORCH_CHECK(!maps.empty() || x.has_value(), "decoder_head: nothing to sum (no maps, no projection)");
  TORCH_CHECK(x.has_value() == x_weight.has_value(), "decoder_head: x and x_weight come together");
  TORCH_CHECK(H > 0 && W > 0, "decoder_head: bad output size ", H, "x", W);
  const at::Tensor& first = maps.empty() ? *x : maps[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decoder_head: float32 or bfloat16, got ", dtype);
  const int64_t B = first.size(0);
  const int64_t E = x_weight ? x_weight->size(0) : maps[0].size(3);
  std::vector<MapView> views;
  for (const auto& m : maps) {
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(3) == E && m.scalar_type() == dtype && m.is_contiguous(),
                "decoder_head: maps must be contiguous (B, h, w, E) tensors of one dtype");
    MapView v{m.size(1), m.size(2), m.size(1) == H && m.size(2) == W, {}, {}};
    TORCH_CHECK(v.h > 0 && v.w > 0, "decoder_head: empty map");
    if (!v.full) {
      for (int64_t o = 0; o < H; ++o) v.rows.push_back(source_tap(o, v.h, H));
      for (int64_t o = 0; o < W; ++o) v.cols.push_back(source_tap(o, v.w, W));
    }
    views.push_back(std::move(v));
  }
  at::Tensor x_weight_t;
  if (x) {
    TORCH_CHECK(x->dim() == 4 && x->size(0) == B && x->size(1) == H && x->size(2) == W && x->is_contiguous() &&
                    x->scalar_type() == dtype,
                "decoder_head: x must be a contiguous (B, H, W, C) tensor in the maps' dtype");
    TORCH_CHECK(x_weight->dim() == 2 && x_weight->size(1) == x->size(3) && x_weight->scalar_type() == dtype,
                "decoder_head: x_weight must be (E, C) in the maps' dtype");
    x_weight_t = x_weight->t();
  }
  const std::optional<at::Tensor> x_packed =
      x && x_weight_packed && x_weight_packed->defined() ? x_weight_packed : std::nullopt;
  if (x_packed) check_packed("x_weight_packed", x_packed, *x_weight);
  const float* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E && bias->scalar_type() == at::kFloat,
                "decoder_head: bias must be float32 (E,)");
    bias_c = bias->contiguous();
    bias_ptr = bias_c.data_ptr<float>();
  }
  std::optional<at::Tensor> cls_weight_t;
  int64_t K = E;
  if (cls_weight) {
    TORCH_CHECK(cls_weight->dim() == 2 && cls_weight->size(1) == E && cls_weight->scalar_type() == dtype,
                "decoder_head: cls_weight must be (K, E) in the maps' dtype");
    K = cls_weight->size(0);
    cls_weight_t = cls_weight->t();
    if (cls_bias)
      TORCH_CHECK(cls_bias->dim() == 1 && cls_bias->size(0) == K && cls_bias->scalar_type() == dtype,
                  "decoder_head: cls_bias must be (K,) in the maps' dtype");
  }
  const std::optional<at::Tensor> cls_packed =
      cls_weight && cls_weight_packed && cls_weight_packed->defined() ? cls_weight_packed : std::nullopt;
  if (cls_packed) check_packed("cls_weight_packed", cls_packed, *cls_weight);
  at::Tensor out = at::empty({B, H, W, K}, first.options());
  if (dtype == at::kFloat)
    run_bands<float>(maps, views, x, x_weight_t, B, H, W, E, bias_ptr, relu, cls_weight_t,
                     cls_weight ? cls_bias : std::nullopt, x_packed, cls_packed, out);
  else
    run_bands<uint16_t>(maps, views, x, x_weight_t, B, H, W, E, bias_ptr, relu, cls_weight_t,
                        cls_weight ? cls_bias : std::nullopt, x_packed, cls_packed, out);
  return out;
}

}  // namespace fastseg
