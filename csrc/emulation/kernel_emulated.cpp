// The CUDA kernels of csrc/overlap_patch_embed_kernel.cu, compiled unchanged as host C++ on top of
// the CPU stand-in for CUDA (cuda_emulation.h). Test tooling only.
#define FASTSEG_CUDA_EMULATION 1
#include "overlap_patch_embed_kernel.cu"
