// Mix-FFN depthwise 3x3 conv + bias + GELU on tokens (CPU): ATen-level declaration
// (see dwconv3x3_gelu_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace fastseg {

// x (B, H*W, C) tokens, channel stride 1, float32 or bfloat16; weight (C, 1, 3, 3), bias (C,) and
// in_bias (C,) in float32 or x's dtype; approximate "none" or "tanh".
// Returns y (B, H*W, C) contiguous in x's dtype:
//   y = GELU(bias + dwconv3x3(x + in_bias)), zero padding 1 (the padding is not biased).
at::Tensor dwconv3x3_gelu_fwd_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_bias,
                                  std::string_view approximate);

}  // namespace fastseg
