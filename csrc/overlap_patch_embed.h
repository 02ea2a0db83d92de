// Overlapping patch embedding of SegFormer's MiT encoder (ATen-level declarations).
//
//   y[b, c, oh, ow] = bias[c] + sum_{ci, kh, kw} weight[c, ci, kh, kw] * x[b, ci, oh*s - p + kh, ow*s - p + kw]
//   out[b, oh*Wo + ow, :] = LayerNorm_C(y[b, :, oh, ow]) * ln_weight + ln_bias
//
// x is a logical (B, Cin, H, W) tensor with ANY strides: an NCHW image (stage 1) or the token
// tensor (B, H*W, Cin) of the previous stage seen as an image without a copy
// (x.view(B, H, W, Cin).permute(0, 3, 1, 2), i.e. channels-last strides). The kernels read it in
// place. out is (B, Ho*Wo, C) contiguous; mean and rstd (B*Ho*Wo,) are the LayerNorm statistics
// (float32, or float64 for float64 input) kept for the backward pass.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <tuple>

namespace fastseg {

struct PatchEmbedShape {
  int64_t B, Cin, H, W;  // input
  int64_t C, k;          // output channels, kernel size (square)
  int64_t stride, pad;
  int64_t Ho, Wo;
  int64_t K;  // GEMM reduction length: Cin * k * k
  int64_t M;  // GEMM rows: B * Ho * Wo (one per output token)
};

// Validates the forward arguments (ranks, channel counts, kernel/stride/padding, dtypes,
// devices) with errors a user can act on, and returns the sizes. `where` names the caller.
PatchEmbedShape check_patch_embed_inputs(const char* where, const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, int64_t stride, int64_t padding);

// The backward arguments on top of the forward ones: grad_out (B, Ho*Wo, C), mean/rstd (M,),
// and y (B, Ho*Wo, C) if the forward kept it.
void check_patch_embed_backward_inputs(const char* where, const PatchEmbedShape& s, const at::Tensor& x,
                                       const at::Tensor& grad_out, const at::Tensor& mean, const at::Tensor& rstd,
                                       const std::optional<at::Tensor>& y);

// t laid out exactly as at::empty_like(like) would be (what the fake implementations promise
// for gradients), copying only if t came back in another layout.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like);

// Forward: (out (B, Ho*Wo, C), mean (M,), rstd (M,), y): y is the conv output + bias as tokens
// (B, Ho*Wo, C) when keep_y is set (the CPU backward then skips recomputing it), else empty.
using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// Backward: (dx (like x, or empty when not needed), dweight (like weight, or empty), dbias (C,),
// dln_weight (C,), dln_bias (C,)).
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdResult overlap_patch_embed_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                      const at::Tensor& ln_bias, int64_t stride, int64_t padding, double eps,
                                      bool keep_y, const std::optional<at::Tensor>& packed_weight);

BwdResult overlap_patch_embed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const std::optional<at::Tensor>& y, int64_t stride, int64_t padding,
                                      bool needs_dx, bool needs_dweight);

}  // namespace fastseg
