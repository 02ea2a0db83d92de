// CPU kernel of the fused bilinear upsample + argmax (inference only), float32 and float64.
//
//   labels[b, y, x] = argmax_k up(logits)[b, k, y, x]      (first maximum wins, NaN counts as the maximum)
//   scores[b, y, x] = up(logits)[b, labels[b, y, x], y, x] (only when asked for)
//
// up is F.interpolate(mode="bilinear", align_corners=False, size=(H, W)); the (B, K, H, W)
// upsampled tensor never exists: every output pixel interpolates its K values and keeps the best.
// Per axis (rows shown, columns likewise), in the input's precision T:
//
//   scale = T(h) / T(H)
//   src   = max(fma(scale, y + 0.5, -0.5), 0)        (as ATen's x86 builds compute it: contracted)
//   y0    = min(floor(src), h - 1),  y1 = y0 + (y0 < h - 1),  l1 = clamp(src - y0, 0, 1),  l0 = 1 - l1
//   (h == H: y0 = y1 = y, l0 = 1, l1 = 0)
//
//   r0 = fma(x[y0, x0], lx0, x[y0, x1] * lx1);  r1 = fma(x[y1, x0], lx0, x[y1, x1] * lx1)
//   v  = fma(r0, ly0, r1 * ly1)                    (columns mixed first, then rows)
//
// The fmas are written out, so the result does not depend on what the compiler contracts.
// ATen's own result does (its kernels are compiled once per CPU capability with contraction
// on), so this is not bit-identical to F.interpolate everywhere: values differ by a few ulps at
// some pixels, and labels only where two classes are that close (see fastseg/ops/upsample_argmax.py).
//
// Two loop orders, picked from the logits' strides:
// * channels-last (stride of K is 1, the fused SegFormer's logits): per output pixel, the four
//   corner vectors of K contiguous values are mixed and reduced in one pass;
// * otherwise (NCHW): per output row, class by class, the row of W interpolated values updates a
//   running maximum and argmax per column (contiguous, vectorisable).
// Rows of the output (B * H of them) are split over threads with at::parallel_for.
//
// upsample2_argmax_fwd_cpu: two chained resizes, (h, w) -> (H1, W1) -> (H, W), then the argmax (a test
// scale's two-step labels); the first resize is made one row at a time, as the second reads it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fastseg {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSEG_UA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSEG_UA_CLONES
#endif

template <typename T>
struct Taps {
  std::vector<int64_t> i0, i1;  // element offsets (index * stride)
  std::vector<T> l0, l1;
};

template <typename T>
Taps<T> axis_taps(int64_t in, int64_t out, int64_t stride) {
  Taps<T> t;
  t.i0.resize(out);
  t.i1.resize(out);
  t.l0.resize(out);
  t.l1.resize(out);
  const T scale = static_cast<T>(in) / static_cast<T>(out);
  for (int64_t o = 0; o < out; ++o) {
    int64_t i0 = o, i1 = o;
    T l0 = T(1), l1 = T(0);
    if (in != out) {
      T src = std::fma(scale, static_cast<T>(o) + T(0.5), T(-0.5));
      if (src < T(0)) src = T(0);
      i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      l1 = std::min(std::max(src - static_cast<T>(i0), T(0)), T(1));
      i1 = i0 + (i0 < in - 1 ? 1 : 0);
      l0 = T(1) - l1;
    }
    t.i0[o] = i0 * stride;
    t.i1[o] = i1 * stride;
    t.l0[o] = l0;
    t.l1[o] = l1;
  }
  return t;
}

template <typename T>
inline bool better(T v, T best) {
  return v > best || (v != v && best == best);  // torch.argmax: NaN is the maximum
}

template <typename T>
inline T mix(T a, T b, T l0, T l1) {
  return std::fma(a, l0, b * l1);
}

// Channels-last: one output pixel at a time, K contiguous per corner. The classes are reduced in
// kLanes interleaved running maxima (lane j sees k = j, j + kLanes, ...), a loop of selects the
// compiler vectorises; the lanes are then merged in class order, so the first maximum still wins
// and the first NaN still counts as the maximum. The classes after the last whole group of lanes
// come last, in order.
constexpr int kLanes = 16;

template <typename T>
FASTSEG_UA_CLONES void row_channels_last(const T* r0, const T* r1, int64_t K, T ly0, T ly1, const Taps<T>& tw,
                                         int64_t W, int64_t* labels, T* scores) {
  const int64_t K_lanes = K >= 2 * kLanes && K <= INT32_MAX ? K / kLanes * kLanes : 0;
  for (int64_t ox = 0; ox < W; ++ox) {
    const T* p00 = r0 + tw.i0[ox];
    const T* p01 = r0 + tw.i1[ox];
    const T* p10 = r1 + tw.i0[ox];
    const T* p11 = r1 + tw.i1[ox];
    const T lx0 = tw.l0[ox], lx1 = tw.l1[ox];
    T best;
    int64_t arg;
    int64_t k = 0;
    if (K_lanes > 0) {
      T lane_best[kLanes];
      int32_t lane_arg[kLanes];
      for (int j = 0; j < kLanes; ++j) {
        lane_best[j] = mix(mix(p00[j], p01[j], lx0, lx1), mix(p10[j], p11[j], lx0, lx1), ly0, ly1);
        lane_arg[j] = j;
      }
      for (k = kLanes; k < K_lanes; k += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const T v = mix(mix(p00[k + j], p01[k + j], lx0, lx1), mix(p10[k + j], p11[k + j], lx0, lx1), ly0, ly1);
          const bool take = v > lane_best[j] || (v != v && lane_best[j] == lane_best[j]);
          lane_best[j] = take ? v : lane_best[j];
          lane_arg[j] = take ? static_cast<int32_t>(k + j) : lane_arg[j];
        }
      }
      best = lane_best[0];
      arg = lane_arg[0];
      for (int j = 1; j < kLanes; ++j) {  // merge: the better value, or on a tie the earlier class
        const T v = lane_best[j];
        const bool best_nan = best != best, v_nan = v != v;
        const bool tie = best_nan ? v_nan : (!v_nan && v == best);
        if (better(v, best) || (tie && lane_arg[j] < arg)) {
          best = v;
          arg = lane_arg[j];
        }
      }
    } else {
      best = mix(mix(p00[0], p01[0], lx0, lx1), mix(p10[0], p11[0], lx0, lx1), ly0, ly1);
      arg = 0;
      k = 1;
    }
    for (; k < K; ++k) {
      const T v = mix(mix(p00[k], p01[k], lx0, lx1), mix(p10[k], p11[k], lx0, lx1), ly0, ly1);
      if (better(v, best)) {
        best = v;
        arg = k;
      }
    }
    labels[ox] = arg;
    if (scores != nullptr) scores[ox] = best;
  }
}

// Any other layout: class by class over a whole output row, a running best per column.
template <typename T>
FASTSEG_UA_CLONES void row_planar(const T* base, int64_t K, int64_t sk, int64_t oh_r0, int64_t oh_r1, T ly0,
                                  T ly1, const Taps<T>& tw, int64_t W, int64_t* labels, T* best) {
  const int64_t* i0 = tw.i0.data();
  const int64_t* i1 = tw.i1.data();
  const T* l0 = tw.l0.data();
  const T* l1 = tw.l1.data();
  for (int64_t k = 0; k < K; ++k) {
    const T* r0 = base + k * sk + oh_r0;
    const T* r1 = base + k * sk + oh_r1;
    if (k == 0) {
      for (int64_t ox = 0; ox < W; ++ox) {
        best[ox] = mix(mix(r0[i0[ox]], r0[i1[ox]], l0[ox], l1[ox]), mix(r1[i0[ox]], r1[i1[ox]], l0[ox], l1[ox]),
                       ly0, ly1);
        labels[ox] = 0;
      }
      continue;
    }
    for (int64_t ox = 0; ox < W; ++ox) {
      const T v = mix(mix(r0[i0[ox]], r0[i1[ox]], l0[ox], l1[ox]), mix(r1[i0[ox]], r1[i1[ox]], l0[ox], l1[ox]),
                      ly0, ly1);
      const bool take = better(v, best[ox]);
      best[ox] = take ? v : best[ox];
      labels[ox] = take ? k : labels[ox];
    }
  }
}

template <typename T>
void run(const at::Tensor& x, int64_t H, int64_t W, at::Tensor& labels, at::Tensor* scores) {
  const int64_t B = x.size(0), K = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t sb = x.stride(0), sk = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const Taps<T> th = axis_taps<T>(h, H, sh);
  const Taps<T> tw = axis_taps<T>(w, W, sw);
  const T* data = x.const_data_ptr<T>();
  int64_t* lab = labels.data_ptr<int64_t>();
  T* sc = scores != nullptr ? scores->data_ptr<T>() : nullptr;
  const bool channels_last = sk == 1 && K > 1;
  // A few rows per task: each row is K * W interpolations.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * W));
  at::parallel_for(0, B * H, grain, [&](int64_t r_begin, int64_t r_end) {
    std::vector<T> best(channels_last ? 0 : W);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t b = r / H, oy = r % H;
      const T* base = data + b * sb;
      int64_t* out = lab + r * W;
      T* out_scores = sc != nullptr ? sc + r * W : nullptr;
      if (channels_last) {
        row_channels_last<T>(base + th.i0[oy], base + th.i1[oy], K, th.l0[oy], th.l1[oy], tw, W, out, out_scores);
      } else {
        T* b_row = out_scores != nullptr ? out_scores : best.data();
        row_planar<T>(base, K, sk, th.i0[oy], th.i1[oy], th.l0[oy], th.l1[oy], tw, W, out, b_row);
      }
    }
  });
}

// One row of the first resize, (W1, K) contiguous: the K values of each of W1 output pixels.
template <typename T>
FASTSEG_UA_CLONES void resized_row(const T* base, int64_t K, int64_t sk, int64_t r0, int64_t r1, T ly0, T ly1,
                                   const Taps<T>& tw, int64_t W1, T* out) {
  for (int64_t ix = 0; ix < W1; ++ix) {
    const T* p00 = base + r0 + tw.i0[ix];
    const T* p01 = base + r0 + tw.i1[ix];
    const T* p10 = base + r1 + tw.i0[ix];
    const T* p11 = base + r1 + tw.i1[ix];
    const T lx0 = tw.l0[ix], lx1 = tw.l1[ix];
    T* o = out + ix * K;
    if (sk == 1) {
      for (int64_t k = 0; k < K; ++k) o[k] = mix(mix(p00[k], p01[k], lx0, lx1), mix(p10[k], p11[k], lx0, lx1), ly0, ly1);
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o_k = k * sk;
        o[k] = mix(mix(p00[o_k], p01[o_k], lx0, lx1), mix(p10[o_k], p11[o_k], lx0, lx1), ly0, ly1);
      }
    }
  }
}

// Two resizes then the argmax: (h, w) -> (H1, W1) -> (H, W), the two-step path of a test scale
// (logits to the network input's size, then to the image's). The first resize is made one row at a
// time, as the second needs it: each thread keeps the two rows its current output row reads.
template <typename T>
void run_two(const at::Tensor& x, int64_t H1, int64_t W1, int64_t H, int64_t W, at::Tensor& labels) {
  const int64_t B = x.size(0), K = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t sb = x.stride(0), sk = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const Taps<T> th1 = axis_taps<T>(h, H1, sh);
  const Taps<T> tw1 = axis_taps<T>(w, W1, sw);
  const Taps<T> th2 = axis_taps<T>(H1, H, 1);  // row indices of the first resize
  const Taps<T> tw2 = axis_taps<T>(W1, W, K);  // offsets into one (W1, K) row
  const T* data = x.const_data_ptr<T>();
  int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * W));
  at::parallel_for(0, B * H, grain, [&](int64_t r_begin, int64_t r_end) {
    std::vector<T> rows(2 * W1 * K);
    int64_t held[2] = {-1, -1};  // b * H1 + row of the first resize in each slot
    auto row = [&](int64_t b, int64_t ir, int64_t keep) -> const T* {
      const int64_t id = b * H1 + ir;
      for (int s = 0; s < 2; ++s)
        if (held[s] == id) return rows.data() + s * W1 * K;
      const int s = held[0] == keep ? 1 : 0;  // never evict the other row this output row reads
      resized_row<T>(data + b * sb, K, sk, th1.i0[ir], th1.i1[ir], th1.l0[ir], th1.l1[ir], tw1, W1,
                     rows.data() + s * W1 * K);
      held[s] = id;
      return rows.data() + s * W1 * K;
    };
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t b = r / H, oy = r % H;
      const int64_t a = th2.i0[oy], c = th2.i1[oy];
      const T* ra = row(b, a, -1);
      const T* rc = row(b, c, b * H1 + a);
      row_channels_last<T>(ra, rc, K, th2.l0[oy], th2.l1[oy], tw2, W, lab + r * W, nullptr);
    }
  });
}

// The checks both entry points make: `op` names the caller in the message.
void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 4, op, ": logits must be (B, K, h, w), got ", logits.dim(), " dimensions");
  TORCH_CHECK_VALUE(logits.device().is_cpu(), op, ": the C++ kernel takes CPU tensors, got ", logits.device());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
                   ": the C++ kernel takes float32 or float64 logits, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && logits.size(2) >= 1 && logits.size(3) >= 1, op,
                    ": logits must have at least one class and one pixel, got shape ", logits.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> upsample_argmax_fwd_cpu(const at::Tensor& logits, int64_t H, int64_t W,
                                                          bool return_scores) {
  check_logits("upsample_argmax", logits);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, "upsample_argmax: output size must be positive, got ", H, "x", W);
  const int64_t B = logits.size(0);
  at::Tensor labels = at::empty({B, H, W}, logits.options().dtype(at::kLong));
  at::Tensor scores = at::empty({return_scores ? B : 0, H, W}, logits.options());
  if (B == 0) return {labels, scores};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "upsample_argmax_fwd_cpu", [&] {
    run<scalar_t>(logits, H, W, labels, return_scores ? &scores : nullptr);
  });
  return {labels, scores};
}

at::Tensor upsample2_argmax_fwd_cpu(const at::Tensor& logits, int64_t H1, int64_t W1, int64_t H, int64_t W) {
  check_logits("upsample2_argmax", logits);
  TORCH_CHECK_VALUE(H1 >= 1 && W1 >= 1 && H >= 1 && W >= 1, "upsample2_argmax: sizes must be positive, got ", H1,
                    "x", W1, " and ", H, "x", W);
  at::Tensor labels = at::empty({logits.size(0), H, W}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) return labels;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "upsample2_argmax_fwd_cpu", [&] {
    run_two<scalar_t>(logits, H1, W1, H, W, labels);
  });
  return labels;
}

}  // namespace fastseg
