// Host driver of the CUDA patch-embedding kernels: sizes and limits, weight packing, allocation,
// the launches, and the conv's input/weight gradients. Plain ATen, no CUDA header: the CUDA op
// (overlap_patch_embed_cuda.cpp) runs it on GPU tensors with the current stream, and the CUDA
// kernel's CPU emulation (csrc/emulation/, tests only) runs the very same code on CPU tensors.
//
// Backward, and why it is split this way: the kernel recomputes the conv rows (cheaper than
// keeping a pre-LayerNorm copy of the output: less memory than eager, which saves it) and runs
// the LayerNorm backward in its epilogue, producing grad_y = dL/d(conv output) plus the dbias /
// dln_weight / dln_bias column sums. The conv's input and weight gradients are then ordinary
// convolution gradients of grad_y, which cuDNN's tuned tensor-core dgrad/wgrad kernels compute
// through at::convolution_backward on channels-last views (grad_y's token memory IS a
// channels-last image; token input x is one too), with no layout copies. Writing our own dgrad
// and wgrad would duplicate cuDNN for no gain.
#include "overlap_patch_embed_kernel_host.h"

#include "overlap_patch_embed_kernel.h"

#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <limits>

namespace fastseg {
namespace {

cuda::DType kernel_dtype(const char* where, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, where, ": the CUDA kernel supports float32, float16 and bfloat16, got ", t);
  }
  return cuda::DType::kFloat32;  // unreachable
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Prepared {
  cuda::PatchEmbedParams p;
  cuda::DType dtype;
  cuda::LaunchPlan plan;
  at::Tensor wpack, bias, ln_weight, ln_bias;  // keep the buffers the params point into alive
};

// Everything but the outputs: checked sizes, packed weight, contiguous parameter vectors.
Prepared prepare(const char* where, const PatchEmbedShape& s, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                 double eps) {
  TORCH_CHECK_VALUE(s.C <= cuda::kMaxChannels, where, ": the CUDA kernel supports at most ", cuda::kMaxChannels,
                    " output channels (one program holds whole LayerNorm rows), got ", s.C,
                    "; use the torch backend for wider layers");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(s.B <= kIntMax && s.H <= kIntMax && s.W <= kIntMax && s.K <= kIntMax &&
                        (s.H + s.pad) * s.stride <= kIntMax && (s.W + s.pad) * s.stride <= kIntMax,
                    where, ": input ", x.sizes(), " is too large for the CUDA kernel's 32-bit coordinates");
  Prepared r{};
  r.dtype = kernel_dtype(where, x.scalar_type());
  const bool cin_last = s.Cin > 1 && x.stride(1) == 1;
  const int64_t K_pad = round_up(s.K, cuda::kBlockK), C_pad = round_up(s.C, cuda::kChannelAlign);
  // (K, C) in the kernel's K order, zero padded to (K_pad, C_pad): (kh, kw, ci) or (ci, kh, kw).
  const at::Tensor w = cin_last ? weight.permute({2, 3, 1, 0}) : weight.permute({1, 2, 3, 0});
  r.wpack = at::zeros({K_pad, C_pad}, weight.options());
  r.wpack.narrow(0, 0, s.K).narrow(1, 0, s.C).copy_(w.reshape({s.K, s.C}));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) r.bias = bias->contiguous();
  r.ln_weight = ln_weight.contiguous();
  r.ln_bias = ln_bias.contiguous();

  cuda::PatchEmbedParams& p = r.p;
  p.x = x.data_ptr();
  p.sxb = x.stride(0);
  p.sxc = x.stride(1);
  p.sxh = x.stride(2);
  p.sxw = x.stride(3);
  p.B = int(s.B);
  p.Cin = int(s.Cin);
  p.H = int(s.H);
  p.W = int(s.W);
  p.k = int(s.k);
  p.stride = int(s.stride);
  p.pad = int(s.pad);
  p.Ho = int(s.Ho);
  p.Wo = int(s.Wo);
  p.M = s.M;
  p.K = int(s.K);
  p.K_pad = int(K_pad);
  p.C = int(s.C);
  p.C_pad = int(C_pad);
  p.cin_last = cin_last;
  p.wpack = r.wpack.data_ptr();
  p.bias = has_bias ? r.bias.data_ptr() : nullptr;
  p.ln_weight = r.ln_weight.data_ptr();
  p.ln_bias = r.ln_bias.data_ptr();
  p.eps = float(eps);
  const char* err = cuda::plan_patch_embed(p, r.dtype, &r.plan);
  TORCH_CHECK(err == nullptr, where, ": ", err);
  return r;
}

}  // namespace

FwdResult patch_embed_kernel_forward(const char* where, const PatchEmbedShape& s, const at::Tensor& x,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                                     void* stream) {
  Prepared r = prepare(where, s, x, weight, bias, ln_weight, ln_bias, eps);
  at::Tensor out = at::empty({s.B, s.Ho * s.Wo, s.C}, x.options());
  at::Tensor mean = at::empty({s.M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({s.M}, x.options().dtype(at::kFloat));
  r.p.out = out.data_ptr();
  r.p.mean = mean.data_ptr<float>();
  r.p.rstd = rstd.data_ptr<float>();
  const char* err = cuda::launch_patch_embed_fwd(r.p, r.dtype, r.plan, stream);
  TORCH_CHECK(err == nullptr, where, ": kernel launch failed: ", err);
  return {out, mean, rstd, at::empty({0}, x.options())};
}

BwdResult patch_embed_kernel_backward(const char* where, const PatchEmbedShape& s, const at::Tensor& grad_out,
                                      const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool needs_dx,
                                      bool needs_dweight, void* stream) {
  Prepared r = prepare(where, s, x, weight, bias, ln_weight, ln_weight, 0.0);
  const at::Tensor grad = grad_out.contiguous();  // documented copy if the incoming gradient is strided
  const at::Tensor mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor grad_y = at::empty({s.B, s.Ho * s.Wo, s.C}, x.options());
  at::Tensor partial = at::empty({r.plan.num_blocks, 3, s.C}, x.options().dtype(at::kFloat));
  r.p.grad_out = grad.data_ptr();
  r.p.mean_in = mu.data_ptr<float>();
  r.p.rstd_in = rs.data_ptr<float>();
  r.p.grad_y = grad_y.data_ptr();
  r.p.partial = partial.data_ptr<float>();
  const char* err = cuda::launch_patch_embed_bwd(r.p, r.dtype, r.plan, stream);
  TORCH_CHECK(err == nullptr, where, ": kernel launch failed: ", err);

  const at::Tensor sums = partial.sum(0);  // (3, C) in float32, fixed order
  at::Tensor dx, dweight;
  if (needs_dx || needs_dweight) {
    // grad_y (B, Ho*Wo, C) is a channels-last (B, C, Ho, Wo) image: a view, no copy.
    const at::Tensor gy = grad_y.view({s.B, s.Ho, s.Wo, s.C}).permute({0, 3, 1, 2});
    auto grads = at::convolution_backward(gy, x, weight, std::nullopt, {s.stride, s.stride}, {s.pad, s.pad}, {1, 1},
                                          false, {0, 0}, 1, {needs_dx, needs_dweight, false});
    if (needs_dx) dx = in_layout_of(std::get<0>(grads), x);
    if (needs_dweight) dweight = std::get<1>(grads).contiguous();
  }
  if (!needs_dx) dx = at::empty({0}, x.options());
  if (!needs_dweight) dweight = at::empty({0}, weight.options());
  // copy=true: distinct outputs, never views of one another
  return {dx, dweight, sums[2].to(weight.scalar_type(), false, true), sums[0].to(ln_weight.scalar_type(), false, true),
          sums[1].to(ln_weight.scalar_type(), false, true)};
}

}  // namespace fastseg
