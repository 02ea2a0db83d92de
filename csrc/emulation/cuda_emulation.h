// A CPU stand-in for the parts of CUDA that csrc/overlap_patch_embed_kernel.cu uses, so that the
// kernels compile as plain C++ (FASTSEG_CUDA_EMULATION) and run on CPU tensors in the tests
// (tests/cuda_emulator.py builds them). Test tooling only: never part of the installed package.
//
// Execution model. A launch runs its blocks one after another. A block's threads are user-space
// fibers (ucontext) on the calling OS thread, switched only at __syncthreads() and inside warp
// shuffles, the kernels' only synchronisation points. Code that is correct under CUDA's rules
// then computes what it computes on a GPU: shared memory is per block, writes before a barrier
// are seen after it, lanes exchange values through __shfl_xor_sync. Warp-collective WMMA calls
// are computed once per warp (by lane 0, which alone holds the fragments' values) on whole
// 16x16 tiles with float accumulation.
//
// Checked on top of running the code:
//  - barrier divergence (threads of a block waiting at different barriers, or some exited) and
//    deadlock;
//  - WMMA pointers 32-byte aligned and leading dimensions multiples of 16 bytes;
//  - dynamic shared memory: a launch asking for more than 48 KB without
//    cudaFuncSetAttribute(MaxDynamicSharedMemorySize), or more than the device has (an H100's
//    227 KB), fails as on a GPU; writes past the bytes asked for are caught by guard bytes;
//  - shared memory starts each block filled with 0xFF bytes (NaN in fp32, fp16 and bf16), so a
//    read of something never written shows up as NaN in the outputs the tests compare.
// Not shown: speed, races that real warps would expose, the memory model, the machine code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

// CUDA's declaration specifiers, as host C++. __shared__ variables are function-local statics:
// one copy shared by the threads of the (one) block being run.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

// Built-in variables: set by the scheduler before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace fastseg_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStaticSmemDefault = 48 * 1024;  // dynamic shared memory without the opt-in
constexpr int kDeviceMaxSmemOptin = 232448;       // an H100's cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr size_t kGuardBytes = 4096;
constexpr size_t kFiberStack = 256 * 1024;

enum class State { kRunnable, kAtSyncthreads, kAtWarpSync, kExited };

struct Block {
  int nthreads = 0;
  std::vector<ucontext_t> ctx;
  std::vector<State> state;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<float> shuffle;  // one slot per thread
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  unsigned char* smem = nullptr;
  std::string error;  // the first problem found
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}

inline void fail(const std::string& what) {
  if (block()->error.empty()) block()->error = what;
}

inline void wait_at(State s) {
  Block* b = block();
  b->state[b->current] = s;
  swapcontext(&b->ctx[b->current], &b->scheduler);
}

inline void fiber_main() {
  Block* b = block();
  b->body();
  b->state[b->current] = State::kExited;  // returns to the scheduler through uc_link
}

inline int lane() { return int(threadIdx.x) % kWarpSize; }

// Runs every thread until it waits or exits, then releases a barrier that everyone it concerns
// has reached; repeats until all threads have exited. False (with b.error set) on a stuck block.
inline bool run_threads(Block& b) {
  for (;;) {
    for (int t = 0; t < b.nthreads; ++t) {
      if (b.state[t] != State::kRunnable) continue;
      b.current = t;
      threadIdx = uint3{unsigned(t), 0, 0};
      swapcontext(&b.scheduler, &b.ctx[t]);
    }
    int exited = 0, at_sync = 0;
    for (State s : b.state) {
      exited += s == State::kExited;
      at_sync += s == State::kAtSyncthreads;
    }
    if (exited == b.nthreads) return true;
    bool released = false;
    if (at_sync > 0 && at_sync + exited == b.nthreads) {
      if (exited > 0) {
        fail("__syncthreads() reached by " + std::to_string(at_sync) + " threads while " + std::to_string(exited) +
             " had exited");
        return false;
      }
      for (State& s : b.state) s = State::kRunnable;
      released = true;
    }
    for (int w = 0; w < b.nthreads / kWarpSize; ++w) {
      int waiting = 0;
      for (int l = 0; l < kWarpSize; ++l) waiting += b.state[w * kWarpSize + l] == State::kAtWarpSync;
      if (waiting == kWarpSize) {
        for (int l = 0; l < kWarpSize; ++l) b.state[w * kWarpSize + l] = State::kRunnable;
        released = true;
      }
    }
    if (!released) {
      fail("deadlock: the threads of a block wait at different barriers (divergent __syncthreads or shuffle)");
      return false;
    }
  }
}

struct Device {
  std::mutex mutex;  // one launch at a time
  std::map<const void*, int> max_dynamic_smem;  // set by cudaFuncSetAttribute
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
};

inline Device& device() {
  static Device d;
  return d;
}

inline cudaError_t launch_failed(const std::string& message) {
  device().last_error = cudaErrorLaunchFailure;
  device().last_message = message;
  return cudaErrorLaunchFailure;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads, size_t smem_bytes, cudaStream_t, Args&&... args) {
  Device& dev = device();
  std::lock_guard<std::mutex> lock(dev.mutex);
  if (grid.y != 1 || grid.z != 1 || threads.y != 1 || threads.z != 1 || threads.x % kWarpSize != 0) {
    launch_failed("emulation: only 1-D grids of 1-D blocks of whole warps are emulated");
    return;
  }
  const auto opt_in = dev.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = opt_in == dev.max_dynamic_smem.end() ? kStaticSmemDefault : size_t(opt_in->second);
  if (smem_bytes > allowed) {
    dev.last_error = cudaErrorInvalidValue;
    dev.last_message = "invalid argument: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory, " +
                       std::to_string(allowed) + " allowed for this kernel";
    return;
  }
  Block b;
  b.nthreads = int(threads.x);
  b.ctx.resize(b.nthreads);
  b.state.resize(b.nthreads);
  b.shuffle.resize(b.nthreads);
  for (int t = 0; t < b.nthreads; ++t) b.stacks.emplace_back(new char[kFiberStack]);
  void* raw = nullptr;
  if (posix_memalign(&raw, 128, smem_bytes + kGuardBytes) != 0) {
    launch_failed("emulation: out of host memory");
    return;
  }
  std::unique_ptr<void, decltype(&std::free)> smem(raw, &std::free);
  b.smem = static_cast<unsigned char*>(raw);
  b.body = [&] { kernel(args...); };
  blockDim = threads;
  gridDim = grid;
  Block* outer = block();
  block() = &b;
  for (unsigned bx = 0; bx < grid.x && b.error.empty(); ++bx) {
    blockIdx = uint3{bx, 0, 0};
    std::memset(b.smem, 0xFF, smem_bytes);
    std::memset(b.smem + smem_bytes, 0xA5, kGuardBytes);
    for (int t = 0; t < b.nthreads; ++t) {
      getcontext(&b.ctx[t]);
      b.ctx[t].uc_stack.ss_sp = b.stacks[t].get();
      b.ctx[t].uc_stack.ss_size = kFiberStack;
      b.ctx[t].uc_link = &b.scheduler;
      makecontext(&b.ctx[t], &fiber_main, 0);
      b.state[t] = State::kRunnable;
    }
    if (!run_threads(b)) break;
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (b.smem[smem_bytes + i] != 0xA5) {
        fail("block " + std::to_string(bx) + " wrote past the " + std::to_string(smem_bytes) +
             " bytes of dynamic shared memory it was launched with");
        break;
      }
    }
  }
  block() = outer;
  if (!b.error.empty()) launch_failed("emulation: " + b.error);
}

inline unsigned char* dynamic_shared() { return block()->smem; }

inline cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > kDeviceMaxSmemOptin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(device().mutex);
  device().max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}
template <typename... Params>
cudaError_t func_set_attribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

inline cudaError_t get_last_error() {
  const cudaError_t e = device().last_error;
  device().last_error = cudaSuccess;
  return e;
}

inline const char* error_string(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  return device().last_message.empty() ? "emulated CUDA error" : device().last_message.c_str();
}

inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = kDeviceMaxSmemOptin;
  return cudaSuccess;
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace fastseg_emu

#define cudaFuncSetAttribute ::fastseg_emu::func_set_attribute
#define cudaGetLastError ::fastseg_emu::get_last_error
#define cudaGetErrorString ::fastseg_emu::error_string
#define cudaGetDevice ::fastseg_emu::get_device
#define cudaDeviceGetAttribute ::fastseg_emu::device_get_attribute
#define FASTSEG_DYNAMIC_SHARED(name) unsigned char* name = ::fastseg_emu::dynamic_shared()
#define FASTSEG_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fastseg_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)

inline void __syncthreads() { fastseg_emu::wait_at(fastseg_emu::State::kAtSyncthreads); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = fastseg_emu::kWarpSize) {
  using namespace fastseg_emu;
  if (mask != 0xffffffffu || width != kWarpSize || lane_mask < 0 || lane_mask >= kWarpSize)
    fail("only full-warp __shfl_xor_sync with a lane mask below 32 is emulated");
  Block* b = block();
  const int t = b->current, warp_base = t - t % kWarpSize;
  b->shuffle[t] = v;
  wait_at(State::kAtWarpSync);  // every lane has written
  const float other = b->shuffle[warp_base + ((t % kWarpSize) ^ (lane_mask & (kWarpSize - 1)))];
  wait_at(State::kAtWarpSync);  // every lane has read before the slots are reused
  return other;
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

// nvcuda::wmma for 16x16x16 row-major tiles, fp32 accumulators. Only lane 0 of a warp holds the
// values; the calls are collective, so the other lanes only check their arguments.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
  T x[16 * 16];
};

template <typename T>
inline void check_tile(const char* what, const void* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    fastseg_emu::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    fastseg_emu::fail(std::string(what) + ": leading dimension " + std::to_string(ldm) + " is not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
  if (fastseg_emu::lane() == 0)
    for (T& e : f.x) e = T(v);
}

template <typename Use, typename T>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check_tile<T>("wmma::load_matrix_sync", p, ldm);
  if (fastseg_emu::lane() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = p[size_t(r) * ldm + c];
}

template <typename T>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, row_major>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (fastseg_emu::lane() != 0) return;
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k)
        acc += fastseg_emu::to_float(a.x[i * 16 + k]) * fastseg_emu::to_float(b.x[k * 16 + j]);
      out[i * 16 + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_tile<float>("wmma::store_matrix_sync", p, ldm);
  if (layout != mem_row_major) fastseg_emu::fail("wmma::store_matrix_sync: only mem_row_major is emulated");
  if (fastseg_emu::lane() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[size_t(r) * ldm + c] = f.x[r * 16 + c];
}

}  // namespace wmma
}  // namespace nvcuda
