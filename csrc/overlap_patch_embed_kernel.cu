// CUDA kernels of the overlapping patch embedding: implicit-GEMM strided conv with bias and
// LayerNorm over C in the epilogue, writing tokens; and its backward companion.
//
// GEMM view: rows m = output tokens (b, oh, ow), M = B*Ho*Wo; columns c = output channels (C);
// reduction k over the receptive field, K = Cin*k*k, in the order that makes x's reads contiguous:
// (kh, kw, ci) for channels-last / token input (consecutive k = consecutive channels),
// (ci, kh, kw) for an NCHW image (consecutive k = consecutive columns).
//
//   y[m, c]   = bias[c] + sum_k A[m, k] * Wp[k, c]     A[m, k] = x[b, ci, oh*s - p + kh, ow*s - p + kw]
//   out[m, :] = (y[m, :] - mean_m) * rstd_m * ln_weight + ln_bias,   rstd_m = 1/sqrt(var_m + eps)
//
// One program (256 threads) owns BM rows and ALL C columns (C <= 1024; SegFormer's C <= 512), so
// the LayerNorm statistics are complete inside the program and the conv output never reaches
// global memory. A (BM x 32) is gathered from x straight into shared memory (zero padding by
// bounds checks: no im2col buffer, no NCHW copy of token input); Wp, the weight packed once per
// call as a zero-padded (K_pad, C_pad) matrix, is read in 32-row tiles with 16-byte loads.
// fp16/bf16 multiply on tensor cores (WMMA 16x16x16, fp32 accumulation); fp32 multiplies with
// FFMA (no TF32: results must match fp32 eager to 1e-4). The accumulators go to shared memory
// (aliasing the operand tiles) and each warp normalises whole rows: bias, two-pass mean/variance
// in fp32, affine, one coalesced store of the row in the output dtype.
//
// Backward (LayerNorm part; the conv's input/weight gradients are cuDNN's, see the .cpp): the
// same main loop recomputes y, then per row a = mean_c(g*gamma), b = mean_c(g*gamma*xhat) and
//   dy = rstd * (g*gamma - a - xhat*b),   written as grad_y (the conv's output gradient),
// with per-program column sums of g*xhat (dln_weight), g (dln_bias) and dy (dbias) written to
// `partial` and reduced on the host side in a fixed order (deterministic).
//
// The same source also compiles as plain C++ with FASTSEG_CUDA_EMULATION defined: then
// csrc/emulation/cuda_emulation.h stands in for the CUDA runtime (thread blocks run on CPU
// fibers), so the tests run these kernels, unchanged, on a machine without a GPU.
#include "overlap_patch_embed_kernel.h"

#ifdef FASTSEG_CUDA_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define FASTSEG_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define FASTSEG_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <type_traits>

namespace fastseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBK = kBlockK;
static_assert(kBK == 32, "the A-tile loader maps one lane to one k of the tile");

template <typename T>
struct Scalar;
template <>
struct Scalar<float> {
  static constexpr bool kTensorCores = false;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Scalar<__half> {
  static constexpr bool kTensorCores = true;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Scalar<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Shared-memory row pitches (elements). Padding keeps WMMA pointers 32-byte aligned and
// spreads rows over banks.
template <typename T>
__host__ __device__ constexpr int a_pitch() { return kBK + (sizeof(T) == 2 ? 8 : 4); }
template <typename T>
__host__ __device__ inline int b_pitch(int C_pad) { return C_pad + (sizeof(T) == 2 ? 8 : 4); }
__host__ __device__ inline int e_pitch(int C_pad) { return C_pad + 4; }

// The widest C each row-tile height supports: 64 accumulator values per thread in every case.
__host__ __device__ constexpr int max_channels_for(int BM) { return BM == 64 ? 256 : BM == 32 ? 512 : 1024; }

template <typename T, int BM>
size_t smem_bytes_for(int C_pad) {
  const size_t operands = sizeof(T) * (size_t(BM) * a_pitch<T>() + size_t(kBK) * b_pitch<T>(C_pad));
  const size_t epilogue = sizeof(float) * size_t(BM) * e_pitch(C_pad);
  const size_t bytes = operands > epilogue ? operands : epilogue;
  return (bytes + 127) / 128 * 128;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Tensor-core main loop (fp16/bf16): warp w owns accumulator tiles f = w, w + 8, ... of the
// (BM/16) x (C_pad/16) grid; at most 8 per warp by max_channels_for.
template <typename T, int BM>
struct WmmaTile {
  static constexpr int kFrags = (BM / 16) * (max_channels_for(BM) / 16) / kWarps;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kFrags];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kFrags; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.0f);
  }
  __device__ void mma(const T* As, const T* Bs, int C_pad, int warp) {
    using namespace nvcuda;
    const int tiles_n = C_pad / 16, tiles = (BM / 16) * tiles_n, ldb = b_pitch<T>(C_pad);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
#pragma unroll
      for (int i = 0; i < kFrags; ++i) {
        const int f = warp + kWarps * i;
        if (f < tiles) {  // warp-uniform
          const int tm = f / tiles_n, tn = f - tm * tiles_n;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, As + tm * 16 * a_pitch<T>() + kk, a_pitch<T>());
          wmma::load_matrix_sync(b, Bs + kk * ldb + tn * 16, ldb);
          wmma::mma_sync(acc[i], a, b, acc[i]);
        }
      }
    }
  }
  __device__ void store(float* Es, int C_pad, int warp) {
    const int tiles_n = C_pad / 16, tiles = (BM / 16) * tiles_n, lde = e_pitch(C_pad);
#pragma unroll
    for (int i = 0; i < kFrags; ++i) {
      const int f = warp + kWarps * i;
      if (f < tiles) {
        const int tm = f / tiles_n, tn = f - tm * tiles_n;
        nvcuda::wmma::store_matrix_sync(Es + tm * 16 * lde + tn * 16, acc[i], lde, nvcuda::wmma::mem_row_major);
      }
    }
  }
};

// FFMA main loop (fp32): warp w owns rows [w*TM, (w+1)*TM), lane l owns columns l, l+32, ...
template <int BM>
struct SimtTile {
  static constexpr int TM = BM / kWarps;
  static constexpr int TN = max_channels_for(BM) / 32;
  float acc[TM][TN];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }
  __device__ void mma(const float* As, const float* Bs, int C_pad, int warp) {
    const int lane = threadIdx.x & 31, ldb = b_pitch<float>(C_pad);
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      float a[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[(warp * TM + i) * a_pitch<float>() + kk];  // broadcast
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int c = lane + 32 * j;
        if (c < C_pad) {
          const float b = Bs[kk * ldb + c];
#pragma unroll
          for (int i = 0; i < TM; ++i) acc[i][j] = fmaf(a[i], b, acc[i][j]);
        }
      }
    }
  }
  __device__ void store(float* Es, int C_pad, int warp) {
    const int lane = threadIdx.x & 31, lde = e_pitch(C_pad);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int c = lane + 32 * j;
        if (c < C_pad) Es[(warp * TM + i) * lde + c] = acc[i][j];
      }
  }
};

template <typename T, int BM>
using Tile = typename std::conditional<Scalar<T>::kTensorCores, WmmaTile<T, BM>, SimtTile<BM>>::type;

// conv + bias for BM output tokens, all C channels, left in shared memory Es (BM x e_pitch)
// without the bias; returns after a __syncthreads() so every thread may read Es.
template <typename T, int BM>
__device__ void conv_tile(const PatchEmbedParams& p, int64_t m0, unsigned char* smem, int64_t* row_base,
                          int* row_ih0, int* row_iw0) {
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * a_pitch<T>();
  float* Es = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ldb = b_pitch<T>(p.C_pad);

  // Where each row's receptive field starts; rows past M read only padding (zeros).
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t m = m0 + r;
    if (m < p.M) {
      const int64_t per_image = int64_t(p.Ho) * p.Wo;
      const int64_t b = m / per_image;
      const int pix = int(m - b * per_image);
      const int oh = pix / p.Wo, ow = pix - oh * p.Wo;
      row_base[r] = b * p.sxb;
      row_ih0[r] = oh * p.stride - p.pad;
      row_iw0[r] = ow * p.stride - p.pad;
    } else {
      row_base[r] = 0;
      row_ih0[r] = -(1 << 29);  // always above the image
      row_iw0[r] = 0;
    }
  }
  __syncthreads();

  const T* x = static_cast<const T*>(p.x);
  const T* wpack = static_cast<const T*>(p.wpack);
  const T zero = Scalar<T>::from_float(0.0f);
  Tile<T, BM> tile;
  tile.zero();
  constexpr int kVec = 16 / sizeof(T);
  const int vecs_per_row = p.C_pad / kVec;

  for (int k0 = 0; k0 < p.K_pad; k0 += kBK) {
    // A tile: lane <-> k (decoded once per tile), warps stride over rows. A warp reads 32
    // consecutive k of one row: consecutive channels (token input) or columns (NCHW image).
    const int k = k0 + lane;
    int ci = 0, kh = 0, kw = 0;
    const bool k_ok = k < p.K;
    if (p.cin_last) {
      ci = k % p.Cin;
      const int t = k / p.Cin;
      kw = t % p.k;
      kh = t / p.k;
    } else {
      kw = k % p.k;
      const int t = k / p.k;
      kh = t % p.k;
      ci = t / p.k;
    }
    const int64_t k_offset = int64_t(ci) * p.sxc;
#pragma unroll 4
    for (int r = warp; r < BM; r += kWarps) {
      const int ih = row_ih0[r] + kh, iw = row_iw0[r] + kw;
      T v = zero;
      if (k_ok && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)
        v = x[row_base[r] + k_offset + int64_t(ih) * p.sxh + int64_t(iw) * p.sxw];
      As[r * a_pitch<T>() + lane] = v;
    }
    // B tile: 32 rows of the packed weight, 16-byte vectors (always in bounds: zero padded).
    for (int i = tid; i < kBK * vecs_per_row; i += kThreads) {
      const int kr = i / vecs_per_row, cv = i - kr * vecs_per_row;
      *reinterpret_cast<float4*>(Bs + kr * ldb + cv * kVec) =
          *reinterpret_cast<const float4*>(wpack + int64_t(k0 + kr) * p.C_pad + cv * kVec);
    }
    __syncthreads();
    tile.mma(As, Bs, p.C_pad, warp);
    __syncthreads();
  }
  tile.store(Es, p.C_pad, warp);  // Es aliases the operand tiles: all warps are past the loop
  __syncthreads();
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) patch_embed_fwd_kernel(const PatchEmbedParams p) {
  FASTSEG_DYNAMIC_SHARED(smem);
  __shared__ int64_t row_base[BM];
  __shared__ int row_ih0[BM], row_iw0[BM];
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  conv_tile<T, BM>(p, m0, smem, row_base, row_ih0, row_iw0);

  const float* Es = reinterpret_cast<const float*>(smem);
  const T* bias = static_cast<const T*>(p.bias);
  const T* gamma = static_cast<const T*>(p.ln_weight);
  const T* beta = static_cast<const T*>(p.ln_bias);
  T* out = static_cast<T*>(p.out);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lde = e_pitch(p.C_pad);
  const float inv_c = 1.0f / float(p.C);
  for (int r = warp; r < BM; r += kWarps) {
    const int64_t m = m0 + r;
    if (m >= p.M) break;
    const float* row = Es + r * lde;
    // A lane only ever touches its own columns c = lane + 32j, so no sync between passes.
    float sum = 0.0f;
    for (int c = lane; c < p.C; c += 32) sum += row[c] + (bias ? Scalar<T>::to_float(bias[c]) : 0.0f);
    const float mean = warp_sum(sum) * inv_c;
    float sq = 0.0f;
    for (int c = lane; c < p.C; c += 32) {
      const float d = row[c] + (bias ? Scalar<T>::to_float(bias[c]) : 0.0f) - mean;
      sq += d * d;
    }
    const float rstd = rsqrtf(warp_sum(sq) * inv_c + p.eps);
    T* o = out + m * p.C;
    for (int c = lane; c < p.C; c += 32) {
      const float y = row[c] + (bias ? Scalar<T>::to_float(bias[c]) : 0.0f);
      o[c] = Scalar<T>::from_float((y - mean) * rstd * Scalar<T>::to_float(gamma[c]) + Scalar<T>::to_float(beta[c]));
    }
    if (lane == 0) {
      p.mean[m] = mean;
      p.rstd[m] = rstd;
    }
  }
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) patch_embed_bwd_kernel(const PatchEmbedParams p) {
  FASTSEG_DYNAMIC_SHARED(smem);
  __shared__ int64_t row_base[BM];
  __shared__ int row_ih0[BM], row_iw0[BM];
  __shared__ float row_mean[BM], row_rstd[BM], row_a[BM], row_b[BM];
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  conv_tile<T, BM>(p, m0, smem, row_base, row_ih0, row_iw0);

  float* Es = reinterpret_cast<float*>(smem);
  const T* bias = static_cast<const T*>(p.bias);
  const T* gamma = static_cast<const T*>(p.ln_weight);
  const T* grad = static_cast<const T*>(p.grad_out);
  T* grad_y = static_cast<T*>(p.grad_y);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, lde = e_pitch(p.C_pad);
  const float inv_c = 1.0f / float(p.C);

  // Pass 1, a warp per row: y = acc + bias (kept in Es), a = mean(g*gamma), b = mean(g*gamma*xhat).
  for (int r = warp; r < BM; r += kWarps) {
    const int64_t m = m0 + r;
    float mean = 0.0f, rstd = 0.0f, a = 0.0f, b = 0.0f;
    if (m < p.M) {
      mean = p.mean_in[m];
      rstd = p.rstd_in[m];
      float* row = Es + r * lde;
      const T* g = grad + m * p.C;
      for (int c = lane; c < p.C; c += 32) {
        const float y = row[c] + (bias ? Scalar<T>::to_float(bias[c]) : 0.0f);
        row[c] = y;
        const float dh = Scalar<T>::to_float(g[c]) * Scalar<T>::to_float(gamma[c]);
        a += dh;
        b += dh * (y - mean) * rstd;
      }
      a = warp_sum(a) * inv_c;
      b = warp_sum(b) * inv_c;
    }
    if (lane == 0) {
      row_mean[r] = mean;
      row_rstd[r] = rstd;
      row_a[r] = a;
      row_b[r] = b;
    }
  }
  __syncthreads();

  // Pass 2, a thread per column: dy for every row of the tile, and the column sums.
  const int rows = p.M - m0 < BM ? int(p.M - m0) : BM;
  float* part = p.partial + int64_t(blockIdx.x) * 3 * p.C;
  for (int c = tid; c < p.C; c += kThreads) {
    const float gm = Scalar<T>::to_float(gamma[c]);
    float dgamma = 0.0f, dbeta = 0.0f, dbias = 0.0f;
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const float xhat = (Es[r * lde + c] - row_mean[r]) * row_rstd[r];
      const float g = Scalar<T>::to_float(grad[m * p.C + c]);
      const float dy = row_rstd[r] * (g * gm - row_a[r] - xhat * row_b[r]);
      grad_y[m * p.C + c] = Scalar<T>::from_float(dy);
      dgamma += g * xhat;
      dbeta += g;
      dbias += dy;
    }
    part[c] = dgamma;
    part[p.C + c] = dbeta;
    part[2 * p.C + c] = dbias;
  }
}

int block_m_for(int C_pad) {
  return C_pad <= max_channels_for(64) ? 64 : C_pad <= max_channels_for(32) ? 32 : 16;
}

template <typename T>
size_t smem_bytes(int BM, int C_pad) {
  return BM == 64 ? smem_bytes_for<T, 64>(C_pad) : BM == 32 ? smem_bytes_for<T, 32>(C_pad)
                                                              : smem_bytes_for<T, 16>(C_pad);
}

template <typename Kernel>
const char* launch(Kernel kernel, const LaunchPlan& plan, const PatchEmbedParams& p, void* stream) {
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_bytes));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  FASTSEG_LAUNCH(kernel, dim3(unsigned(plan.num_blocks)), dim3(kThreads), plan.smem_bytes,
                 static_cast<cudaStream_t>(stream), p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, bool kBackward>
const char* launch_typed(const PatchEmbedParams& p, const LaunchPlan& plan, void* stream) {
  switch (plan.block_m) {
    case 64:
      return kBackward ? launch(patch_embed_bwd_kernel<T, 64>, plan, p, stream)
                       : launch(patch_embed_fwd_kernel<T, 64>, plan, p, stream);
    case 32:
      return kBackward ? launch(patch_embed_bwd_kernel<T, 32>, plan, p, stream)
                       : launch(patch_embed_fwd_kernel<T, 32>, plan, p, stream);
    case 16:
      return kBackward ? launch(patch_embed_bwd_kernel<T, 16>, plan, p, stream)
                       : launch(patch_embed_fwd_kernel<T, 16>, plan, p, stream);
    default:
      return "internal error: unsupported row tile";
  }
}

template <bool kBackward>
const char* launch_any(const PatchEmbedParams& p, DType dtype, const LaunchPlan& plan, void* stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float, kBackward>(p, plan, stream);
    case DType::kFloat16:
      return launch_typed<__half, kBackward>(p, plan, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, kBackward>(p, plan, stream);
  }
  return "internal error: unsupported dtype";
}

}  // namespace

const char* plan_patch_embed(const PatchEmbedParams& p, DType dtype, LaunchPlan* plan) {
  if (p.C < 1 || p.C > kMaxChannels) return "the CUDA kernel supports 1 to 1024 output channels";
  if (p.C_pad % kChannelAlign != 0 || p.C_pad < p.C || p.K_pad % kBK != 0 || p.K_pad < p.K)
    return "internal error: packed weight sizes";
  if (p.M < 1) return "internal error: empty output";
  plan->block_m = block_m_for(p.C_pad);
  plan->num_blocks = (p.M + plan->block_m - 1) / plan->block_m;
  if (plan->num_blocks > 0x7fffffffLL) return "too many output tokens for one launch";
  plan->smem_bytes = dtype == DType::kFloat32 ? smem_bytes<float>(plan->block_m, p.C_pad)
                                              : smem_bytes<__half>(plan->block_m, p.C_pad);
  int device = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (plan->smem_bytes + 4096 > size_t(max_smem))  // + the kernels' static row arrays (< 4 KB)
    return "this GPU has too little shared memory per block for the kernel at this channel count";
  return nullptr;
}

const char* launch_patch_embed_fwd(const PatchEmbedParams& p, DType dtype, const LaunchPlan& plan, void* stream) {
  return launch_any<false>(p, dtype, plan, stream);
}

const char* launch_patch_embed_bwd(const PatchEmbedParams& p, DType dtype, const LaunchPlan& plan, void* stream) {
  return launch_any<true>(p, dtype, plan, stream);
}

}  // namespace cuda
}  // namespace fastseg
