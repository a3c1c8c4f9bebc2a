// Math of the S-IB head shared by the CPU and CUDA kernels (docs/loss.md sections 2-5),
// and the layout of the tensors the forward op saves for the backward op.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SIB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SIB_HOST_DEVICE inline
#endif

namespace sib_fast {

// Columns of image_stats (B, kImageStats), in the compute dtype.
enum ImageStat : int {
  kStatLow = 0,      // lo  = Q(a, 0.05)
  kStatMaskLevel,    // q80 = Q(a, 0.80); t1 = (q80 - lo) / (hi - lo + 1e-8)
  kStatHigh,         // hi  = Q(a, 0.95)
  kStatT2,           // t2  = Q(d, 0.80)
  kStatBgSum,        // sum of R * (1 - M) over the image
  kStatBgSumSq,      // sum of its squares
  kImageStats
};

// Rows of rank_index (B, kQuantiles, kRankWindow): which quantile of which plane.
enum Quantile : int { kQuantLow = 0, kQuantMaskLevel, kQuantHigh, kQuantT2, kQuantiles };

constexpr double kQuantileLevel[kQuantiles] = {0.05, 0.80, 0.95, 0.80};
constexpr int kRankWindow = 18;   // ranks floor(t) - 8 .. floor(t) + 9 (docs/loss.md section 2)
constexpr int kRanksBelow = 8;
constexpr double kRangeEps = 1e-8;   // hi - lo + 1e-8
constexpr double kNormEps = 1e-12;   // max(||u||, 1e-12)

// The ranks a soft quantile reads: [first, first + count), clipped to [0, n).
struct RankWindow {
  int64_t first;
  int count;
};

SIB_HOST_DEVICE RankWindow rank_window(int64_t n, double q) {
  const int64_t center = static_cast<int64_t>(std::floor(q * static_cast<double>(n - 1)));
  int64_t first = center - kRanksBelow;
  int64_t last = center + (kRankWindow - kRanksBelow - 1);
  first = first < 0 ? 0 : first;
  last = last > n - 1 ? n - 1 : last;
  return {first, static_cast<int>(last - first + 1)};
}

// Softmax weights of the ranks in the window: w_k ~ exp(-|rank_k - t| / T),
// normalised over the window (the truncation docs/loss.md section 2 allows).
SIB_HOST_DEVICE void rank_weights(int64_t n, double q, double temperature, RankWindow win,
                                  double* w) {
  const double t = q * static_cast<double>(n - 1);
  double dmin = 1e300;
  for (int k = 0; k < win.count; ++k) {
    const double dist = std::fabs(static_cast<double>(win.first + k) - t);
    dmin = dist < dmin ? dist : dmin;
  }
  double total = 0.0;
  for (int k = 0; k < win.count; ++k) {
    w[k] = std::exp(-(std::fabs(static_cast<double>(win.first + k) - t) - dmin) / temperature);
    total += w[k];
  }
  for (int k = 0; k < win.count; ++k) w[k] /= total;
}

// Unbiased variance of D values from their sum s1 and sum of squares s2 (docs/loss.md section 5).
// A sum of squares past the range (values of 1e19 in float32) is a variance past it too:
// +inf, where s2 - s1^2 / D would be inf - inf = NaN.
SIB_HOST_DEVICE double unbiased_variance(double s1, double s2, double D) {
  if (s2 > 1.7976931348623157e308) return s2;  // +inf
  // rounding can leave a variance of nearly constant values a little below 0; never a
  // negative variance (NaN stays NaN)
  const double v = (s2 - s1 * s1 / D) / (D - 1.0);
  return v < 0.0 ? 0.0 : v;
}

// docs/loss.md section 8 for the soft quantile: a plane holding NaN or +-Inf has Q = NaN, as the
// full-rank weighted sum of the reference is (far ranks weigh 0, and 0 * inf is NaN).
template <typename T>
SIB_HOST_DEVICE bool is_finite_value(T v) {
  return v - v == T(0);
}

template <typename T>
SIB_HOST_DEVICE T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

// d|g|/dg as autograd has it: sign(g), 0 at 0 (NaN stays NaN).
template <typename T>
SIB_HOST_DEVICE T sign_of(T g) {
  return g > T(0) ? T(1) : (g < T(0) ? T(-1) : (g == T(0) ? T(0) : g));
}

// The forward box mean of h (values in [0, 1]) runs on a dyadic grid: h rounded to a
// multiple of 2^-F, with F such that every sum of up to k * (k + 1) grid values stays
// below 2^52 quanta. Window sums are then exact, so windows that hold the same values in
// any arrangement give the same d and tie exactly (the rank selection then orders them by
// index, as the reference's stable sort). avg_pool2d sums each window in row order and
// may split such ties by an ulp; no running sum can reproduce that. Rounding h costs at
// most 2^-(F+1) (about 1e-13 for k = 31).
SIB_HOST_DEVICE int box_grid_bits(int64_t window) {
  int bits = 0;
  while (bits < 62 && (int64_t(1) << bits) <= window * (window + 1)) ++bits;
  return bits >= 52 ? 0 : 52 - bits;
}

// A key that orders values like a stable sort does: by value (-0 == +0, NaN
// last whatever its sign) in the top bits; ties then go by flat index.
SIB_HOST_DEVICE uint64_t order_bits(double v) {
  if (v != v) return ~uint64_t(0);  // every NaN sorts last
  if (v == 0.0) v = 0.0;            // -0 ties with +0
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits >> 63) ? ~bits : (bits | (uint64_t(1) << 63));
}

SIB_HOST_DEVICE uint32_t order_bits(float v) {
  if (v != v) return ~uint32_t(0);
  if (v == 0.0f) v = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits >> 31) ? ~bits : (bits | (uint32_t(1) << 31));
}

// The HSIC of docs/loss.md section 4 from the raw (symmetric) Gram matrices of
// u = R*M and v = x*M, and the factors of its backward. With G = dHSIC/dK
// (times the upstream gradient), the gradient of u_i is sum_j A_ij u_j where
//   A_ij = 2 G_ij / (n_i n_j) - [i == j] alpha_i / n_i^2,   alpha_i = 2 sum_j G_ij K_ij,
// n_i = max(||u_i||, 1e-12), and the alpha term only where the norm is not
// clamped (the clamp passes no gradient to the norm). Likewise A_v for v.
// `work` holds 4 B^2 + 3 B doubles. A_u/A_v may be null for the forward.
SIB_HOST_DEVICE double hsic_and_adjoint(const double* gram_u, const double* gram_v, int64_t B,
                                        double grad_hsic, double* A_u, double* A_v, double* work) {
  double* K = work;
  double* L = K + B * B;
  double* Kc = L + B * B;
  double* Lc = Kc + B * B;
  double* norm_u = Lc + B * B;
  double* norm_v = norm_u + B;
  double* means = norm_v + B;
  const double* grams[2] = {gram_u, gram_v};
  double* normalised[2] = {K, L};
  double* centred[2] = {Kc, Lc};
  double* norms[2] = {norm_u, norm_v};
  for (int m = 0; m < 2; ++m) {
    const double* gram = grams[m];
    double* Kn = normalised[m];
    double* n = norms[m];
    for (int64_t i = 0; i < B; ++i) {
      const double len = std::sqrt(gram[i * B + i]);
      n[i] = len > kNormEps ? len : kNormEps;
    }
    double grand = 0.0;
    for (int64_t i = 0; i < B; ++i) {
      double row = 0.0;
      for (int64_t j = 0; j < B; ++j) {
        Kn[i * B + j] = gram[i * B + j] / (n[i] * n[j]);
        row += Kn[i * B + j];
      }
      means[i] = row / static_cast<double>(B);
      grand += row;
    }
    grand /= static_cast<double>(B * B);
    // P K P with P = I - 1/B; K is symmetric, so its row and column means agree.
    for (int64_t i = 0; i < B; ++i)
      for (int64_t j = 0; j < B; ++j)
        centred[m][i * B + j] = Kn[i * B + j] - means[i] - means[j] + grand;
  }
  const double scale = 1.0 / static_cast<double>((B - 1) * (B - 1));
  double hsic = 0.0;
  for (int64_t i = 0; i < B * B; ++i) hsic += Kc[i] * Lc[i];
  hsic *= scale;
  if (A_u == nullptr) return hsic;
  // dHSIC/dK = Lc / (B-1)^2 and dHSIC/dL = Kc / (B-1)^2 (P is idempotent).
  double* adjoints[2] = {A_u, A_v};
  for (int m = 0; m < 2; ++m) {
    const double* G = centred[1 - m];
    const double* Kn = normalised[m];
    const double* n = norms[m];
    const double* gram = grams[m];
    double* A = adjoints[m];
    for (int64_t i = 0; i < B; ++i) {
      double alpha = 0.0;
      for (int64_t j = 0; j < B; ++j) {
        const double g = grad_hsic * scale * G[i * B + j];
        alpha += 2.0 * g * Kn[i * B + j];
        A[i * B + j] = 2.0 * g / (n[i] * n[j]);
      }
      if (std::sqrt(gram[i * B + i]) >= kNormEps) A[i * B + i] -= alpha / (n[i] * n[i]);
    }
  }
  return hsic;
}

}  // namespace sib_fast
