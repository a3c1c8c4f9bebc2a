// The backward's passes over R, x and M (docs/loss.md section 7): the HSIC term's gradient is
// d/du_i = sum_j A_u[i, j] u_j (u = R*M), likewise for v = x*M (the B x B factors
// A_u, A_v come from hsic_and_adjoint's math, see sib_head_cuda.cu). With T_u = A_u U:
//   pass 1   dM_u = sum_c (R T_u - R g_bg)    g_bg = bg_scale (R (1 - M) - bg_mean)
//            dM_v = sum_c x T_v,   g = mean_c R (for the mask chain's adjoint),   dx = M T_v
//   pass 2   dR = M T_u + (1 - M) g_bg + sign(g) da / C, with da from the mask chain's
//            adjoint (sib_head_cuda.cu) on the planes of pass 1
// Pass 2 mixes T_u again rather than storing it: dR is then written once, and the planes
// fit in dR's own channels (sib_head_cuda_ops.cpp), so the backward allocates no more
// than dR. Block (pixel tiles, image tile, m) with m = 0 for R (T_u) and, in pass 1,
// m = 1 for x (T_v): it stages the A rows of its image tile and, per channel, the masked
// rows of all images over TP pixels in shared memory, multiplies them on tensor cores
// (3xTF32 or double MMA), stages T and finishes each element; dM and g sum over the
// channels in shared memory, so every output element is written once by one block.
// Blocks are persistent (a grid of about two per multiprocessor loops over the pixel
// tiles), so A is loaded once per block when the batch fits one chunk.
#include "cuda/sib_cuda_common.cuh"

namespace sib_fast {
namespace cuda {
namespace {

constexpr int kBackwardThreads = 256;

enum class Pass { kPlanes, kGradR };

// The tile: TI images (rows of T and of A) by TP pixels, with the inner dimension (the
// images j of u_j) in chunks of JC; 8 warps as a WI x WP grid, each owning FRI x FCP
// fragments of T. Shared memory: A[i][j] of the chunk, the masked rows u_j (then T),
// and the per-channel sums of dM and g owned by the thread that finishes the element.
template <typename acc_t, int TI, int JC>
struct BackwardShape {
  static constexpr int FM = Mma<acc_t>::M, FN = Mma<acc_t>::N;
  static constexpr int TP = (sizeof(acc_t) == 8 ? 2048 : 4096) / TI;
  static constexpr int NFI = TI / FM, NFP = TP / FN;
  static constexpr int PER_WARP = NFI * NFP / 8;
  static constexpr int FRI = NFI < 2 ? NFI : 2;
  static constexpr int FCP = PER_WARP / FRI;
  static constexpr int WI = NFI / FRI, WP = NFP / FCP;
  static constexpr int PAD = 16 / static_cast<int>(sizeof(acc_t));
  static constexpr int LDA = JC + PAD, LDU = TP + PAD;
  static_assert(WI * WP == 8 && FRI * FCP == PER_WARP && JC % TI == 0, "warp layout");
  static_assert(JC >= TI, "T is staged in the rows of u");
  static constexpr size_t smem_bytes() {
    return (static_cast<size_t>(TI) * LDA + static_cast<size_t>(JC) * LDU + 2 * static_cast<size_t>(TI) * TP) *
           sizeof(acc_t);
  }
};

// The planes dM_u (da in pass 2), dM_v and g are laid out as `layout` says; they may be
// channels of dR, which pass 2 overwrites: each thread reads da and g of its groups before
// it stores dR there, and no other block touches them.
template <typename scalar_t, typename acc_t, int TI, int JC, Pass kPass>
__global__ void __launch_bounds__(kBackwardThreads, 2) backward_kernel(
    const scalar_t* __restrict__ R, const scalar_t* __restrict__ x, Map4 map_r, Map4 map_x,
    const acc_t* __restrict__ mask, bool plane_aligned, const acc_t* __restrict__ A, int64_t Bp,
    const acc_t* __restrict__ bg_terms, int64_t B, int64_t C, int64_t N, scalar_t* dR, Map4 map_dr,
    scalar_t* __restrict__ dx, Map4 map_dx, acc_t* dM_u, acc_t* dM_v, acc_t* g_planes,
    PlaneLayout layout, bool planes_aligned) {
  using S = BackwardShape<acc_t, TI, JC>;
  using MT = Mma<acc_t>;
  constexpr int V = VecWidth<scalar_t>::value;
  constexpr int TP = S::TP, LDA = S::LDA, LDU = S::LDU;
  constexpr int GPR = TP / V;  // vector groups per row of the tile
  constexpr int OUT_GROUPS = TI * GPR, IN_GROUPS = JC * GPR;
  static_assert(TP % V == 0 && OUT_GROUPS % kBackwardThreads == 0 && IN_GROUPS % kBackwardThreads == 0,
                "tile holds whole groups");

  SIB_DYNAMIC_SMEM(smem_raw);
  acc_t* As = reinterpret_cast<acc_t*>(smem_raw);  // A[i0 + il][j0 + jl]
  acc_t* Us = As + TI * LDA;                        // u_j over the tile's pixels; then T
  acc_t* dm = Us + JC * LDU;                        // sum over channels of dM; da in pass 2
  acc_t* gsum = dm + TI * TP;                       // sum over channels of R; g in pass 2
  const int m = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * TI;
  const scalar_t* X = m == 0 ? R : x;
  const Map4 map = m == 0 ? map_r : map_x;
  const acc_t* Am = A + m * Bp * Bp;
  const int64_t jchunks = ceil_div(B, JC);
  const int64_t ptiles = ceil_div(N, TP);
  const acc_t bg_scale = bg_terms[0];

  const int tid = threadIdx.x, warp = tid / 32;
  const int wi = warp / S::WP, wp = warp % S::WP;
  bool a_loaded = false;

  for (int64_t pt = blockIdx.x; pt < ptiles; pt += gridDim.x) {
    const int64_t p_base = pt * TP;
    for (int q = tid; q < OUT_GROUPS; q += kBackwardThreads) {
      if constexpr (kPass == Pass::kGradR) {
        const int il = q / GPR, pg = q % GPR;
        const int64_t i = i0 + il, p = p_base + pg * V;
        acc_t dav[V] = {}, gv[V] = {};
        if (i < B && p < N) {
          if (layout.pixel == 1) {
            load_plane<acc_t, V>(dM_u + layout.at(i, 0), p, N, planes_aligned, dav);
            load_plane<acc_t, V>(g_planes + layout.at(i, 0), p, N, planes_aligned, gv);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) {
              if (p + e < N) {
                dav[e] = dM_u[layout.at(i, p + e)];
                gv[e] = g_planes[layout.at(i, p + e)];
              }
            }
          }
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          dm[q * V + e] = dav[e];
          gsum[q * V + e] = gv[e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) dm[q * V + e] = gsum[q * V + e] = acc_t(0);
      }
    }

    for (int64_t c = 0; c < C; ++c) {
      typename MT::Acc acc[S::FRI][S::FCP];
#pragma unroll
      for (int a = 0; a < S::FRI; ++a)
#pragma unroll
        for (int b = 0; b < S::FCP; ++b) wmma::fill_fragment(acc[a][b], acc_t(0));

      for (int64_t jc = 0; jc < jchunks; ++jc) {
        const int64_t j0 = jc * JC;
        __syncthreads();  // the previous tile's A, U and T are no longer read
        if (jchunks > 1 || !a_loaded) {
          for (int e = tid; e < TI * JC; e += kBackwardThreads) {
            const int il = e / JC, jl = e % JC;
            As[il * LDA + jl] = Am[(i0 + il) * Bp + j0 + jl];  // padded with zeros past B
          }
          a_loaded = true;
        }
#pragma unroll(V >= 8 ? 1 : 2)  // two loads in flight per thread, registers permitting
        for (int q = tid; q < IN_GROUPS; q += kBackwardThreads) {
          const int jl = q / GPR, pg = q % GPR;
          const int64_t j = j0 + jl, p = p_base + pg * V;
          acc_t xv[V], mv[V];
          if (j < B) {
            load_group<scalar_t, acc_t, V>(X, map, j, c, p, N, xv);
            load_plane<acc_t, V>(mask + j * N, p, N, plane_aligned, mv);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) xv[e] = mv[e] = acc_t(0);
          }
          acc_t* row = Us + jl * LDU + pg * V;
#pragma unroll
          for (int e = 0; e < V; ++e) row[e] = mv[e] * xv[e];
        }
        __syncthreads();
        // images past B are zero rows of A and U (a batch of 32 in the 64-image tile, say):
        // their k-steps and this warp's fragments of them are skipped
#pragma unroll 2
        for (int ks = 0; ks < JC / MT::K && j0 + ks * MT::K < B; ++ks) {
          typename MT::template FragA<wmma::row_major> a_big[S::FRI], a_small[S::FRI];
#pragma unroll
          for (int a = 0; a < S::FRI; ++a) {
            wmma::load_matrix_sync(a_big[a], As + (wi * S::FRI + a) * MT::M * LDA + ks * MT::K, LDA);
            MT::split(a_big[a], a_small[a]);
          }
#pragma unroll
          for (int b = 0; b < S::FCP; ++b) {
            typename MT::template FragB<wmma::row_major> b_big, b_small;
            wmma::load_matrix_sync(b_big, Us + ks * MT::K * LDU + (wp * S::FCP + b) * MT::N, LDU);
            MT::split(b_big, b_small);
#pragma unroll
            for (int a = 0; a < S::FRI; ++a)
              if (i0 + (wi * S::FRI + a) * MT::M < B) MT::mma(acc[a][b], a_big[a], a_small[a], b_big, b_small);
          }
        }
      }
      __syncthreads();  // every warp is done with Us: it now holds T (TI rows)
#pragma unroll
      for (int a = 0; a < S::FRI; ++a)
#pragma unroll
        for (int b = 0; b < S::FCP; ++b)
          wmma::store_matrix_sync(Us + (wi * S::FRI + a) * MT::M * LDU + (wp * S::FCP + b) * MT::N, acc[a][b], LDU,
                                  wmma::mem_row_major);
      __syncthreads();

      // finish the elements of this thread's groups (the same groups for every channel)
#pragma unroll(V >= 8 ? 1 : 2)
      for (int q = tid; q < OUT_GROUPS; q += kBackwardThreads) {
        const int il = q / GPR, pg = q % GPR;
        const int64_t i = i0 + il, p = p_base + pg * V;
        if (i >= B || p >= N) continue;
        acc_t xv[V], mv[V], out[V];
        load_group<scalar_t, acc_t, V>(X, map, i, c, p, N, xv);
        load_plane<acc_t, V>(mask + i * N, p, N, plane_aligned, mv);
        const acc_t* T = Us + il * LDU + pg * V;
        acc_t* dmq = dm + q * V;
        if constexpr (kPass == Pass::kGradR) {
          const acc_t bg_mean = bg_terms[1 + i];
          const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
          const acc_t* gq = gsum + q * V;
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const acc_t keep = acc_t(1) - mv[e];
            const acc_t bg_grad = bg_scale * (xv[e] * keep - bg_mean);
            out[e] = mv[e] * T[e] + keep * bg_grad + dmq[e] * sign_of(gq[e]) * inv_c;
          }
          store_group<scalar_t, acc_t, V>(dR, map_dr, i, c, p, N, out);
        } else if (m == 0) {
          const acc_t bg_mean = bg_terms[1 + i];
          acc_t* gq = gsum + q * V;
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const acc_t keep = acc_t(1) - mv[e];
            const acc_t bg_grad = bg_scale * (xv[e] * keep - bg_mean);
            dmq[e] += xv[e] * T[e] - xv[e] * bg_grad;
            gq[e] += xv[e];
          }
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            out[e] = mv[e] * T[e];
            dmq[e] += xv[e] * T[e];
          }
          if (dx != nullptr) store_group<scalar_t, acc_t, V>(dx, map_dx, i, c, p, N, out);
        }
      }
    }

    // pass 1: the planes of this tile (each thread its own groups: no barrier needed)
    if constexpr (kPass == Pass::kPlanes) {
      for (int q = tid; q < OUT_GROUPS; q += kBackwardThreads) {
        const int il = q / GPR, pg = q % GPR;
        const int64_t i = i0 + il;
        if (i >= B) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int64_t p = p_base + pg * V + e;
          if (p >= N) continue;
          if (m == 0) {
            dM_u[layout.at(i, p)] = dm[q * V + e];
            g_planes[layout.at(i, p)] = exact_div(gsum[q * V + e], static_cast<acc_t>(C));
          } else {
            dM_v[layout.at(i, p)] = dm[q * V + e];
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int TI, int JC, Pass kPass>
void launch_tile(const void* R, const void* x, const Map4& map_r, const Map4& map_x, const void* mask, const void* A,
                 int64_t Bp, const void* bg_terms, const Shape& sh, void* dR, const Map4& map_dr, void* dx,
                 const Map4& map_dx, const BackwardPlanes& planes, cudaStream_t stream) {
  using S = BackwardShape<acc_t, TI, JC>;
  const bool plane_aligned = sh.N % (16 / sizeof(acc_t)) == 0;
  const int64_t itiles = ceil_div(sh.B, TI), ptiles = ceil_div(sh.N, S::TP);
  // persistent blocks: about two per multiprocessor in all, each looping over pixel tiles
  const int64_t mats = kPass == Pass::kPlanes ? 2 : 1;
  const int64_t want = ceil_div(2 * device_info().num_sms, mats * itiles);
  const int64_t blocks = want < 1 ? 1 : (want > ptiles ? ptiles : want);
  const size_t smem = S::smem_bytes();
  auto kernel = backward_kernel<scalar_t, acc_t, TI, JC, kPass>;
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(itiles), static_cast<unsigned>(mats));
  SIB_LAUNCH(kernel, grid, dim3(kBackwardThreads), smem, stream, static_cast<const scalar_t*>(R),
             static_cast<const scalar_t*>(x), map_r, map_x, static_cast<const acc_t*>(mask), plane_aligned,
             static_cast<const acc_t*>(A), Bp, static_cast<const acc_t*>(bg_terms), sh.B, sh.C, sh.N,
             static_cast<scalar_t*>(dR), map_dr, static_cast<scalar_t*>(dx), map_dx, static_cast<acc_t*>(planes.dM_u),
             static_cast<acc_t*>(planes.dM_v), static_cast<acc_t*>(planes.g), planes.layout, planes.aligned);
}

template <Pass kPass>
void launch_pass(Dtype dtype, const void* R, const void* x, const Map4& map_r, const Map4& map_x, const void* mask,
                 const void* A, int64_t Bp, const void* bg_terms, const Shape& sh, void* dR, const Map4& map_dr,
                 void* dx, const Map4& map_dx, const BackwardPlanes& planes, cudaStream_t stream) {
  with_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_of<scalar_t>;
    const int tile = image_tile(sh.B, std::is_same<acc_t, double>::value);
    TORCH_CHECK(Bp % tile == 0, "sib_head_backward (CUDA kernel): A is not padded to the image tile");
    auto run = [&](auto tile_tag) {
      constexpr int JC = decltype(tile_tag)::value, TI = JC < 64 ? JC : 64;
      launch_tile<scalar_t, acc_t, TI, JC, kPass>(R, x, map_r, map_x, mask, A, Bp, bg_terms, sh, dR, map_dr, dx,
                                                  map_dx, planes, stream);
    };
    if (tile == 16) {
      run(std::integral_constant<int, 16>{});
    } else if constexpr (std::is_same<acc_t, double>::value) {
      run(std::integral_constant<int, 64>{});
    } else if (tile == 64) {
      run(std::integral_constant<int, 64>{});
    } else {
      run(std::integral_constant<int, 128>{});
    }
  });
}

}  // namespace

void launch_backward_planes(Dtype dtype, const void* R, const void* x, const Map4& map_r, const Map4& map_x,
                            const void* mask, const void* A, int64_t Bp, const void* bg_terms, const Shape& sh,
                            void* dx, const Map4& map_dx, const BackwardPlanes& planes, cudaStream_t stream) {
  launch_pass<Pass::kPlanes>(dtype, R, x, map_r, map_x, mask, A, Bp, bg_terms, sh, nullptr, map_r, dx, map_dx, planes,
                             stream);
}

void launch_backward_grad_r(Dtype dtype, const void* R, const Map4& map_r, const void* mask, const void* A, int64_t Bp,
                            const void* bg_terms, const Shape& sh, void* dR, const Map4& map_dr,
                            const BackwardPlanes& planes, cudaStream_t stream) {
  launch_pass<Pass::kGradR>(dtype, R, R, map_r, map_r, mask, A, Bp, bg_terms, sh, dR, map_dr, nullptr, map_dr, planes,
                            stream);
}

}  // namespace cuda
}  // namespace sib_fast
