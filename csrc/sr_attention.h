// Spatial-reduction attention of the MiT encoder, forward, CPU (see sr_attention_cpu.cpp).
//
//   out[b, n, h*D:(h+1)*D] = softmax_j(scale * q_h[b, n] . k_h[b, j]) v_h[b, j]
//
// q: (B, N, C) and kv: (B, Nkv, 2C) (k = kv[..., :C], v = kv[..., C:]), channel stride 1, any batch
// and token strides, both float32 or both bfloat16; D = C / num_heads, a multiple of 8.
// Returns out (B, N, C) contiguous in q's dtype. Softmax and accumulation in float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace fastseg {

at::Tensor sr_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads, double scale);

// The instruction set the kernel uses for inputs of this dtype on this CPU: "avx512_bf16" (bfloat16
// dot products), "avx512" or "avx2" (float32 math, bfloat16 widened), or "" (no supported SIMD: the
// kernel refuses to run).
std::string sr_attention_cpu_isa(c10::ScalarType dtype);

}  // namespace fastseg
