// Launch interface of the CUDA patch-embedding kernels (overlap_patch_embed_kernel.cu).
//
// Plain C++ on purpose: the .cu file includes no torch header, so it compiles with nvcc against
// any torch (CI checks it against a CPU-only torch, whose c10/cuda headers are incomplete) and
// fast. Tensors, dtype dispatch, streams and error checks live in overlap_patch_embed_cuda.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastseg {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxChannels = 1024;  // a program keeps whole rows of C in shared memory
constexpr int kBlockK = 32;         // reduction tile; the packed weight has K_pad rows
constexpr int kChannelAlign = 16;   // the packed weight has C_pad columns (tensor-core tile)

struct PatchEmbedParams {
  // x: logical (B, Cin, H, W) with element strides (NCHW image, or tokens seen channels-last).
  const void* x;
  int64_t sxb, sxc, sxh, sxw;
  int B, Cin, H, W;
  int k, stride, pad, Ho, Wo;
  int64_t M;       // B * Ho * Wo output tokens
  int K, K_pad;    // Cin * k * k, rounded up to kBlockK
  int C, C_pad;    // output channels, rounded up to kChannelAlign
  bool cin_last;   // K order (kh, kw, ci) if true (channels-last input), else (ci, kh, kw)
  const void* wpack;  // (K_pad, C_pad) row-major, x's dtype, zero padded, K in the order above
  const void* bias;   // (C,) or nullptr
  const void* ln_weight;
  const void* ln_bias;  // (C,)
  float eps;
  // forward outputs
  void* out;      // (M, C) tokens
  float* mean;    // (M,)
  float* rstd;    // (M,)
  // backward
  const void* grad_out;   // (M, C) contiguous
  const float* mean_in;   // (M,) saved by the forward
  const float* rstd_in;   // (M,)
  void* grad_y;           // (M, C) out: dL/d(conv + bias)
  float* partial;         // (num_blocks, 3, C) out: per-program sums of dln_weight, dln_bias, dbias
};

struct LaunchPlan {
  int block_m;        // output tokens per program
  int64_t num_blocks; // programs (grid size)
  size_t smem_bytes;  // dynamic shared memory per program
};

// Each returns nullptr on success, else a message naming the problem.
const char* plan_patch_embed(const PatchEmbedParams& p, DType dtype, LaunchPlan* plan);
const char* launch_patch_embed_fwd(const PatchEmbedParams& p, DType dtype, const LaunchPlan& plan, void* stream);
// Recomputes conv + bias rows, then the LayerNorm backward: grad_y and the partial sums.
const char* launch_patch_embed_bwd(const PatchEmbedParams& p, DType dtype, const LaunchPlan& plan, void* stream);

}  // namespace cuda
}  // namespace fastseg
