// Shared by the C++ CPU kernels: function multiversioning and bfloat16 <-> float32 on the bits.
#pragma once

#include <cstdint>
#include <cstring>

// Functions marked FASTSEG_CLONES are compiled three times (AVX-512, AVX2+FMA, baseline x86-64)
// and the loader picks the widest the CPU has (GCC function multiversioning): their plain loops
// vectorise for the machine they run on while the build stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSEG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTSEG_CLONES
#endif
#define FASTSEG_INLINE inline __attribute__((always_inline))

namespace fastseg {

using bf16_bits = uint16_t;  // bfloat16 storage: the high half of a float32

FASTSEG_INLINE float bf16_to_float(bf16_bits v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet bit set, so no NaN rounds into infinity).
// Branch-free, so loops of it vectorise.
FASTSEG_INLINE bf16_bits float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<bf16_bits>((bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

}  // namespace fastseg
