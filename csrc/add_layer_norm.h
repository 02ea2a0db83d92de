// Fused residual add + bias + LayerNorm of SegFormer's transformer blocks (ATen-level declarations;
// the CPU kernels are in add_layer_norm_cpu.cpp).
//
//   s[r, :] = x[r, :] + (h[r, :] + h_bias)                 (the new residual stream)
//   y[r, :] = (s[r, :] - mean[r]) * rstd[r] * weight + bias  (LayerNorm over the C channels)
//   mean[r] = mean_c s[r, c],  rstd[r] = 1 / sqrt(var_c s[r, c] + eps)   (float32, biased variance)
//
// x, h: (..., C), the same shape, any strides (rows with unit channel stride and one row stride are
// read in place; anything else is copied once). float32 or bfloat16 each: s has the dtype eager
// PyTorch gives `x + h` (promotion), y has out_dtype (default: s's dtype); the statistics are taken
// of s as stored (rounded to its dtype), so y is LayerNorm(s) exactly as eager would compute it.
// h_bias (C,) may be absent; h_bias, weight, bias (C,) are float32 or bfloat16. Everything is
// computed in float32. float64 is refused (fastseg's `torch` backend keeps it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <tuple>

namespace fastseg {

// (s (x's shape, contiguous), y (x's shape, contiguous), mean (M,), rstd (M,)), M = numel / C.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& h_bias, const at::Tensor& weight,
    const at::Tensor& bias, double eps, std::optional<at::ScalarType> out_dtype);

// The same, writing s into h's own memory (h must be contiguous, of s's dtype, and share no
// memory with x): (y, mean, rstd). For a scratch h nobody else reads (a fresh GEMM output in
// inference); the Python op decides when that holds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_inplace_cpu(
    const at::Tensor& x, at::Tensor& h, const std::optional<at::Tensor>& h_bias, const at::Tensor& weight,
    const at::Tensor& bias, double eps, std::optional<at::ScalarType> out_dtype);

// Backward from the saved s, mean, rstd: grad_sum = dL/ds_total = grad_s + LayerNorm-backward(grad_y)
// (s's shape and dtype; it is dL/dx and dL/dh up to a cast), and the float32 column sums
// dweight = sum_r grad_y * xhat, dbias = sum_r grad_y, dh_bias = sum_r grad_sum (C,) each,
// summed deterministically (fixed row blocks, float64 partials). grad_s may be absent (zero).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace fastseg
