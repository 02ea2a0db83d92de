// The SegFormer decoder head on CPU, inference: ATen-level declaration (see decoder_head_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastseg {

// out = [ReLU](Σᵢ resize(maps[i]) + X·Wᵀ + bias) [· cls_wᵀ + cls_b], computed over bands of
// output rows. maps: (B, hᵢ, wᵢ, E) contiguous; X: (B, H, W, C) contiguous with W: (E, C) (the
// projection of the map that is already at full size); bias (E,) float32; cls_w (K, E), cls_b
// (K,). float32 or bfloat16 (all tensors but bias in one dtype). Returns (B, H, W, K or E).
// x_weight_packed / cls_weight_packed: optional copies of W / cls_w in oneDNN's packed layout
// (torch.ops.mkldnn._reorder_linear_weight); with them the GEMMs run mkldnn::_linear_pointwise.
at::Tensor decoder_head_fwd_cpu(at::TensorList maps, const std::optional<at::Tensor>& x,
                                const std::optional<at::Tensor>& x_weight, int64_t H, int64_t W,
                                const std::optional<at::Tensor>& bias, bool relu,
                                const std::optional<at::Tensor>& cls_weight,
                                const std::optional<at::Tensor>& cls_bias,
                                const std::optional<at::Tensor>& x_weight_packed,
                                const std::optional<at::Tensor>& cls_weight_packed);

}  // namespace fastseg
