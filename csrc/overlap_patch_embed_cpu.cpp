// CPU kernel of the overlapping patch embedding (forward and backward), float32 and float64;
// bfloat16 forward (inference) by its own path, bf16_forward below.
//
// The conv rows are produced by one of two engines; everything after them is ours and fused:
//
// * "conv" (default when ATen has oneDNN): at::convolution on the input seen channels-last. Token
//   input (B, H*W, Cin) already IS a channels-last image, so it is read in place; an NCHW image
//   (3 channels at stage 1) gets one small channels-last copy (the Python op makes it, so that
//   autograd keeps it for the backward). oneDNN then writes the conv output channels-last, and a
//   channels-last (B, C, Ho, Wo) tensor is the token tensor (B, Ho*Wo, C): no transpose copy.
//   Why not our own GEMM: on the AMD EPYC CPUs this runs on, MKL's sgemm takes its AVX2 path at
//   about half of oneDNN's AVX-512 conv speed (measured), and the direct conv needs no im2col.
// * "im2col" (fallback without oneDNN, or FASTSEG_CPU_CONV=im2col): over chunks of output tokens
//   (~2 MB of im2col at a time, so memory stays bounded at any batch size), im2col straight from
//   x's strides into cols (rows, K) in a K order that makes the copies contiguous runs ((kh, kw, ci)
//   for channels-last input: one run of k*Cin values per kernel row; (ci, kh, kw) for NCHW: runs
//   of k), then one GEMM with the bias folded in (at::addmm, MKL) written straight into the tokens.
//
// Then one parallel pass over the token rows: LayerNorm over C (in place unless the rows are kept),
// with the mean and 1/std kept for the backward.
//
// When a gradient will be needed the forward also returns the conv rows y (keep_y), as eager
// keeps its LayerNorm input: on CPU recomputing the conv in the backward costs more than the
// memory (measured: csrc/bench_cpu.py --backward). Without y the backward recomputes them.
//
// Backward: LayerNorm backward per row giving dy = dL/dy, with deterministic per-thread partial
// sums of dln_weight, dln_bias and dbias (float64), then the conv's input and weight gradients:
// at::convolution_backward (oneDNN; NCHW on small maps with wide channels, see below) for the
// "conv" engine; dW += dy^T @ cols and dcols = dy @ W scattered back into dx (col2im, in parallel
// over input channels so no two threads add to one element) for "im2col".
#include "overlap_patch_embed.h"

#include "cpu_simd.h"

#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace fastseg {
namespace {

// Geometry of one call, plus x's element strides and the K order of the im2col rows.
struct Geometry {
  PatchEmbedShape s;
  int64_t sxb, sxc, sxh, sxw;
  bool cin_last;  // K order (kh, kw, ci) when x is channels-last, else (ci, kh, kw)
};

Geometry geometry(const PatchEmbedShape& s, const at::Tensor& x) {
  Geometry g{s, x.stride(0), x.stride(1), x.stride(2), x.stride(3), false};
  // Unit channel stride: token input (B, H*W, Cin) seen as an image, or a channels-last image.
  g.cin_last = s.Cin > 1 && g.sxc == 1;
  return g;
}

// The (C, K) weight matrix in the K order of the im2col rows (a small copy at most).
at::Tensor weight_matrix(const at::Tensor& weight, const Geometry& g) {
  const auto w = g.cin_last ? weight.permute({0, 2, 3, 1}).contiguous() : weight.contiguous();
  return w.view({g.s.C, g.s.K});
}

// Tokens per chunk: the im2col buffer (rows x K) is kept near 2 MB, never below 128 rows.
int64_t chunk_rows(const PatchEmbedShape& s, int64_t elem_size) {
  constexpr int64_t kTargetBytes = int64_t(2) << 20;
  const int64_t rows = std::max<int64_t>(128, kTargetBytes / (std::max(s.K, s.C) * elem_size));
  return std::min(rows, s.M);
}

// The LayerNorm passes are FASTSEG_CLONES (cpu_simd.h): compiled for AVX-512, AVX2+FMA and x86-64.
constexpr int kLanes = 16;  // independent partial sums, so reductions vectorise

// Pairwise (tree) sum of the kLanes partial sums: log2(kLanes) vectorisable steps instead of a
// serial chain of dependent adds (which costs more than the row itself when C is small).
template <typename T>
FASTSEG_INLINE T reduce_lanes(T* acc) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0];
}

template <typename T>
FASTSEG_INLINE T sum_row(const T* v, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += v[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += v[i];  // the tail, one per lane
  return reduce_lanes(acc);
}

template <typename T>
FASTSEG_INLINE T sum_sq_dev(const T* v, int64_t n, T mean) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const T d = v[i + j] - mean;
      acc[j] += d * d;
    }
  for (int j = 0; i < n; ++i, ++j) acc[j] += (v[i] - mean) * (v[i] - mean);
  return reduce_lanes(acc);
}

// Output token m -> (image b, top-left input row ih0, input column iw0) of its receptive field.
struct RowOrigin {
  int64_t b, ih0, iw0;
};

inline RowOrigin row_origin(const PatchEmbedShape& s, int64_t m) {
  const int64_t per_image = s.Ho * s.Wo;
  const int64_t b = m / per_image;
  const int64_t pix = m - b * per_image;
  const int64_t oh = pix / s.Wo;
  const int64_t ow = pix - oh * s.Wo;
  return {b, oh * s.stride - s.pad, ow * s.stride - s.pad};
}

// cols[r, :] = the receptive field of output token m0 + r, zero where it falls in the padding.
template <typename T>
void im2col(const T* x, const Geometry& g, int64_t m0, int64_t rows, T* cols) {
  const PatchEmbedShape& s = g.s;
  const int64_t k = s.k, Cin = s.Cin, K = s.K;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowOrigin o = row_origin(s, m0 + r);
      T* dst = cols + r * K;
      const T* xb = x + o.b * g.sxb;
      // Kernel columns kw in [kw_lo, kw_hi) land inside the image; the rest read padding.
      const int64_t kw_lo = std::min(k, std::max<int64_t>(0, -o.iw0));
      const int64_t kw_hi = std::max(kw_lo, std::min(k, s.W - o.iw0));
      if (g.cin_last) {
        for (int64_t kh = 0; kh < k; ++kh) {
          T* d = dst + kh * k * Cin;
          const int64_t ih = o.ih0 + kh;
          if (ih < 0 || ih >= s.H || kw_hi == kw_lo) {
            std::memset(d, 0, sizeof(T) * k * Cin);
            continue;
          }
          std::memset(d, 0, sizeof(T) * kw_lo * Cin);
          std::memset(d + kw_hi * Cin, 0, sizeof(T) * (k - kw_hi) * Cin);
          const T* src = xb + ih * g.sxh + (o.iw0 + kw_lo) * g.sxw;
          if (g.sxw == Cin) {  // the whole kernel row is one contiguous run
            std::memcpy(d + kw_lo * Cin, src, sizeof(T) * (kw_hi - kw_lo) * Cin);
          } else {
            for (int64_t kw = kw_lo; kw < kw_hi; ++kw)
              std::memcpy(d + kw * Cin, src + (kw - kw_lo) * g.sxw, sizeof(T) * Cin);
          }
        }
      } else {
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const T* xc = xb + ci * g.sxc;
          for (int64_t kh = 0; kh < k; ++kh) {
            T* d = dst + (ci * k + kh) * k;
            const int64_t ih = o.ih0 + kh;
            if (ih < 0 || ih >= s.H) {
              std::memset(d, 0, sizeof(T) * k);
              continue;
            }
            const T* src = xc + ih * g.sxh + o.iw0 * g.sxw;
            for (int64_t kw = 0; kw < kw_lo; ++kw) d[kw] = T(0);
            for (int64_t kw = kw_lo; kw < kw_hi; ++kw) d[kw] = src[kw * g.sxw];
            for (int64_t kw = kw_hi; kw < k; ++kw) d[kw] = T(0);
          }
        }
      }
    }
  });
}

// dx[receptive field of token m0 + r] += dcols[r, :], for all rows of the chunk. Threads own
// disjoint input-channel ranges, so overlapping receptive fields never race.
template <typename T>
void col2im_add(const T* dcols, const Geometry& g, int64_t m0, int64_t rows, T* dx, const at::Tensor& dx_t) {
  const PatchEmbedShape& s = g.s;
  const int64_t k = s.k, Cin = s.Cin, K = s.K;
  const int64_t sb = dx_t.stride(0), sc = dx_t.stride(1), sh = dx_t.stride(2), sw = dx_t.stride(3);
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, Cin / std::max(1, at::get_num_threads())));
  at::parallel_for(0, Cin, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < rows; ++r) {
      const RowOrigin o = row_origin(s, m0 + r);
      const T* src_row = dcols + r * K;
      T* db = dx + o.b * sb;
      for (int64_t kh = 0; kh < k; ++kh) {
        const int64_t ih = o.ih0 + kh;
        if (ih < 0 || ih >= s.H) continue;
        for (int64_t kw = 0; kw < k; ++kw) {
          const int64_t iw = o.iw0 + kw;
          if (iw < 0 || iw >= s.W) continue;
          T* d = db + ih * sh + iw * sw;
          if (g.cin_last) {
            const T* src = src_row + (kh * k + kw) * Cin;
            if (sc == 1) {
              for (int64_t ci = c0; ci < c1; ++ci) d[ci] += src[ci];
            } else {
              for (int64_t ci = c0; ci < c1; ++ci) d[ci * sc] += src[ci];
            }
          } else {
            for (int64_t ci = c0; ci < c1; ++ci) d[ci * sc] += src_row[(ci * k + kh) * k + kw];
          }
        }
      }
    }
  });
}

// out[r, :] = LayerNorm(y[r, :]) * gamma + beta for rows [r0, r1), keeping the statistics.
// out may be y (in place): every element is read before it is written.
template <typename T>
FASTSEG_INLINE void ln_forward_range(const T* y, T* out, int64_t r0, int64_t r1, int64_t C, const T* gamma,
                                     const T* beta, T eps, T* mean, T* rstd) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = y + r * C;
    T* o = out + r * C;
    const T mu = sum_row(row, C) / T(C);
    const T var = sum_sq_dev(row, C, mu) / T(C);  // two-pass: no cancellation
    const T rs = T(1) / std::sqrt(var + eps);
    for (int64_t c = 0; c < C; ++c) o[c] = (row[c] - mu) * rs * gamma[c] + beta[c];
    mean[r] = mu;
    rstd[r] = rs;
  }
}

FASTSEG_CLONES void ln_forward(const float* y, float* out, int64_t r0, int64_t r1, int64_t C, const float* gamma,
                               const float* beta, float eps, float* mean, float* rstd) {
  ln_forward_range(y, out, r0, r1, C, gamma, beta, eps, mean, rstd);
}
FASTSEG_CLONES void ln_forward(const double* y, double* out, int64_t r0, int64_t r1, int64_t C, const double* gamma,
                               const double* beta, double eps, double* mean, double* rstd) {
  ln_forward_range(y, out, r0, r1, C, gamma, beta, eps, mean, rstd);
}

template <typename T>
void layer_norm_rows(const T* y, T* out, int64_t rows, int64_t C, const T* gamma, const T* beta, double eps,
                     T* mean, T* rstd) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C), [&](int64_t r0, int64_t r1) {
    ln_forward(y, out, r0, r1, C, gamma, beta, T(eps), mean, rstd);
  });
}

// dy[r, :] = dL/dy[r, :] through the LayerNorm of the conv rows y for rows [r0, r1), adding
// g*xhat, g and dy to the float64 column sums part (3, C): summed in T over groups of kFlushRows
// rows (vectorised), then added to part. No two arguments overlap (restrict: the loops vectorise
// without alias checks). scratch: 4*C elements.
constexpr int64_t kFlushRows = 64;

template <typename T>
FASTSEG_INLINE void ln_backward_range(const T* __restrict__ y, const T* __restrict__ grad, T* __restrict__ dy_out,
                                      int64_t r0, int64_t r1, int64_t C, const T* __restrict__ gamma,
                                      const T* __restrict__ mean, const T* __restrict__ rstd,
                                      double* __restrict__ part, T* __restrict__ scratch) {
  T* __restrict__ dxhat = scratch;
  T* __restrict__ s_gx = scratch + C;  // column sums over the current group of rows: g*xhat,
  T* __restrict__ s_g = scratch + 2 * C;  // g,
  T* __restrict__ s_dy = scratch + 3 * C;  // dy
  for (int64_t group = r0; group < r1; group += kFlushRows) {
    const int64_t group_end = std::min(r1, group + kFlushRows);
    for (int64_t c = 0; c < 3 * C; ++c) s_gx[c] = T(0);
    for (int64_t r = group; r < group_end; ++r) {
      const T* __restrict__ row = y + r * C;
      const T* __restrict__ g = grad + r * C;
      T* __restrict__ d = dy_out + r * C;
      const T mu = mean[r], rs = rstd[r];
      T a16[kLanes] = {}, b16[kLanes] = {};
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const T xhat = (row[c + j] - mu) * rs;
          const T dh = g[c + j] * gamma[c + j];
          dxhat[c + j] = dh;
          a16[j] += dh;
          b16[j] += dh * xhat;
        }
      for (int j = 0; c < C; ++c, ++j) {  // the tail, one per lane
        const T xhat = (row[c] - mu) * rs;
        const T dh = g[c] * gamma[c];
        dxhat[c] = dh;
        a16[j] += dh;
        b16[j] += dh * xhat;
      }
      const T a_mean = reduce_lanes(a16) / T(C), b_mean = reduce_lanes(b16) / T(C);
      for (c = 0; c < C; ++c) {
        const T xhat = (row[c] - mu) * rs;
        const T dy = rs * (dxhat[c] - a_mean - xhat * b_mean);
        s_gx[c] += g[c] * xhat;
        s_g[c] += g[c];
        s_dy[c] += dy;
        d[c] = dy;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      part[c] += double(s_gx[c]);
      part[C + c] += double(s_g[c]);
      part[2 * C + c] += double(s_dy[c]);
    }
  }
}

FASTSEG_CLONES void ln_backward(const float* y, const float* grad, float* dy, int64_t r0, int64_t r1, int64_t C,
                                const float* gamma, const float* mean, const float* rstd, double* part, float* scratch) {
  ln_backward_range(y, grad, dy, r0, r1, C, gamma, mean, rstd, part, scratch);
}
FASTSEG_CLONES void ln_backward(const double* y, const double* grad, double* dy, int64_t r0, int64_t r1, int64_t C,
                                const double* gamma, const double* mean, const double* rstd, double* part,
                                double* scratch) {
  ln_backward_range(y, grad, dy, r0, r1, C, gamma, mean, rstd, part, scratch);
}

// The LayerNorm backward over `rows` rows, with the column sums of each row block added to
// part[block] (3, C), in float64 (they add up every token of the batch). Blocks are a fixed
// split of the rows, one per thread slot, so the sums are deterministic.
template <typename T>
void layer_norm_backward_rows(const T* y, const T* grad, T* dy, int64_t rows, int64_t C, const T* gamma,
                              const T* mean, const T* rstd, double* part, int64_t nblocks) {
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> scratch(4 * C);
    for (int64_t blk = b0; blk < b1; ++blk)
      ln_backward(y, grad, dy, rows * blk / nblocks, rows * (blk + 1) / nblocks, C, gamma, mean, rstd,
                  part + blk * 3 * C, scratch.data());
  });
}

void check_cpu_dtype(const char* where, const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, where,
                   ": the CPU kernel computes in float32 or float64 (bfloat16: forward only), got ", x.scalar_type(),
                   "; for float16 on CPU use the 'torch' backend (fastseg.use_backend(\"torch\"))");
  TORCH_CHECK_VALUE(x.device().is_cpu(), where, ": the CPU kernel got a tensor on ", x.device());
}

// The bfloat16 forward (inference): im2col in bfloat16 over chunks of tokens, each chunk widened
// to float32 and multiplied by the float32 weight matrix (aten GEMM: exact products of bf16
// values with fp32 accumulation, as a bf16 GEMM with fp32 accumulation computes, at the fp32
// GEMM's speed on every x86 CPU, where aten's own bf16 GEMM without AVX-512 runs at a tenth of
// it), bias and LayerNorm in float32 on the fp32 conv rows (never rounded to bf16 in between),
// tokens rounded to bfloat16 once. mean / rstd are float32.
FwdResult bf16_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias, const PatchEmbedShape& s, double eps) {
  const Geometry g = geometry(s, x);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const at::Tensor wmat_t = weight_matrix(weight, g).to(at::kFloat).t();  // (K, C) fp32
  const at::Tensor gamma = ln_weight.to(at::kFloat).contiguous(), beta = ln_bias.to(at::kFloat).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias32 = has_bias ? bias->to(at::kFloat) : at::Tensor();
  at::Tensor out = at::empty({s.B, s.Ho * s.Wo, s.C}, x.options());
  at::Tensor mean = at::empty({s.M}, f32), rstd = at::empty({s.M}, f32);
  const at::Tensor out2d = out.view({s.M, s.C});
  const int64_t chunk = chunk_rows(s, sizeof(float));
  at::Tensor cols = at::empty({chunk, s.K}, x.options());
  at::Tensor cols32 = at::empty({chunk, s.K}, f32);
  at::Tensor rows32 = at::empty({chunk, s.C}, f32);
  for (int64_t m0 = 0; m0 < s.M; m0 += chunk) {
    const int64_t rows = std::min(chunk, s.M - m0);
    at::Tensor c = cols.narrow(0, 0, rows);
    im2col<at::BFloat16>(x.const_data_ptr<at::BFloat16>(), g, m0, rows, c.data_ptr<at::BFloat16>());
    const at::Tensor c32 = cols32.narrow(0, 0, rows).copy_(c);
    at::Tensor y = rows32.narrow(0, 0, rows);
    if (has_bias)
      at::addmm_out(y, bias32, c32, wmat_t);
    else
      at::mm_out(y, c32, wmat_t);
    layer_norm_rows<float>(y.const_data_ptr<float>(), y.data_ptr<float>(), rows, s.C, gamma.const_data_ptr<float>(),
                           beta.const_data_ptr<float>(), eps, mean.data_ptr<float>() + m0,
                           rstd.data_ptr<float>() + m0);
    out2d.narrow(0, m0, rows).copy_(y);
  }
  return {out, mean, rstd, at::empty({0}, x.options())};
}

enum class Engine { kConv, kIm2col };

// "conv" unless ATen has no oneDNN (or it is switched off), or FASTSEG_CPU_CONV=im2col asks.
Engine cpu_engine() {
  const char* env = std::getenv("FASTSEG_CPU_CONV");
  if (env != nullptr && std::strcmp(env, "im2col") == 0) return Engine::kIm2col;
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() ? Engine::kConv : Engine::kIm2col;
}

// The input seen channels-last: token views already are (read in place); anything else (an NCHW
// image, a channel slice) is copied once.
at::Tensor channels_last_input(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
}

// Small maps with wide channels (stage 4 at 512x512: 2·Ho·Wo <= C): oneDNN's channels-last conv
// measured ~1.4x slower than NCHW there (csrc/bench_cpu.py), so those convolve in NCHW; the
// tensors are small at such sizes, so the layout copies are cheap.
bool prefer_nchw(const PatchEmbedShape& s) { return 2 * s.Ho * s.Wo <= s.C; }

// y = conv(x) + bias as channels-last (B, C, Ho, Wo): its memory is the token matrix (M, C).
at::Tensor conv_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const PatchEmbedShape& s) {
  const at::Tensor input = prefer_nchw(s) ? x.contiguous() : channels_last_input(x);
  at::Tensor y = at::convolution(input, weight, bias, {s.stride, s.stride}, {s.pad, s.pad}, {1, 1}, false, {0, 0}, 1);
  return y.is_contiguous(at::MemoryFormat::ChannelsLast) ? y : y.contiguous(at::MemoryFormat::ChannelsLast);
}

// y = conv(x) + bias as above, by oneDNN with a weight already in its blocked layout (inference:
// the Python op caches it per weight version). at::convolution reorders the dense weight on every
// call, which costs up to a third of the conv at stages 3-4 (csrc/bench_cpu.py); that reorder is
// gone here. mkldnn::_convolution_pointwise is the ATen op that takes such a weight and writes
// channels-last output for channels-last input; it is called boxed, whose signature has no
// C++ types that changed across torch versions.
at::Tensor packed_conv_rows(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                            const PatchEmbedShape& s) {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  TORCH_CHECK(op.has_value(), "fastseg_ext::overlap_patch_embed_fwd (CPU): packed_weight needs ATen's "
              "mkldnn::_convolution_pointwise, which this torch lacks; pass packed_weight=None");
  c10::impl::GenericList no_scalars(c10::OptionalType::create(c10::NumberType::get()));
  torch::jit::Stack stack;
  stack.reserve(10);
  stack.emplace_back(channels_last_input(x));
  stack.emplace_back(packed);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::vector<int64_t>{s.pad, s.pad});
  stack.emplace_back(std::vector<int64_t>{s.stride, s.stride});
  stack.emplace_back(std::vector<int64_t>{1, 1});  // dilation
  stack.emplace_back(int64_t(1));                   // groups
  stack.emplace_back(std::string("none"));          // no fused activation
  stack.emplace_back(std::move(no_scalars));
  stack.emplace_back(c10::IValue());  // algorithm
  op->callBoxed(&stack);
  const at::Tensor y = stack.at(0).toTensor();
  return y.is_contiguous(at::MemoryFormat::ChannelsLast) ? y : y.contiguous(at::MemoryFormat::ChannelsLast);
}

void check_packed_weight(const char* where, const at::Tensor& packed, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(packed.is_mkldnn(), where, ": packed_weight must be the weight in oneDNN's layout "
                    "(torch.ops.aten.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), ...)), got a ",
                    packed.layout(), " tensor");
  TORCH_CHECK_VALUE(packed.sizes() == weight.sizes() && packed.scalar_type() == weight.scalar_type(), where,
                    ": packed_weight ", packed.sizes(), " ", packed.scalar_type(), " does not match weight ",
                    weight.sizes(), " ", weight.scalar_type());
}

}  // namespace

FwdResult overlap_patch_embed_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                      const at::Tensor& ln_bias, int64_t stride, int64_t padding, double eps,
                                      bool keep_y, const std::optional<at::Tensor>& packed_weight) {
  constexpr const char* where = "fastseg_ext::overlap_patch_embed_fwd (CPU)";
  const bool packed = packed_weight.has_value() && packed_weight->defined();
  // The shape checks read weight's sizes, which a packed weight shares; its dtype and device are
  // checked here (check_patch_embed_inputs compares them to x's).
  const PatchEmbedShape s = check_patch_embed_inputs(where, x, weight, bias, ln_weight, ln_bias, stride, padding);
  if (x.scalar_type() == at::kBFloat16 && x.device().is_cpu()) {
    TORCH_CHECK_VALUE(!keep_y, where, ": the bfloat16 CPU kernel is forward-only (keep_y=False); its backward "
                      "computes in float32/float64");
    TORCH_CHECK_VALUE(!packed, where, ": packed_weight is float32-only; pass None for bfloat16");
    return bf16_forward(x, weight, bias, ln_weight, ln_bias, s, eps);
  }
  check_cpu_dtype(where, x);
  if (packed) check_packed_weight(where, *packed_weight, weight);
  const at::Tensor gamma = ln_weight.contiguous(), beta = ln_bias.contiguous();
  at::Tensor mean = at::empty({s.M}, x.options());
  at::Tensor rstd = at::empty({s.M}, x.options());
  // keep_y: the conv rows are returned too (for the backward), so the LayerNorm writes a new
  // tensor instead of overwriting them.
  at::Tensor out, y;

  if (packed || cpu_engine() == Engine::kConv) {
    // The channels-last conv output (B, C, Ho, Wo) is the token matrix (M, C): a view, no copy.
    const at::Tensor conv = packed ? packed_conv_rows(x, *packed_weight, bias, s) : conv_rows(x, weight, bias, s);
    y = conv.permute({0, 2, 3, 1}).reshape({s.B, s.Ho * s.Wo, s.C});
    out = keep_y ? at::empty({s.B, s.Ho * s.Wo, s.C}, x.options()) : y;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "overlap_patch_embed_fwd_cpu", [&] {
      layer_norm_rows<scalar_t>(y.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s.M, s.C,
                                gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(), eps,
                                mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
    });
  } else {
    const Geometry g = geometry(s, x);
    const at::Tensor wmat_t = weight_matrix(weight, g).t();  // (K, C), a transposed view
    const bool has_bias = bias.has_value() && bias->defined();
    out = at::empty({s.B, s.Ho * s.Wo, s.C}, x.options());
    y = keep_y ? at::empty({s.B, s.Ho * s.Wo, s.C}, x.options()) : out;
    const at::Tensor out2d = out.view({s.M, s.C}), y2d = y.view({s.M, s.C});
    const int64_t chunk = chunk_rows(s, x.element_size());
    at::Tensor cols = at::empty({chunk, s.K}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "overlap_patch_embed_fwd_cpu", [&] {
      for (int64_t m0 = 0; m0 < s.M; m0 += chunk) {
        const int64_t rows = std::min(chunk, s.M - m0);
        at::Tensor c = cols.narrow(0, 0, rows);
        im2col<scalar_t>(x.const_data_ptr<scalar_t>(), g, m0, rows, c.data_ptr<scalar_t>());
        at::Tensor yc = y2d.narrow(0, m0, rows);
        if (has_bias)
          at::addmm_out(yc, *bias, c, wmat_t);
        else
          at::mm_out(yc, c, wmat_t);
        layer_norm_rows<scalar_t>(yc.const_data_ptr<scalar_t>(), out2d.data_ptr<scalar_t>() + m0 * s.C, rows, s.C,
                                  gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(), eps,
                                  mean.data_ptr<scalar_t>() + m0, rstd.data_ptr<scalar_t>() + m0);
      }
    });
  }
  return {out, mean, rstd, keep_y ? y : at::empty({0}, x.options())};
}

BwdResult overlap_patch_embed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const std::optional<at::Tensor>& y_kept, int64_t stride, int64_t padding,
                                      bool needs_dx, bool needs_dweight) {
  constexpr const char* where = "fastseg_ext::overlap_patch_embed_bwd (CPU)";
  const PatchEmbedShape s = check_patch_embed_inputs(where, x, weight, bias, ln_weight, ln_weight, stride, padding);
  check_patch_embed_backward_inputs(where, s, x, grad_out, mean, rstd, y_kept);
  check_cpu_dtype(where, x);
  const at::Tensor gamma = ln_weight.contiguous();
  const at::Tensor grad = grad_out.contiguous().view({s.M, s.C});  // documented copy if strided
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  const bool have_y = y_kept.has_value() && y_kept->defined();
  const at::Tensor y = have_y ? y_kept->contiguous().view({s.M, s.C}) : at::Tensor();
  const int64_t nblocks = std::max(1, at::get_num_threads());
  at::Tensor part = at::zeros({nblocks, 3, s.C}, x.options().dtype(at::kDouble));  // dgamma, dbeta, dbias
  at::Tensor dx, dweight;

  if (cpu_engine() == Engine::kConv) {
    // oneDNN's channels-last conv backward is slow on small maps with wide channels (MiT-B2..B5
    // stage 4 at 512x512: 2x slower than NCHW, measured with csrc/bench_cpu.py): there, the conv
    // gradients are taken in NCHW (dy and x are small at such sizes; dx goes back to x's layout).
    const bool nchw = prefer_nchw(s);
    const bool conv_grads = needs_dx || needs_dweight;
    // x seen channels-last, only where it is used (a copy for an NCHW image).
    const at::Tensor x_cl = conv_grads && !nchw ? channels_last_input(x) : at::Tensor();
    // dy as a channels-last (B, C, Ho, Wo) image: its memory is the token matrix (M, C).
    at::Tensor dy = at::empty({s.B, s.C, s.Ho, s.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const at::Tensor yrows = have_y ? y : conv_rows(x, weight, bias, s);  // kept, or recomputed
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "overlap_patch_embed_bwd_cpu", [&] {
      layer_norm_backward_rows<scalar_t>(yrows.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                         dy.data_ptr<scalar_t>(), s.M, s.C, gamma.const_data_ptr<scalar_t>(),
                                         mu.const_data_ptr<scalar_t>(), rs.const_data_ptr<scalar_t>(),
                                         part.data_ptr<double>(), nblocks);
    });
    if (conv_grads) {
      auto grads = at::convolution_backward(nchw ? dy.contiguous() : dy, nchw ? x.contiguous() : x_cl, weight,
                                            std::nullopt, {s.stride, s.stride}, {s.pad, s.pad}, {1, 1}, false,
                                            {0, 0}, 1, {needs_dx, needs_dweight, false});
      if (needs_dx) dx = in_layout_of(std::get<0>(grads), x);
      if (needs_dweight) dweight = std::get<1>(grads).contiguous();
    }
  } else {
    const Geometry g = geometry(s, x);
    const at::Tensor wmat = weight_matrix(weight, g);  // (C, K)
    const at::Tensor wmat_t = wmat.t();
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor dwmat = needs_dweight ? at::empty({s.C, s.K}, x.options()) : at::Tensor();
    // dx takes x's layout (channels-last for token input) so the tokens' gradient is a view.
    if (needs_dx) dx = at::zeros_like(x);
    const int64_t chunk = chunk_rows(s, x.element_size());
    at::Tensor cols = at::empty({chunk, s.K}, x.options());
    at::Tensor dybuf = at::empty({chunk, s.C}, x.options());
    at::Tensor ybuf = have_y ? at::Tensor() : at::empty({chunk, s.C}, x.options());  // recomputed rows
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "overlap_patch_embed_bwd_cpu", [&] {
      for (int64_t m0 = 0; m0 < s.M; m0 += chunk) {
        const int64_t rows = std::min(chunk, s.M - m0);
        at::Tensor c = cols.narrow(0, 0, rows);
        at::Tensor dy = dybuf.narrow(0, 0, rows);
        im2col<scalar_t>(x.const_data_ptr<scalar_t>(), g, m0, rows, c.data_ptr<scalar_t>());
        if (!have_y) {  // recompute the conv rows
          at::Tensor yc = ybuf.narrow(0, 0, rows);
          if (has_bias)
            at::addmm_out(yc, *bias, c, wmat_t);
          else
            at::mm_out(yc, c, wmat_t);
        }
        const scalar_t* yrows = have_y ? y.const_data_ptr<scalar_t>() + m0 * s.C : ybuf.const_data_ptr<scalar_t>();
        layer_norm_backward_rows<scalar_t>(yrows, grad.const_data_ptr<scalar_t>() + m0 * s.C, dy.data_ptr<scalar_t>(),
                                           rows, s.C, gamma.const_data_ptr<scalar_t>(),
                                           mu.const_data_ptr<scalar_t>() + m0, rs.const_data_ptr<scalar_t>() + m0,
                                           part.data_ptr<double>(), nblocks);
        if (needs_dweight) {
          if (m0 == 0)
            at::mm_out(dwmat, dy.t(), c);
          else
            dwmat.addmm_(dy.t(), c);
        }
        if (needs_dx) {
          at::mm_out(c, dy, wmat);  // dcols overwrite cols: they are not needed any more
          col2im_add<scalar_t>(c.const_data_ptr<scalar_t>(), g, m0, rows, dx.data_ptr<scalar_t>(), dx);
        }
      }
    });
    if (needs_dweight)
      dweight = g.cin_last ? dwmat.view({s.C, s.k, s.k, s.Cin}).permute({0, 3, 1, 2}).contiguous()
                           : dwmat.view({s.C, s.Cin, s.k, s.k});
  }

  const at::Tensor sums = part.sum(0).to(x.scalar_type());  // (3, C)
  if (!needs_dx) dx = at::empty({0}, x.options());
  if (!needs_dweight) dweight = at::empty({0}, weight.options());
  return {dx, dweight, sums[2].clone(), sums[0].clone(), sums[1].clone()};  // no aliased outputs
}

}  // namespace fastseg
