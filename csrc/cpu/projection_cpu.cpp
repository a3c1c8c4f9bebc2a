// CPU kernels of sib_fast::masked_projection_forward / _backward: the random-feature HSIC's
// projections (docs/loss.md section 4b, docs/random_features.md), with the D x F Gaussian matrix W
// never stored. Each entry is computed where it is used, from the counter-based generator of
// sib_fast/backends/random_features.py, in a small tile that lives in L1.
//
// Forward: a fixed grid of chunks over d (the flattened (C, H, W) index), one per task; a chunk
// walks its d-tiles, loads the masked rows u = R*M, v = x*M of all B images for the tile, builds
// the tile of W a block of features at a time and accumulates proj += [u; v]^T W_tile. The chunks'
// partial sums are added in chunk order, so results do not depend on the number of threads.
// Backward: one task per tile of pixels, all channels of each pixel in it, so grad_mask's sum over
// channels needs no reduction across tasks; W's tile for each channel is built again and
// du = grad_proj[0] W^T + 2 grad_sq[0] u (dv likewise) comes out of a tile product.
//
// Float32 (and half-precision inputs, computed in float32) evaluates W with the polynomials of
// projection_generator.h, which vectorise; float64 uses libm and matches the reference's W to
// rounding. No FMA, as in row_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/row_kernels.h"
#include "projection_generator.h"
#include "sib_head_host.h"

namespace sib_fast {
namespace {

// ---------------------------------------------------------------- the generator

using generator::mix32;
using generator::SeedKeys;

struct GaussianPairF {
  static inline void eval(uint32_t h1, uint32_t h2, float* c, float* s) { generator::gaussian_pair_f32(h1, h2, c, s); }
};

// Float64: the reference's formula (random_features.gaussian_matrix) with libm.
struct GaussianPairD {
  static inline void eval(uint32_t h1, uint32_t h2, double* c, double* s) {
    const double u1 = static_cast<double>((h1 >> 8) + 1u) * 5.9604644775390625e-8;
    const double u2 = static_cast<double>(h2 >> 8) * 5.9604644775390625e-8;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 6.283185307179586 * u2;
    *c = radius * std::cos(angle);
    *s = radius * std::sin(angle);
  }
};

template <typename acc_t>
using GaussianPair = typename std::conditional<std::is_same<acc_t, double>::value, GaussianPairD, GaussianPairF>::type;

// Forward layout: for each of nd rows (a = mix(d ^ row_key)) and nj pairs, the cosines in
// Wc[t * stride + j] and the sines in Ws[t * stride + j] (lanes over features).
template <typename acc_t>
SIB_MULTIVERSION void gaussian_rows(const uint32_t* a, int64_t nd, const uint32_t* b_even, const uint32_t* b_odd,
                                    int64_t nj, int64_t stride, acc_t* Wc, acc_t* Ws) {
  for (int64_t t = 0; t < nd; ++t) {
    const uint32_t at = a[t];
    acc_t* c = Wc + t * stride;
    acc_t* s = Ws + t * stride;
#pragma omp simd
    for (int64_t j = 0; j < nj; ++j) GaussianPair<acc_t>::eval(mix32(at + b_even[j]), mix32(at + b_odd[j]), c + j, s + j);
  }
}

// Backward layout: for each of nj pairs, rows 2j (cosines) and 2j + 1 (sines) of Wt, each of
// `lanes` consecutive d (lanes over d). The same operations element by element as gaussian_rows,
// so both see the same bits of W.
template <typename acc_t, int64_t lanes>  // lanes a constant: no remainder loop per pair
SIB_MULTIVERSION void gaussian_cols(const uint32_t* a, const uint32_t* b_even, const uint32_t* b_odd, int64_t nj,
                                    acc_t* Wt) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint32_t e = b_even[j], o = b_odd[j];
    acc_t* c = Wt + (2 * j) * lanes;
    acc_t* s = c + lanes;
#pragma omp simd
    for (int64_t t = 0; t < lanes; ++t) GaussianPair<acc_t>::eval(mix32(a[t] + e), mix32(a[t] + o), c + t, s + t);
  }
}

// ---------------------------------------------------------------- tile products

// 32-byte vectors of the compiler's vector extension (AVX2 registers in the avx2 clone).
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(acc_t);
};

constexpr int64_t kRowBlock = 4;  // rows of [u; v] (or of grad_proj) per register block

// out[r, j] += sum_{t < nd} U[r, t] Wt[t, j] for r < rows (a multiple of kRowBlock), j < cols
// (a multiple of 2 kLanes); U rows `ld_u` apart, Wt rows `ld_w`, out rows `ld_out`. The forward
// takes proj += [u; v]^T W_tile with it, the backward du += grad_proj W_tile^T (cols = one tile).
template <typename acc_t>
SIB_MULTIVERSION void tile_product(const acc_t* U, int64_t ld_u, int64_t rows, int64_t nd, const acc_t* Wt,
                                   int64_t ld_w, int64_t cols, acc_t* out, int64_t ld_out) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock)
    for (int64_t j0 = 0; j0 < cols; j0 += 2 * L) {
      vec acc[kRowBlock][2] = {};
      for (int64_t t = 0; t < nd; ++t) {
        vec w0, w1;
        std::memcpy(&w0, Wt + t * ld_w + j0, sizeof(vec));
        std::memcpy(&w1, Wt + t * ld_w + j0 + L, sizeof(vec));
        for (int64_t r = 0; r < kRowBlock; ++r) {
          const acc_t u = U[(r0 + r) * ld_u + t];
          acc[r][0] += u * w0;
          acc[r][1] += u * w1;
        }
      }
      for (int64_t r = 0; r < kRowBlock; ++r) {
        acc_t* o = out + (r0 + r) * ld_out + j0;
        vec o0, o1;
        std::memcpy(&o0, o, sizeof(vec));
        std::memcpy(&o1, o + L, sizeof(vec));
        o0 += acc[r][0];
        o1 += acc[r][1];
        std::memcpy(o, &o0, sizeof(vec));
        std::memcpy(o + L, &o1, sizeof(vec));
      }
    }
}

// ---------------------------------------------------------------- shared layout

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

struct Geometry {
  int64_t B, C, H, W, N, D, F, pairs, rows;  // rows: 2B rounded up to kRowBlock
  Geometry(const at::Tensor& R, int64_t features)
      : B(R.size(0)), C(R.size(1)), H(R.size(2)), W(R.size(3)), N(R.size(2) * R.size(3)),
        D(R.size(1) * R.size(2) * R.size(3)), F(features), pairs((features + 1) / 2),
        rows(round_up(2 * R.size(0), kRowBlock)) {}
};

// Offset of logical element d = c N + h W + w of image 0 under strides s.
inline int64_t offset_of(int64_t d, int64_t N, int64_t W, const at::Tensor& t) {
  const int64_t c = d / N, p = d - c * N, h = p / W, w = p - h * W;
  return c * t.stride(1) + h * t.stride(2) + w * t.stride(3);
}

// The hashed column keys b_f = mix(f ^ col_key) of the even and odd features, padded to `padded` pairs.
void column_keys(const SeedKeys& keys, int64_t padded, std::vector<uint32_t>& b_even, std::vector<uint32_t>& b_odd) {
  b_even.resize(padded);
  b_odd.resize(padded);
  for (int64_t j = 0; j < padded; ++j) {
    b_even[j] = mix32(static_cast<uint32_t>(2 * j) ^ keys.col);
    b_odd[j] = mix32(static_cast<uint32_t>(2 * j + 1) ^ keys.col);
  }
}

// ---------------------------------------------------------------- forward

constexpr int64_t kMaxChunks = 16;     // the forward's fixed grid over d
constexpr int64_t kMinChunkRows = 1024;
constexpr int64_t kTileRows = 32;      // d per tile of W in the forward
constexpr int64_t kPairBlock = 64;     // pairs of features per tile of W

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& R, const at::Tensor& x, const at::Tensor& mask_t, int64_t features,
                    int64_t seed, at::Tensor& proj_t, at::Tensor& sq_t) {
  const Geometry g(R, features);
  const SeedKeys keys = generator::seed_keys(seed);
  constexpr int64_t L = Vec<acc_t>::kLanes;
  const int64_t padded_pairs = round_up(g.pairs, 2 * L);
  const int64_t ld = 2 * padded_pairs;  // a partial row: cosine columns, then sine columns
  std::vector<uint32_t> b_even, b_odd;
  column_keys(keys, padded_pairs, b_even, b_odd);

  const int64_t chunks = std::max<int64_t>(1, std::min(kMaxChunks, g.D / kMinChunkRows));
  const int64_t chunk_rows = (g.D + chunks - 1) / chunks;
  // from torch's allocator, so that its memory accounting sees them (1 MB at B = 16, F = 512)
  const at::Tensor partial_t = at::zeros({chunks, g.rows, ld}, mask_t.options());
  const at::Tensor partial_sq_t = at::zeros({chunks, 2 * g.B}, mask_t.options().dtype(at::kDouble));
  acc_t* partial = partial_t.data_ptr<acc_t>();
  double* partial_sq = partial_sq_t.data_ptr<double>();
  const scalar_t* Rp = R.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* mask = mask_t.data_ptr<acc_t>();
  const auto rs = R.strides(), xs = x.strides();

  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> U(g.rows * kTileRows, acc_t(0)), Wc(kTileRows * kPairBlock), Ws(kTileRows * kPairBlock);
    std::vector<uint32_t> a(kTileRows);
    std::vector<int64_t> off_r(kTileRows), off_x(kTileRows), pix(kTileRows);
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* out = partial + k * g.rows * ld;
      double* sq = partial_sq + k * 2 * g.B;
      const int64_t d_end = std::min(g.D, (k + 1) * chunk_rows);
      for (int64_t d0 = k * chunk_rows; d0 < d_end; d0 += kTileRows) {
        const int64_t nd = std::min(kTileRows, d_end - d0);
        // (c, h, w) of d0 once, then stepped: no division per element
        int64_t c = d0 / g.N, p = d0 - c * g.N, h = p / g.W, w = p - h * g.W;
        for (int64_t t = 0; t < nd; ++t) {
          off_r[t] = c * rs[1] + h * rs[2] + w * rs[3];
          off_x[t] = c * xs[1] + h * xs[2] + w * xs[3];
          pix[t] = h * g.W + w;
          a[t] = mix32(static_cast<uint32_t>(d0 + t) ^ keys.row);
          if (++w == g.W) {
            w = 0;
            if (++h == g.H) h = 0, ++c;
          }
        }
        for (int64_t b = 0; b < g.B; ++b) {
          const scalar_t* Rb = Rp + b * rs[0];
          const scalar_t* xb = xp + b * xs[0];
          const acc_t* mb = mask + b * g.N;
          acc_t* u = &U[b * kTileRows];
          acc_t* v = &U[(g.B + b) * kTileRows];
          double su = 0.0, sv = 0.0;
          for (int64_t t = 0; t < nd; ++t) {
            u[t] = mb[pix[t]] * static_cast<acc_t>(Rb[off_r[t]]);
            v[t] = mb[pix[t]] * static_cast<acc_t>(xb[off_x[t]]);
            su += static_cast<double>(u[t] * u[t]);
            sv += static_cast<double>(v[t] * v[t]);
          }
          sq[b] += su;
          sq[g.B + b] += sv;
        }
        for (int64_t j0 = 0; j0 < padded_pairs; j0 += kPairBlock) {
          const int64_t nj = std::min(kPairBlock, padded_pairs - j0);
          gaussian_rows(a.data(), nd, &b_even[j0], &b_odd[j0], nj, kPairBlock, Wc.data(), Ws.data());
          tile_product(U.data(), kTileRows, g.rows, nd, Wc.data(), kPairBlock, nj, out + j0, ld);
          tile_product(U.data(), kTileRows, g.rows, nd, Ws.data(), kPairBlock, nj, out + padded_pairs + j0,
                               ld);
        }
      }
    }
  });

  // the chunks' partials in chunk order, in double
  acc_t* proj = proj_t.data_ptr<acc_t>();  // (2, B, F): row r = m B + b of [u; v]
  for (int64_t r = 0; r < 2 * g.B; ++r)
    for (int64_t f = 0; f < g.F; ++f) {
      const int64_t col = (f % 2 == 0 ? 0 : padded_pairs) + f / 2;
      double total = 0.0;
      for (int64_t k = 0; k < chunks; ++k) total += static_cast<double>(partial[(k * g.rows + r) * ld + col]);
      proj[r * g.F + f] = static_cast<acc_t>(total);
    }
  acc_t* sq = sq_t.data_ptr<acc_t>();
  for (int64_t r = 0; r < 2 * g.B; ++r) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += partial_sq[k * 2 * g.B + r];
    sq[r] = static_cast<acc_t>(total);
  }
}

// ---------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& grad_proj, const at::Tensor& grad_sq, const at::Tensor& R, const at::Tensor& x,
                     const at::Tensor& mask_t, int64_t features, int64_t seed, at::Tensor& dR_t, at::Tensor* dx_t,
                     at::Tensor& dmask_t) {
  const Geometry g(R, features);
  const SeedKeys keys = generator::seed_keys(seed);
  constexpr int64_t kPixels = 2 * Vec<acc_t>::kLanes;  // pixels per task tile: one register row
  std::vector<uint32_t> b_even, b_odd;
  column_keys(keys, g.pairs, b_even, b_odd);

  // grad_proj as rows of [du; dv]'s factor, padded to g.rows; twice grad_sq per row
  const at::Tensor G_t = at::zeros({g.rows, g.F}, grad_proj.options());  // torch's allocator: counted
  acc_t* G = G_t.data_ptr<acc_t>();
  std::vector<acc_t> sq2(g.rows, acc_t(0));
  const acc_t* gp = grad_proj.data_ptr<acc_t>();
  std::copy(gp, gp + 2 * g.B * g.F, G);
  if (grad_sq.defined()) {
    const acc_t* gs = grad_sq.data_ptr<acc_t>();
    for (int64_t r = 0; r < 2 * g.B; ++r) sq2[r] = acc_t(2) * gs[r];
  }
  const scalar_t* Rp = R.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* dRp = dR_t.data_ptr<scalar_t>();
  scalar_t* dxp = dx_t ? dx_t->data_ptr<scalar_t>() : nullptr;
  const acc_t* mask = mask_t.data_ptr<acc_t>();
  acc_t* dmask = dmask_t.data_ptr<acc_t>();
  const int64_t tiles = (g.N + kPixels - 1) / kPixels;

  at::parallel_for(0, tiles, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> T(g.rows * kPixels), Wt(2 * kPairBlock * kPixels), dm(g.B * kPixels);
    std::vector<uint32_t> a(kPixels);
    std::vector<int64_t> off_r(kPixels), off_x(kPixels), off_dr(kPixels), off_dx(kPixels);
    for (int64_t tile = i0; tile < i1; ++tile) {
      const int64_t p0 = tile * kPixels, np = std::min(kPixels, g.N - p0);
      std::fill(dm.begin(), dm.end(), acc_t(0));
      for (int64_t t = 0; t < np; ++t) {  // the pixels' offsets in channel 0
        off_r[t] = offset_of(p0 + t, g.N, g.W, R);
        off_x[t] = offset_of(p0 + t, g.N, g.W, x);
        off_dr[t] = offset_of(p0 + t, g.N, g.W, dR_t);
        off_dx[t] = dx_t ? offset_of(p0 + t, g.N, g.W, *dx_t) : 0;
      }
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t d0 = c * g.N + p0;
        for (int64_t t = 0; t < kPixels; ++t)  // lanes past the image: hashed, never stored
          a[t] = mix32(static_cast<uint32_t>(d0 + t) ^ keys.row);
        const int64_t cr = c * R.stride(1), cx = c * x.stride(1), cdr = c * dR_t.stride(1),
                      cdx = dx_t ? c * dx_t->stride(1) : 0;
        std::fill(T.begin(), T.end(), acc_t(0));
        for (int64_t j0 = 0; j0 < g.pairs; j0 += kPairBlock) {
          const int64_t nj = std::min(kPairBlock, g.pairs - j0);
          gaussian_cols<acc_t, kPixels>(a.data(), &b_even[j0], &b_odd[j0], nj, Wt.data());
          const int64_t nf = std::min(2 * nj, g.F - 2 * j0);  // an odd F's last sine is not used
          tile_product(G + 2 * j0, g.F, g.rows, nf, Wt.data(), kPixels, kPixels, T.data(), kPixels);
        }
        for (int64_t b = 0; b < g.B; ++b) {
          const scalar_t* Rb = Rp + b * R.stride(0);
          const scalar_t* xb = xp + b * x.stride(0);
          const acc_t* mb = mask + b * g.N + p0;
          const acc_t* Tu = &T[b * kPixels];
          const acc_t* Tv = &T[(g.B + b) * kPixels];
          acc_t* dmb = &dm[b * kPixels];
          for (int64_t t = 0; t < np; ++t) {
            const acc_t r = static_cast<acc_t>(Rb[cr + off_r[t]]), xv = static_cast<acc_t>(xb[cx + off_x[t]]);
            const acc_t m = mb[t];
            const acc_t du = Tu[t] + sq2[b] * (m * r);
            const acc_t dv = Tv[t] + sq2[g.B + b] * (m * xv);
            dRp[b * dR_t.stride(0) + cdr + off_dr[t]] = static_cast<scalar_t>(m * du);
            if (dxp) dxp[b * dx_t->stride(0) + cdx + off_dx[t]] = static_cast<scalar_t>(m * dv);
            dmb[t] += r * du + xv * dv;  // channels in order: no race, no thread-count dependence
          }
        }
      }
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t t = 0; t < np; ++t) dmask[b * g.N + p0 + t] = dm[b * kPixels + t];
    }
  });
}

// ---------------------------------------------------------------- ops

void check_cpu_inputs(const at::Tensor& R, const at::Tensor& x, const at::Tensor& mask, int64_t features,
                      int64_t seed) {
  TORCH_CHECK(R.device().is_cpu() && x.device().is_cpu() && mask.device().is_cpu(),
              "masked_projection (CPU kernel): R, x and mask must be CPU tensors");
  check_projection_inputs(R, x, mask, features, seed);
}

std::tuple<at::Tensor, at::Tensor> masked_projection_forward_cpu(const at::Tensor& R, const at::Tensor& x,
                                                                 const at::Tensor& mask, int64_t features,
                                                                 int64_t seed) {
  check_cpu_inputs(R, x, mask, features, seed);
  const auto opts = R.options().dtype(compute_type(R));
  at::Tensor proj = at::empty({2, R.size(0), features}, opts);
  at::Tensor sq = at::empty({2, R.size(0)}, opts);
  const at::Tensor m = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "masked_projection_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(R, x, m, features, seed, proj, sq);
  });
  return {proj, sq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_projection_backward_cpu(
    const at::Tensor& grad_proj, const std::optional<at::Tensor>& grad_sq, const at::Tensor& R, const at::Tensor& x,
    const at::Tensor& mask, int64_t features, int64_t seed, bool compute_grad_x) {
  check_cpu_inputs(R, x, mask, features, seed);
  const auto acc = compute_type(R);
  const bool has_sq = grad_sq.has_value() && grad_sq->defined();
  check_projection_grads(grad_proj, has_sq ? &*grad_sq : nullptr, R, features);
  const at::Tensor gp = grad_proj.to(acc).contiguous();
  const at::Tensor gs = has_sq ? grad_sq->to(acc).contiguous() : at::Tensor();
  const at::Tensor m = mask.contiguous();
  at::Tensor dR = at::empty_like(R);
  at::Tensor dx = compute_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dmask = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "masked_projection_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(gp, gs, R, x, m, features, seed, dR, compute_grad_x ? &dx : nullptr, dmask);
  });
  return {dR, dx, dmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(sib_fast, CPU, m) {
  m.impl("masked_projection_forward", &masked_projection_forward_cpu);
  m.impl("masked_projection_backward", &masked_projection_backward_cpu);
}

}  // namespace sib_fast
