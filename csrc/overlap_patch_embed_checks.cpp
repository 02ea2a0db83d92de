// Argument checks shared by every kernel of the patch embedding (CPU, CUDA, and the CUDA kernel's
// CPU emulation in csrc/emulation/): errors name the argument and say what was expected.
#include "overlap_patch_embed.h"

#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace fastseg {

namespace {

void check_vector(const char* where, const char* name, const at::Tensor& t, int64_t C) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, where, ": ", name, " must have shape (", C,
                    ",) to match the conv's ", C, " output channels, got ", t.sizes());
}

}  // namespace

PatchEmbedShape check_patch_embed_inputs(const char* where, const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, int64_t stride, int64_t padding) {
  TORCH_CHECK_VALUE(x.defined() && weight.defined() && ln_weight.defined() && ln_bias.defined(), where,
                    ": x, weight, ln_weight and ln_bias are required");
  TORCH_CHECK_VALUE(x.dim() == 4, where, ": x must be a 4-D (B, Cin, H, W) tensor (tokens (B, H*W, Cin) are passed "
                    "as x.view(B, H, W, Cin).permute(0, 3, 1, 2)), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, where, ": weight must be a 4-D conv weight (C, Cin, k, k), got shape ",
                    weight.sizes());
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t C = weight.size(0), k = weight.size(2);
  TORCH_CHECK_VALUE(weight.size(2) == weight.size(3), where, ": only square kernels are supported, got a ",
                    weight.size(2), "x", weight.size(3), " kernel");
  TORCH_CHECK_VALUE(weight.size(1) == Cin, where, ": x has ", Cin, " channels but weight ", weight.sizes(),
                    " expects ", weight.size(1), " input channels");
  TORCH_CHECK_VALUE(C >= 1 && k >= 1, where, ": weight ", weight.sizes(), " is empty");
  TORCH_CHECK_VALUE(B >= 1, where, ": empty batch, x has shape ", x.sizes());
  TORCH_CHECK_VALUE(H >= 1 && W >= 1 && Cin >= 1, where, ": empty image, x has shape ", x.sizes());
  TORCH_CHECK_VALUE(stride >= 1, where, ": stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0 && padding < k, where, ": padding must be in [0, kernel size ", k,
                    "), got ", padding, " (the patch embedding pads by k // 2)");
  TORCH_CHECK_VALUE(H + 2 * padding >= k && W + 2 * padding >= k, where, ": a ", H, "x", W,
                    " input padded by ", padding, " is smaller than the ", k, "x", k, " kernel");
  const int64_t Ho = (H + 2 * padding - k) / stride + 1;
  const int64_t Wo = (W + 2 * padding - k) / stride + 1;
  check_vector(where, "ln_weight", ln_weight, C);
  check_vector(where, "ln_bias", ln_bias, C);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_vector(where, "bias", *bias, C);

  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), where, ": x must be floating point, got ", x.scalar_type());
  auto same = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), where, ": ", name, " is ", t.scalar_type(), " but x is ",
                     x.scalar_type(), "; cast them to one dtype");
    TORCH_CHECK_VALUE(t.device() == x.device(), where, ": ", name, " is on ", t.device(), " but x is on ",
                      x.device(), "; move them to one device");
  };
  same("weight", weight);
  same("ln_weight", ln_weight);
  same("ln_bias", ln_bias);
  if (has_bias) same("bias", *bias);
  return {B, Cin, H, W, C, k, stride, padding, Ho, Wo, Cin * k * k, B * Ho * Wo};
}

void check_patch_embed_backward_inputs(const char* where, const PatchEmbedShape& s, const at::Tensor& x,
                                       const at::Tensor& grad_out, const at::Tensor& mean, const at::Tensor& rstd,
                                       const std::optional<at::Tensor>& y) {
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == s.B && grad_out.size(1) == s.Ho * s.Wo &&
                        grad_out.size(2) == s.C,
                    where, ": grad_out must have the output's shape (", s.B, ", ", s.Ho * s.Wo, ", ", s.C, "), got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), where, ": grad_out is ", grad_out.scalar_type(),
                   " but x is ", x.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), where, ": grad_out is on ", grad_out.device(), " but x is on ",
                    x.device());
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == s.M && t->device() == x.device(), where,
                      ": mean and rstd must be the forward's (", s.M, ",) statistics on ", x.device(), ", got ",
                      t->sizes(), " on ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == stat_type, where, ": mean and rstd must be ", stat_type, ", got ",
                     t->scalar_type());
  }
  if (y.has_value() && y->defined()) {
    TORCH_CHECK_VALUE(y->sizes() == grad_out.sizes() && y->scalar_type() == x.scalar_type() &&
                          y->device() == x.device(),
                      where, ": y must be the forward's kept conv output (", s.B, ", ", s.Ho * s.Wo, ", ", s.C,
                      ") ", x.scalar_type(), " on ", x.device(), ", got ", y->sizes(), " ", y->scalar_type());
  }
}

at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  at::Tensor want = at::empty_like(like);
  if (t.strides() == want.strides()) return t;
  want.copy_(t);
  return want;
}

}  // namespace fastseg
