// CPU kernel of the fused residual add + bias + LayerNorm (forward and backward), float32/bfloat16.
//
//   s = x + (h + h_bias);   y = LayerNorm_C(s) * weight + bias      (see add_layer_norm.h)
//
// Eager PyTorch spends four passes over the (M, C) tokens here: addmm copies the bias into its
// output before the GEMM, `x + branch` is a pass, and LayerNorm reads its input twice (mean, then
// normalise). Here one parallel loop over the rows does it all with the row in L1 (C <= 512 in
// SegFormer: at most 2 KB as float32): per row,
//   1. v = x + (h + h_bias) in float32, rounded to s's dtype (the value eager stores), kept in a
//      per-thread float32 scratch row, summed (a vectorised reduction) -> mean;
//   2. the squared deviations of the scratch row -> variance (two-pass: no cancellation);
//   3. s and y = (v - mean) * rstd * weight + bias written out.
// x and h are read once, s and y written once. s is written only in step 3, after the row of h
// was read in step 1, so s may be h's own memory (add_layer_norm_fwd_: inference, no allocation).
//
// bfloat16 is converted with bit operations: widening is a 16-bit shift; narrowing rounds to
// nearest even (add 0x7FFF plus the lowest kept bit, truncate; NaN stays a quiet NaN). Both
// vectorise. The loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 (target_clones, as
// the patch-embedding kernel's LayerNorm passes), the loader picks the widest the CPU has.
//
// Backward (from the saved s, mean, rstd; xhat = (s - mean) * rstd, g = grad_y * weight):
//   grad_sum = grad_s + rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
//   dweight = sum_r grad_y * xhat,  dbias = sum_r grad_y,  dh_bias = sum_r grad_sum
// one pass per row again; column sums in float32 over groups of 64 rows, then added to float64
// partials of a fixed row block per thread slot (deterministic, as the patch embedding's).
#include "add_layer_norm.h"

#include "cpu_simd.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastseg {
namespace {

constexpr int kLanes = 16;         // independent partial sums, so the reductions vectorise
constexpr int64_t kFlushRows = 64;  // backward: rows summed in float32 before the float64 partials

using bf16_t = bf16_bits;
FASTSEG_INLINE float widen(bf16_t v) { return bf16_to_float(v); }
FASTSEG_INLINE bf16_t narrow(float f) { return float_to_bf16(f); }

FASTSEG_INLINE float load(const float* p, int64_t i) { return p[i]; }
FASTSEG_INLINE float load(const bf16_t* p, int64_t i) { return widen(p[i]); }
FASTSEG_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
FASTSEG_INLINE void store(bf16_t* p, int64_t i, float v) { p[i] = narrow(v); }
// v as it will be stored in a T (what eager's s holds, so the statistics are of that value).
FASTSEG_INLINE float as_stored(float v, const float*) { return v; }
FASTSEG_INLINE float as_stored(float v, const bf16_t*) { return widen(narrow(v)); }

FASTSEG_INLINE float reduce_lanes(float* acc) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0];
}

// Rows [r0, r1) of the forward. Row strides in elements; hb, gamma, beta: float32 (C,) (hb all
// zeros without a bias); buf: C floats of scratch. s may be h (in place); nothing else aliases.
template <typename Tx, typename Th, typename Ts, typename Ty>
FASTSEG_INLINE void forward_range(const Tx* x, int64_t sx, const Th* h, int64_t sh,
                                      const float* __restrict__ hb, Ts* s, Ty* __restrict__ y,
                                      const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                                      int64_t r0, int64_t r1, int64_t C, float* __restrict__ mean,
                                      float* __restrict__ rstd, float* __restrict__ buf) {
  for (int64_t r = r0; r < r1; ++r) {
    const Tx* xr = x + r * sx;
    const Th* hr = h + r * sh;
    // One vectorised reduction each (omp simd: the compiler may reorder just these sums; the
    // build passes -fopenmp-simd, no OpenMP runtime). Measured ~25% faster per row than 16
    // explicit lanes with a tree reduction.
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) {
      const float v = as_stored(load(xr, c) + (load(hr, c) + hb[c]), s);
      buf[c] = v;
      sum += v;
    }
    const float mu = sum / float(C);
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < C; ++c) {
      const float d = buf[c] - mu;
      sq += d * d;
    }
    const float rs = 1.0f / std::sqrt(sq / float(C) + eps);
    Ts* sr = s + r * C;
    Ty* __restrict__ yr = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      store(sr, c, buf[c]);
      store(yr, c, (buf[c] - mu) * rs * gamma[c] + beta[c]);
    }
    mean[r] = mu;
    rstd[r] = rs;
  }
}

#define FASTSEG_ALN_FWD(TX, TH, TS, TY)                                                                        \
  FASTSEG_CLONES void forward_rows(const TX* x, int64_t sx, const TH* h, int64_t sh, const float* hb, TS* s, \
                                       TY* y, const float* gamma, const float* beta, float eps, int64_t r0,      \
                                       int64_t r1, int64_t C, float* mean, float* rstd, float* buf) {            \
    forward_range(x, sx, h, sh, hb, s, y, gamma, beta, eps, r0, r1, C, mean, rstd, buf);                        \
  }
// s's dtype is the promotion of x's and h's: float32 unless both are bfloat16.
FASTSEG_ALN_FWD(float, float, float, float)
FASTSEG_ALN_FWD(float, float, float, bf16_t)
FASTSEG_ALN_FWD(float, bf16_t, float, float)
FASTSEG_ALN_FWD(float, bf16_t, float, bf16_t)
FASTSEG_ALN_FWD(bf16_t, float, float, float)
FASTSEG_ALN_FWD(bf16_t, float, float, bf16_t)
FASTSEG_ALN_FWD(bf16_t, bf16_t, bf16_t, float)
FASTSEG_ALN_FWD(bf16_t, bf16_t, bf16_t, bf16_t)
#undef FASTSEG_ALN_FWD

// Rows [r0, r1) of the backward, adding the column sums to part (3, C) float64. grad_s may be
// null; scratch: 5*C floats.
template <typename Tg, typename Ts>
FASTSEG_INLINE void backward_range(const Tg* __restrict__ gy, const Ts* __restrict__ gs_in,
                                       const Ts* __restrict__ s, Ts* __restrict__ gsum,
                                       const float* __restrict__ gamma, const float* __restrict__ mean,
                                       const float* __restrict__ rstd, int64_t r0, int64_t r1, int64_t C,
                                       double* __restrict__ part, float* __restrict__ scratch) {
  float* __restrict__ xhat = scratch;
  float* __restrict__ g = scratch + C;
  float* __restrict__ col_gx = scratch + 2 * C;  // sums over the current group of rows: grad_y * xhat,
  float* __restrict__ col_g = scratch + 3 * C;   // grad_y,
  float* __restrict__ col_gs = scratch + 4 * C;  // grad_sum
  for (int64_t group = r0; group < r1; group += kFlushRows) {
    const int64_t group_end = std::min(r1, group + kFlushRows);
    for (int64_t c = 0; c < 3 * C; ++c) col_gx[c] = 0.0f;
    for (int64_t r = group; r < group_end; ++r) {
      const Ts* __restrict__ sr = s + r * C;
      const Tg* __restrict__ gr = gy + r * C;
      const float mu = mean[r], rs = rstd[r];
      float a16[kLanes] = {}, b16[kLanes] = {};
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const float xh = (load(sr, c + j) - mu) * rs;
          const float gv = load(gr, c + j);
          const float dh = gv * gamma[c + j];
          xhat[c + j] = xh;
          g[c + j] = dh;
          a16[j] += dh;
          b16[j] += dh * xh;
          col_gx[c + j] += gv * xh;
          col_g[c + j] += gv;
        }
      float a_tail = 0.0f, b_tail = 0.0f;  // tails apart: the lanes stay in registers (see forward)
      for (; c < C; ++c) {
        const float xh = (load(sr, c) - mu) * rs;
        const float gv = load(gr, c);
        const float dh = gv * gamma[c];
        xhat[c] = xh;
        g[c] = dh;
        a_tail += dh;
        b_tail += dh * xh;
        col_gx[c] += gv * xh;
        col_g[c] += gv;
      }
      const float a_mean = (reduce_lanes(a16) + a_tail) / float(C);
      const float b_mean = (reduce_lanes(b16) + b_tail) / float(C);
      Ts* __restrict__ out = gsum + r * C;
      if (gs_in != nullptr) {
        const Ts* __restrict__ dsr = gs_in + r * C;
        for (c = 0; c < C; ++c) {
          const float v = rs * (g[c] - a_mean - xhat[c] * b_mean) + load(dsr, c);
          store(out, c, v);
          col_gs[c] += v;
        }
      } else {
        for (c = 0; c < C; ++c) {
          const float v = rs * (g[c] - a_mean - xhat[c] * b_mean);
          store(out, c, v);
          col_gs[c] += v;
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      part[c] += double(col_gx[c]);
      part[C + c] += double(col_g[c]);
      part[2 * C + c] += double(col_gs[c]);
    }
  }
}

#define FASTSEG_ALN_BWD(TG, TS)                                                                                 \
  FASTSEG_CLONES void backward_rows(const TG* gy, const TS* gs_in, const TS* s, TS* gsum, const float* gamma, \
                                        const float* mean, const float* rstd, int64_t r0, int64_t r1, int64_t C,  \
                                        double* part, float* scratch) {                                           \
    backward_range(gy, gs_in, s, gsum, gamma, mean, rstd, r0, r1, C, part, scratch);                             \
  }
FASTSEG_ALN_BWD(float, float)
FASTSEG_ALN_BWD(bf16_t, float)
FASTSEG_ALN_BWD(float, bf16_t)
FASTSEG_ALN_BWD(bf16_t, bf16_t)
#undef FASTSEG_ALN_BWD

// --- checks and row views ---------------------------------------------------------------------------

bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

void check_dtype(const char* where, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_kernel_dtype(t.scalar_type()), where, ": ", name, " is ", t.scalar_type(),
                   "; the CPU kernel takes float32 or bfloat16 (float64 runs on the 'torch' backend)");
  TORCH_CHECK_VALUE(t.device().is_cpu(), where, ": ", name, " is on ", t.device(), ", the CPU kernel takes CPU tensors");
}

void check_vector(const char* where, const char* name, const at::Tensor& t, int64_t C) {
  check_dtype(where, name, t);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, where, ": ", name, " must have shape (", C, ",) for ", C,
                    " channels, got ", t.sizes());
}

// t (..., C) as an (M, C) matrix with unit channel stride: a strided view where its strides
// allow (leading dims that collapse into one row stride), else a contiguous copy.
at::Tensor as_rows(const at::Tensor& t, int64_t C) {
  const int64_t M = C > 0 ? t.numel() / C : 0;
  if (t.is_contiguous()) return t.view({M, C});
  const int64_t nd = t.dim();
  bool ok = t.stride(nd - 1) == 1 || C == 1;
  int64_t row_stride = nd >= 2 ? t.stride(nd - 2) : C;
  // Collapse the leading dims: each must step by the product of the next one's size and stride.
  int64_t expect = -1;
  for (int64_t d = nd - 2; d >= 0 && ok; --d) {
    if (t.size(d) == 1) continue;
    if (expect < 0) {
      row_stride = t.stride(d);
    } else if (t.stride(d) != expect) {
      ok = false;
    }
    expect = t.stride(d) * t.size(d);
  }
  if (ok && row_stride >= C) return t.as_strided({M, C}, {row_stride, 1});
  return t.contiguous().view({M, C});
}

at::Tensor as_float_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

struct FwdArgs {
  int64_t C, M;
  at::ScalarType s_dtype, y_dtype;
};

FwdArgs check_forward(const char* where, const at::Tensor& x, const at::Tensor& h,
                      const std::optional<at::Tensor>& h_bias, const at::Tensor& weight, const at::Tensor& bias,
                      std::optional<at::ScalarType> out_dtype) {
  check_dtype(where, "x", x);
  check_dtype(where, "h", h);
  TORCH_CHECK_VALUE(x.dim() >= 1, where, ": x must have a channel dim (..., C), got a scalar");
  TORCH_CHECK_VALUE(x.sizes() == h.sizes(), where, ": x ", x.sizes(), " and h ", h.sizes(), " must have one shape");
  const int64_t C = x.size(-1);
  TORCH_CHECK_VALUE(C > 0 && x.numel() > 0, where, ": empty input, x has shape ", x.sizes());
  if (h_bias.has_value() && h_bias->defined()) check_vector(where, "h_bias", *h_bias, C);
  check_vector(where, "weight", weight, C);
  check_vector(where, "bias", bias, C);
  const at::ScalarType s_dtype = c10::promoteTypes(x.scalar_type(), h.scalar_type());
  const at::ScalarType y_dtype = out_dtype.value_or(s_dtype);
  TORCH_CHECK_TYPE(is_kernel_dtype(y_dtype), where, ": out_dtype ", y_dtype, " is not float32 or bfloat16");
  return {C, x.numel() / C, s_dtype, y_dtype};
}

template <typename Tx, typename Th, typename Ts, typename Ty>
void run_forward(const at::Tensor& x2, const at::Tensor& h2, const float* hb, at::Tensor& s, at::Tensor& y,
                 const float* gamma, const float* beta, float eps, const FwdArgs& a, float* mean, float* rstd) {
  const Tx* xp = reinterpret_cast<const Tx*>(x2.const_data_ptr());
  const Th* hp = reinterpret_cast<const Th*>(h2.const_data_ptr());
  Ts* sp = reinterpret_cast<Ts*>(s.data_ptr());
  Ty* yp = reinterpret_cast<Ty*>(y.data_ptr());
  const int64_t sx = x2.stride(0), sh = h2.stride(0), C = a.C;
  at::parallel_for(0, a.M, std::max<int64_t>(1, 8192 / C), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(C);
    forward_rows(xp, sx, hp, sh, hb, sp, yp, gamma, beta, eps, r0, r1, C, mean, rstd, buf.data());
  });
}

template <typename Tx, typename Th, typename Ts>
void forward_y(const at::Tensor& x2, const at::Tensor& h2, const float* hb, at::Tensor& s, at::Tensor& y,
               const float* gamma, const float* beta, float eps, const FwdArgs& a, float* mean, float* rstd) {
  if (a.y_dtype == at::kFloat)
    run_forward<Tx, Th, Ts, float>(x2, h2, hb, s, y, gamma, beta, eps, a, mean, rstd);
  else
    run_forward<Tx, Th, Ts, bf16_t>(x2, h2, hb, s, y, gamma, beta, eps, a, mean, rstd);
}

// s (M, C) contiguous of a.s_dtype (new, or h itself), y (M, C) contiguous of a.y_dtype.
void forward(const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& h_bias,
             const at::Tensor& weight, const at::Tensor& bias, double eps, const FwdArgs& a, at::Tensor& s,
             at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  const at::Tensor x2 = as_rows(x, a.C), h2 = as_rows(h, a.C);
  const at::Tensor hb = h_bias.has_value() && h_bias->defined() ? as_float_vector(*h_bias)
                                                                : at::zeros({a.C}, x.options().dtype(at::kFloat));
  const at::Tensor gamma = as_float_vector(weight), beta = as_float_vector(bias);
  const float* hbp = hb.const_data_ptr<float>();
  const float* gp = gamma.const_data_ptr<float>();
  const float* bp = beta.const_data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const bool xf = x.scalar_type() == at::kFloat, hf = h.scalar_type() == at::kFloat;
  const float e = float(eps);
  if (xf && hf) forward_y<float, float, float>(x2, h2, hbp, s, y, gp, bp, e, a, mp, rp);
  else if (xf) forward_y<float, bf16_t, float>(x2, h2, hbp, s, y, gp, bp, e, a, mp, rp);
  else if (hf) forward_y<bf16_t, float, float>(x2, h2, hbp, s, y, gp, bp, e, a, mp, rp);
  else forward_y<bf16_t, bf16_t, bf16_t>(x2, h2, hbp, s, y, gp, bp, e, a, mp, rp);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& h_bias, const at::Tensor& weight,
    const at::Tensor& bias, double eps, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* where = "fastseg_ext::add_layer_norm_fwd (CPU)";
  const FwdArgs a = check_forward(where, x, h, h_bias, weight, bias, out_dtype);
  at::Tensor s = at::empty(x.sizes(), x.options().dtype(a.s_dtype));
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(a.y_dtype));
  at::Tensor mean = at::empty({a.M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({a.M}, x.options().dtype(at::kFloat));
  forward(x, h, h_bias, weight, bias, eps, a, s, y, mean, rstd);
  return {s, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_inplace_cpu(
    const at::Tensor& x, at::Tensor& h, const std::optional<at::Tensor>& h_bias, const at::Tensor& weight,
    const at::Tensor& bias, double eps, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* where = "fastseg_ext::add_layer_norm_fwd_ (CPU)";
  const FwdArgs a = check_forward(where, x, h, h_bias, weight, bias, out_dtype);
  TORCH_CHECK_VALUE(h.scalar_type() == a.s_dtype, where, ": s (", a.s_dtype, ") cannot be written into h (",
                    h.scalar_type(), "); use add_layer_norm_fwd");
  TORCH_CHECK_VALUE(h.is_contiguous(), where, ": h must be contiguous to hold s, got strides ", h.strides());
  for (const at::Tensor* t : {&x, &weight, &bias}) {
    TORCH_CHECK_VALUE(at::get_overlap_status(h, *t) == at::MemOverlapStatus::No, where,
                      ": h shares memory with another input; it cannot be overwritten with s");
  }
  if (h_bias.has_value() && h_bias->defined())
    TORCH_CHECK_VALUE(at::get_overlap_status(h, *h_bias) == at::MemOverlapStatus::No, where,
                      ": h shares memory with h_bias; it cannot be overwritten with s");
  at::Tensor s = h.view({a.M, a.C});
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(a.y_dtype));
  at::Tensor mean = at::empty({a.M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({a.M}, x.options().dtype(at::kFloat));
  forward(x, h, h_bias, weight, bias, eps, a, s, y, mean, rstd);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  constexpr const char* where = "fastseg_ext::add_layer_norm_bwd (CPU)";
  check_dtype(where, "grad_y", grad_y);
  check_dtype(where, "s", s);
  TORCH_CHECK_VALUE(s.dim() >= 1 && s.numel() > 0, where, ": s must be non-empty (..., C), got ", s.sizes());
  TORCH_CHECK_VALUE(grad_y.sizes() == s.sizes(), where, ": grad_y ", grad_y.sizes(), " does not match s ", s.sizes());
  const int64_t C = s.size(-1), M = s.numel() / C;
  check_vector(where, "weight", weight, C);
  TORCH_CHECK_VALUE(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == M &&
                        rstd.numel() == M,
                    where, ": mean and rstd must be float32 (", M, ",) as the forward returned them, got ",
                    mean.sizes(), " ", mean.scalar_type(), " and ", rstd.sizes(), " ", rstd.scalar_type());
  const bool has_gs = grad_s.has_value() && grad_s->defined();
  at::Tensor gs_in;
  if (has_gs) {
    TORCH_CHECK_VALUE(grad_s->sizes() == s.sizes(), where, ": grad_s ", grad_s->sizes(), " does not match s ",
                      s.sizes());
    gs_in = grad_s->to(s.scalar_type()).contiguous();
  }
  const at::Tensor s2 = s.contiguous(), gy = grad_y.contiguous();  // saved s is contiguous; grads may not be
  const at::Tensor gamma = as_float_vector(weight);
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor gsum = at::empty(s.sizes(), s.options());
  const int64_t nblocks = std::max(1, at::get_num_threads());
  at::Tensor part = at::zeros({nblocks, 3, C}, s.options().dtype(at::kDouble));
  double* pp = part.data_ptr<double>();
  const float* gp = gamma.const_data_ptr<float>();
  const float* mp = mu.const_data_ptr<float>();
  const float* rp = rs.const_data_ptr<float>();
  auto run = [&](auto tg, auto ts) {
    using Tg = decltype(tg);
    using Ts = decltype(ts);
    const Tg* gyp = reinterpret_cast<const Tg*>(gy.const_data_ptr());
    const Ts* gsp = has_gs ? reinterpret_cast<const Ts*>(gs_in.const_data_ptr()) : nullptr;
    const Ts* sp = reinterpret_cast<const Ts*>(s2.const_data_ptr());
    Ts* outp = reinterpret_cast<Ts*>(gsum.data_ptr());
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(5 * C);
      for (int64_t blk = b0; blk < b1; ++blk)
        backward_rows(gyp, gsp, sp, outp, gp, mp, rp, M * blk / nblocks, M * (blk + 1) / nblocks, C,
                      pp + blk * 3 * C, scratch.data());
    });
  };
  const bool gf = grad_y.scalar_type() == at::kFloat, sf = s.scalar_type() == at::kFloat;
  if (gf && sf) run(float(), float());
  else if (sf) run(bf16_t(), float());
  else if (gf) run(float(), bf16_t());
  else run(bf16_t(), bf16_t());
  const at::Tensor sums = part.sum(0);  // (3, C) float64: dweight, dbias, dh_bias
  // Three tensors of their own (not views of one): outputs of an op must not alias.
  return {gsum, sums[0].to(at::kFloat), sums[1].to(at::kFloat), sums[2].to(at::kFloat)};
}

}  // namespace fastseg
