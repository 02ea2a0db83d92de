// The whole Mix-FFN of a SegFormer block on tokens, in row tiles (CPU, inference): ATen-level
// declaration (see mix_ffn_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace fastseg {

// x (B, H*W, C) tokens, channel stride 1, float32 or bfloat16;
// fc1_weight (Ch, C), fc1_bias (Ch,)?, dw_weight (Ch, 1, 3, 3), dw_bias (Ch,)?, fc2_weight (Co, Ch),
// fc2_bias (Co,)?, each float32 or x's dtype; approximate "none" or "tanh".
// tile_rows: image rows per tile (at least 2 are used), 0 = chosen from the L2 size. fp32_gemm (bfloat16 x only): run
// both GEMMs in float32 on float32 copies of the tile (for CPUs without a fast bf16 GEMM).
// fc1_packed / fc2_packed: the weights in oneDNN's layout, as torch.ops.mkldnn._reorder_linear_weight
// returns them, in the GEMM dtype; the GEMMs then run through mkldnn::_linear_pointwise.
// Returns y (B, H*W, Co) contiguous in x's dtype:
//   y = fc2(GELU(dwconv3x3(fc1(x)) + dw_bias)), zero padding 1.
at::Tensor mix_ffn_fwd_cpu(const at::Tensor& x, int64_t H, int64_t W, const at::Tensor& fc1_weight,
                           const std::optional<at::Tensor>& fc1_bias, const at::Tensor& dw_weight,
                           const std::optional<at::Tensor>& dw_bias, const at::Tensor& fc2_weight,
                           const std::optional<at::Tensor>& fc2_bias, std::string_view approximate, int64_t tile_rows,
                           bool fp32_gemm, const std::optional<at::Tensor>& fc1_packed,
                           const std::optional<at::Tensor>& fc2_packed);

}  // namespace fastseg
