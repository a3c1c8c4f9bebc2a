// Forward pass over R, x and M (docs/loss.md sections 4, 5): partial raw Gram matrices of
// u = R*M and v = x*M, and the background sums of R*(1-M), without writing any of
// those products.
//
// The Gram matrix is a product with a very long inner dimension (C*H*W positions) and
// a small B x B result, so the positions are split into chunks: block (chunk, tile, m)
// accumulates, for the image tile pair `tile` = (I, J) with I <= J, the products of
// matrix m (0: R, 1: x) over its chunk in tensor-core fragments, and writes them as one
// partial; sib_head_cuda.cu sums the partials in a fixed order. The reduction reads the
// upper triangle only, so a diagonal tile (I == J: the whole Gram up to 128 images)
// computes only the fragments on and above its diagonal, those on it in two products
// instead of three (Mma::mma_self), about half the tensor-core work of the full tile. Each slab of TK pixels
// of one channel is read from global memory once per tile side (16-byte vectors where
// the layout allows), multiplied by M, converted to the compute type and staged in
// shared memory as rows [image][position]; the warps then multiply the staged rows.
#include "cuda/sib_cuda_common.cuh"

namespace sib_fast {
namespace cuda {
namespace {

// Pixels per slab: 8 k-steps of the MMA (so up to 8 warp groups can split them).
template <typename acc_t>
constexpr int slab_width() {
  return 8 * Mma<acc_t>::K;
}

// Whether the 4-bit fields 0..n-1 of `order` hold each of 0..n-1 once.
constexpr bool is_region_order(uint64_t order, int n) {
  unsigned seen = 0;
  for (int w = 0; w < n; ++w) seen |= 1u << ((order >> (4 * w)) & 0xF);
  return seen == (1u << n) - 1;
}

// How the warps of a block cover the TB x TB tile of NF x NF fragments: a WR x WC grid
// of warps each owning FR x FC fragments, and KSPLIT groups of such grids splitting the
// k-steps of a slab (when the tile has fewer fragments than there are warps). Blocks of
// 8 warps; 16 for the float 128-image tile, whose 2 x 2 fragments per warp keep the
// accumulators within the 128 registers that two blocks' worth of threads per SM allow.
template <typename acc_t, int TB>
struct GramShape {
  static constexpr int FM = Mma<acc_t>::M;
  static constexpr int NF = TB / FM;
  static constexpr int WARPS = NF == 8 && sizeof(acc_t) == 4 ? 16 : 8;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int WR = NF < 4 ? NF : 4;
  static constexpr int WC = NF < WARPS / 4 ? NF : WARPS / 4;
  static constexpr int FR = NF / WR;
  static constexpr int FC = NF / WC;
  static constexpr int KSPLIT = WARPS / (WR * WC);
  static constexpr int TK = slab_width<acc_t>();
  static constexpr int LD = TK + 16 / static_cast<int>(sizeof(acc_t));  // padded row, 16-byte multiple
  static_assert(TB % FM == 0 && WR * WC * KSPLIT == WARPS && FR * WR == NF && FC * WC == NF, "warp layout");
  static_assert((TK / Mma<acc_t>::K) % KSPLIT == 0, "k-steps split evenly");
  // Warp w issues on SM sub-partition w % 4, whose tensor core it shares. A diagonal tile
  // computes only the fragments on and above its diagonal, so the plain order of the warp
  // regions would load the sub-partitions unevenly; in a diagonal tile warp w takes region
  // (DIAGONAL_ORDER >> 4 w) & 15 instead (region = WC row + column), products per k-step
  // (2 on the diagonal, 3 above it) at most, per sub-partition:
  //   128-image float tile, 4 x 4 regions of 2 x 2 fragments: 31 (one diagonal region of 7
  //     and one or two of 12 each; the plain order 43, the full tile 48);
  //   64-image float tile, 4 x 2 regions of 1 x 2 fragments: 7 (plain order 11, full tile 12).
  // The other shapes keep the plain order.
  static constexpr bool REORDER = KSPLIT == 1 && sizeof(acc_t) == 4 && (TB == 128 || TB == 64);
  static constexpr uint64_t DIAGONAL_ORDER = TB == 128 ? 0xEDC98462B731FA50ULL : 0x72645031ULL;
  static_assert(!REORDER || is_region_order(DIAGONAL_ORDER, WR * WC), "each warp one region");
};

template <typename scalar_t, typename acc_t, int TB>
__global__ void __launch_bounds__(GramShape<acc_t, TB>::THREADS, 512 / GramShape<acc_t, TB>::THREADS) gram_kernel(
    const scalar_t* __restrict__ R, const scalar_t* __restrict__ x, Map4 map_r, Map4 map_x,
    const acc_t* __restrict__ mask, bool mask_aligned, int64_t B, int64_t C, int64_t N, int64_t chunk_px,
    int tiles_side, int tiles, acc_t* __restrict__ gram_part, double* __restrict__ bg_part) {
  using S = GramShape<acc_t, TB>;
  using MT = Mma<acc_t>;
  constexpr int V = VecWidth<scalar_t>::value;
  constexpr int TK = S::TK, LD = S::LD, kGramThreads = S::THREADS;
  constexpr int GPR = TK / V;  // vector groups per staged row
  constexpr int GROUPS = TB * GPR;
  static_assert(TK % V == 0, "slab holds whole vectors");

  SIB_DYNAMIC_SMEM(smem_raw);
  const int m = blockIdx.z;
  const int tile = blockIdx.y;
  const int64_t chunk = blockIdx.x;
  // tile -> (I, J), I <= J, row-major over the upper triangle
  int I = 0, rest = tile;
  while (rest >= tiles_side - I) {
    rest -= tiles_side - I;
    ++I;
  }
  const int J = I + rest;
  const bool diagonal = I == J;
  // shared memory: the staged rows of tile I, of tile J (unless I == J), then the
  // background partials (two per load group, each owned by the thread that loads it)
  acc_t* UI = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* UJ = diagonal ? UI : UI + TB * LD;
  acc_t* bgs = UI + (tiles_side == 1 ? 1 : 2) * TB * LD;
  const scalar_t* X = m == 0 ? R : x;
  const Map4 map = m == 0 ? map_r : map_x;
  const bool want_bg = m == 0 && diagonal;

  const int tid = threadIdx.x, warp = tid / 32;
  const int kgroup = warp / (S::WR * S::WC);
  const int region = diagonal && S::REORDER ? static_cast<int>((S::DIAGONAL_ORDER >> (4 * warp)) & 0xF)
                                             : warp % (S::WR * S::WC);
  const int wr = region / S::WC;
  const int wc = region % S::WC;
  // a region wholly below the diagonal of a diagonal tile has nothing to compute
  const bool idle = diagonal && wr * S::FR >= (wc + 1) * S::FC;

  typename MT::Acc acc[S::FR][S::FC];
#pragma unroll
  for (int a = 0; a < S::FR; ++a)
#pragma unroll
    for (int b = 0; b < S::FC; ++b) wmma::fill_fragment(acc[a][b], acc_t(0));
  if (want_bg)
    for (int q = tid; q < GROUPS; q += kGramThreads) bgs[2 * q] = bgs[2 * q + 1] = acc_t(0);

  const int64_t p_begin = chunk * chunk_px;
  const int64_t p_end = p_begin + chunk_px < N ? p_begin + chunk_px : N;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += TK) {
    for (int64_t c = 0; c < C; ++c) {
      __syncthreads();  // the previous slab is no longer read
      // stage u = M * X of the slab: rows of tile I (and of tile J)
      for (int side = 0; side < (diagonal ? 1 : 2); ++side) {
        const int64_t img0 = static_cast<int64_t>(side == 0 ? I : J) * TB;
        acc_t* U = side == 0 ? UI : UJ;
#pragma unroll(V >= 8 ? 1 : 2)  // two loads in flight per thread, registers permitting
        for (int q = tid; q < GROUPS; q += kGramThreads) {
          const int il = q / GPR, kg = q % GPR;
          const int64_t i = img0 + il, p = p0 + kg * V;
          acc_t xv[V], mv[V];
          if (i < B) {
            load_group<scalar_t, acc_t, V>(X, map, i, c, p, N, xv);
            load_plane<acc_t, V>(mask + i * N, p, N, mask_aligned, mv);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) xv[e] = mv[e] = acc_t(0);
          }
          acc_t* row = U + il * LD + kg * V;
#pragma unroll
          for (int e = 0; e < V; ++e) row[e] = mv[e] * xv[e];
          if (want_bg) {
            acc_t s1 = 0, s2 = 0;
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const acc_t background = xv[e] * (acc_t(1) - mv[e]);
              s1 += background;
              s2 += background * background;
            }
            bgs[2 * q] += s1;
            bgs[2 * q + 1] += s2;
          }
        }
      }
      __syncthreads();
      // this warp's fragments over its share of the slab's k-steps; in a diagonal tile only
      // those on and above the diagonal (the reduction reads the upper triangle), the ones on
      // it in two products (mma_self); none of images past B (zero rows: a batch of 32 in the
      // 64-image tile, say)
      for (int ks = kgroup; ks < TK / MT::K && !idle; ks += S::KSPLIT) {
        typename MT::template FragA<wmma::row_major> a_big[S::FR], a_small[S::FR];
#pragma unroll
        for (int a = 0; a < S::FR; ++a) {
          wmma::load_matrix_sync(a_big[a], UI + (wr * S::FR + a) * MT::M * LD + ks * MT::K, LD);
          MT::split(a_big[a], a_small[a]);
        }
#pragma unroll
        for (int b = 0; b < S::FC; ++b) {
          const int fc = wc * S::FC + b;
          if (static_cast<int64_t>(J) * TB + fc * MT::N >= B) continue;
          typename MT::template FragB<wmma::col_major> b_big, b_small;
          wmma::load_matrix_sync(b_big, UJ + fc * MT::N * LD + ks * MT::K, LD);
          MT::split(b_big, b_small);
#pragma unroll
          for (int a = 0; a < S::FR; ++a) {
            const int fr = wr * S::FR + a;
            if (static_cast<int64_t>(I) * TB + fr * MT::M >= B) continue;
            if (!diagonal || fr < fc) {
              MT::mma(acc[a][b], a_big[a], a_small[a], b_big, b_small);
            } else if (fr == fc) {
              MT::mma_self(acc[a][b], a_big[a], b_big, b_small);
            }
          }
        }
      }
    }
  }

  // partial (chunk, k-group) of tile pair `tile`, matrix m: a TB x TB row-major block
  const int64_t sub = chunk * S::KSPLIT + kgroup;
  acc_t* out = gram_part + ((sub * tiles + tile) * 2 + m) * static_cast<int64_t>(TB) * TB;
#pragma unroll
  for (int a = 0; a < S::FR; ++a)
#pragma unroll
    for (int b = 0; b < S::FC; ++b)
      if (!idle && (!diagonal || wr * S::FR + a <= wc * S::FC + b))
        wmma::store_matrix_sync(out + (wr * S::FR + a) * MT::M * TB + (wc * S::FC + b) * MT::N, acc[a][b], TB,
                                wmma::mem_row_major);

  if (want_bg) {
    __syncthreads();  // every thread's partials are in
    if (tid < TB) {   // per image: its groups in order
      const int64_t i = static_cast<int64_t>(I) * TB + tid;
      if (i < B) {
        double s1 = 0.0, s2 = 0.0;
        for (int kg = 0; kg < GPR; ++kg) {
          s1 += static_cast<double>(bgs[2 * (tid * GPR + kg)]);
          s2 += static_cast<double>(bgs[2 * (tid * GPR + kg) + 1]);
        }
        bg_part[(chunk * B + i) * 2] = s1;
        bg_part[(chunk * B + i) * 2 + 1] = s2;
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int TB>
void launch_tile(const void* R, const void* x, const Map4& map_r, const Map4& map_x, const void* mask,
                 const Shape& sh, const GramPlan& plan, void* gram_part, double* bg_part, cudaStream_t stream) {
  using S = GramShape<acc_t, TB>;
  constexpr int V = VecWidth<scalar_t>::value;
  const bool mask_aligned = sh.N % (16 / sizeof(acc_t)) == 0;
  const size_t smem = (static_cast<size_t>(plan.tiles_side == 1 ? 1 : 2) * TB * S::LD +
                       2 * static_cast<size_t>(TB) * (S::TK / V)) * sizeof(acc_t);
  auto kernel = gram_kernel<scalar_t, acc_t, TB>;
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(plan.chunks), static_cast<unsigned>(plan.tiles), 2);
  SIB_LAUNCH(kernel, grid, dim3(S::THREADS), smem, stream, static_cast<const scalar_t*>(R),
             static_cast<const scalar_t*>(x), map_r, map_x, static_cast<const acc_t*>(mask), mask_aligned, sh.B, sh.C,
             sh.N, plan.chunk_px, plan.tiles_side, plan.tiles, static_cast<acc_t*>(gram_part), bg_part);
}

template <typename acc_t, int TB>
GramPlan make_plan(int64_t B, int64_t N) {
  using S = GramShape<acc_t, TB>;
  GramPlan plan;
  plan.tile = TB;
  plan.tiles_side = static_cast<int>(ceil_div(B, TB));
  plan.tiles = plan.tiles_side * (plan.tiles_side + 1) / 2;
  plan.ksplit = S::KSPLIT;
  // about two blocks' worth of 256 threads per multiprocessor; chunks of whole slabs
  const int64_t slabs = ceil_div(N, S::TK);
  const int64_t want = ceil_div(2 * device_info().num_sms * 256 / S::THREADS, 2 * plan.tiles);
  const int64_t chunks = want < 1 ? 1 : (want > slabs ? slabs : want);
  plan.chunk_px = ceil_div(slabs, chunks) * S::TK;
  plan.chunks = static_cast<int>(ceil_div(N, plan.chunk_px));
  return plan;
}

}  // namespace

GramPlan gram_plan(int64_t B, int64_t N, bool is_double) {
  switch (image_tile(B, is_double)) {
    case 16:
      return is_double ? make_plan<double, 16>(B, N) : make_plan<float, 16>(B, N);
    case 64:
      return is_double ? make_plan<double, 64>(B, N) : make_plan<float, 64>(B, N);
    default:
      return make_plan<float, 128>(B, N);
  }
}

void launch_gram(Dtype dtype, const void* R, const void* x, const Map4& map_r, const Map4& map_x, const void* mask,
                 const Shape& sh, const GramPlan& plan, void* gram_part, double* bg_part, cudaStream_t stream) {
  with_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_of<scalar_t>;
    if constexpr (std::is_same<acc_t, double>::value) {
      if (plan.tile == 16) {
        launch_tile<scalar_t, acc_t, 16>(R, x, map_r, map_x, mask, sh, plan, gram_part, bg_part, stream);
      } else {
        launch_tile<scalar_t, acc_t, 64>(R, x, map_r, map_x, mask, sh, plan, gram_part, bg_part, stream);
      }
    } else {
      if (plan.tile == 16) {
        launch_tile<scalar_t, acc_t, 16>(R, x, map_r, map_x, mask, sh, plan, gram_part, bg_part, stream);
      } else if (plan.tile == 64) {
        launch_tile<scalar_t, acc_t, 64>(R, x, map_r, map_x, mask, sh, plan, gram_part, bg_part, stream);
      } else {
        launch_tile<scalar_t, acc_t, 128>(R, x, map_r, map_x, mask, sh, plan, gram_part, bg_part, stream);
      }
    }
  });
}

}  // namespace cuda
}  // namespace sib_fast
