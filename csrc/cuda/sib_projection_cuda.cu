// CUDA kernels of sib_fast::masked_projection_forward / _backward, the random-feature HSIC's
// projections (docs/loss.md section 4b, docs/random_features.md), W never stored: each entry is
// generated in registers where it is used (sib_projection_math.cuh), in the forward and again in
// the backward. Plain CUDA-core arithmetic: generating an entry costs about as much as the 4 IB
// multiply-adds it feeds, so tensor cores would not change the picture much.
//
// Forward (projection_forward_kernel): grid (F blocks, chunks of d, image blocks); a thread owns
// one pair of features (2j, 2j + 1: one Box-Muller draw), a block 128 pairs. For each tile of 32
// rows d of its chunk the block stages u = R*M and v = x*M of its IB images in shared memory
// (read by every thread at the same address: broadcasts), then each thread generates its two
// entries of every row and accumulates 4 IB sums (u, v times cosine, sine column) in registers.
// F block 0 also sums u^2 and v^2 (a warp per image, lanes over d, summed by shuffles). Each
// chunk writes its partial sums; projection_reduce_kernel adds them in chunk order, in double:
// deterministic, no atomics.
// Backward (projection_backward_kernel): grid (pixel tiles of 64, image blocks); a thread owns
// one pixel and walks its channels in order, so grad_mask's sum over c stays in the thread. Per
// channel it loops over the pairs, 32 at a time (grad_proj's tile of them and their column hashes
// staged in shared memory), generates W[d, 2j], W[d, 2j + 1] and accumulates du, dv of its IB
// images; then dR = M du, dx = M dv and dM += R du + x dv.
//
// Per pass each block generates its entries once: D F ceil(B / IB) entries in all, as the
// Triton kernels; IB = 16 images in float32 (64 float accumulators a thread in the forward), 8
// in float64.
#include "cuda/sib_cuda_common.cuh"
#include "cuda/sib_projection_launch.h"
#include "cuda/sib_projection_math.cuh"

namespace sib_fast {
namespace cuda {
namespace {

using projection::gaussian_pair;
using projection::mix32;

constexpr int kForwardThreads = 128;  // pairs of features per forward block
constexpr int kTileRows = 32;         // rows d per staged tile: one warp's lanes
constexpr int kBackwardThreads = 64;  // pixels per backward block
constexpr int kPairTile = 32;         // pairs per staged tile of grad_proj
constexpr int64_t kPartialBudget = int64_t(16) << 20;  // bytes of forward partials at most

template <typename acc_t>
constexpr int image_block() {
  return sizeof(acc_t) == 8 ? 8 : 16;
}

// (c, p) of the logical row d = c N + p. C == 1 is apart: there N may be 2^32, past 32 bits.
__device__ __forceinline__ void channel_pixel(uint32_t d, int64_t C, uint32_t N, int64_t* c, int64_t* p) {
  const uint32_t cc = C == 1 ? 0u : d / N;
  *c = cc;
  *p = d - cc * N;
}

template <typename scalar_t, typename acc_t, int IB>
__global__ void __launch_bounds__(kForwardThreads, 1)
    projection_forward_kernel(const scalar_t* __restrict__ R, const scalar_t* __restrict__ x, Map4 map_r, Map4 map_x,
                              const acc_t* __restrict__ mask, int64_t B, int64_t C, int64_t N, int64_t D, int64_t F,
                              uint32_t row_key, uint32_t col_key, int64_t tiles_per_chunk, acc_t* __restrict__ part,
                              int64_t part_stride) {
  constexpr int TD = kTileRows;
  constexpr int PER = IB * TD / kForwardThreads;  // staged values per thread and matrix
  static_assert(PER >= 1 && (IB * TD) % kForwardThreads == 0, "tile loads");
  alignas(16) __shared__ acc_t us[TD * IB];  // [row][image]
  alignas(16) __shared__ acc_t vs[TD * IB];
  __shared__ uint32_t row_hash[TD];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t chunk = blockIdx.y, b0 = static_cast<int64_t>(blockIdx.z) * IB;
  const int64_t pairs = (F + 1) / 2;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kForwardThreads + tid;
  const uint32_t f_cos = static_cast<uint32_t>(2 * j);
  const uint32_t b_cos = mix32(f_cos ^ col_key), b_sin = mix32((f_cos + 1u) ^ col_key);
  const uint32_t N32 = static_cast<uint32_t>(N);  // exact unless C == 1 (channel_pixel)

  acc_t acc[4][IB];  // u cos, u sin, v cos, v sin
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int b = 0; b < IB; ++b) acc[m][b] = acc_t(0);
  acc_t sq_u[PER], sq_v[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) sq_u[k] = sq_v[k] = acc_t(0);

  const int64_t d_first = chunk * tiles_per_chunk * TD;
  const int64_t d_end = d_first + tiles_per_chunk * TD < D ? d_first + tiles_per_chunk * TD : D;
  for (int64_t d0 = d_first; d0 < d_end; d0 += TD) {
    __syncthreads();  // every thread is done with the previous tile
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int e = tid + k * kForwardThreads;
      const int t = e % TD, bl = e / TD;  // lanes over rows: coalesced along d
      const int64_t d = d0 + t, b = b0 + bl;
      acc_t u = acc_t(0), v = acc_t(0);
      if (d < d_end && b < B) {
        int64_t c, p;
        channel_pixel(static_cast<uint32_t>(d), C, N32, &c, &p);
        const acc_t m = mask[b * N + p];
        u = m * to_acc<acc_t>(R[map_r.offset(b, c, p)]);
        v = m * to_acc<acc_t>(x[map_x.offset(b, c, p)]);
      }
      us[t * IB + bl] = u;
      vs[t * IB + bl] = v;
      sq_u[k] += u * u;
      sq_v[k] += v * v;
    }
    if (tid < TD) row_hash[tid] = mix32(static_cast<uint32_t>(d0 + tid) ^ row_key);
    __syncthreads();
    const int nd = d_end - d0 < TD ? static_cast<int>(d_end - d0) : TD;
    if (j < pairs) {
      for (int t = 0; t < nd; ++t) {
        acc_t wc, ws;
        gaussian_pair<acc_t>(row_hash[t], b_cos, b_sin, &wc, &ws);
        const acc_t* ut = us + t * IB;
        const acc_t* vt = vs + t * IB;
#pragma unroll
        for (int b = 0; b < IB; ++b) {
          const acc_t u = ut[b], v = vt[b];
          acc[0][b] += u * wc;
          acc[1][b] += u * ws;
          acc[2][b] += v * wc;
          acc[3][b] += v * ws;
        }
      }
    }
  }

  acc_t* out = part + chunk * part_stride;
  if (j < pairs) {
#pragma unroll
    for (int b = 0; b < IB; ++b) {
      if (b0 + b >= B) break;
      acc_t* ou = out + (b0 + b) * F + 2 * j;
      acc_t* ov = out + (B + b0 + b) * F + 2 * j;
      ou[0] = acc[0][b];
      ov[0] = acc[2][b];
      if (2 * j + 1 < F) {  // an odd F has no last sine
        ou[1] = acc[1][b];
        ov[1] = acc[3][b];
      }
    }
  }
  // squared norms: thread tid staged rows of image tid / TD + k (kForwardThreads / TD), lanes over rows
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const acc_t su = warp_sum(sq_u[k]), sv = warp_sum(sq_v[k]);
    const int64_t b = b0 + tid / TD + k * (kForwardThreads / TD);
    if (blockIdx.x == 0 && tid % TD == 0 && b < B) {
      out[2 * B * F + b] = su;
      out[2 * B * F + B + b] = sv;
    }
  }
}

// proj and sq: the sums of the chunks' partials in chunk order, in double.
template <typename acc_t>
__global__ void projection_reduce_kernel(const acc_t* __restrict__ part, int64_t chunks, int64_t stride,
                                         int64_t n_proj, acc_t* __restrict__ proj, acc_t* __restrict__ sq) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= stride) return;
  double total = 0.0;
  for (int64_t k = 0; k < chunks; ++k) total += static_cast<double>(part[k * stride + o]);
  if (o < n_proj) {
    proj[o] = static_cast<acc_t>(total);
  } else {
    sq[o - n_proj] = static_cast<acc_t>(total);
  }
}

template <typename scalar_t, typename acc_t, int IB>
__global__ void __launch_bounds__(kBackwardThreads)
    projection_backward_kernel(const acc_t* __restrict__ gp, const acc_t* __restrict__ gs,
                               const scalar_t* __restrict__ R, const scalar_t* __restrict__ x, Map4 map_r, Map4 map_x,
                               const acc_t* __restrict__ mask, int64_t B, int64_t C, int64_t N, int64_t F,
                               uint32_t row_key, uint32_t col_key, scalar_t* __restrict__ dR, Map4 map_dr,
                               scalar_t* __restrict__ dx, Map4 map_dx, acc_t* __restrict__ dmask) {
  constexpr int JT = kPairTile;
  constexpr int TILE = 4 * IB * JT;  // grad_proj values per staged tile
  static_assert(TILE % kBackwardThreads == 0, "tile loads");
  // [pair][u cos, u sin, v cos, v sin][image]; zeros past F and B
  alignas(16) __shared__ acc_t gt[TILE];
  __shared__ uint32_t hash_cos[JT], hash_sin[JT];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kBackwardThreads + tid;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * IB;
  const bool live = p < N;
  const int64_t pairs = (F + 1) / 2;
  acc_t dm[IB];
#pragma unroll
  for (int b = 0; b < IB; ++b) dm[b] = acc_t(0);

  for (int64_t c = 0; c < C; ++c) {
    const uint32_t a = mix32(static_cast<uint32_t>(c * N + p) ^ row_key);  // past N: unused
    acc_t du[IB], dv[IB];
#pragma unroll
    for (int b = 0; b < IB; ++b) du[b] = dv[b] = acc_t(0);
    for (int64_t j0 = 0; j0 < pairs; j0 += JT) {
      __syncthreads();  // every thread is done with the previous tile
#pragma unroll 4
      for (int e = tid; e < TILE; e += kBackwardThreads) {
        const int fl = e % (2 * JT), rest = e / (2 * JT);  // lanes over features: coalesced
        const int bl = rest % IB, m = rest / IB;
        const int64_t f = 2 * j0 + fl, b = b0 + bl;
        gt[((fl >> 1) * 4 + 2 * m + (fl & 1)) * IB + bl] = f < F && b < B ? gp[(m * B + b) * F + f] : acc_t(0);
      }
      if (tid < JT) {
        const uint32_t f = static_cast<uint32_t>(2 * (j0 + tid));
        hash_cos[tid] = mix32(f ^ col_key);
        hash_sin[tid] = mix32((f + 1u) ^ col_key);
      }
      __syncthreads();
      const int nj = pairs - j0 < JT ? static_cast<int>(pairs - j0) : JT;
      for (int jj = 0; jj < nj; ++jj) {
        acc_t wc, ws;
        gaussian_pair<acc_t>(a, hash_cos[jj], hash_sin[jj], &wc, &ws);
        const acc_t* g = gt + jj * 4 * IB;
#pragma unroll
        for (int b = 0; b < IB; ++b) {
          du[b] += g[b] * wc + g[IB + b] * ws;
          dv[b] += g[2 * IB + b] * wc + g[3 * IB + b] * ws;
        }
      }
    }
    if (live) {
#pragma unroll
      for (int b = 0; b < IB; ++b) {
        const int64_t bi = b0 + b;
        if (bi >= B) break;
        const acc_t m = mask[bi * N + p];
        const acc_t r = to_acc<acc_t>(R[map_r.offset(bi, c, p)]), xv = to_acc<acc_t>(x[map_x.offset(bi, c, p)]);
        const acc_t two_gu = gs ? acc_t(2) * gs[bi] : acc_t(0), two_gv = gs ? acc_t(2) * gs[B + bi] : acc_t(0);
        const acc_t gu = du[b] + two_gu * (m * r), gv = dv[b] + two_gv * (m * xv);
        dR[map_dr.offset(bi, c, p)] = from_acc<scalar_t>(m * gu);
        if (dx) dx[map_dx.offset(bi, c, p)] = from_acc<scalar_t>(m * gv);
        dm[b] += r * gu + xv * gv;  // channels in order: deterministic
      }
    }
  }
  if (live) {
#pragma unroll
    for (int b = 0; b < IB; ++b)
      if (b0 + b < B) dmask[(b0 + b) * N + p] = dm[b];
  }
}

}  // namespace

ProjectionPlan projection_plan(int64_t B, int64_t D, int64_t F, bool is_double) {
  const int64_t IB = is_double ? image_block<double>() : image_block<float>();
  ProjectionPlan plan;
  plan.fblocks = ceil_div((F + 1) / 2, kForwardThreads);
  plan.iblocks = ceil_div(B, IB);
  plan.part_stride = 2 * B * F + 2 * B;
  // about 8 blocks per multiprocessor, within the partials' budget and one tile per chunk at least
  const int64_t tiles = ceil_div(D, kTileRows);
  const int64_t bytes = plan.part_stride * (is_double ? 8 : 4);
  int64_t chunks = ceil_div(8 * static_cast<int64_t>(device_info().num_sms), plan.fblocks * plan.iblocks);
  const int64_t budget = kPartialBudget / bytes > 1 ? kPartialBudget / bytes : 1;
  chunks = chunks < budget ? chunks : budget;
  chunks = chunks < tiles ? chunks : tiles;
  chunks = chunks < 65535 ? chunks : 65535;
  plan.tiles_per_chunk = ceil_div(tiles, chunks);
  plan.chunks = ceil_div(tiles, plan.tiles_per_chunk);  // every chunk holds a tile
  return plan;
}

void launch_projection_forward(Dtype dtype, const void* R, const void* x, const Map4& map_r, const Map4& map_x,
                               const void* mask, const Shape& s, int64_t F, int64_t seed, const ProjectionPlan& plan,
                               void* part, cudaStream_t stream) {
  const projection::SeedKeys keys = projection::seed_keys(seed);
  with_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_of<scalar_t>;
    const dim3 grid(static_cast<unsigned>(plan.fblocks), static_cast<unsigned>(plan.chunks),
                    static_cast<unsigned>(plan.iblocks));
    auto kernel = projection_forward_kernel<scalar_t, acc_t, image_block<acc_t>()>;
    SIB_LAUNCH(kernel, grid, dim3(kForwardThreads), 0, stream, static_cast<const scalar_t*>(R),
               static_cast<const scalar_t*>(x), map_r, map_x, static_cast<const acc_t*>(mask), s.B, s.C, s.N, s.C * s.N,
               F, keys.row, keys.col, plan.tiles_per_chunk, static_cast<acc_t*>(part), plan.part_stride);
  });
}

void launch_projection_reduce(bool is_double, const void* part, const ProjectionPlan& plan, int64_t B, int64_t F,
                              void* proj, void* sq, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(ceil_div(plan.part_stride, kThreads)));
  if (is_double) {
    auto kernel = projection_reduce_kernel<double>;
    SIB_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, static_cast<const double*>(part),
               plan.chunks, plan.part_stride, 2 * B * F, static_cast<double*>(proj), static_cast<double*>(sq));
  } else {
    auto kernel = projection_reduce_kernel<float>;
    SIB_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, static_cast<const float*>(part),
               plan.chunks, plan.part_stride, 2 * B * F, static_cast<float*>(proj), static_cast<float*>(sq));
  }
}

void launch_projection_backward(Dtype dtype, const void* gp, const void* gs, const void* R, const void* x,
                                const Map4& map_r, const Map4& map_x, const void* mask, const Shape& s, int64_t F,
                                int64_t seed, void* dR, const Map4& map_dr, void* dx, const Map4& map_dx, void* dmask,
                                cudaStream_t stream) {
  const projection::SeedKeys keys = projection::seed_keys(seed);
  with_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_of<scalar_t>;
    constexpr int IB = image_block<acc_t>();
    const dim3 grid(static_cast<unsigned>(ceil_div(s.N, kBackwardThreads)), static_cast<unsigned>(ceil_div(s.B, IB)));
    auto kernel = projection_backward_kernel<scalar_t, acc_t, IB>;
    SIB_LAUNCH(kernel, grid, dim3(kBackwardThreads), 0, stream,
               static_cast<const acc_t*>(gp), static_cast<const acc_t*>(gs), static_cast<const scalar_t*>(R),
               static_cast<const scalar_t*>(x), map_r, map_x, static_cast<const acc_t*>(mask), s.B, s.C, s.N, F,
               keys.row, keys.col, static_cast<scalar_t*>(dR), map_dr, static_cast<scalar_t*>(dx), map_dx,
               static_cast<acc_t*>(dmask));
  });
}

}  // namespace cuda
}  // namespace sib_fast
