// CPU kernels of sib_fast::sib_head_forward / sib_head_backward (docs/loss.md sections 2-5, 7).
//
// Forward: one pass over R for the channel-mean plane, plane work per image
// (rank selection instead of sorting, prefix-sum box mean), then one pass over
// R, x and M that accumulates both raw Gram matrices and the background sums
// without writing R*M, x*M or R*(1-M).
// Backward: one pass over R and x writing dR (and dx) and accumulating the
// mask's gradient, plane work for the mask chain's adjoint, and one pass adding
// its share to dR. Reductions run over a fixed grid of row blocks and are
// summed in block order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/row_kernels.h"
#include "sib_head.h"
#include "sib_head_host.h"

namespace sib_fast {
namespace {

// Strided (B, C, H, W) access: any layout, channels_last included, without a copy.
template <typename T>
struct Strided4d {
  T* data;
  int64_t sb, sc, sh, sw;
  explicit Strided4d(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  T* row(int64_t b, int64_t c, int64_t h) const { return data + b * sb + c * sc + h * sh; }
};

struct Shape {
  int64_t B, C, H, W, N, D;
  explicit Shape(const at::Tensor& t)
      : B(t.size(0)), C(t.size(1)), H(t.size(2)), W(t.size(3)), N(t.size(2) * t.size(3)),
        D(t.size(1) * t.size(2) * t.size(3)) {}
};

// Row blocks of the big passes: a grid fixed by H alone, so that summing the
// per-block partials in order is deterministic whatever the thread count.
constexpr int64_t kMaxRowBlocks = 64;

struct RowBlocks {
  int64_t count, rows_per_block, H;
  explicit RowBlocks(int64_t H_) : H(H_) {
    count = std::min(H, kMaxRowBlocks);
    rows_per_block = (H + count - 1) / count;
    count = (H + rows_per_block - 1) / rows_per_block;
  }
  int64_t begin(int64_t blk) const { return blk * rows_per_block; }
  int64_t end(int64_t blk) const { return std::min(H, (blk + 1) * rows_per_block); }
};

// k x k box sums with zero padding (docs/loss.md section 3): prefix sums along rows, then
// along columns; O(1) per pixel for any k. out = (window sum) * out_scale.
// `load` maps an input value to sum_t.
template <typename sum_t, typename acc_t, typename Load>
void box_sum_plane(const acc_t* in, acc_t* out, int64_t H, int64_t W, int64_t k, double out_scale,
                   std::vector<sum_t>& row_sums, std::vector<sum_t>& prefix, Load load) {
  const int64_t r = k / 2;
  row_sums.resize(H * W);
  prefix.resize(std::max(W, (H + 1) * W) + 1);
  for (int64_t h = 0; h < H; ++h) {
    prefix[0] = sum_t(0);
    for (int64_t w = 0; w < W; ++w) prefix[w + 1] = prefix[w] + load(in[h * W + w]);
    for (int64_t w = 0; w < W; ++w)
      row_sums[h * W + w] = prefix[std::min(W, w + r + 1)] - prefix[std::max<int64_t>(0, w - r)];
  }
  // column prefix: prefix[(h + 1) * W + w] = sum of row_sums[0..h][w]
  for (int64_t w = 0; w < W; ++w) prefix[w] = sum_t(0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) prefix[(h + 1) * W + w] = prefix[h * W + w] + row_sums[h * W + w];
  for (int64_t h = 0; h < H; ++h) {
    const sum_t* top = &prefix[std::max<int64_t>(0, h - r) * W];
    const sum_t* bottom = &prefix[std::min(H, h + r + 1) * W];
    for (int64_t w = 0; w < W; ++w)
      out[h * W + w] = static_cast<acc_t>(static_cast<double>(bottom[w] - top[w]) * out_scale);
  }
}

// Box mean divided by k*k, in double. It is self-adjoint, so the backward uses it on dd.
template <typename acc_t>
void box_mean_plane(const acc_t* in, acc_t* out, int64_t H, int64_t W, int64_t k, std::vector<double>& row_sums,
                    std::vector<double>& prefix) {
  box_sum_plane(in, out, H, W, k, 1.0 / static_cast<double>(k * k), row_sums, prefix,
                [](acc_t v) { return static_cast<double>(v); });
}

// Buffers of the forward box mean.
struct BoxScratch {
  std::vector<uint64_t> row_sums, prefix;
  std::vector<double> row_sums_f, prefix_f;
};

// d = box mean of h in the forward, with h on the grid of box_grid_bits (sib_head.h):
// integer sums, exact, so tied windows tie exactly. Unsigned prefix sums may wrap; their
// differences, the window sums (below 2^52), do not. A plane with a NaN takes the
// floating-point sums, so the NaN reaches d as in avg_pool2d.
template <typename acc_t>
void box_mean_of_h(const acc_t* h, acc_t* d, int64_t H, int64_t W, int64_t k, BoxScratch& scratch) {
  const int64_t N = H * W;
  for (int64_t p = 0; p < N; ++p)
    if (!(h[p] >= acc_t(0) && h[p] <= acc_t(1))) {
      box_mean_plane(h, d, H, W, k, scratch.row_sums_f, scratch.prefix_f);
      return;
    }
  const double scale = static_cast<double>(int64_t(1) << box_grid_bits(k));
  const double out_scale = (1.0 / scale) / static_cast<double>(k * k);
  // h * scale <= 2^51: adding and subtracting 2^52 rounds it to the nearest integer, ties to
  // even (as rint on the GPU), without a libm call
  constexpr double kRound = 4503599627370496.0;  // 2^52
  box_sum_plane(h, d, H, W, k, out_scale, scratch.row_sums, scratch.prefix, [scale](acc_t v) {
    return static_cast<uint64_t>((static_cast<double>(v) * scale + kRound) - kRound);
  });
}

// Sort keys that order (value, flat index) as a stable sort does: one packed
// 64-bit word for float planes, a pair for double planes.
template <typename acc_t>
struct RankKeys;

template <>
struct RankKeys<float> {
  using Key = uint64_t;
  static Key make(float v, int64_t i) { return (uint64_t(order_bits(v)) << 32) | uint64_t(uint32_t(i)); }
  static int64_t index(Key k) { return static_cast<int64_t>(k & 0xffffffffu); }
};

template <>
struct RankKeys<double> {
  using Key = std::pair<uint64_t, int64_t>;
  static Key make(double v, int64_t i) { return {order_bits(v), i}; }
  static int64_t index(const Key& k) { return k.second; }
};

// Buffers of the rank selection, reused across the images of one task.
template <typename acc_t>
struct SelectionScratch {
  std::vector<typename RankKeys<acc_t>::Key> keys;
  std::vector<std::pair<acc_t, int64_t>> sample, candidates;
};

// Planes this small are selected exactly at once; larger ones first try bounds
// taken from a sorted sample.
constexpr int64_t kExactSelectBelow = 4096;
constexpr int64_t kSampleSize = 1024;

// Writes to `index` the flat indices of the elements at ranks [first, first + count)
// of `plane`, in rank order, ranking by (value, index) as a stable sort does.
//
// Fast path: a sorted, evenly strided sample gives value bounds that bracket the
// window with a margin of 4 standard deviations of the sample rank; one pass
// counts the elements below the bounds and collects those between, and only
// those are ordered. It is exact whenever the bounds bracket the window, which
// the counts verify; otherwise (or with NaN around) the exact path runs.
template <typename acc_t>
void select_ranks(const acc_t* plane, int64_t n, RankWindow win, SelectionScratch<acc_t>& scratch, int64_t* index) {
  using Keys = RankKeys<acc_t>;
  const int64_t first = win.first, end = win.first + win.count;
  if (n >= kExactSelectBelow) {
    auto& sample = scratch.sample;
    if (sample.empty()) {  // sorted once per plane, shared by its windows
      const int64_t stride = n / kSampleSize;
      for (int64_t i = 0; i < kSampleSize; ++i) sample.push_back({plane[i * stride], i * stride});
      std::sort(sample.begin(), sample.end(), [](const auto& a, const auto& b) {
        return Keys::make(a.first, a.second) < Keys::make(b.first, b.second);
      });
    }
    const double S = static_cast<double>(kSampleSize), p = static_cast<double>(first) / static_cast<double>(n);
    const int64_t margin = static_cast<int64_t>(4.0 * std::sqrt(S * p * (1.0 - p)) + 4.0);
    const int64_t lo_pos = static_cast<int64_t>(static_cast<double>(first) * S / static_cast<double>(n)) - margin;
    const int64_t hi_pos = static_cast<int64_t>(static_cast<double>(end) * S / static_cast<double>(n)) + margin;
    const bool has_lo = lo_pos >= 0, has_hi = hi_pos < kSampleSize;
    constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
    const acc_t lo = has_lo ? sample[lo_pos].first : -inf;
    const acc_t hi = has_hi ? sample[hi_pos].first : inf;
    if (lo == lo && hi == hi) {  // NaN bounds: exact path
      auto& buffer = scratch.candidates;
      if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);  // grows once per task
      // NaNs are neither below nor candidates: they sort last, and if the window reaches
      // them the count check below fails.
      int64_t below = 0;
      const int64_t kept = scan_window(plane, n, lo, hi, buffer.data(), &below);
      const auto cand = buffer.begin();
      const auto cand_stop = cand + kept;
      const int64_t cand_end = below + kept;
      if (below <= first && end <= cand_end) {
        auto less = [](const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& b) {
          return a.first < b.first || (a.first == b.first && a.second < b.second);
        };
        auto a = cand + (first - below), b = cand + (end - below);
        std::nth_element(cand, a, cand_stop, less);
        std::partial_sort(a, b, cand_stop, less);
        for (int64_t k = 0; k < win.count; ++k) index[k] = cand[first - below + k].second;
        return;
      }
    }
  }
  auto& keys = scratch.keys;
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = Keys::make(plane[i], i);
  std::nth_element(keys.begin(), keys.begin() + first, keys.end());
  std::partial_sort(keys.begin() + first, keys.begin() + end, keys.end());
  for (int64_t k = 0; k < win.count; ++k) index[k] = Keys::index(keys[first + k]);
}

// Soft quantiles of one plane (docs/loss.md section 2): selects the ranks of each
// quantile's window, records their indices and returns the weighted sums.
template <typename acc_t>
void soft_quantiles(const acc_t* plane, int64_t n, const int* quantiles, int count, double temperature,
                    SelectionScratch<acc_t>& scratch, int64_t* rank_index, double* values) {
  scratch.sample.clear();
  bool all_finite = true;
  for (int64_t p = 0; p < n; ++p) all_finite &= is_finite_value(plane[p]);
  double w[kRankWindow];
  for (int qi = 0; qi < count; ++qi) {
    const int quantile = quantiles[qi];
    const double level = kQuantileLevel[quantile];
    const RankWindow win = rank_window(n, level);
    int64_t* index_row = rank_index + quantile * kRankWindow;
    select_ranks(plane, n, win, scratch, index_row);
    rank_weights(n, level, temperature, win, w);
    double value = all_finite ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    for (int k = 0; k < kRankWindow; ++k) {
      if (k < win.count) {
        value += w[k] * static_cast<double>(plane[index_row[k]]);
      } else {
        index_row[k] = -1;
      }
    }
    values[qi] = value;
  }
}

// Scalars of the mask chain of one image, in the compute dtype.
template <typename acc_t>
struct MaskScalars {
  acc_t lo, range, t1;
  MaskScalars(acc_t lo_, acc_t q80, acc_t hi)
      : lo(lo_), range(hi - lo_ + static_cast<acc_t>(kRangeEps)), t1((q80 - lo_) / range) {}
  acc_t u(acc_t a) const { return (a - lo) / range; }
};

// g = mean over channels of R for image b (docs/loss.md section 3); `row` holds W values.
// The forward and the backward sum the channels in the same order, so both see the same g.
template <typename scalar_t, typename acc_t>
void channel_mean_plane(const Strided4d<const scalar_t>& Rs, int64_t b, const Shape& sh, acc_t* g, acc_t* row) {
  std::fill(g, g + sh.N, acc_t(0));
  for (int64_t c = 0; c < sh.C; ++c)
    for (int64_t y = 0; y < sh.H; ++y) {
      load_row(Rs.row(b, c, y), Rs.sw, row, sh.W);
      acc_t* gy = g + y * sh.W;
      for (int64_t w = 0; w < sh.W; ++w) gy[w] += row[w];
    }
  for (int64_t p = 0; p < sh.N; ++p) g[p] /= static_cast<acc_t>(sh.C);
}

// The plane h = sigmoid(s (u - t1)), u = (|g| - lo) / S, of one image.
template <typename acc_t>
void h_plane(const acc_t* g, const MaskScalars<acc_t>& ms, acc_t slope, int64_t N, acc_t* h) {
  sigmoid_row(g, /*absolute=*/true, ms.lo, ms.range, ms.t1, slope, h, N);
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& R, const at::Tensor& x, int64_t window, double temperature, double slope,
                    at::Tensor& hsic_out, at::Tensor& bg_out, at::Tensor& mask_out, at::Tensor& gram_out,
                    at::Tensor& stats_out, at::Tensor& rank_out) {
  const Shape sh(R);
  const Strided4d<const scalar_t> Rs(R), xs(x);
  acc_t* mask = mask_out.data_ptr<acc_t>();
  acc_t* stats = stats_out.data_ptr<acc_t>();
  int64_t* ranks = rank_out.data_ptr<int64_t>();
  const acc_t s = static_cast<acc_t>(slope);

  // Planes, one image per task: channel mean, quantiles of |g|, h, d, t2, M.
  at::parallel_for(0, sh.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> g(sh.N), a(sh.N), h(sh.N), d(sh.N);
    BoxScratch box;
    SelectionScratch<acc_t> keys;
    for (int64_t b = b0; b < b1; ++b) {
      channel_mean_plane(Rs, b, sh, g.data(), h.data());  // h is free until h_plane
      for (int64_t p = 0; p < sh.N; ++p) a[p] = std::abs(g[p]);
      const int a_quantiles[3] = {kQuantLow, kQuantMaskLevel, kQuantHigh};
      double q[3];
      soft_quantiles(a.data(), sh.N, a_quantiles, 3, temperature, keys, ranks + b * kQuantiles * kRankWindow, q);
      acc_t* st = stats + b * kImageStats;
      st[kStatLow] = static_cast<acc_t>(q[0]);
      st[kStatMaskLevel] = static_cast<acc_t>(q[1]);
      st[kStatHigh] = static_cast<acc_t>(q[2]);
      const MaskScalars<acc_t> ms(st[kStatLow], st[kStatMaskLevel], st[kStatHigh]);
      h_plane(g.data(), ms, s, sh.N, h.data());
      box_mean_of_h(h.data(), d.data(), sh.H, sh.W, window, box);
      const int d_quantile[1] = {kQuantT2};
      double t2;
      soft_quantiles(d.data(), sh.N, d_quantile, 1, temperature, keys, ranks + b * kQuantiles * kRankWindow, &t2);
      st[kStatT2] = static_cast<acc_t>(t2);
      acc_t* m = mask + b * sh.N;
      sigmoid_row(d.data(), /*absolute=*/false, st[kStatT2], acc_t(1), acc_t(0), s, m, sh.N);
    }
  });

  // One pass over R, x, M: raw Gram matrices of R*M and x*M and background sums.
  const int64_t B = sh.B, W = sh.W;
  const RowBlocks blocks(sh.H);
  const int64_t partial_size = 2 * B * B + 2 * B;
  std::vector<double> partials(blocks.count * partial_size, 0.0);
  const int64_t block_len = sh.C * blocks.rows_per_block * W;  // values of one image in a row block
  at::parallel_for(0, blocks.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> rv(W), xv(W), mr(B * block_len), mx(B * block_len);
    for (int64_t blk = k0; blk < k1; ++blk) {
      double* gram_u = &partials[blk * partial_size];
      double* gram_v = gram_u + B * B;
      double* bg_sum = gram_v + B * B;
      double* bg_sumsq = bg_sum + B;
      const int64_t len = sh.C * (blocks.end(blk) - blocks.begin(blk)) * W;
      for (int64_t j = 0; j < B; ++j) {
        int64_t offset = j * len;
        for (int64_t y = blocks.begin(blk); y < blocks.end(blk); ++y)
          for (int64_t c = 0; c < sh.C; ++c, offset += W) {
            load_row(Rs.row(j, c, y), Rs.sw, rv.data(), W);
            load_row(xs.row(j, c, y), xs.sw, xv.data(), W);
            acc_t s1, s2;
            mask_row(rv.data(), xv.data(), mask + j * sh.N + y * W, &mr[offset], &mx[offset], W, &s1, &s2);
            bg_sum[j] += s1;
            bg_sumsq[j] += s2;
          }
      }
      gram_update(mr.data(), B, len, gram_u);
      gram_update(mx.data(), B, len, gram_v);
    }
  });
  std::vector<double> total(partial_size, 0.0);
  for (int64_t blk = 0; blk < blocks.count; ++blk)
    for (int64_t i = 0; i < partial_size; ++i) total[i] += partials[blk * partial_size + i];
  std::vector<double> gram(2 * B * B);
  for (int64_t m = 0; m < 2; ++m)
    for (int64_t i = 0; i < B; ++i)
      for (int64_t j = 0; j < B; ++j)
        gram[m * B * B + i * B + j] = total[m * B * B + std::min(i, j) * B + std::max(i, j)];

  std::vector<double> work(4 * B * B + 3 * B);
  const double hsic = hsic_and_adjoint(gram.data(), gram.data() + B * B, B, 0.0, nullptr, nullptr, work.data());
  double bg = 0.0;
  const double D = static_cast<double>(sh.D);
  for (int64_t b = 0; b < B; ++b) {
    const double s1 = total[2 * B * B + b], s2 = total[2 * B * B + B + b];
    bg += unbiased_variance(s1, s2, D);
    stats[b * kImageStats + kStatBgSum] = static_cast<acc_t>(s1);
    stats[b * kImageStats + kStatBgSumSq] = static_cast<acc_t>(s2);
  }
  hsic_out.fill_(hsic);
  bg_out.fill_(bg / static_cast<double>(B));
  acc_t* gram_acc = gram_out.data_ptr<acc_t>();
  for (int64_t i = 0; i < 2 * B * B; ++i) gram_acc[i] = static_cast<acc_t>(gram[i]);
}

int64_t check_maps(const at::Tensor& R, const at::Tensor& x, int64_t window, double temperature, double slope) {
  TORCH_CHECK(R.device().is_cpu() && x.device().is_cpu(), "sib_head (CPU kernel): R and x must be CPU tensors");
  return check_head_inputs(R, x, window, temperature, slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sib_head_forward_cpu(
    const at::Tensor& R, const at::Tensor& x, int64_t window_size, double temperature, double slope) {
  window_size = check_maps(R, x, window_size, temperature, slope);
  const Shape sh(R);
  const auto opts = R.options().dtype(compute_type(R));
  at::Tensor hsic = at::empty({}, opts), bg = at::empty({}, opts);
  at::Tensor mask = at::empty({sh.B, sh.H, sh.W}, opts);
  at::Tensor gram = at::empty({2, sh.B, sh.B}, opts);
  at::Tensor stats = at::empty({sh.B, kImageStats}, opts);
  at::Tensor ranks = at::empty({sh.B, kQuantiles, kRankWindow}, R.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "sib_head_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(R, x, window_size, temperature, slope, hsic, bg, mask, gram, stats, ranks);
  });
  return {hsic, bg, mask, gram, stats, ranks};
}

// Adjoint of the mask chain of one image (docs/loss.md section 3 backwards): from dM to
// dg, the gradient of the channel-mean plane. Nothing is detached, so the
// quantiles pass gradient to the elements at their ranks. dM and dg may be the
// same buffer: dM is read in full before dg is written.
template <typename acc_t>
void mask_chain_adjoint(const acc_t* g, const acc_t* M, const acc_t* dM, const acc_t* st, const int64_t* ranks,
                        const Shape& sh, int64_t window, double temperature, acc_t s, acc_t* dg,
                        std::vector<acc_t>& h, std::vector<acc_t>& d, std::vector<acc_t>& dd,
                        std::vector<double>& row_sums, std::vector<double>& prefix) {
  const int64_t N = sh.N;
  const MaskScalars<acc_t> ms(st[kStatLow], st[kStatMaskLevel], st[kStatHigh]);
  h_plane(g, ms, s, N, h.data());
  double w[kRankWindow];
  auto scatter_to_ranks = [&](int quantile, double grad, acc_t* plane) {
    const RankWindow win = rank_window(N, kQuantileLevel[quantile]);
    rank_weights(N, kQuantileLevel[quantile], temperature, win, w);
    for (int k = 0; k < win.count; ++k) {
      const int64_t idx = ranks[quantile * kRankWindow + k];
      if (idx >= 0) plane[idx] += static_cast<acc_t>(w[k] * grad);
    }
  };
  // M = sigmoid(s (d - t2)), t2 = Q(d, 0.8)
  double dt2 = 0.0;
  for (int64_t p = 0; p < N; ++p) {
    dd[p] = dM[p] * s * M[p] * (acc_t(1) - M[p]);
    dt2 -= dd[p];
  }
  scatter_to_ranks(kQuantT2, dt2, dd.data());
  // d = box(h), self-adjoint: dh = box(dd)
  acc_t* dh = d.data();
  box_mean_plane(dd.data(), dh, sh.H, sh.W, window, row_sums, prefix);
  // h = sigmoid(s (u - t1)), u = (a - lo) / S, t1 = (q80 - lo) / S, S = hi - lo + eps
  double du_sum = 0.0, du_u_sum = 0.0;
  const double S = static_cast<double>(ms.range);
  for (int64_t p = 0; p < N; ++p) {
    const acc_t du = dh[p] * s * h[p] * (acc_t(1) - h[p]);
    const acc_t u = ms.u(std::abs(g[p]));
    du_sum += du;
    du_u_sum += static_cast<double>(du) * u;
    dg[p] = du / ms.range;  // da for now
  }
  const double dt1 = -du_sum;
  const double t1 = static_cast<double>(ms.t1);
  const double dS = -du_u_sum / S - dt1 * t1 / S;
  const double dq80 = dt1 / S;
  const double dhi = dS;
  const double dlo = -du_sum / S - dt1 / S - dS;
  scatter_to_ranks(kQuantLow, dlo, dg);
  scatter_to_ranks(kQuantMaskLevel, dq80, dg);
  scatter_to_ranks(kQuantHigh, dhi, dg);
  for (int64_t p = 0; p < N; ++p) dg[p] *= sign_of(g[p]);
}

template <typename scalar_t, typename acc_t>
void backward_kernel(double grad_hsic, double grad_bg, const at::Tensor& grad_mask, const at::Tensor& R,
                     const at::Tensor& x, const at::Tensor& mask_t, const at::Tensor& gram_t,
                     const at::Tensor& stats_t, const at::Tensor& ranks_t, int64_t window, double temperature,
                     double slope, at::Tensor& dR_t, at::Tensor* dx_t, bool accumulate) {
  const Shape sh(R);
  const int64_t B = sh.B, W = sh.W, N = sh.N;
  const Strided4d<const scalar_t> Rs(R), xs(x);
  const Strided4d<scalar_t> dRs(dR_t);
  const Strided4d<scalar_t> dxs = dx_t ? Strided4d<scalar_t>(*dx_t) : dRs;
  const acc_t* mask = mask_t.data_ptr<acc_t>();
  const acc_t* stats = stats_t.data_ptr<acc_t>();
  const int64_t* ranks = ranks_t.data_ptr<int64_t>();

  // Per-batch factors: dL/du_i = sum_j A_u[i,j] u_j, likewise for v; background.
  std::vector<double> gram(2 * B * B), A(2 * B * B), work(4 * B * B + 3 * B);
  const acc_t* gram_acc = gram_t.data_ptr<acc_t>();
  for (int64_t i = 0; i < 2 * B * B; ++i) gram[i] = static_cast<double>(gram_acc[i]);
  hsic_and_adjoint(gram.data(), gram.data() + B * B, B, grad_hsic, A.data(), A.data() + B * B, work.data());
  std::vector<acc_t> A_u(B * B), A_v(B * B), bg_scale(B), bg_mean(B);
  for (int64_t i = 0; i < B * B; ++i) {
    A_u[i] = static_cast<acc_t>(A[i]);
    A_v[i] = static_cast<acc_t>(A[B * B + i]);
  }
  const double D = static_cast<double>(sh.D);
  for (int64_t b = 0; b < B; ++b) {
    // dBG/dr = 2 (r - mean) / (B (D - 1))
    bg_scale[b] = static_cast<acc_t>(2.0 * grad_bg / (static_cast<double>(B) * (D - 1.0)));
    bg_mean[b] = static_cast<acc_t>(static_cast<double>(stats[b * kImageStats + kStatBgSum]) / D);
  }

  // Planes kept between the passes: dM (then dg) and g, the channel mean of R that pass 1
  // sums on its way (the chain needs it; reading R again for it would cost a pass). They
  // live in channels C - 1 and C - 2 of dR when dR holds the compute dtype, as pass 2 reads
  // each row of them before it writes that row of dR; otherwise (half-precision inputs, or
  // g when C = 1) in planes from torch's allocator. When accumulating, dR already holds a
  // gradient: dM then lives in grad_mask (which it adds to, contiguous compute dtype) and g
  // in a plane of its own.
  const bool in_dR = std::is_same<scalar_t, acc_t>::value && !accumulate;
  const int64_t own_planes = (in_dR || accumulate ? 0 : 1) + ((in_dR && sh.C >= 2) ? 0 : 1);
  const at::Tensor own = own_planes ? at::empty({own_planes, B * N}, mask_t.options()) : at::Tensor();
  auto plane_row = [&](int slot, int64_t b, int64_t y) -> std::pair<acc_t*, int64_t> {
    const int64_t channel = sh.C - 1 - slot;  // slot 0: dM / dg, slot 1: g
    if (in_dR && channel >= 0) return {reinterpret_cast<acc_t*>(dRs.row(b, channel, y)), dRs.sw};
    if (accumulate && slot == 0) return {grad_mask.data_ptr<acc_t>() + b * N + y * W, 1};
    const int64_t own_index = in_dR || accumulate ? 0 : slot;
    return {own.data_ptr<acc_t>() + own_index * B * N + b * N + y * W, 1};
  };
  // dst += src when accumulating, dst = src otherwise
  auto put_row = [&](acc_t* src, scalar_t* dst, int64_t stride, std::vector<acc_t>& prior) {
    if (accumulate) {
      load_row(static_cast<const scalar_t*>(dst), stride, prior.data(), W);
      for (int64_t w = 0; w < W; ++w) src[w] += prior[w];
    }
    store_row(static_cast<const acc_t*>(src), dst, stride, W);
  };
  constexpr int kSlotDM = 0, kSlotG = 1;

  // Pass 1 over R, x: dM (and dx), and g. Tu = A_u (M R), Tv = A_v (M x) mix the images of a row.
  at::parallel_for(0, sh.H, 1, [&](int64_t y0, int64_t y1) {
    std::vector<acc_t> rv(B * W), xv(B * W), mr(B * W), mx(B * W), Tu(B * W), Tv(B * W), dMv(B * W), gv(B * W),
        out(W), prior(W);
    for (int64_t y = y0; y < y1; ++y) {
      std::fill(dMv.begin(), dMv.end(), acc_t(0));
      std::fill(gv.begin(), gv.end(), acc_t(0));
      for (int64_t c = 0; c < sh.C; ++c) {
        for (int64_t j = 0; j < B; ++j) {
          load_row(Rs.row(j, c, y), Rs.sw, &rv[j * W], W);
          load_row(xs.row(j, c, y), xs.sw, &xv[j * W], W);
          // channels summed in the forward's order (channel_mean_plane): the same g
          for (int64_t w = 0; w < W; ++w) gv[j * W + w] += rv[j * W + w];
          acc_t unused_s1, unused_s2;
          mask_row(&rv[j * W], &xv[j * W], mask + j * N + y * W, &mr[j * W], &mx[j * W], W, &unused_s1,
                   &unused_s2);
        }
        mix_rows(A_u.data(), mr.data(), B, W, Tu.data());
        mix_rows(A_v.data(), mx.data(), B, W, Tv.data());
        for (int64_t i = 0; i < B; ++i) {
          const acc_t* m = mask + i * N + y * W;
          mask_grad_row(&rv[i * W], &xv[i * W], m, &Tu[i * W], &Tv[i * W], bg_scale[i], bg_mean[i], &dMv[i * W], W);
          if (dx_t) {
            for (int64_t w = 0; w < W; ++w) out[w] = m[w] * Tv[i * W + w];
            put_row(out.data(), dxs.row(i, c, y), dxs.sw, prior);
          }
        }
      }
      for (int64_t i = 0; i < B; ++i) {
        for (int64_t w = 0; w < W; ++w) gv[i * W + w] /= static_cast<acc_t>(sh.C);
        const auto dm_dst = plane_row(kSlotDM, i, y);
        if (accumulate)  // the plane is grad_mask: dM adds to it
          for (int64_t w = 0; w < W; ++w) dMv[i * W + w] += dm_dst.first[w];
        store_row(&dMv[i * W], dm_dst.first, dm_dst.second, W);
        const auto g_dst = plane_row(kSlotG, i, y);
        store_row(&gv[i * W], g_dst.first, g_dst.second, W);
      }
    }
  });

  // Planes: the mask chain's adjoint, dM -> dg, one image per task.
  const acc_t* gmp = nullptr;
  at::Tensor gm;
  if (grad_mask.defined() && !accumulate) {  // accumulating, pass 1 added it already
    gm = grad_mask.to(mask_t.scalar_type()).contiguous();
    gmp = gm.data_ptr<acc_t>();
  }
  const acc_t s = static_cast<acc_t>(slope);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> g(N), h(N), d(N), dd(N), dM(N), dg(N);
    std::vector<double> row_sums, prefix;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t y = 0; y < sh.H; ++y) {
        const auto dm_src = plane_row(kSlotDM, b, y);
        load_row(static_cast<const acc_t*>(dm_src.first), dm_src.second, &dM[y * W], W);
        const auto g_src = plane_row(kSlotG, b, y);
        load_row(static_cast<const acc_t*>(g_src.first), g_src.second, &g[y * W], W);
      }
      if (gmp)
        for (int64_t p = 0; p < N; ++p) dM[p] += gmp[b * N + p];
      mask_chain_adjoint(g.data(), mask + b * N, dM.data(), stats + b * kImageStats,
                         ranks + b * kQuantiles * kRankWindow, sh, window, temperature, s, dg.data(), h, d, dd,
                         row_sums, prefix);
      for (int64_t y = 0; y < sh.H; ++y) {
        const auto dst = plane_row(kSlotDM, b, y);
        store_row(&dg[y * W], dst.first, dst.second, W);
      }
    }
  });

  // Pass 2 over R: dR = M Tu + (1 - M) dBG/dr + dg / C, written once. Tu is mixed again
  // rather than kept: keeping it would cost a tensor the size of R.
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(sh.C);
  at::parallel_for(0, sh.H, 1, [&](int64_t y0, int64_t y1) {
    std::vector<acc_t> rv(B * W), mr(B * W), Tu(B * W), dgv(B * W), out(W), prior(W);
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t i = 0; i < B; ++i) {  // before channel C - 1 of this row is overwritten
        const auto src = plane_row(kSlotDM, i, y);
        load_row(static_cast<const acc_t*>(src.first), src.second, &dgv[i * W], W);
      }
      for (int64_t c = 0; c < sh.C; ++c) {
        for (int64_t j = 0; j < B; ++j) {
          load_row(Rs.row(j, c, y), Rs.sw, &rv[j * W], W);
          const acc_t* m = mask + j * N + y * W;
          for (int64_t w = 0; w < W; ++w) mr[j * W + w] = m[w] * rv[j * W + w];
        }
        mix_rows(A_u.data(), mr.data(), B, W, Tu.data());
        for (int64_t i = 0; i < B; ++i) {
          vjp_grad_row(&rv[i * W], mask + i * N + y * W, &Tu[i * W], &dgv[i * W], inv_c, bg_scale[i], bg_mean[i],
                       out.data(), W);
          put_row(out.data(), dRs.row(i, c, y), dRs.sw, prior);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sib_head_backward_cpu(
    const at::Tensor& grad_hsic, const at::Tensor& grad_bg, const std::optional<at::Tensor>& grad_mask,
    const at::Tensor& R, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& gram,
    const at::Tensor& image_stats, const at::Tensor& rank_index, int64_t window_size, double temperature,
    double slope, bool compute_grad_x) {
  window_size = check_maps(R, x, window_size, temperature, slope);
  TORCH_CHECK(mask.scalar_type() == compute_type(R) && mask.is_contiguous() && gram.is_contiguous() &&
                  image_stats.is_contiguous() && rank_index.is_contiguous(),
              "sib_head_backward: the saved tensors must be the forward op's outputs");
  at::Tensor dR = at::empty_like(R);
  at::Tensor dx = compute_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  const double gh = grad_hsic.item<double>(), gb = grad_bg.item<double>();
  const at::Tensor gm = grad_mask.has_value() ? *grad_mask : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "sib_head_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(gh, gb, gm, R, x, mask, gram, image_stats, rank_index, window_size,
                                     temperature, slope, dR, compute_grad_x ? &dx : nullptr, false);
  });
  return {dR, dx};
}

// The head's gradients added into grad_R (and grad_x), with grad_mask as the scratch plane: the
// random-feature HSIC's backward (sib_fast/backends/autograd.py) passes the projection's own
// gradients, so that no second R-sized gradient exists.
void sib_head_backward_add_cpu(at::Tensor& grad_R, const std::optional<at::Tensor>& grad_x, at::Tensor& grad_mask,
                               const at::Tensor& grad_hsic, const at::Tensor& grad_bg, const at::Tensor& R,
                               const at::Tensor& x, const at::Tensor& mask, const at::Tensor& gram,
                               const at::Tensor& image_stats, const at::Tensor& rank_index, int64_t window_size,
                               double temperature, double slope) {
  window_size = check_maps(R, x, window_size, temperature, slope);
  TORCH_CHECK(mask.scalar_type() == compute_type(R) && mask.is_contiguous() && gram.is_contiguous() &&
                  image_stats.is_contiguous() && rank_index.is_contiguous(),
              "sib_head_backward_add_: the saved tensors must be the forward op's outputs");
  TORCH_CHECK(grad_R.sizes() == R.sizes() && grad_R.scalar_type() == R.scalar_type() && grad_R.device().is_cpu(),
              "sib_head_backward_add_: grad_R must be a CPU tensor of R's shape and dtype");
  TORCH_CHECK(!grad_x.has_value() || (grad_x->sizes() == x.sizes() && grad_x->scalar_type() == x.scalar_type() &&
                                      grad_x->device().is_cpu()),
              "sib_head_backward_add_: grad_x must be a CPU tensor of x's shape and dtype");
  TORCH_CHECK(grad_mask.sizes() == mask.sizes() && grad_mask.scalar_type() == mask.scalar_type() &&
                  grad_mask.is_contiguous(),
              "sib_head_backward_add_: grad_mask must be a contiguous tensor of the mask's shape and dtype");
  const double gh = grad_hsic.item<double>(), gb = grad_bg.item<double>();
  at::Tensor dx = grad_x.has_value() ? *grad_x : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "sib_head_backward_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(gh, gb, grad_mask, R, x, mask, gram, image_stats, rank_index, window_size,
                                     temperature, slope, grad_R, grad_x.has_value() ? &dx : nullptr, true);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sib_fast, CPU, m) {
  m.impl("sib_head_forward", &sib_head_forward_cpu);
  m.impl("sib_head_backward", &sib_head_backward_cpu);
  m.impl("sib_head_backward_add_", &sib_head_backward_add_cpu);
}

}  // namespace sib_fast
