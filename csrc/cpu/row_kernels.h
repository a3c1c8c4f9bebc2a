// Inner loops of the CPU kernels over one image row (W values) of all B images.
//
// Each is a plain loop over contiguous buffers that the compiler vectorises;
// on x86-64 with GCC it is also built for AVX2 and picked at run time
// (target_clones), so the extension stays portable without -march flags.
// No FMA is enabled, so both versions round alike element by element.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SIB_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define SIB_MULTIVERSION
#endif

namespace sib_fast {

// The scan of the rank selection: counts the values below lo and writes the (value, index)
// pairs with lo <= value <= hi to `out` (room for n), returning how many. Branch-free:
// every pair is written and the cursor advances only for a candidate, since a branch on
// either test would mispredict at random.
template <typename acc_t>
SIB_MULTIVERSION int64_t scan_window(const acc_t* v, int64_t n, acc_t lo, acc_t hi, std::pair<acc_t, int64_t>* out,
                                     int64_t* below) {
  int64_t count = 0, kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = v[i];
    count += x < lo;
    out[kept] = {x, i};
    kept += (x >= lo) & (x <= hi);
  }
  *below = count;
  return kept;
}

// dst[w] = src[w * stride], converted to the compute type.
template <typename scalar_t, typename acc_t>
SIB_MULTIVERSION void load_row(const scalar_t* src, int64_t stride, acc_t* dst, int64_t n) {
  if (stride == 1) {
    for (int64_t w = 0; w < n; ++w) dst[w] = static_cast<acc_t>(src[w]);
  } else {
    for (int64_t w = 0; w < n; ++w) dst[w] = static_cast<acc_t>(src[w * stride]);
  }
}

template <typename scalar_t, typename acc_t>
SIB_MULTIVERSION void store_row(const acc_t* src, scalar_t* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    for (int64_t w = 0; w < n; ++w) dst[w] = static_cast<scalar_t>(src[w]);
  } else {
    for (int64_t w = 0; w < n; ++w) dst[w * stride] = static_cast<scalar_t>(src[w]);
  }
}

// Masked row of one image: u = M r, v = M x, background b = r (1 - M);
// returns the sums of b and b^2 through s1, s2.
template <typename acc_t>
SIB_MULTIVERSION void mask_row(const acc_t* r, const acc_t* x, const acc_t* m, acc_t* u, acc_t* v, int64_t n,
                               acc_t* s1, acc_t* s2) {
  acc_t sum = 0, sumsq = 0;
#pragma omp simd reduction(+ : sum, sumsq)
  for (int64_t w = 0; w < n; ++w) {
    const acc_t background = r[w] * (acc_t(1) - m[w]);
    u[w] = m[w] * r[w];
    v[w] = m[w] * x[w];
    sum += background;
    sumsq += background * background;
  }
  *s1 = sum;
  *s2 = sumsq;
}

// gram[i, j] += <U_i, U_j> for i <= j, U a (B, n) row block; the dot of one row
// is summed in acc_t and added in double.
template <typename acc_t>
SIB_MULTIVERSION void gram_update(const acc_t* U, int64_t B, int64_t n, double* gram) {
  for (int64_t i = 0; i < B; ++i) {
    const acc_t* ui = U + i * n;
    for (int64_t j = i; j < B; ++j) {
      const acc_t* uj = U + j * n;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t w = 0; w < n; ++w) dot += ui[w] * uj[w];
      gram[i * B + j] += static_cast<double>(dot);
    }
  }
}

// T = A U for A (B, B) and U (B, n): T_i = sum_j A_ij U_j. Blocks of kRows
// output rows by kCols columns keep their sums in registers and load each U_j
// chunk once for kRows rows.
template <typename acc_t>
SIB_MULTIVERSION void mix_rows(const acc_t* A, const acc_t* U, int64_t B, int64_t n, acc_t* T) {
  // 32-byte vectors of the compiler's vector extension: AVX2 registers in the
  // avx2 clone, pairs of SSE registers in the default one.
  typedef acc_t vec __attribute__((vector_size(32)));
  constexpr int64_t kLanes = 32 / sizeof(acc_t), kRows = 4, kCols = 2 * kLanes;
  const int64_t full = n - n % kCols;
  for (int64_t i0 = 0; i0 < B; i0 += kRows) {
    const int64_t rows = std::min(kRows, B - i0);
    for (int64_t w0 = 0; w0 < full; w0 += kCols) {
      vec acc[kRows][2] = {};
      for (int64_t j = 0; j < B; ++j) {
        vec u0, u1;
        std::memcpy(&u0, U + j * n + w0, sizeof(vec));
        std::memcpy(&u1, U + j * n + w0 + kLanes, sizeof(vec));
        for (int64_t r = 0; r < kRows; ++r) {
          const acc_t a = r < rows ? A[(i0 + r) * B + j] : acc_t(0);
          acc[r][0] += a * u0;
          acc[r][1] += a * u1;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(T + (i0 + r) * n + w0, &acc[r][0], sizeof(vec));
        std::memcpy(T + (i0 + r) * n + w0 + kLanes, &acc[r][1], sizeof(vec));
      }
    }
    for (int64_t r = 0; r < rows; ++r)  // the last n % kCols columns
      for (int64_t w = full; w < n; ++w) {
        acc_t sum = 0;
        for (int64_t j = 0; j < B; ++j) sum += A[(i0 + r) * B + j] * U[j * n + w];
        T[(i0 + r) * n + w] = sum;
      }
  }
}

// exp for float without a call, so loops over it vectorise: Cephes' polynomial
// on [-ln2/2, ln2/2] scaled by 2^k, within 2 ulp of expf; NaN stays NaN.
inline float exp_poly(float x) {
  float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
  xc = xc < -87.3365478515625f ? -87.3365478515625f : xc;
  // round to nearest by the 1.5 * 2^23 trick (|xc log2 e| < 2^22): no libm call, no branch
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = c10::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  return x != x ? x : y * scale;
}

inline double exp_poly(double x) { return std::exp(x); }  // float64 keeps libm's exp

// out = sigmoid(slope * ((f(in) - shift) / range - offset)), f = |.| if `absolute`, else identity.
template <typename acc_t>
SIB_MULTIVERSION void sigmoid_row(const acc_t* in, bool absolute, acc_t shift, acc_t range, acc_t offset,
                                  acc_t slope, acc_t* out, int64_t n) {
  if (absolute) {
#pragma omp simd
    for (int64_t w = 0; w < n; ++w)
      out[w] = acc_t(1) / (acc_t(1) + exp_poly(-slope * ((std::abs(in[w]) - shift) / range - offset)));
  } else {
#pragma omp simd
    for (int64_t w = 0; w < n; ++w)
      out[w] = acc_t(1) / (acc_t(1) + exp_poly(-slope * ((in[w] - shift) / range - offset)));
  }
}

// Backward of one image row of one channel, given Tu = dL/du and Tv = dL/dv of the masked
// rows (u = M r, v = M x) and the background term's dBG/dr = bg_scale (r (1 - M) - bg_mean):
// dM += r Tu + x Tv - r dBG/dr (the mask's share, summed over channels).
template <typename acc_t>
SIB_MULTIVERSION void mask_grad_row(const acc_t* r, const acc_t* x, const acc_t* m, const acc_t* Tu,
                                    const acc_t* Tv, acc_t bg_scale, acc_t bg_mean, acc_t* dM, int64_t n) {
#pragma omp simd
  for (int64_t w = 0; w < n; ++w) {
    const acc_t bg_grad = bg_scale * (r[w] * (acc_t(1) - m[w]) - bg_mean);
    dM[w] += r[w] * Tu[w] + x[w] * Tv[w] - r[w] * bg_grad;
  }
}

// dR = M Tu + (1 - M) dBG/dr + dg / C: R's gradient through the Gram term, the background
// term and the mask chain (dg = dL/dg, g the channel mean).
template <typename acc_t>
SIB_MULTIVERSION void vjp_grad_row(const acc_t* r, const acc_t* m, const acc_t* Tu, const acc_t* dg, acc_t inv_c,
                                   acc_t bg_scale, acc_t bg_mean, acc_t* dR, int64_t n) {
#pragma omp simd
  for (int64_t w = 0; w < n; ++w) {
    const acc_t keep = acc_t(1) - m[w];
    dR[w] = m[w] * Tu[w] + keep * (bg_scale * (r[w] * keep - bg_mean)) + dg[w] * inv_c;
  }
}

}  // namespace sib_fast
