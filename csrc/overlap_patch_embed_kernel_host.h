// Host driver of the CUDA patch-embedding kernels (overlap_patch_embed_kernel_host.cpp): ATen in,
// ATen out, device-agnostic, so that the CUDA op and the kernel's CPU emulation share it.
#pragma once

#include "overlap_patch_embed.h"

namespace fastseg {

// The forward kernel on x's device: (out (B, Ho*Wo, C), mean (M,), rstd (M,) in float32, empty y).
// `s` comes from check_patch_embed_inputs; `stream` is a cudaStream_t (nullptr: the default).
FwdResult patch_embed_kernel_forward(const char* where, const PatchEmbedShape& s, const at::Tensor& x,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                                     void* stream);

// The backward kernel (recomputed conv rows, LayerNorm backward, column sums), then the conv's
// input and weight gradients of grad_y: (dx, dweight, dbias, dln_weight, dln_bias).
BwdResult patch_embed_kernel_backward(const char* where, const PatchEmbedShape& s, const at::Tensor& grad_out,
                                      const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool needs_dx,
                                      bool needs_dweight, void* stream);

}  // namespace fastseg
