// CPU kernel of SegFormer's spatial-reduction attention (forward, inference): the CPU twin of
// kernels/sr_attention.py.
//
//   S = scale * Q_h K_hᵀ,  P = exp(S - rowmax S),  out_h = (P V_h) / rowsum P      per head h
//
// q: (B, N, C), kv: (B, Nkv, 2C) as the q / kv linears write them (k = kv[..., :C], v =
// kv[..., C:]), read in place through their strides; out: (B, N, C) contiguous, written in token
// layout (no head permutes). D = C / heads.
//
// Work: tasks of TM = 24 query rows of one (batch, head), over threads (at::parallel_for). K and V
// of a (batch, head) are packed by the thread that reaches it into panels of 16 columns (zero
// padded), so the micro-kernels read them contiguously: Kᵀ as (D, 16) panels, V as (Nkv, 16) panels. A task walks
// the KV in chunks of at most KC columns (one chunk at SegFormer's Nkv = 256): scores of its 24
// rows (24 x chunk floats, L1/L2 resident), softmax in fp32 with a running max and sum (online
// softmax: chunks after the first rescale the accumulated output), then P V accumulated into a
// 24 x D fp32 block, which is finally divided by the row sums and stored in q's dtype.
//
// Both products run on one register-blocked micro-kernel, C[6x16] (+)= A[6xK] B[Kx16]: with AVX2
// 12 ymm accumulators, two B loads and six broadcasts per step (FMA bound). Instruction sets are
// chosen at run time:
//   avx2         float32 math (bfloat16 inputs widened while packing / loading);
//   avx512       the same on AVX-512F: 6x32 tiles over two panels (12 zmm accumulators);
//   avx512_bf16  bfloat16 inputs only: both products as bf16 pair dot products (vdpbf16ps) into
//                fp32 accumulators, K and V packed as bf16 pairs, P rounded to bf16 (as eager bf16
//                attention does), softmax still fp32.
//
// Non-finite values follow the reference: a NaN or +inf score makes its row NaN (inf - inf in the
// exponent), -inf scores get probability 0, a row of only -inf scores is NaN (0 / 0), NaN / inf in
// V reach every output row that weights them. The running max uses max(m, -inf) = 0 as the shift
// for all -inf chunks (as flash attention does) so that an all -inf chunk cannot poison later ones.
#include "sr_attention.h"

#include "cpu_simd.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSEG_SRA_X86 1
#include <immintrin.h>
#else
#define FASTSEG_SRA_X86 0
#endif
// The AVX512-BF16 intrinsics and cpu-feature name need GCC 10 or newer; older compilers build
// without that path (bf16 then runs the widening float32 path).
#if FASTSEG_SRA_X86 && __GNUC__ >= 10
#define FASTSEG_SRA_BF16 1
#else
#define FASTSEG_SRA_BF16 0
#endif

namespace fastseg {
namespace {

constexpr int64_t MR = 6;    // micro-tile rows
constexpr int64_t NR = 16;   // micro-tile columns (a K / V panel)
constexpr int64_t TM = 24;   // query rows per task (4 micro-tiles)
constexpr int64_t KC = 512;  // most KV columns per chunk: a task's 24 x KC scores stay in L2

enum class Isa { none, avx2, avx512, avx512_bf16 };

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

Isa isa_for(c10::ScalarType dtype) {
#if FASTSEG_SRA_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
#if FASTSEG_SRA_BF16
  static const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
#else
  static const bool bf16 = false;
#endif
  if (dtype == at::kBFloat16 && bf16) return Isa::avx512_bf16;
  return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::none;
#else
  (void)dtype;
  return Isa::none;
#endif
}

FASTSEG_INLINE float widen(float v) { return v; }
FASTSEG_INLINE float widen(c10::BFloat16 v) { return static_cast<float>(v); }

// The geometry of one call: sizes, strides (elements) and the chunking of the KV.
struct Shape {
  int64_t B, N, Nkv, C, heads, D;
  int64_t sqb, sqn, skb, skn;  // q and kv batch / token strides
  int64_t Dp;                  // D rounded up to NR (the V panels' padded width)
  int64_t Nkvp;                // Nkv rounded up to NR (padded K / V rows)
  int64_t Lc;                  // chunk length (a multiple of NR; the last chunk may be shorter)
  float scale;
  bool avx512;                 // float32 products on AVX-512 (two panels per micro-kernel call)
};

#if FASTSEG_SRA_X86

// ----------------------------------------------------------------------------------------------
// AVX2 + FMA: float32 micro-kernel, exp, softmax of a chunk.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// C[6x16] (+)= A[6xK] B[Kx16]: A rows lda apart, B rows 16 contiguous floats, C rows ldc apart.
__attribute__((noinline)) void gemm_6x16_f32(const float* __restrict__ A, int64_t lda, const float* __restrict__ B,
                                             int64_t K, float* __restrict__ C, int64_t ldc, bool accumulate) {
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    c[r][0] = accumulate ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();
    c[r][1] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * NR), b1 = _mm256_loadu_ps(B + k * NR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(C + r * ldc, c[r][0]);
    _mm256_storeu_ps(C + r * ldc + 8, c[r][1]);
  }
}

// exp(x), relative error ~2e-7: x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial, 2^k built in the exponent bits. x < -87 gives 0 (no subnormals: their microcode
// assists are slow; exp(-87) ~ 2e-38 is nothing next to the row's sum >= 1), NaN stays NaN, x is
// clamped at 88 (never reached: every exponent here is <= 0).
FASTSEG_INLINE __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // false for NaN
  x = _mm256_max_ps(lo, x);                                // max/min return the 2nd operand on NaN
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  const __m256 kf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693145751953125f), x);  // ln 2 = hi + lo
  r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i k = _mm256_cvtps_epi32(kf);
  const __m256 pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2));
}

float exp_scalar(float x) { return _mm256_cvtss_f32(exp_avx2(_mm256_set1_ps(x))); }

FASTSEG_INLINE float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

FASTSEG_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Scores of `rows` rows (ls apart), columns [0, L) of this chunk, become exp(scale * s - m_r) in
// place; m (running max), l (running sum) and alpha (the factor by which the output accumulated
// over earlier chunks must be rescaled) are updated per row. first: this is the first chunk.
__attribute__((noinline)) void softmax_chunk(float* s, int64_t ls, int64_t rows, int64_t L, float scale, float* m,
                                             float* l, float* alpha, bool first) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ls;
    __m256 vmax = _mm256_set1_ps(kNegInf);
    int64_t j = 0;
    for (; j + 8 <= L; j += 8) vmax = _mm256_max_ps(vmax, _mm256_mul_ps(_mm256_loadu_ps(row + j), vscale));
    float mx = hmax(vmax);
    for (; j < L; ++j) mx = std::max(mx, row[j] * scale);
    const float m_old = first ? kNegInf : m[r];
    const float m_new = std::max(m_old, mx);
    const float shift = m_new == kNegInf ? 0.0f : m_new;  // an all -inf chunk: every p is 0
    const __m256 vshift = _mm256_set1_ps(shift);
    __m256 vsum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= L; j += 8) {
      const __m256 p = exp_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(row + j), vscale, vshift));
      _mm256_storeu_ps(row + j, p);
      vsum = _mm256_add_ps(vsum, p);
    }
    float sum = hsum(vsum);
    for (; j < L; ++j) {
      row[j] = exp_scalar(row[j] * scale - shift);
      sum += row[j];
    }
    if (first) {
      l[r] = sum;
    } else {
      alpha[r] = exp_scalar(m_old - shift);
      l[r] = l[r] * alpha[r] + sum;
    }
    m[r] = m_new;
  }
}

#pragma GCC pop_options

// ----------------------------------------------------------------------------------------------
// AVX-512F: the float32 micro-kernel on two adjacent 16-column panels at once (12 zmm accumulators).
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

// C[6x32] (+)= A[6xK] [B0 B1]: B0, B1 two panels of K rows of 16 floats; C's 32 columns contiguous.
__attribute__((noinline)) void gemm_6x32_f32_avx512(const float* __restrict__ A, int64_t lda,
                                                    const float* __restrict__ B0, const float* __restrict__ B1,
                                                    int64_t K, float* __restrict__ C, int64_t ldc, bool accumulate) {
  __m512 c[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    c[r][0] = accumulate ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();
    c[r][1] = accumulate ? _mm512_loadu_ps(C + r * ldc + NR) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(B0 + k * NR), b1 = _mm512_loadu_ps(B1 + k * NR);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * ldc, c[r][0]);
    _mm512_storeu_ps(C + r * ldc + NR, c[r][1]);
  }
}

#pragma GCC pop_options

// C[6 x 16] or C[6 x 32] (+)= A[6xK] B: `two` panels (B0, B1) on AVX-512, else one (B0).
FASTSEG_INLINE void gemm_f32(bool two, const float* A, int64_t lda, const float* B0, const float* B1, int64_t K,
                             float* C, int64_t ldc, bool accumulate) {
  if (two)
    gemm_6x32_f32_avx512(A, lda, B0, B1, K, C, ldc, accumulate);
  else
    gemm_6x16_f32(A, lda, B0, K, C, ldc, accumulate);
}

#if FASTSEG_SRA_BF16
// ----------------------------------------------------------------------------------------------
// AVX512-BF16: bf16 pair dot products into fp32.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

// C[6x16] (+)= A[6xK] B[Kx16] in bf16 pairs: A rows lda (bf16 elements) apart, K2 = K / 2 pairs;
// B holds K2 rows of 16 (k, k+1) pairs (32 bf16); C fp32 rows ldc apart.
__attribute__((noinline)) void gemm_6x16_bf16(const bf16_bits* __restrict__ A, int64_t lda,
                                              const bf16_bits* __restrict__ B, int64_t K2, float* __restrict__ C,
                                              int64_t ldc, bool accumulate) {
  __m512 c[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c[r] = accumulate ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    const __m512bh b = (__m512bh)_mm512_loadu_si512(B + k * 2 * NR);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * k, sizeof pair);
      c[r] = _mm512_dpbf16_ps(c[r], (__m512bh)_mm512_set1_epi32(pair), b);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(C + r * ldc, c[r]);
}

// dst[i] = bf16(src[i]) (round to nearest even) for i < n, then zeros up to n_pad.
__attribute__((noinline)) void to_bf16_row(const float* src, bf16_bits* dst, int64_t n, int64_t n_pad) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  for (; i < n_pad; ++i) dst[i] = 0;
}

#pragma GCC pop_options
#else
// Never called (isa_for never picks avx512_bf16 in such a build); they keep run<T, true> compiling.
void gemm_6x16_bf16(const bf16_bits*, int64_t, const bf16_bits*, int64_t, float*, int64_t, bool) {}
void to_bf16_row(const float*, bf16_bits*, int64_t, int64_t) {}
#endif  // FASTSEG_SRA_BF16

#endif  // FASTSEG_SRA_X86

// ----------------------------------------------------------------------------------------------
// Packing (plain C++, once per (batch, head) and thread: negligible next to the products).

// float32 panels. Kᵀ: panel p holds columns [16p, 16p + 16) as (D, 16), kt[p][d][j]; V: panel c
// holds channels [16c, 16c + 16) of all Nkvp rows as (Nkvp, 16), vp[c][j][d]. Zero padded.
template <typename T>
void pack_f32(const T* kv, const Shape& s, int64_t b, int64_t h, float* kt, float* vp) {
  const int64_t D = s.D;
  std::fill(kt, kt + s.Nkvp * D, 0.0f);
  std::fill(vp, vp + s.Nkvp * s.Dp, 0.0f);
  for (int64_t j = 0; j < s.Nkv; ++j) {
    const T* krow = kv + b * s.skb + j * s.skn + h * D;
    const T* vrow = krow + s.C;
    float* kdst = kt + (j / NR) * D * NR + (j % NR);
    for (int64_t d = 0; d < D; ++d) kdst[d * NR] = widen(krow[d]);
    for (int64_t d = 0; d < D; ++d) vp[(d / NR) * s.Nkvp * NR + j * NR + (d % NR)] = widen(vrow[d]);
  }
}

// bf16 pair panels (D is even). Kᵀ: panel p as (D/2, 16, 2): element (d, j) at
// p*D*16 + (d/2)*32 + (j%16)*2 + d%2. V: panel c as (Nkvp/2, 16, 2): element (j, d) at
// c*Nkvp*16 + (j/2)*32 + (d%16)*2 + j%2. Zero padded.
void pack_bf16(const bf16_bits* kv, const Shape& s, int64_t b, int64_t h, bf16_bits* kt, bf16_bits* vp) {
  const int64_t D = s.D;
  std::fill(kt, kt + s.Nkvp * D, bf16_bits(0));
  std::fill(vp, vp + s.Nkvp * s.Dp, bf16_bits(0));
  for (int64_t j = 0; j < s.Nkv; ++j) {
    const bf16_bits* krow = kv + b * s.skb + j * s.skn + h * D;
    const bf16_bits* vrow = krow + s.C;
    bf16_bits* kdst = kt + (j / NR) * D * NR + (j % NR) * 2;
    for (int64_t d = 0; d < D; ++d) kdst[(d / 2) * 2 * NR + (d % 2)] = krow[d];
    bf16_bits* vdst = vp + (j / 2) * 2 * NR + (j % 2);
    for (int64_t d = 0; d < D; ++d) vdst[(d / NR) * s.Nkvp * NR + (d % NR) * 2] = vrow[d];
  }
}

// ----------------------------------------------------------------------------------------------
// One task: rows [i0, i0 + TM) of (b, h).

struct Scratch {
  std::vector<float> q32, s, o, m, l, alpha;
  std::vector<bf16_bits> q16, p16;
  Scratch(const Shape& sh, bool bf16dot)
      : q32(bf16dot ? 0 : TM * sh.D), s(TM * sh.Lc), o(TM * sh.Dp), m(TM), l(TM), alpha(TM),
        q16(bf16dot ? TM * sh.D : 0), p16(bf16dot ? TM * sh.Lc : 0) {}
};

#if FASTSEG_SRA_X86

template <typename T, bool BF16DOT>
void attention_rows(const T* q, T* out, const Shape& sh, int64_t b, int64_t h, int64_t i0, const void* kt_bh,
                    const void* vp_bh, Scratch& w) {
  const int64_t step = sh.avx512 && !BF16DOT ? 2 : 1;  // panels per micro-kernel call
  const int64_t D = sh.D, Dp = sh.Dp, Lc = sh.Lc;
  const int64_t rows = std::min(TM, sh.N - i0);
  const int64_t tiles = (rows + MR - 1) / MR;
  const int64_t rows_p = tiles * MR;  // computed rows; the padding rows are zeros, never stored
  // The query rows: bf16 kept as pairs for the bf16 products, else widened to fp32.
  for (int64_t r = 0; r < rows_p; ++r) {
    const T* src = q + b * sh.sqb + (i0 + r) * sh.sqn + h * D;
    if constexpr (BF16DOT) {
      bf16_bits* dst = w.q16.data() + r * D;
      if (r < rows)
        std::memcpy(dst, src, D * sizeof(bf16_bits));
      else
        std::fill(dst, dst + D, bf16_bits(0));
    } else {
      float* dst = w.q32.data() + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = r < rows ? widen(src[d]) : 0.0f;
    }
  }
  float* S = w.s.data();
  float* O = w.o.data();
  for (int64_t j0 = 0; j0 < sh.Nkv; j0 += Lc) {
    const int64_t L = std::min(Lc, sh.Nkv - j0);
    const bool first = j0 == 0;
    const int64_t panels = (L + NR - 1) / NR;
    // S = Q Kᵀ over this chunk, panel by panel (a K panel stays in L1 across the row tiles).
    for (int64_t p = 0; p < panels; p += step) {
      const int64_t panel = j0 / NR + p;
      const bool two = step == 2 && p + 1 < panels;
      for (int64_t t = 0; t < tiles; ++t) {
        if constexpr (BF16DOT) {
          gemm_6x16_bf16(w.q16.data() + t * MR * D, D, static_cast<const bf16_bits*>(kt_bh) + panel * D * NR, D / 2,
                         S + t * MR * Lc + p * NR, Lc, false);
        } else {
          const float* B0 = static_cast<const float*>(kt_bh) + panel * D * NR;
          gemm_f32(two, w.q32.data() + t * MR * D, D, B0, B0 + D * NR, D, S + t * MR * Lc + p * NR, Lc, false);
        }
      }
    }
    softmax_chunk(S, Lc, rows_p, L, sh.scale, w.m.data(), w.l.data(), w.alpha.data(), first);
    if (!first)
      for (int64_t r = 0; r < rows_p; ++r)
        for (int64_t d = 0; d < Dp; ++d) O[r * Dp + d] *= w.alpha[r];
    // O (+)= P V over this chunk, V panel by panel.
    if constexpr (BF16DOT) {
      const int64_t L2 = (L + 1) / 2;  // pairs; an odd chunk (the last) ends with P = 0
      for (int64_t r = 0; r < rows_p; ++r) to_bf16_row(S + r * Lc, w.p16.data() + r * Lc, L, 2 * L2);
      for (int64_t c = 0; c < Dp / NR; ++c)
        for (int64_t t = 0; t < tiles; ++t)
          gemm_6x16_bf16(w.p16.data() + t * MR * Lc, Lc,
                         static_cast<const bf16_bits*>(vp_bh) + c * sh.Nkvp * NR + j0 * NR, L2, O + t * MR * Dp + c * NR,
                         Dp, !first);
    } else {
      for (int64_t c = 0; c < Dp / NR; c += step) {
        const bool two = step == 2 && c + 1 < Dp / NR;
        const float* B0 = static_cast<const float*>(vp_bh) + c * sh.Nkvp * NR + j0 * NR;
        for (int64_t t = 0; t < tiles; ++t)
          gemm_f32(two, S + t * MR * Lc, Lc, B0, B0 + sh.Nkvp * NR, L, O + t * MR * Dp + c * NR, Dp, !first);
      }
    }
  }
  // out = O / l, in token layout and q's dtype (1 / 0 for an all -inf row: 0 * inf = NaN).
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / w.l[r];
    T* dst = out + (b * sh.N + i0 + r) * sh.C + h * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(O[r * Dp + d] * inv);
  }
}

template <typename T, bool BF16DOT>
void run(const at::Tensor& q, const at::Tensor& kv, at::Tensor& out, const Shape& sh) {
  using Packed = std::conditional_t<BF16DOT, bf16_bits, float>;
  const T* qp = static_cast<const T*>(q.const_data_ptr());
  const T* kvp = static_cast<const T*>(kv.const_data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  const int64_t row_tiles = (sh.N + TM - 1) / TM;
  // At least ~64K multiply-adds per task, so that tiny problems stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (TM * sh.Nkvp * sh.Dp));
  // One parallel region (a second one, for packing, would add a barrier: costly on a loaded
  // machine). Tasks run in (batch, head, row tile) order and each thread packs the K / V of the
  // (batch, head) it reaches into its own buffer: a (batch, head) split between two threads is
  // packed twice, nothing more.
  at::parallel_for(0, sh.B * sh.heads * row_tiles, grain, [&](int64_t t0, int64_t t1) {
    Scratch w(sh, BF16DOT);
    std::vector<Packed> kt(sh.Nkvp * sh.D), vp(sh.Nkvp * sh.Dp);
    int64_t packed = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / row_tiles, tile = t % row_tiles;
      const int64_t b = bh / sh.heads, h = bh % sh.heads;
      if (bh != packed) {
        if constexpr (BF16DOT)
          pack_bf16(reinterpret_cast<const bf16_bits*>(kvp), sh, b, h, kt.data(), vp.data());
        else
          pack_f32(kvp, sh, b, h, kt.data(), vp.data());
        packed = bh;
      }
      attention_rows<T, BF16DOT>(qp, op, sh, b, h, tile * TM, kt.data(), vp.data(), w);
    }
  });
}

#endif  // FASTSEG_SRA_X86

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "";
  }
}

}  // namespace

std::string sr_attention_cpu_isa(c10::ScalarType dtype) { return isa_name(isa_for(dtype)); }

at::Tensor sr_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& kv, int64_t num_heads, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 3, "sr_attention_fwd: q and kv must be rank 3, (B, N, C) and (B, Nkv, 2C); "
              "got ", q.sizes(), " and ", kv.sizes());
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "sr_attention_fwd: this kernel takes CPU tensors, q is on ",
              q.device(), " and kv on ", kv.device());
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "sr_attention_fwd: q is ", q.scalar_type(), " but kv is ",
              kv.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "sr_attention_fwd: q and kv must be float32 or bfloat16, got ", q.scalar_type());
  const int64_t B = q.size(0), N = q.size(1), C = q.size(2), Nkv = kv.size(1);
  TORCH_CHECK(kv.size(0) == B && kv.size(2) == 2 * C, "sr_attention_fwd: kv must be (B=", B, ", Nkv, 2C=", 2 * C,
              "), got ", kv.sizes());
  TORCH_CHECK(B > 0 && N > 0 && Nkv > 0 && C > 0, "sr_attention_fwd: empty input, q ", q.sizes(), ", kv ",
              kv.sizes());
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, "sr_attention_fwd: ", C, " channels are not divisible into ",
              num_heads, " heads");
  const int64_t D = C / num_heads;
  TORCH_CHECK(D % 8 == 0, "sr_attention_fwd: head dim ", D, " is not a multiple of 8");
  TORCH_CHECK(q.stride(2) == 1 && kv.stride(2) == 1, "sr_attention_fwd: q and kv need stride 1 over channels, got ",
              q.strides(), " and ", kv.strides());
  const Isa isa = isa_for(q.scalar_type());
  TORCH_CHECK(isa != Isa::none, "sr_attention_fwd: this CPU (or build) lacks AVX2 + FMA, which the kernel needs");

  Shape sh{};
  sh.B = B, sh.N = N, sh.Nkv = Nkv, sh.C = C, sh.heads = num_heads, sh.D = D;
  sh.sqb = q.stride(0), sh.sqn = q.stride(1), sh.skb = kv.stride(0), sh.skn = kv.stride(1);
  sh.Dp = round_up(D, NR);
  sh.Nkvp = round_up(Nkv, NR);
  const int64_t chunks = (Nkv + KC - 1) / KC;
  sh.Lc = round_up((Nkv + chunks - 1) / chunks, NR);  // equal chunks, each a whole number of panels
  sh.scale = static_cast<float>(scale);
  sh.avx512 = isa == Isa::avx512;

  at::Tensor out = at::empty({B, N, C}, q.options().memory_format(at::MemoryFormat::Contiguous));
#if FASTSEG_SRA_X86
  if (q.scalar_type() == at::kFloat)
    run<float, false>(q, kv, out, sh);
  else if (isa == Isa::avx512_bf16)
    run<c10::BFloat16, true>(q, kv, out, sh);
  else
    run<c10::BFloat16, false>(q, kv, out, sh);
#endif
  return out;
}

}  // namespace fastseg
