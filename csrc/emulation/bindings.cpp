// torch.library bindings of the emulated CUDA kernels (test tooling; tests/cuda_emulator.py):
//
//   fastseg_cuda_emulator::overlap_patch_embed_fwd / _bwd
//
// Same schemas and the same host driver (overlap_patch_embed_kernel_host.cpp: weight packing,
// launch plan, launches, the conv gradients) as the extension's CUDA op, on CPU tensors, with
// the kernels run by the emulator. fp32, fp16 and bf16, like the CUDA kernel.
#include "overlap_patch_embed.h"
#include "overlap_patch_embed_kernel_host.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace {

using fastseg::BwdResult;
using fastseg::FwdResult;
using fastseg::PatchEmbedShape;

void check_cpu(const char* where, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), where, ": the emulated kernels take CPU tensors, got ", x.device());
}

FwdResult emulated_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias, int64_t stride, int64_t padding,
                       double eps) {
  constexpr const char* where = "fastseg_cuda_emulator::overlap_patch_embed_fwd";
  const PatchEmbedShape s =
      fastseg::check_patch_embed_inputs(where, x, weight, bias, ln_weight, ln_bias, stride, padding);
  check_cpu(where, x);
  return fastseg::patch_embed_kernel_forward(where, s, x, weight, bias, ln_weight, ln_bias, eps, nullptr);
}

BwdResult emulated_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight, const at::Tensor& mean,
                       const at::Tensor& rstd, int64_t stride, int64_t padding, bool needs_dx, bool needs_dweight) {
  constexpr const char* where = "fastseg_cuda_emulator::overlap_patch_embed_bwd";
  const PatchEmbedShape s =
      fastseg::check_patch_embed_inputs(where, x, weight, bias, ln_weight, ln_weight, stride, padding);
  fastseg::check_patch_embed_backward_inputs(where, s, x, grad_out, mean, rstd, std::nullopt);
  check_cpu(where, x);
  return fastseg::patch_embed_kernel_backward(where, s, grad_out, x, weight, bias, ln_weight, mean, rstd, needs_dx,
                                              needs_dweight, nullptr);
}

}  // namespace

TORCH_LIBRARY(fastseg_cuda_emulator, m) {
  m.def(
      "overlap_patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor ln_weight, Tensor ln_bias, "
      "int stride, int padding, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "overlap_patch_embed_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor ln_weight, "
      "Tensor mean, Tensor rstd, int stride, int padding, bool needs_dx, bool needs_dweight) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastseg_cuda_emulator, CPU, m) {
  m.impl("overlap_patch_embed_fwd", &emulated_fwd);
  m.impl("overlap_patch_embed_bwd", &emulated_bwd);
}
