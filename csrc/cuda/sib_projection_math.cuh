// The generator of the random-feature HSIC's Gaussian matrix W on the device (docs/loss.md
// section 4b, sib_fast/backends/random_features.py), per compute type, for
// sib_projection_cuda.cu only. Float32 is the shared pair of projection_generator.h, arithmetic
// only, so --use_fast_math cannot swap approximate intrinsics into it (__sinf is off by 1e-6
// absolute even on [0, 2 pi)); the emulation (tests/cuda_emulation) runs the same operations as
// the GPU, up to FMA contraction. Float64 is untouched by fast math: log and sqrt are
// libdevice's (correctly rounded to 1 ulp), sine and cosine the Taylor series of the Triton
// kernels (7e-17).
#pragma once

#include <cstdint>

#include "projection_generator.h"

namespace sib_fast {
namespace cuda {
namespace projection {

using generator::mix32;
using generator::rotate;
using generator::seed_keys;
using generator::SeedKeys;

constexpr double kTwoPiOver2p24 = 6.283185307179586 * 5.9604644775390625e-8;

template <typename acc_t>
struct GaussianPair;

template <>
struct GaussianPair<float> {
  __device__ __forceinline__ static void eval(uint32_t h1, uint32_t h2, float* c, float* s) {
    generator::gaussian_pair_f32(h1, h2, c, s);
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
