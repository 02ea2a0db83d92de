// Fused bilinear upsample + argmax (inference): ATen-level declaration (see upsample_argmax_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastseg {

// logits (B, K, h, w), any strides, float32/float64 -> (labels (B, H, W) int64, scores (B, H, W) in
// the logits' dtype when return_scores, else an empty (0, H, W) tensor).
std::tuple<at::Tensor, at::Tensor> upsample_argmax_fwd_cpu(const at::Tensor& logits, int64_t H, int64_t W,
                                                          bool return_scores);

// Labels of two chained resizes, (h, w) -> (H1, W1) -> (H, W), then the argmax over K: the
// two-step labels of a test scale without the (B, K, H1, W1) tensor. logits as above.
at::Tensor upsample2_argmax_fwd_cpu(const at::Tensor& logits, int64_t H1, int64_t W1, int64_t H, int64_t W);

}  // namespace fastseg
