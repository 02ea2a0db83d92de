// CPU kernel of the whole Mix-FFN (inference forward), float32 and bfloat16, in row tiles so that
// the 4C-channel hidden tensor never exists in full:
//
//   h = x @ fc1_weight^T                       (fc1's bias is folded into the conv, see below)
//   g = GELU(dwconv3x3(h + fc1_bias) + dw_bias)          zero padding 1 (not biased)
//   y = g @ fc2_weight^T [+ fc2_bias]
//
// x, y: (B, N = H*W, C) tokens (token n = h*W + w). The eager composition writes h and g, each
// (B, N, 4C), to memory and reads them back (at 512x512 MiT-B2 stage 1 that is 16 MB each, far
// beyond L2). Here each task owns a band of image rows of one image and walks it in tiles of
// `t` rows; per tile it
//   1. runs fc1 for the hidden rows the tile needs and the previous tile has not made (the tile's
//      rows plus one halo row below; the previous tile's last two hidden rows are the halo above
//      and the tile's first row, so t >= 2), into a task-local buffer: ping-pong between two
//      buffers, so nothing is copied and no hidden row is computed twice inside a band;
//   2. runs the depthwise 3x3 conv + bias + exact / tanh GELU over the tile's rows
//      (dwconv3x3_gelu_rows.h, the same code as the dwconv3x3_gelu kernel) into a second
//      buffer of t rows;
//   3. runs fc2 on that buffer straight into the tile's rows of y (with fc2's bias, or without it
//      when the caller adds it later: the fused Block adds it in add_layer_norm).
// Buffers: (2 t + 2) rows of W * 4C hidden values, chosen to fit the L2 cache (auto tile_rows).
// Only band edges recompute hidden rows: a band computes fc1 for its rows plus one halo row on
// each side that has a neighbour, so the extra fc1 FLOPs are at most 2 / band_rows of fc1's
// (bands are whole images when the batch alone fills the threads).
//
// fc1's bias is not added by the GEMM (addmm would first copy it into every hidden row): as in
// the dwconv3x3_gelu kernel it is folded into the conv's per-border-case bias (exact:
// conv(h + b1) = conv(h) + b1 * sum of the taps that exist).
//
// GEMMs: aten (at::mm_out / at::addmm_out into the buffers and y: MKL or oneDNN, whatever this
// torch uses), one thread each inside the parallel tasks; or, given oneDNN-packed weights,
// mkldnn::_linear_pointwise called through the dispatcher (boxed, as overlap_patch_embed_cpu.cpp
// does), whose output then serves as the hidden buffer (fc1) or is copied into y (fc2).
// bfloat16: GEMMs in bfloat16 with fp32 accumulation (aten / oneDNN), hidden values stored in
// bfloat16 as eager's would be; or with fp32_gemm, for CPUs whose bf16 GEMM is slow (no AVX-512),
// the tile is converted to float32 and everything runs in float32 up to the final rounding of y.
#include "mix_ffn.h"

#include "dwconv3x3_gelu_rows.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace fastseg {
namespace {

constexpr const char* kWhere = "fastseg_ext::mix_ffn_fwd (CPU)";
constexpr int64_t kMinTileTokens = 128;  // below this the GEMMs lose efficiency (measured)
constexpr int64_t kMinBandRows = 8;      // a band recomputes 2 hidden rows: at most 25% more fc1

// The dwconv + GELU of output rows, given each row's three input row pointers (up / down null
// outside the image) and the rows' outputs at out + i * W * C.
template <typename T>
FASTSEG_INLINE void dw_tile_impl(const T* const* up, const T* const* mid, const T* const* down, int64_t rows,
                                 int64_t W, int64_t C, T* out, const float* wt, const float* eb, bool tanh, float* z) {
  const int64_t chunk = dwconv::chunk_pixels(W, C);
  for (int64_t i = 0; i < rows; ++i) {
    if (tanh)
      dwconv::row<T, true>(up[i], mid[i], down[i], C, W, C, chunk, out + i * W * C, wt, eb, z);
    else
      dwconv::row<T, false>(up[i], mid[i], down[i], C, W, C, chunk, out + i * W * C, wt, eb, z);
  }
}

FASTSEG_CLONES void dw_tile(const float* const* up, const float* const* mid, const float* const* down, int64_t rows,
                            int64_t W, int64_t C, float* out, const float* wt, const float* eb, bool tanh, float* z) {
  dw_tile_impl(up, mid, down, rows, W, C, out, wt, eb, tanh, z);
}

FASTSEG_CLONES void dw_tile(const bf16_bits* const* up, const bf16_bits* const* mid, const bf16_bits* const* down,
                            int64_t rows, int64_t W, int64_t C, bf16_bits* out, const float* wt, const float* eb,
                            bool tanh, float* z) {
  dw_tile_impl(up, mid, down, rows, W, C, out, wt, eb, tanh, z);
}

// y = x @ packed^T [+ bias] by oneDNN, with the weight already in its layout.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  TORCH_CHECK(op.has_value(), kWhere, ": packed weights need ATen's mkldnn::_linear_pointwise, which this torch "
              "lacks; pass fc1_packed=None, fc2_packed=None");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x.is_contiguous() ? x : x.contiguous());
  stack.emplace_back(packed);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::impl::GenericList(c10::OptionalType::create(c10::NumberType::get())));
  stack.emplace_back(c10::IValue());  // algorithm
  op->callBoxed(&stack);
  return stack.at(0).toTensor();
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return int64_t(v);
#endif
    return int64_t(1) << 20;
  }();
  return bytes;
}

// Rows per tile: the fc1 rows of the tile (t), the two carried from the previous tile and the
// GELU rows (t) fill at most 3/4 of L2, but a tile has at least kMinTileTokens tokens.
int64_t auto_tile_rows(int64_t W, int64_t hidden, int64_t elem) {
  const int64_t row_bytes = W * hidden * elem;
  const int64_t fit = (l2_cache_bytes() * 3 / 4 / row_bytes - 2) / 2;
  return std::max<int64_t>({fit, (kMinTileTokens + W - 1) / W, 1});
}

void check_param(const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape, kWhere, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), kWhere, ": ", name,
                   " must be float32 or x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), kWhere, ": ", name, " is on ", t.device(), ", x on the CPU");
  TORCH_CHECK_VALUE(!t.is_mkldnn(), kWhere, ": ", name, " must be a dense tensor (pass oneDNN-packed weights as "
                    "fc1_packed / fc2_packed)");
}

void check_optional(const char* name, const std::optional<at::Tensor>& t, int64_t n, const at::Tensor& x) {
  if (t.has_value() && t->defined()) check_param(name, *t, {n}, x);
}

void check_packed(const char* name, const std::optional<at::Tensor>& packed, const at::Tensor& weight,
                  at::ScalarType gemm_dtype) {
  if (!packed.has_value() || !packed->defined()) return;
  TORCH_CHECK_VALUE(packed->is_mkldnn(), kWhere, ": ", name, " must be the weight in oneDNN's layout "
                    "(torch.ops.mkldnn._reorder_linear_weight(weight, batch)), got a ", packed->layout(), " tensor");
  TORCH_CHECK_VALUE(packed->sizes() == weight.sizes(), kWhere, ": ", name, " has shape ", packed->sizes(),
                    " but the weight is ", weight.sizes());
  TORCH_CHECK_TYPE(packed->scalar_type() == gemm_dtype, kWhere, ": ", name, " is ", packed->scalar_type(),
                   " but the GEMMs run in ", gemm_dtype);
}

std::optional<at::Tensor> cast_optional(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->to(dtype);
}

// Everything one call shares between its tasks.
struct Plan {
  int64_t B, H, W, C, Ch, Co;
  int64_t bands, tile;
  bool tanh, fp32_gemm;
  at::ScalarType gemm_dtype;
  at::Tensor w1t, w2t;  // (C, Ch), (Ch, Co): transposed views in the GEMM dtype
  std::optional<at::Tensor> b2, p1, p2;
  dwconv::Taps taps;
};

// Output rows [r0, r1) of image b, tile by tile (see the file comment).
template <typename T>
void run_band(const Plan& p, const at::Tensor& x, at::Tensor& y, int64_t b, int64_t r0, int64_t r1) {
  const int64_t W = p.W, Ch = p.Ch, t = p.tile;
  const at::TensorOptions hopt = x.options().dtype(p.gemm_dtype);
  const at::Tensor xb = x.select(0, b);  // (N, C)
  at::Tensor yb = y.select(0, b);        // (N, Co)
  // fc1 row buffers (ping-pong) and the GELU rows; with fc1 packed, oneDNN's outputs are the buffers.
  at::Tensor hbuf[2];
  if (!p.p1) {
    hbuf[0] = at::empty({(t + 2) * W, Ch}, hopt);
    hbuf[1] = at::empty({(t + 2) * W, Ch}, hopt);
  }
  at::Tensor gbuf = at::empty({t * W, Ch}, hopt);
  at::Tensor xf = p.fp32_gemm ? at::empty({(t + 2) * W, p.C}, hopt) : at::Tensor();    // x rows in fp32
  at::Tensor yf = p.fp32_gemm ? at::empty({t * W, p.Co}, hopt) : at::Tensor();        // y rows in fp32
  std::vector<float> z(dwconv::chunk_pixels(W, Ch) * Ch);
  std::vector<const T*> up(t), mid(t), down(t);

  at::Tensor cur, prev;  // hidden rows [cur_lo, cur_hi) and [prev_lo, prev_hi)
  int64_t cur_lo = 0, cur_hi = 0, prev_lo = 0;
  int turn = 0;
  const int64_t row_elems = W * Ch;
  auto row_ptr = [&](int64_t h) -> const T* {
    const at::Tensor& buf = h >= cur_lo ? cur : prev;
    const int64_t lo = h >= cur_lo ? cur_lo : prev_lo;
    return reinterpret_cast<const T*>(buf.const_data_ptr()) + (h - lo) * row_elems;
  };

  for (int64_t h0 = r0; h0 < r1; h0 += t) {
    const int64_t h1 = std::min(h0 + t, r1);
    const int64_t need_lo = std::max<int64_t>(h0 - 1, 0), need_hi = std::min(h1 + 1, p.H);
    // 1. fc1 for the rows not made yet (all of them in the band's first tile).
    const int64_t new_lo = cur_hi > need_lo ? cur_hi : need_lo;
    prev = cur;
    prev_lo = cur_lo;
    if (new_lo < need_hi) {
      const int64_t n = (need_hi - new_lo) * W;
      at::Tensor a = xb.narrow(0, new_lo * W, n);
      if (p.fp32_gemm) a = xf.narrow(0, 0, n).copy_(a);
      if (p.p1) {
        cur = packed_linear(a, *p.p1, std::nullopt);
      } else {
        cur = hbuf[turn].narrow(0, 0, n);
        turn ^= 1;
        at::mm_out(cur, a, p.w1t);
      }
      cur_lo = new_lo;
      cur_hi = need_hi;
    }
    // 2. dwconv + bias + GELU of the tile's rows.
    const int64_t rows = h1 - h0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t h = h0 + i;
      up[i] = h > 0 ? row_ptr(h - 1) : nullptr;
      mid[i] = row_ptr(h);
      down[i] = h + 1 < p.H ? row_ptr(h + 1) : nullptr;
    }
    T* g = reinterpret_cast<T*>(gbuf.data_ptr());
    dw_tile(up.data(), mid.data(), down.data(), rows, W, Ch, g, p.taps.wt.const_data_ptr<float>(),
            p.taps.eb.const_data_ptr<float>(), p.tanh, z.data());
    // 3. fc2 into y's rows.
    const at::Tensor gt = gbuf.narrow(0, 0, rows * W);
    at::Tensor yt = yb.narrow(0, h0 * W, rows * W);
    if (p.p2) {
      yt.copy_(packed_linear(gt, *p.p2, p.b2));
    } else {
      at::Tensor dst = p.fp32_gemm ? yf.narrow(0, 0, rows * W) : yt;
      if (p.b2)
        at::addmm_out(dst, *p.b2, gt, p.w2t);
      else
        at::mm_out(dst, gt, p.w2t);
      if (p.fp32_gemm) yt.copy_(dst);
    }
  }
}

}  // namespace

at::Tensor mix_ffn_fwd_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& fc1_weight,
                           const std::optional<at::Tensor>& fc1_bias, const at::Tensor& dw_weight,
                           const std::optional<at::Tensor>& dw_bias, const at::Tensor& fc2_weight,
                           const std::optional<at::Tensor>& fc2_bias, std::string_view approximate, int64_t tile_rows,
                           bool fp32_gemm, const std::optional<at::Tensor>& fc1_packed,
                           const std::optional<at::Tensor>& fc2_packed) {
  TORCH_CHECK_VALUE(x.dim() == 3, kWhere, ": x must be tokens (B, N, C), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() && !x.is_mkldnn(), kWhere, ": x must be a dense CPU tensor, got ",
                    x.device(), " ", x.layout());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kWhere,
                   ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", kWhere,
                    ": approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1 && H * W == N, kWhere, ": ", N, " tokens do not form a ", H, "x", W, " map");
  TORCH_CHECK_VALUE(C == 1 || x.stride(2) == 1, kWhere, ": x must have stride 1 over channels, got strides ",
                    x.strides());
  TORCH_CHECK_VALUE(fc1_weight.dim() == 2 && fc1_weight.size(1) == C, kWhere, ": fc1_weight must be (hidden, ", C,
                    "), got ", fc1_weight.sizes());
  const int64_t Ch = fc1_weight.size(0);
  TORCH_CHECK_VALUE(fc2_weight.dim() == 2 && fc2_weight.size(1) == Ch, kWhere, ": fc2_weight must be (out, ", Ch,
                    "), got ", fc2_weight.sizes());
  const int64_t Co = fc2_weight.size(0);
  check_param("fc1_weight", fc1_weight, {Ch, C}, x);
  check_param("dw_weight", dw_weight, {Ch, 1, 3, 3}, x);
  check_param("fc2_weight", fc2_weight, {Co, Ch}, x);
  check_optional("fc1_bias", fc1_bias, Ch, x);
  check_optional("dw_bias", dw_bias, Ch, x);
  check_optional("fc2_bias", fc2_bias, Co, x);
  TORCH_CHECK_VALUE(tile_rows >= 0, kWhere, ": tile_rows must be >= 0 (0: from the L2 size), got ", tile_rows);
  TORCH_CHECK_VALUE(!fp32_gemm || x.scalar_type() == at::kBFloat16, kWhere,
                    ": fp32_gemm applies to bfloat16 x only, x is ", x.scalar_type());
  const at::ScalarType gemm_dtype = fp32_gemm ? at::kFloat : x.scalar_type();
  check_packed("fc1_packed", fc1_packed, fc1_weight, gemm_dtype);
  check_packed("fc2_packed", fc2_packed, fc2_weight, gemm_dtype);

  at::Tensor y = at::empty({B, N, Co}, x.options().memory_format(at::MemoryFormat::Contiguous));
  TORCH_CHECK_VALUE(C >= 1 && Ch >= 1, kWhere, ": empty channels (C = ", C, ", hidden = ", Ch, ")");
  if (y.numel() == 0) return y;
  // The GEMMs and copies below must not record autograd or trip inference-mode checks in worker threads.
  at::AutoDispatchBelowADInplaceOrView guard;

  Plan p;
  p.B = B, p.H = H, p.W = W, p.C = C, p.Ch = Ch, p.Co = Co;
  p.tanh = approximate == "tanh";
  p.fp32_gemm = fp32_gemm;
  p.gemm_dtype = gemm_dtype;
  p.w1t = fc1_weight.to(gemm_dtype).t();
  p.w2t = fc2_weight.to(gemm_dtype).t();
  p.b2 = cast_optional(fc2_bias, gemm_dtype);
  if (fc1_packed.has_value() && fc1_packed->defined()) p.p1 = *fc1_packed;
  if (fc2_packed.has_value() && fc2_packed->defined()) p.p2 = *fc2_packed;
  p.taps = dwconv::make_taps(dw_weight, dw_bias, fc1_bias, Ch, x.options());

  // Bands per image: enough tasks to give every thread the same number (B * bands a multiple of
  // the thread count), but no band under kMinBandRows rows (each recomputes 2 hidden rows).
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t per_image = threads / std::gcd(B, threads);
  p.bands = std::max<int64_t>(1, std::min(per_image, H / kMinBandRows));
  const int64_t elem = gemm_dtype == at::kFloat ? 4 : 2;
  // At least 2 rows: a tile's halo above (and its first row) come from the previous tile's fc1 buffer.
  p.tile = std::min(std::max<int64_t>(2, tile_rows > 0 ? tile_rows : auto_tile_rows(W, Ch, elem)),
                    (H + p.bands - 1) / p.bands);

  const at::Tensor xc = x;
  auto task = [&](int64_t i) {
    const int64_t b = i / p.bands, band = i % p.bands;
    const int64_t r0 = H * band / p.bands, r1 = H * (band + 1) / p.bands;
    if (gemm_dtype == at::kFloat)  // the hidden rows are in the GEMM dtype
      run_band<float>(p, xc, y, b, r0, r1);
    else
      run_band<bf16_bits>(p, xc, y, b, r0, r1);
  };
  const int64_t tasks = B * p.bands;
  if (tasks == 1) {
    task(0);  // one task: the GEMMs use every thread themselves
  } else {
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView task_guard;  // thread-local: set again in each worker
      for (int64_t i = t0; i < t1; ++i) task(i);
    });
  }
  return y;
}

}  // namespace fastseg
