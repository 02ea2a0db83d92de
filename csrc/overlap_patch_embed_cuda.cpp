// The CUDA op of the patch embedding (CUDA builds only): device checks, the device guard and the
// current stream around the host driver (overlap_patch_embed_kernel_host.cpp).
#include "overlap_patch_embed.h"
#include "overlap_patch_embed_kernel_host.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace fastseg {
namespace {

void check_cuda_device(const char* where, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), where, ": the CUDA kernel got a tensor on ", x.device());
}

FwdResult overlap_patch_embed_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                       const at::Tensor& ln_bias, int64_t stride, int64_t padding, double eps,
                                       bool keep_y, const std::optional<at::Tensor>& packed_weight) {
  constexpr const char* where = "fastseg_ext::overlap_patch_embed_fwd (CUDA)";
  const PatchEmbedShape s = check_patch_embed_inputs(where, x, weight, bias, ln_weight, ln_bias, stride, padding);
  TORCH_CHECK_VALUE(!(packed_weight.has_value() && packed_weight->defined()), where,
                    ": packed_weight is for the CPU kernel (oneDNN's layout); the CUDA kernel packs its own");
  TORCH_CHECK_VALUE(!keep_y, where, ": keep_y is not supported on CUDA: the backward kernel recomputes the conv "
                    "rows instead of keeping them (pass keep_y=False)");
  check_cuda_device(where, x);
  const c10::cuda::CUDAGuard guard(x.device());
  return patch_embed_kernel_forward(where, s, x, weight, bias, ln_weight, ln_bias, eps,
                                    c10::cuda::getCurrentCUDAStream().stream());
}

BwdResult overlap_patch_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const std::optional<at::Tensor>& y, int64_t stride, int64_t padding,
                                       bool needs_dx, bool needs_dweight) {
  constexpr const char* where = "fastseg_ext::overlap_patch_embed_bwd (CUDA)";
  const PatchEmbedShape s = check_patch_embed_inputs(where, x, weight, bias, ln_weight, ln_weight, stride, padding);
  check_patch_embed_backward_inputs(where, s, x, grad_out, mean, rstd, y);  // y is not used: recomputed
  check_cuda_device(where, x);
  const c10::cuda::CUDAGuard guard(x.device());
  return patch_embed_kernel_backward(where, s, grad_out, x, weight, bias, ln_weight, mean, rstd, needs_dx,
                                     needs_dweight, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace
}  // namespace fastseg

TORCH_LIBRARY_IMPL(fastseg_ext, CUDA, m) {
  m.impl("overlap_patch_embed_fwd", &fastseg::overlap_patch_embed_fwd_cuda);
  m.impl("overlap_patch_embed_bwd", &fastseg::overlap_patch_embed_bwd_cuda);
}
