// The generator of the random-feature HSIC's Gaussian matrix W on the device (docs/loss.md
// section 4b, sib_fast/backends/random_features.py), per compute type, for
// sib_projection_cuda.cu only:
//   a_d = mix(d ^ row_key), b_f = mix(f ^ col_key), h = mix(a_d + b_f)
//   W[d, 2j] = r cos(2 pi u2), W[d, 2j+1] = r sin(2 pi u2), r = sqrt(-2 ln u1),
//   u1 = ((h(d, 2j) >> 8) + 1) / 2^24, u2 = (h(d, 2j+1) >> 8) / 2^24.
//
// The build passes --use_fast_math, which turns logf/sinf/cosf/sqrtf into approximate
// intrinsics (__sinf is off by 1e-6 absolute even on [0, 2 pi)). So the float32 pair uses
// only arithmetic: the CPU kernels' Cephes log polynomial (csrc/cpu/projection_cpu.cpp) and
// sine/cosine polynomials on an exactly reduced angle, with the IEEE square root __fsqrt_rn;
// the emulation (tests/cuda_emulation) then runs the same operations as the GPU, up to FMA
// contraction. Float64 is untouched by fast math: log and sqrt are libdevice's (correctly
// rounded to 1 ulp), sine and cosine the Taylor series of the Triton kernels (7e-17).
#pragma once

#include <cstdint>

namespace sib_fast {
namespace cuda {
namespace projection {

// lowbias32 (random_features.mix)
__host__ __device__ __forceinline__ uint32_t mix32(uint32_t z) {
  z ^= z >> 16;
  z *= 0x7feb352du;
  z ^= z >> 15;
  z *= 0x846ca68bu;
  z ^= z >> 16;
  return z;
}

constexpr uint32_t kRowSalt = 0x243f6a88u, kColSalt = 0x85a308d3u;

// (row_key, col_key) of a seed (random_features.keys), computed on the host.
struct SeedKeys {
  uint32_t row, col;
};
inline SeedKeys seed_keys(int64_t seed) {
  const uint32_t lo = static_cast<uint32_t>(static_cast<uint64_t>(seed)),
                 hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  return {mix32(lo ^ mix32(hi ^ kRowSalt)), mix32(hi ^ mix32(lo ^ kColSalt))};
}

constexpr float kTwoPiOver2p24f = 6.28318530717958648f * 5.9604644775390625e-8f;
constexpr double kTwoPiOver2p24 = 6.283185307179586 * 5.9604644775390625e-8;

__device__ __forceinline__ float sqrt_rn(float v) {
#ifdef SIB_CUDA_EMULATE
  return std::sqrt(v);
#else
  return __fsqrt_rn(v);  // sqrtf would be sqrt.approx under --use_fast_math
#endif
}

// ln x for x in (0, 1]: Cephes' logf, as log_poly of csrc/cpu/projection_cpu.cpp (within 2 ulp).
__device__ __forceinline__ float log_poly(float x) {
  const int32_t bits = static_cast<int32_t>(__float_as_uint(x));
  int32_t e = (bits >> 23) - 126;  // x = m 2^e, m in [1/2, 1)
  float m = __uint_as_float(static_cast<uint32_t>((bits & 0x007fffff) | 0x3f000000));
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

// (cos, sin) of the rest x (|x| <= pi / 4) of the angle, rotated by the quarter turns q.
template <typename T>
__device__ __forceinline__ void rotate(int32_t q, T cs, T sn, T* c, T* s) {
  const int32_t quarter = q & 3;
  *c = quarter == 0 ? cs : (quarter == 1 ? -sn : (quarter == 2 ? -cs : sn));
  *s = quarter == 0 ? sn : (quarter == 1 ? cs : (quarter == 2 ? -sn : -cs));
}

template <typename acc_t>
struct GaussianPair;

template <>
struct GaussianPair<float> {
  __device__ __forceinline__ static void eval(uint32_t h1, uint32_t h2, float* c, float* s) {
    const float u1 = static_cast<float>(static_cast<int32_t>(h1 >> 8) + 1) * 5.9604644775390625e-8f;
    const float radius = sqrt_rn(-2.0f * log_poly(u1));
    // 2 pi u2 reduced exactly on u2's 24-bit grid: the nearest quarter turn q and the rest
    const int32_t k = static_cast<int32_t>(h2 >> 8);
    const int32_t q = (k + (1 << 21)) >> 22;  // 0..4
    const float x = static_cast<float>(k - (q << 22)) * kTwoPiOver2p24f;
    const float z = x * x;
    const float sn = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
    const float cs = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                     0.5f * z + 1.0f;
    float cq, sq;
    rotate(q, cs, sn, &cq, &sq);
    *c = radius * cq;
    *s = radius * sq;
  }
};

template <>
struct GaussianPair<double> {
  __device__ __forceinline__ static void eval(uint32_t h1, uint32_t h2, double* c, double* s) {
    const double u1 = static_cast<double>((h1 >> 8) + 1u) * 5.9604644775390625e-8;
    const double radius = sqrt(-2.0 * log(u1));
    const int32_t k = static_cast<int32_t>(h2 >> 8);
    const int32_t q = (k + (1 << 21)) >> 22;
    const double x = static_cast<double>(k - (q << 22)) * kTwoPiOver2p24;
    const double x2 = x * x;
    // Taylor series to x^15 and x^16 (Horner), as _sin_cos_turns of the Triton kernels
    double sn = ((((((-1.0 / 1307674368000.0 * x2 + 1.0 / 6227020800.0) * x2 - 1.0 / 39916800.0) * x2 +
                    1.0 / 362880.0) * x2 - 1.0 / 5040.0) * x2 + 1.0 / 120.0) * x2 - 1.0 / 6.0) * x2;
    double cs = (((((((1.0 / 20922789888000.0 * x2 - 1.0 / 87178291200.0) * x2 + 1.0 / 479001600.0) * x2 -
                     1.0 / 3628800.0) * x2 + 1.0 / 40320.0) * x2 - 1.0 / 720.0) * x2 + 1.0 / 24.0) * x2 - 0.5) * x2;
    sn = x + x * sn;
    cs = 1.0 + cs;
    double cq, sq;
    rotate(q, cs, sn, &cq, &sq);
    *c = radius * cq;
    *s = radius * sq;
  }
};

// W[d, 2j] and W[d, 2j + 1] from the row hash a = a_d and the column hashes of 2j and 2j + 1.
template <typename acc_t>
__device__ __forceinline__ void gaussian_pair(uint32_t a, uint32_t b_cos, uint32_t b_sin, acc_t* c, acc_t* s) {
  GaussianPair<acc_t>::eval(mix32(a + b_cos), mix32(a + b_sin), c, s);
}

}  // namespace projection
}  // namespace cuda
}  // namespace sib_fast
