// CUDA kernels of sib_fast::sib_head_forward / sib_head_backward (docs/loss.md sections 2-5, 7).
// They compute what the CPU kernels (csrc/cpu/sib_head_cpu.cpp) compute and save the
// same tensors for the backward (mask, raw Gram matrices, image_stats, rank_index).
//
// Forward, all on the current stream, no host synchronisation:
//   channel_mean_kernel     R -> g = mean_c R (plane B x N, compute type)
//   select_kernel           per image, a block-wide radix select in shared memory over
//                           the keys (order_bits(|g|), pixel index), compacting the
//                           candidates once they are few: the ranks
//                           floor(t)-8 .. floor(t)+9 of Q(a, .05), Q(a, .8), Q(a, .95),
//                           ties by index as a stable sort; soft quantiles -> image_stats
//   hbox_kernel             h = sigmoid(s (u - t1)) and its row window sums (running sums,
//                           exact: h on a fine dyadic grid, so tied windows tie)
//   vbox_kernel             column window sums / k^2 -> d
//   select_kernel           t2 = Q(d, .8), then M = sigmoid(s (d - t2)) (the mask output)
//   gram_kernel             one pass over R, x, M: partial Gram matrices and background
//                           sums per chunk of pixels (sib_gram_cuda.cu)
//   gram_reduce_kernel      partials summed in a fixed order in double
//   finalize_kernel         one block: HSIC (hsic_and_adjoint's math, in parallel) and BG
// Backward (its planes may be channels of dR: every plane kernel takes their batch stride):
//   adjoint_kernel          one block: the B x B factors A_u, A_v and the background terms
//   backward_kernel         pass 1 over R, x, M: the planes dM_u, dM_v and g, and dx
//                           (sib_backward_cuda.cu)
//   mask_adjoint_t2_kernel  dd = dM s M (1 - M), d t2 scattered to its ranks
//   hbox_kernel, vbox_kernel   dh = box(dd) (the box mean is self-adjoint)
//   mask_adjoint_h_kernel   da from dh, d lo / d q80 / d hi scattered to their ranks
//   backward_kernel         pass 2 over R, M: dR, the mask chain's share sign(g) da / C
//                           included, written once
// Every reduction runs in a fixed order, so repeated runs give identical bits.
// The host code (checks, allocation, op registration) is sib_head_cuda_ops.cpp; these
// files hold the kernels and their launchers (sib_cuda_launch.h).
#include "cuda/sib_cuda_common.cuh"

namespace sib_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;        // elementwise and plane kernels
constexpr int kSelectThreads = 512;  // one block per image
constexpr int kSmallThreads = 512;   // B x B kernels (one block)
constexpr int kSegment = 32;         // outputs per thread of the running window sums
constexpr int kMaxTargets = 6;       // first and last rank of up to 3 windows

inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = ceil_div(work, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (int64_t(1) << 30) ? (int64_t(1) << 30) : blocks));
}

// ---------------------------------------------------------------------------------
// Channel mean
// ---------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) channel_mean_kernel(const scalar_t* __restrict__ R, Map4 map, int64_t B,
                                                                int64_t C, int64_t N, acc_t* __restrict__ g) {
  constexpr int V = VecWidth<scalar_t>::value;
  const int64_t groups = ceil_div(N, V);
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < B * groups;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t b = static_cast<uint32_t>(q) / static_cast<uint32_t>(groups);  // 32-bit: checked on the host
    const int64_t p0 = (q - static_cast<int64_t>(b) * groups) * V;
    acc_t sum[V];
#pragma unroll
    for (int e = 0; e < V; ++e) sum[e] = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      acc_t v[V];
      load_group<scalar_t, acc_t, V>(R, map, b, c, p0, N, v);
#pragma unroll
      for (int e = 0; e < V; ++e) sum[e] += v[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (p0 + e < N) g[b * N + p0 + e] = exact_div(sum[e], static_cast<acc_t>(C));
  }
}

// ---------------------------------------------------------------------------------
// Rank selection
// ---------------------------------------------------------------------------------

// Bytes of the pixel index that the keys need (0 for a single pixel).
int index_digits(int64_t N) {
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < N) ++bits;  // 2^bits >= N: indices < N fit
  return (bits + 7) / 8;
}

template <typename acc_t>
struct KeyBits;
template <>
struct KeyBits<float> {
  using T = uint32_t;
};
template <>
struct KeyBits<double> {
  using T = uint64_t;
};

// The keys are (order_bits(value), index): VB value bits, then IB = 8 * idigits index
// bits, most significant first. A prefix of nb bits is held as (value part, index part).
// Digits: 11 bits first (one histogram: every target starts from the empty prefix), then
// 8 bits, the last value digit narrower so that no digit straddles value and index.
constexpr int kFirstDigit = 11;
constexpr int kHistBins = 1 << kFirstDigit;  // >= kMaxTargets * 256 for the later digits

template <typename Bits>
__device__ __forceinline__ int digit_width(int nb) {
  constexpr int VB = 8 * sizeof(Bits);
  return nb == 0 ? kFirstDigit : (nb < VB ? (VB - nb < 8 ? VB - nb : 8) : 8);
}

template <typename Bits>
__device__ __forceinline__ void key_prefix(Bits vb, uint32_t idx, int nb, int IB, Bits& pv, uint32_t& pi) {
  constexpr int VB = 8 * sizeof(Bits);
  if (nb <= VB) {
    pv = nb == 0 ? Bits(0) : static_cast<Bits>(vb >> (VB - nb));
    pi = 0;
  } else {
    pv = vb;
    pi = idx >> (IB - (nb - VB));
  }
}

template <typename Bits>
__device__ __forceinline__ int key_digit(Bits vb, uint32_t idx, int nb, int w, int IB) {
  constexpr int VB = 8 * sizeof(Bits);
  const uint32_t mask = (1u << w) - 1u;
  if (nb < VB) return static_cast<int>(static_cast<uint32_t>(vb >> (VB - nb - w)) & mask);
  return static_cast<int>((idx >> (IB - (nb - VB) - w)) & mask);
}

template <typename Bits>
__device__ __forceinline__ bool prefix_less(Bits av, uint32_t ai, Bits bv, uint32_t bi) {
  return av < bv || (av == bv && ai < bi);
}

// One block per image. Each target (the first and the last rank of each window) keeps
// the key prefix of the element at its rank, narrowed one digit per pass by a histogram
// of its candidates in shared memory; targets with the same prefix share a histogram.
// When every prefix is unique to one element, a window is the elements whose prefix lies
// between its two targets' prefixes: exactly its ranks, since keys are distinct. Once
// the elements within some window's range are fewer than half the current list, a pass
// also writes them to a candidate list (two ping-pong lists of N indices in `scratch`),
// and later passes read only those: in practice two passes over the whole plane.
template <typename acc_t, bool kAbs, bool kWriteMask>
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const acc_t* __restrict__ planes, int64_t N, int idigits, const QuantileWindows win,
                  int32_t* __restrict__ scratch, acc_t* __restrict__ stats, int64_t* __restrict__ ranks,
                  acc_t* __restrict__ mask, acc_t slope) {
  using Bits = typename KeyBits<acc_t>::T;
  constexpr int VB = 8 * sizeof(Bits);
  constexpr unsigned kAll = 0xffffffffu;
  __shared__ Bits pre_v[kMaxTargets];
  __shared__ uint32_t pre_i[kMaxTargets];
  __shared__ int rem[kMaxTargets], cnt[kMaxTargets], slot_of[kMaxTargets], leaders[kMaxTargets];
  __shared__ int nleaders, list_n, next_n, do_compact, nonfinite;
  __shared__ int hist[kHistBins];
  __shared__ int coll_n[3];
  __shared__ int coll_idx[3][kRankWindow];
  __shared__ acc_t shared_t2;

  const int64_t b = blockIdx.x;
  const acc_t* plane = planes + b * N;
  int32_t* const list0 = scratch + b * 2 * N;
  int32_t* const list1 = list0 + N;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int targets = 2 * win.count;
  const int IB = 8 * idigits;
  auto value_at = [&](int64_t p) {
    const acc_t v = plane[p];
    return kAbs ? abs_of(v) : v;
  };

  if (tid < targets) {
    const int w = tid / 2;
    rem[tid] = tid % 2 == 0 ? win.first[w] : win.first[w] + win.len[w] - 1;
    cnt[tid] = static_cast<int>(N);
    pre_v[tid] = 0;
    pre_i[tid] = 0;
  }
  if (tid == 0) {
    list_n = -1;  // -1: the whole plane
    nonfinite = 0;
  }
  __syncthreads();

  int nb = 0, cur = 0;
  while (nb < VB + IB) {
    bool done = true;
    for (int t = 0; t < targets; ++t) done = done && cnt[t] == 1;
    if (done) break;
    const int w = digit_width<Bits>(nb), nbins = 1 << w;
    if (tid == 0) {
      int n = 0, candidates = 0;
      for (int t = 0; t < targets; ++t) {
        int s = -1;
        for (int l = 0; l < n; ++l)
          if (pre_v[leaders[l]] == pre_v[t] && pre_i[leaders[l]] == pre_i[t]) s = l;
        if (s < 0) {
          leaders[n] = t;
          candidates += cnt[t];
          s = n++;
        }
        slot_of[t] = s;
      }
      nleaders = n;
      // the elements in the windows' ranges: the targets' candidates and fewer than
      // kRankWindow in between the two targets of a window
      const int64_t in_ranges = candidates + static_cast<int64_t>(kRankWindow) * win.count;
      const int64_t current = list_n < 0 ? N : list_n;
      do_compact = nb > 0 && 2 * in_ranges < current;
      next_n = 0;
    }
    for (int e = tid; e < kHistBins; e += kSelectThreads) hist[e] = 0;
    __syncthreads();
    const int nl = nleaders;
    const bool compact = do_compact != 0, implicit = list_n < 0;
    const int64_t n_cur = implicit ? N : list_n;
    Bits lv[kMaxTargets];
    uint32_t li[kMaxTargets];
#pragma unroll
    for (int l = 0; l < kMaxTargets; ++l) {
      lv[l] = l < nl ? pre_v[leaders[l]] : Bits(0);
      li[l] = l < nl ? pre_i[leaders[l]] : 0u;
    }
    Bits lo_v[3], hi_v[3];
    uint32_t lo_i[3], hi_i[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int t = k < win.count ? 2 * k : 0;
      lo_v[k] = pre_v[t];
      lo_i[k] = pre_i[t];
      hi_v[k] = pre_v[t + 1];
      hi_i[k] = pre_i[t + 1];
    }
    for (int64_t base = 0; base < n_cur; base += kSelectThreads) {
      const int64_t i = base + tid;
      const bool valid = i < n_cur;
      const int64_t p = valid ? (implicit ? i : static_cast<int64_t>((cur ? list1 : list0)[i])) : 0;
      int key = -1;
      bool keep = false;
      if (valid) {
        // the first pass reads the whole plane: it also finds NaN and +-Inf (see below)
        if (nb == 0 && !is_finite_value(value_at(p))) nonfinite = 1;
        const Bits vb = order_bits(value_at(p));
        Bits pv;
        uint32_t pi;
        key_prefix(vb, static_cast<uint32_t>(p), nb, IB, pv, pi);
        int s = -1;
#pragma unroll
        for (int l = 0; l < kMaxTargets; ++l)
          if (l < nl && pv == lv[l] && pi == li[l]) s = l;
        if (s >= 0) key = s * nbins + key_digit(vb, static_cast<uint32_t>(p), nb, w, IB);
        if (compact) {
#pragma unroll
          for (int k = 0; k < 3; ++k)
            keep = keep || (k < win.count && !prefix_less(pv, pi, lo_v[k], lo_i[k]) &&
                             !prefix_less(hi_v[k], hi_i[k], pv, pi));
        }
      }
      // one shared-memory atomic per distinct bin in the warp (ties pile into one bin)
      const unsigned peers = __match_any_sync(kAll, key);
      if (key >= 0 && lane == __ffs(static_cast<int>(peers)) - 1) atomicAdd(&hist[key], __popc(peers));
      if (compact) {
        const unsigned kept = __ballot_sync(kAll, keep);
        if (kept != 0) {  // the same for the whole warp
          const int first = __ffs(static_cast<int>(kept)) - 1;
          int slot = 0;
          if (lane == first) slot = atomicAdd(&next_n, __popc(kept));
          slot = __shfl_sync(kAll, slot, first);
          if (keep) (cur ? list0 : list1)[slot + __popc(kept & ((1u << lane) - 1u))] = static_cast<int32_t>(p);
        }
      }
    }
    __syncthreads();
    if (warp < targets) {
      const int t = warp;
      const int* h = hist + slot_of[t] * nbins;
      const int per_lane = nbins / 32;
      int sum = 0;
      for (int k = 0; k < per_lane; ++k) sum += h[lane * per_lane + k];
      int incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(kAll, incl, o);
        if (lane >= o) incl += y;
      }
      const int excl = incl - sum;
      const int r = rem[t];
      __syncwarp();
      if (r >= excl && r < incl) {
        int cum = excl, digit = -1, count = 0, before = 0;
        for (int k = 0; k < per_lane && digit < 0; ++k) {
          const int c = h[lane * per_lane + k];
          if (r < cum + c) {
            digit = lane * per_lane + k;
            count = c;
            before = cum;
          }
          cum += c;
        }
        rem[t] = r - before;
        cnt[t] = count;
        if (nb < VB) {
          pre_v[t] = static_cast<Bits>((pre_v[t] << w) | static_cast<Bits>(digit));
        } else {
          pre_i[t] = (pre_i[t] << w) | static_cast<uint32_t>(digit);
        }
      }
    }
    if (compact) {
      cur ^= 1;
      if (tid == 0) list_n = next_n;
    }
    nb += w;
    __syncthreads();
  }

  // collect each window: the elements (of the current list) whose nb-bit prefix lies
  // between its targets' prefixes
  if (tid < 3) coll_n[tid] = 0;
  __syncthreads();
  {
    const bool implicit = list_n < 0;
    const int64_t n_cur = implicit ? N : list_n;
    Bits lo_v[3], hi_v[3];
    uint32_t lo_i[3], hi_i[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int t = k < win.count ? 2 * k : 0;
      lo_v[k] = pre_v[t];
      lo_i[k] = pre_i[t];
      hi_v[k] = pre_v[t + 1];
      hi_i[k] = pre_i[t + 1];
    }
    for (int64_t i = tid; i < n_cur; i += kSelectThreads) {
      const int64_t p = implicit ? i : static_cast<int64_t>((cur ? list1 : list0)[i]);
      const Bits vb = order_bits(value_at(p));
      Bits pv;
      uint32_t pi;
      key_prefix(vb, static_cast<uint32_t>(p), nb, IB, pv, pi);
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        if (k < win.count && !prefix_less(pv, pi, lo_v[k], lo_i[k]) && !prefix_less(hi_v[k], hi_i[k], pv, pi)) {
          const int slot = atomicAdd(&coll_n[k], 1);
          if (slot < kRankWindow) coll_idx[k][slot] = static_cast<int>(p);
        }
      }
    }
  }
  __syncthreads();
  if (tid < win.count) {
    const int w = tid;
    int* idx = coll_idx[w];
    const int n = coll_n[w] < kRankWindow ? coll_n[w] : kRankWindow;
    for (int k = 1; k < n; ++k) {  // insertion sort by (key, index)
      const int cur_idx = idx[k];
      const Bits ck = order_bits(value_at(cur_idx));
      int j = k - 1;
      while (j >= 0) {
        const Bits jk = order_bits(value_at(idx[j]));
        if (jk < ck || (jk == ck && idx[j] < cur_idx)) break;
        idx[j + 1] = idx[j];
        --j;
      }
      idx[j + 1] = cur_idx;
    }
    double value = 0.0;
    int64_t* row = ranks + (b * kQuantiles + win.quantile[w]) * kRankWindow;
    for (int k = 0; k < kRankWindow; ++k) {
      if (k < win.len[w] && k < n) {
        row[k] = idx[k];
        value += win.weight[w][k] * static_cast<double>(value_at(idx[k]));
      } else {
        row[k] = -1;
      }
    }
    // a window that did not collect exactly its ranks would be a bug: make it loud
    if (n != win.len[w] || coll_n[w] != win.len[w]) value = nan("");
    // docs/loss.md section 8: NaN or +-Inf anywhere in the plane makes Q NaN (is_finite_value); a
    // one-element plane takes no pass, but then its element is in the window
    if (nonfinite || !is_finite_value(value)) value = nan("");
    stats[b * kImageStats + win.quantile[w]] = static_cast<acc_t>(value);
    if (kWriteMask) shared_t2 = static_cast<acc_t>(value);
  }
  if (kWriteMask) {
    __syncthreads();
    const acc_t t2 = shared_t2;
    for (int64_t p = tid; p < N; p += kSelectThreads)
      mask[b * N + p] = sigmoid_of(plane[p], t2, acc_t(1), acc_t(0), slope);
  }
}

// ---------------------------------------------------------------------------------
// Box mean: running window sums along rows, then along columns (O(1) per pixel)
// ---------------------------------------------------------------------------------

// out[b, y, w] = sum of f(in[b, y, w']) over |w' - w| <= r inside the row, summed in
// double. With kFromG, f = sigmoid(s (u - t1)) of g (the plane h of docs/loss.md section 3),
// rounded to the grid of box_grid_bits (sib_head.h), so that the sliding sums are exact
// and tied windows tie exactly. `scale` is 2^F.
// Otherwise f is the identity (the backward's box of dd, a linear map: no rounding).
// Each thread slides a window along kSegment outputs. `in` and `out` are planes laid out
// as `layout` says.
template <typename acc_t, bool kFromG, typename out_t>
__global__ void __launch_bounds__(kThreads)
    hbox_kernel(const acc_t* __restrict__ in, const acc_t* __restrict__ stats, acc_t slope, int64_t B, int64_t H,
                int64_t W, PlaneLayout layout, int64_t r, double scale, out_t* __restrict__ out) {
  const int64_t segs = ceil_div(W, kSegment);
  const double inv_scale = 1.0 / scale;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < B * H * segs;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = static_cast<uint32_t>(q) / static_cast<uint32_t>(segs);
    const int64_t w0 = (q - row * segs) * kSegment;
    const int64_t w1 = w0 + kSegment < W ? w0 + kSegment : W;
    const int64_t b = static_cast<uint32_t>(row) / static_cast<uint32_t>(H);
    const int64_t start = layout.at(b, (row - b * H) * W);
    // 32 bits, and 1 outright in the forward (contiguous planes): ptxas spilled otherwise
    const int step = kFromG ? 1 : static_cast<int>(layout.pixel);
    const acc_t* src = in + start;
    out_t* dst = out + start;
    acc_t lo = 0, range = 1, t1 = 0;
    if (kFromG) {
      const acc_t* st = stats + b * kImageStats;
      const MaskScalars<acc_t> ms(st[kStatLow], st[kStatMaskLevel], st[kStatHigh]);
      lo = ms.lo;
      range = ms.range;
      t1 = ms.t1;
    }
    auto f = [&](int64_t w) -> double {
      const acc_t v = src[w * step];
      if (kFromG) return rint(static_cast<double>(sigmoid_of(abs_of(v), lo, range, t1, slope)) * scale) * inv_scale;
      return static_cast<double>(v);
    };
    double sum = 0.0;
    const int64_t a = w0 - r > 0 ? w0 - r : 0, e = w0 + r < W - 1 ? w0 + r : W - 1;
    for (int64_t w = a; w <= e; ++w) sum += f(w);
    dst[w0 * step] = static_cast<out_t>(sum);
    for (int64_t w = w0 + 1; w < w1; ++w) {
      if (w + r < W) sum += f(w + r);
      if (w - r - 1 >= 0) sum -= f(w - r - 1);
      dst[w * step] = static_cast<out_t>(sum);
    }
  }
}

// out[b, y, w] = inv_area * sum of in[b, y', w] over |y' - y| <= r (double sums); `in` and
// `out` are planes laid out as `layout` says.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) vbox_kernel(const in_t* __restrict__ in, int64_t B, int64_t H, int64_t W,
                                                        PlaneLayout layout, int64_t r, double inv_area,
                                                        out_t* __restrict__ out) {
  const int64_t segs = ceil_div(H, kSegment);
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < B * segs * W;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = static_cast<uint32_t>(q) / static_cast<uint32_t>(W), w = q - t * W;
    const int64_t b = static_cast<uint32_t>(t) / static_cast<uint32_t>(segs), y0 = (t - b * segs) * kSegment;
    const int64_t y1 = y0 + kSegment < H ? y0 + kSegment : H;
    const in_t* col = in + layout.at(b, w);
    out_t* dst = out + layout.at(b, w);
    const int64_t row = W * layout.pixel;
    double sum = 0.0;
    const int64_t a = y0 - r > 0 ? y0 - r : 0, e = y0 + r < H - 1 ? y0 + r : H - 1;
    for (int64_t y = a; y <= e; ++y) sum += static_cast<double>(col[y * row]);
    dst[y0 * row] = static_cast<out_t>(sum * inv_area);
    for (int64_t y = y0 + 1; y < y1; ++y) {
      if (y + r < H) sum += static_cast<double>(col[(y + r) * row]);
      if (y - r - 1 >= 0) sum -= static_cast<double>(col[(y - r - 1) * row]);
      dst[y * row] = static_cast<out_t>(sum * inv_area);
    }
  }
}

// ---------------------------------------------------------------------------------
// Gram partials -> Gram matrices; HSIC and its B x B adjoint (hsic_and_adjoint's math)
// ---------------------------------------------------------------------------------

__device__ __forceinline__ int tile_index(int I, int J, int tiles_side) {
  return I * tiles_side - I * (I - 1) / 2 + (J - I);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gram_reduce_kernel(const acc_t* __restrict__ part, int64_t parts, int TB, int tiles_side, int tiles, int64_t B,
                       acc_t* __restrict__ gram_out, double* __restrict__ gram_d) {
  constexpr int kFragment = Mma<acc_t>::M;  // the side of the Gram kernel's MMA fragments
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < 2 * B * B;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = static_cast<uint32_t>(e) / static_cast<uint32_t>(B), j = e - row * B;
    const int64_t m = row >= B ? 1 : 0, i = row - m * B;
    const int64_t lo = i < j ? i : j, hi = i < j ? j : i;  // the upper triangle for both: exactly symmetric
    const int I = static_cast<int>(lo / TB), J = static_cast<int>(hi / TB);
    const int64_t t = tile_index(I, J, tiles_side);
    const int64_t r = lo - I * TB, c = hi - J * TB;
    const int64_t offset = (t * 2 + m) * TB * TB + r * TB + c;
    // a fragment on the tile's diagonal holds S: the Gram is its symmetric part
    const bool on_diagonal = I == J && r / kFragment == c / kFragment;
    const int64_t mirror = (t * 2 + m) * TB * TB + c * TB + r;
    const int64_t step = static_cast<int64_t>(tiles) * 2 * TB * TB;
    double s = 0.0;
    for (int64_t k = 0; k < parts; ++k) {
      s += on_diagonal ? 0.5 * (static_cast<double>(part[k * step + offset]) + static_cast<double>(part[k * step + mirror]))
                       : static_cast<double>(part[k * step + offset]);
    }
    gram_d[e] = s;
    gram_out[e] = static_cast<acc_t>(s);
  }
}

// HSIC of docs/loss.md section 4 from the raw Gram matrices, by one block; with A non-null also
// the backward's factors (written into the padded (2, Bp, Bp) A; hsic_and_adjoint in
// sib_head.h is the serial statement of the same math). work holds 6 B doubles.
template <typename G, typename acc_t>
__device__ double hsic_block(const G* __restrict__ gram_u, const G* __restrict__ gram_v, int64_t B,
                             double* __restrict__ work, double* scratch, double grad, acc_t* __restrict__ A,
                             int64_t Bp) {
  double* n_u = work;
  double* n_v = work + B;
  double* mean_u = work + 2 * B;
  double* mean_v = work + 3 * B;
  double* row_u = work + 4 * B;
  double* row_v = work + 5 * B;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int nthreads = blockDim.x, nwarps = nthreads / 32;
  for (int64_t i = tid; i < B; i += nthreads) {
    const double lu = sqrt(static_cast<double>(gram_u[i * B + i]));
    const double lv = sqrt(static_cast<double>(gram_v[i * B + i]));
    n_u[i] = lu > kNormEps ? lu : kNormEps;
    n_v[i] = lv > kNormEps ? lv : kNormEps;
  }
  __syncthreads();
  for (int64_t i = warp; i < B; i += nwarps) {
    double su = 0.0, sv = 0.0;
    for (int64_t j = lane; j < B; j += 32) {
      su += static_cast<double>(gram_u[i * B + j]) / (n_u[i] * n_u[j]);
      sv += static_cast<double>(gram_v[i * B + j]) / (n_v[i] * n_v[j]);
    }
    su = warp_sum(su);
    sv = warp_sum(sv);
    if (lane == 0) {
      row_u[i] = su;
      row_v[i] = sv;
      mean_u[i] = su / static_cast<double>(B);
      mean_v[i] = sv / static_cast<double>(B);
    }
  }
  __syncthreads();
  double gu = 0.0, gv = 0.0;
  for (int64_t i = tid; i < B; i += nthreads) {
    gu += row_u[i];
    gv += row_v[i];
  }
  const double BB = static_cast<double>(B) * static_cast<double>(B);
  const double grand_u = block_sum(gu, scratch) / BB;
  const double grand_v = block_sum(gv, scratch) / BB;
  auto Kn = [&](int64_t i, int64_t j) { return static_cast<double>(gram_u[i * B + j]) / (n_u[i] * n_u[j]); };
  auto Ln = [&](int64_t i, int64_t j) { return static_cast<double>(gram_v[i * B + j]) / (n_v[i] * n_v[j]); };
  auto Kc = [&](int64_t i, int64_t j) { return Kn(i, j) - mean_u[i] - mean_u[j] + grand_u; };
  auto Lc = [&](int64_t i, int64_t j) { return Ln(i, j) - mean_v[i] - mean_v[j] + grand_v; };
  const double scale = 1.0 / (static_cast<double>(B - 1) * static_cast<double>(B - 1));
  double h = 0.0;
  for (int64_t e = tid; e < B * B; e += nthreads) h += Kc(e / B, e % B) * Lc(e / B, e % B);
  h = block_sum(h, scratch) * scale;
  if (A == nullptr) return h;
  // dHSIC/dK = Lc / (B-1)^2, dHSIC/dL = Kc / (B-1)^2; A_ij = 2 G_ij / (n_i n_j), and on the
  // diagonal - alpha_i / n_i^2 with alpha_i = 2 sum_j G_ij Kn_ij, unless the norm is clamped.
  for (int64_t i = warp; i < B; i += nwarps) {
#pragma unroll
    for (int mm = 0; mm < 2; ++mm) {
      const G* gram = mm == 0 ? gram_u : gram_v;
      const double* n = mm == 0 ? n_u : n_v;
      double alpha = 0.0;
      for (int64_t j = lane; j < B; j += 32) {
        const double gij = grad * scale * (mm == 0 ? Lc(i, j) : Kc(i, j));
        alpha += 2.0 * gij * (mm == 0 ? Kn(i, j) : Ln(i, j));
      }
      alpha = warp_sum(alpha);
      const bool unclamped = sqrt(static_cast<double>(gram[i * B + i])) >= kNormEps;
      for (int64_t j = lane; j < B; j += 32) {
        const double gij = grad * scale * (mm == 0 ? Lc(i, j) : Kc(i, j));
        double value = 2.0 * gij / (n[i] * n[j]);
        if (j == i && unclamped) value -= alpha / (n[i] * n[i]);
        A[(mm * Bp + i) * Bp + j] = static_cast<acc_t>(value);
      }
    }
  }
  return h;
}

template <typename acc_t>
__global__ void __launch_bounds__(kSmallThreads)
    finalize_kernel(const double* __restrict__ gram_d, const double* __restrict__ bg_part, int64_t chunks, int64_t B,
                    double D, double* __restrict__ work, acc_t* __restrict__ hsic_out, acc_t* __restrict__ bg_out,
                    acc_t* __restrict__ stats) {
  __shared__ double scratch[32];
  const double h = hsic_block<double, acc_t>(gram_d, gram_d + B * B, B, work, scratch, 0.0, nullptr, 0);
  double bg = 0.0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      s1 += bg_part[(k * B + b) * 2];
      s2 += bg_part[(k * B + b) * 2 + 1];
    }
    bg += unbiased_variance(s1, s2, D);
    stats[b * kImageStats + kStatBgSum] = static_cast<acc_t>(s1);
    stats[b * kImageStats + kStatBgSumSq] = static_cast<acc_t>(s2);
  }
  bg = block_sum(bg, scratch);
  if (threadIdx.x == 0) {
    *hsic_out = static_cast<acc_t>(h);
    *bg_out = static_cast<acc_t>(bg / static_cast<double>(B));
  }
}

// The backward's B x B factors and background terms: bg_terms = (bg_scale, bg_mean[B]).
template <typename acc_t>
__global__ void __launch_bounds__(kSmallThreads)
    adjoint_kernel(const acc_t* __restrict__ gram, int64_t B, const acc_t* __restrict__ grad_hsic,
                   const acc_t* __restrict__ grad_bg, const acc_t* __restrict__ stats, double D,
                   double* __restrict__ work, acc_t* __restrict__ A, int64_t Bp, acc_t* __restrict__ bg_terms) {
  __shared__ double scratch[32];
  hsic_block<acc_t, acc_t>(gram, gram + B * B, B, work, scratch, static_cast<double>(*grad_hsic), A, Bp);
  if (threadIdx.x == 0)
    bg_terms[0] = static_cast<acc_t>(2.0 * static_cast<double>(*grad_bg) / (static_cast<double>(B) * (D - 1.0)));
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x)
    bg_terms[1 + b] = static_cast<acc_t>(static_cast<double>(stats[b * kImageStats + kStatBgSum]) / D);
}

// ---------------------------------------------------------------------------------
// The mask chain's adjoint (docs/loss.md section 3 backwards), one block per image
// ---------------------------------------------------------------------------------

// Adds w_k * grad to the elements at the ranks of window k of this image (serially:
// windows may share elements on small images); pixel p of the image at plane[p * step].
template <typename acc_t>
__device__ __forceinline__ void scatter_to_ranks(const QuantileWindows& win, int w, const int64_t* ranks_b,
                                                 double grad, acc_t* plane, int64_t step) {
  const int64_t* row = ranks_b + win.quantile[w] * kRankWindow;
  for (int k = 0; k < win.len[w]; ++k) {
    const int64_t idx = row[k];
    if (idx >= 0) plane[idx * step] += static_cast<acc_t>(win.weight[w][k] * grad);
  }
}

// M = sigmoid(s (d - t2)), t2 = Q(d, .8): dd = dM s M (1 - M) with dM = dM_u + dM_v
// (+ the mask's own upstream gradient), then d t2 = -sum dd to the ranks of t2. The planes
// dM_u, dM_v are laid out as `layout` says (mask and grad_mask are contiguous).
template <typename acc_t>
__global__ void __launch_bounds__(kSelectThreads)
    mask_adjoint_t2_kernel(acc_t* __restrict__ dM_u, const acc_t* __restrict__ dM_v, PlaneLayout layout,
                           const acc_t* __restrict__ grad_mask, const acc_t* __restrict__ mask,
                           const int64_t* __restrict__ ranks, int64_t N, QuantileWindows win, acc_t slope) {
  __shared__ double scratch[32];
  const int64_t b = blockIdx.x;
  acc_t* dd_b = dM_u + layout.at(b, 0);
  const acc_t* dM_v_b = dM_v + layout.at(b, 0);
  const int64_t step = layout.pixel;
  double part = 0.0;
  for (int64_t p = threadIdx.x; p < N; p += kSelectThreads) {
    const int64_t i = b * N + p;
    acc_t dM = dd_b[p * step] + dM_v_b[p * step];
    if (grad_mask != nullptr) dM += grad_mask[i];
    const acc_t m = mask[i];
    const acc_t dd = dM * slope * m * (acc_t(1) - m);
    dd_b[p * step] = dd;
    part += static_cast<double>(dd);
  }
  const double total = block_sum(part, scratch);  // also orders the writes above before the scatter
  if (threadIdx.x == 0) scatter_to_ranks(win, 0, ranks + b * kQuantiles * kRankWindow, -total, dd_b, step);
}

// h = sigmoid(s (u - t1)), u = (|g| - lo) / S, t1 = (q80 - lo) / S, S = hi - lo + eps:
// from dh to da (= d|g|), the quantiles' gradients scattered to their ranks. The planes dh
// and g are laid out as `layout` says.
template <typename acc_t>
__global__ void __launch_bounds__(kSelectThreads)
    mask_adjoint_h_kernel(acc_t* __restrict__ dh_planes, const acc_t* __restrict__ g_planes, PlaneLayout layout,
                          const acc_t* __restrict__ stats, const int64_t* __restrict__ ranks, int64_t N,
                          QuantileWindows win, acc_t slope) {
  __shared__ double scratch[32];
  const int64_t b = blockIdx.x;
  acc_t* dh = dh_planes + layout.at(b, 0);
  const acc_t* g = g_planes + layout.at(b, 0);
  const int64_t step = layout.pixel;
  const acc_t* st = stats + b * kImageStats;
  const MaskScalars<acc_t> ms(st[kStatLow], st[kStatMaskLevel], st[kStatHigh]);
  double du_sum = 0.0, du_u_sum = 0.0;
  for (int64_t p = threadIdx.x; p < N; p += kSelectThreads) {
    const acc_t a = abs_of(g[p * step]);
    const acc_t h = sigmoid_of(a, ms.lo, ms.range, ms.t1, slope);
    const acc_t du = dh[p * step] * slope * h * (acc_t(1) - h);
    const acc_t u = ms.u(a);
    du_sum += static_cast<double>(du);
    du_u_sum += static_cast<double>(du) * static_cast<double>(u);
    dh[p * step] = du / ms.range;  // da for now
  }
  du_sum = block_sum(du_sum, scratch);
  du_u_sum = block_sum(du_u_sum, scratch);
  if (threadIdx.x == 0) {
    const double S = static_cast<double>(ms.range), t1 = static_cast<double>(ms.t1);
    const double dt1 = -du_sum;
    const double dS = -du_u_sum / S - dt1 * t1 / S;
    const double dq80 = dt1 / S;
    const double dhi = dS;
    const double dlo = -du_sum / S - dt1 / S - dS;
    const int64_t* ranks_b = ranks + b * kQuantiles * kRankWindow;
    scatter_to_ranks(win, 0, ranks_b, dlo, dh, step);
    scatter_to_ranks(win, 1, ranks_b, dq80, dh, step);
    scatter_to_ranks(win, 2, ranks_b, dhi, dh, step);
  }
}

// ---------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------

template <typename F>
void with_compute_type(bool is_double, F&& f) {
  if (is_double) {
    f(Tag<double>{});
  } else {
    f(Tag<float>{});
  }
}

}  // namespace

void launch_channel_mean(Dtype dtype, const void* R, const Map4& map, const Shape& s, void* g, cudaStream_t stream) {
  with_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_of<scalar_t>;
    constexpr int V = VecWidth<scalar_t>::value;
    auto kernel = channel_mean_kernel<scalar_t, acc_t>;
    SIB_LAUNCH(kernel, grid_for(s.B * ceil_div(s.N, V), kThreads), dim3(kThreads), 0, stream,
               static_cast<const scalar_t*>(R), map, s.B, s.C, s.N, static_cast<acc_t*>(g));
  });
}

void launch_select(bool is_double, bool abs_values, const void* planes, const Shape& s, const QuantileWindows& win,
                   int32_t* scratch, void* stats, int64_t* ranks, void* mask, double slope, cudaStream_t stream) {
  // |g| serves lo, q80, hi; d serves t2 and then gives the mask
  TORCH_CHECK(win.count >= 1 && win.count <= 3 && (abs_values ? mask == nullptr : (win.count == 1 && mask)),
              "sib_head (CUDA kernel): bad selection request");
  const int idigits = index_digits(s.N);
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto kernel = abs_values ? select_kernel<acc_t, true, false> : select_kernel<acc_t, false, true>;
    SIB_LAUNCH(kernel, dim3(static_cast<unsigned>(s.B)), dim3(kSelectThreads), 0, stream,
               static_cast<const acc_t*>(planes), s.N, idigits, win, scratch, static_cast<acc_t*>(stats), ranks,
               static_cast<acc_t*>(mask), static_cast<acc_t>(slope));
  });
}

void launch_box_mean_h(bool is_double, const void* g, const void* stats, double slope, const Shape& s,
                       int64_t window, double* rows, void* d, cudaStream_t stream) {
  // h on the grid of box_grid_bits (a sliding sum holds k + 1 rows of k values for a moment)
  const double scale = static_cast<double>(int64_t(1) << box_grid_bits(window));
  const int64_t radius = window / 2;
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto hbox = hbox_kernel<acc_t, true, double>;
    SIB_LAUNCH(hbox, grid_for(s.B * s.H * ceil_div(s.W, kSegment), kThreads), dim3(kThreads), 0, stream,
               static_cast<const acc_t*>(g), static_cast<const acc_t*>(stats), static_cast<acc_t>(slope), s.B, s.H,
               s.W, PlaneLayout{s.N, 1}, radius, scale, rows);
    auto vbox = vbox_kernel<double, acc_t>;
    SIB_LAUNCH(vbox, grid_for(s.B * ceil_div(s.H, kSegment) * s.W, kThreads), dim3(kThreads), 0, stream, rows, s.B,
               s.H, s.W, PlaneLayout{s.N, 1}, radius, 1.0 / static_cast<double>(window * window),
               static_cast<acc_t*>(d));
  });
}

void launch_box_mean(bool is_double, const void* in, const PlaneLayout& layout, const Shape& s, int64_t window,
                     void* rows, void* out, cudaStream_t stream) {
  const int64_t radius = window / 2;
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto hbox = hbox_kernel<acc_t, false, acc_t>;
    SIB_LAUNCH(hbox, grid_for(s.B * s.H * ceil_div(s.W, kSegment), kThreads), dim3(kThreads), 0, stream,
               static_cast<const acc_t*>(in), static_cast<const acc_t*>(nullptr), acc_t(0), s.B, s.H, s.W, layout,
               radius, 1.0, static_cast<acc_t*>(rows));
    auto vbox = vbox_kernel<acc_t, acc_t>;
    SIB_LAUNCH(vbox, grid_for(s.B * ceil_div(s.H, kSegment) * s.W, kThreads), dim3(kThreads), 0, stream,
               static_cast<const acc_t*>(rows), s.B, s.H, s.W, layout, radius,
               1.0 / static_cast<double>(window * window), static_cast<acc_t*>(out));
  });
}

void launch_gram_reduce(bool is_double, const void* gram_part, const GramPlan& plan, int64_t B, void* gram_out,
                        double* gram_d, cudaStream_t stream) {
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto kernel = gram_reduce_kernel<acc_t>;
    SIB_LAUNCH(kernel, grid_for(2 * B * B, kThreads), dim3(kThreads), 0, stream,
               static_cast<const acc_t*>(gram_part), plan.partial_count(), plan.tile, plan.tiles_side, plan.tiles, B,
               static_cast<acc_t*>(gram_out), gram_d);
  });
}

void launch_finalize(bool is_double, const double* gram_d, const double* bg_part, int64_t chunks, int64_t B, double D,
                     double* work, void* hsic, void* bg, void* stats, cudaStream_t stream) {
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto kernel = finalize_kernel<acc_t>;
    SIB_LAUNCH(kernel, dim3(1), dim3(kSmallThreads), 0, stream, gram_d, bg_part, chunks, B, D, work,
               static_cast<acc_t*>(hsic), static_cast<acc_t*>(bg), static_cast<acc_t*>(stats));
  });
}

void launch_adjoint(bool is_double, const void* gram, int64_t B, const void* grad_hsic, const void* grad_bg,
                    const void* stats, double D, double* work, void* A, int64_t Bp, void* bg_terms,
                    cudaStream_t stream) {
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto kernel = adjoint_kernel<acc_t>;
    SIB_LAUNCH(kernel, dim3(1), dim3(kSmallThreads), 0, stream, static_cast<const acc_t*>(gram), B,
               static_cast<const acc_t*>(grad_hsic), static_cast<const acc_t*>(grad_bg),
               static_cast<const acc_t*>(stats), D, work, static_cast<acc_t*>(A), Bp, static_cast<acc_t*>(bg_terms));
  });
}

void launch_mask_adjoint_t2(bool is_double, void* dM_u, const void* dM_v, const PlaneLayout& layout, const void* grad_mask,
                            const void* mask, const int64_t* ranks, const Shape& s, const QuantileWindows& win,
                            double slope, cudaStream_t stream) {
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto kernel = mask_adjoint_t2_kernel<acc_t>;
    SIB_LAUNCH(kernel, dim3(static_cast<unsigned>(s.B)), dim3(kSelectThreads), 0, stream, static_cast<acc_t*>(dM_u),
               static_cast<const acc_t*>(dM_v), layout, static_cast<const acc_t*>(grad_mask),
               static_cast<const acc_t*>(mask),
               ranks, s.N, win, static_cast<acc_t>(slope));
  });
}

void launch_mask_adjoint_h(bool is_double, void* dh, const void* g, const PlaneLayout& layout, const void* stats,
                           const int64_t* ranks, const Shape& s, const QuantileWindows& win, double slope,
                           cudaStream_t stream) {
  with_compute_type(is_double, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    auto kernel = mask_adjoint_h_kernel<acc_t>;
    SIB_LAUNCH(kernel, dim3(static_cast<unsigned>(s.B)), dim3(kSelectThreads), 0, stream, static_cast<acc_t*>(dh),
               static_cast<const acc_t*>(g), layout, static_cast<const acc_t*>(stats), ranks, s.N, win,
               static_cast<acc_t>(slope));
  });
}

}  // namespace cuda
}  // namespace sib_fast
