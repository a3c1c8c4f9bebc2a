// The counter-based generator of the random-feature HSIC's Gaussian matrix W (docs/loss.md
// section 4b; sib_fast/backends/random_features.py is its definition), written once for the CPU
// kernels (cpu/projection_cpu.cpp), the CUDA ones (cuda/sib_projection_math.cuh) and the CUDA
// emulation:
//   a_d = mix(d ^ row_key), b_f = mix(f ^ col_key), h = mix(a_d + b_f)
//   W[d, 2j] = r cos(2 pi u2), W[d, 2j+1] = r sin(2 pi u2), r = sqrt(-2 ln u1),
//   u1 = ((h(d, 2j) >> 8) + 1) / 2^24, u2 = (h(d, 2j+1) >> 8) / 2^24.
//
// The float32 pair uses arithmetic only, so that the CPU loops vectorise (libm's logf, sinf and
// cosf do not, at -O3 without -ffast-math) and CUDA's --use_fast_math cannot swap in approximate
// intrinsics: Cephes' logf on the mantissa, and sine and cosine polynomials on an angle reduced
// exactly on u2's 24-bit grid; the square root is IEEE's on both. Each backend evaluates float64
// in its own way (the CPU with libm, CUDA with a Taylor series), so that pair is not here.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SIB_GENERATOR_FN __host__ __device__ __forceinline__
#else
#define SIB_GENERATOR_FN inline
#endif

namespace sib_fast {
namespace generator {

constexpr uint32_t kRowSalt = 0x243f6a88u, kColSalt = 0x85a308d3u;

// lowbias32 (random_features.mix)
SIB_GENERATOR_FN uint32_t mix32(uint32_t z) {
  z ^= z >> 16;
  z *= 0x7feb352du;
  z ^= z >> 15;
  z *= 0x846ca68bu;
  z ^= z >> 16;
  return z;
}

// (row_key, col_key) of a seed (random_features.keys), computed on the host.
struct SeedKeys {
  uint32_t row, col;
};
inline SeedKeys seed_keys(int64_t seed) {
  const uint32_t lo = static_cast<uint32_t>(static_cast<uint64_t>(seed)),
                 hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  return {mix32(lo ^ mix32(hi ^ kRowSalt)), mix32(hi ^ mix32(lo ^ kColSalt))};
}

SIB_GENERATOR_FN float bits_to_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

SIB_GENERATOR_FN int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

SIB_GENERATOR_FN float sqrt_rn(float v) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(v);  // sqrtf would be sqrt.approx under --use_fast_math
#else
  return std::sqrt(v);
#endif
}

// ln x for x in (0, 1], no libm call: Cephes' logf (mantissa in [sqrt(1/2), sqrt(2)), a degree-9
// polynomial of m - 1, the exponent's ln 2 in two parts); within 2 ulp, relative accuracy kept
// near x = 1 where ln x is small.
SIB_GENERATOR_FN float log_poly(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = (bits >> 23) - 126;  // x = m 2^e, m in [1/2, 1)
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? (m + m) - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// (cos, sin) of the rest of the angle, rotated by q quarter turns: (cos, sin) -> (-sin, cos) each.
template <typename T>
SIB_GENERATOR_FN void rotate(int32_t q, T cs, T sn, T* c, T* s) {
  const int32_t quarter = q & 3;
  *c = quarter == 0 ? cs : (quarter == 1 ? -sn : (quarter == 2 ? -cs : sn));
  *s = quarter == 0 ? sn : (quarter == 1 ? cs : (quarter == 2 ? -sn : -cs));
}

// One float32 Box-Muller pair from the two hash values h1 = h(d, 2j), h2 = h(d, 2j + 1).
SIB_GENERATOR_FN void gaussian_pair_f32(uint32_t h1, uint32_t h2, float* c, float* s) {
  const float u1 = static_cast<float>(static_cast<int32_t>(h1 >> 8) + 1) * 5.9604644775390625e-8f;
  const float radius = sqrt_rn(-2.0f * log_poly(u1));
  // 2 pi u2 reduced exactly on u2's 24-bit grid: the nearest quarter turn q and the rest
  // r in [-1/8, 1/8] turn; sin and cos of 2 pi r by Cephes' polynomials on [-pi/4, pi/4]
  const int32_t k = static_cast<int32_t>(h2 >> 8);
  const int32_t q = (k + (1 << 21)) >> 22;  // 0..4
  const float x = static_cast<float>(k - (q << 22)) * (6.28318530717958648f * 5.9604644775390625e-8f);
  const float z = x * x;
  const float sn = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float cs = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.0f;
  float cq, sq;
  rotate(q, cs, sn, &cq, &sq);
  *c = radius * cq;
  *s = radius * sq;
}

}  // namespace generator
}  // namespace sib_fast
