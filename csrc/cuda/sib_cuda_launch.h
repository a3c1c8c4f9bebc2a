// The interface between the host code of the CUDA backend (sib_head_cuda_ops.cpp:
// checks, allocation, op registration; compiled by the C++ compiler with ATen) and the
// kernels (*.cu: compiled by nvcc without ATen, whose headers would multiply the
// build time). Plain pointers, sizes and the stream; every launcher checks its launch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sib_head.h"

#ifdef SIB_CUDA_EMULATE
#include "cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace sib_fast {
namespace cuda {

enum class Dtype : int { kFloat, kDouble, kHalf, kBFloat16 };

struct Shape {
  int64_t B, C, H, W, N;
};

// Where element (b, c, p) of a (B, C, H, W) tensor lives, p = h * W + w the flat pixel.
// `linear`: pixels are evenly spaced (h stride == W * w stride), as in contiguous,
// channels_last and column-sliced tensors; otherwise (transposed) p is split into h, w.
// `vec`: groups of V consecutive pixels (V values = 16 bytes) are aligned vectors.
struct Map4 {
  int64_t sb, sc, sh, sw;
  int64_t W;
  bool linear, vec;

  SIB_HOST_DEVICE int64_t offset(int64_t b, int64_t c, int64_t p) const {
    return b * sb + c * sc + (linear ? p * sw : (p / W) * sh + (p % W) * sw);
  }
};

// The soft-quantile windows one selection launch serves (the same for every image).
struct QuantileWindows {
  int count;
  int quantile[3];  // row of rank_index and column of image_stats
  int first[3];
  int len[3];
  double weight[3][kRankWindow];
};

// Where pixel p of image b of a (B, H*W) plane lives: contiguous planes have image = N,
// pixel = 1; a channel of a contiguous or channels_last (B, C, H, W) tensor is a plane too.
// pixel < 2^31 (the box kernels step in 32 bits).
struct PlaneLayout {
  int64_t image, pixel;
  SIB_HOST_DEVICE int64_t at(int64_t b, int64_t p) const { return b * image + p * pixel; }
};

// The backward's planes in the compute type (sib_backward_cuda.cu): channels of dR or a
// buffer of their own (sib_head_cuda_ops.cpp).
struct BackwardPlanes {
  void* dM_u;  // dM of the R products; then dd, dh and da of the mask chain's adjoint
  void* dM_v;  // dM of the x products; then the row sums of the box pass
  void* g;     // mean_c R
  PlaneLayout layout;
  bool aligned;  // contiguous pixels and images on 16 bytes: groups of pixels load as vectors
};

// How the Gram pass splits its work (sib_gram_cuda.cu).
struct GramPlan {
  int tile;          // image tile TB
  int tiles_side;    // ceil(B / TB)
  int tiles;         // tile pairs (I <= J)
  int chunks;        // pixel chunks
  int ksplit;        // warp groups splitting the positions of a chunk
  int64_t chunk_px;  // pixels per chunk (a multiple of the slab width)
  int64_t partial_count() const { return static_cast<int64_t>(chunks) * ksplit; }
  int64_t partial_elements() const { return partial_count() * tiles * 2 * static_cast<int64_t>(tile) * tile; }
};

// The image tile of the Gram and backward products for a batch of B: 16, 64 or 128
// (64 at most for double, whose fragments take twice the registers).
inline int image_tile(int64_t B, bool is_double) {
  if (B <= 16) return 16;
  if (B <= 64 || is_double) return 64;
  return 128;
}

// ---- forward (planes in the compute type: double if is_double, else float)
void launch_channel_mean(Dtype dtype, const void* R, const Map4& map, const Shape& s, void* g, cudaStream_t stream);
// scratch: 2 B N int32 (candidate lists)
void launch_select(bool is_double, bool abs_values, const void* planes, const Shape& s, const QuantileWindows& win,
                   int32_t* scratch, void* stats, int64_t* ranks, void* mask, double slope, cudaStream_t stream);
// d = box_k(h), h = sigmoid(s (u - t1)) from g and the image stats; rows: a (B, N) double plane
void launch_box_mean_h(bool is_double, const void* g, const void* stats, double slope, const Shape& s,
                       int64_t window, double* rows, void* d, cudaStream_t stream);
// out = box_k(in) (the backward's, on dd); rows: planes of the compute type; all three
// planes laid out alike.
void launch_box_mean(bool is_double, const void* in, const PlaneLayout& layout, const Shape& s, int64_t window,
                     void* rows, void* out, cudaStream_t stream);
GramPlan gram_plan(int64_t B, int64_t N, bool is_double);
void launch_gram(Dtype dtype, const void* R, const void* x, const Map4& map_r, const Map4& map_x, const void* mask,
                 const Shape& s, const GramPlan& plan, void* gram_part, double* bg_part, cudaStream_t stream);
void launch_gram_reduce(bool is_double, const void* gram_part, const GramPlan& plan, int64_t B, void* gram_out,
                        double* gram_d, cudaStream_t stream);
void launch_finalize(bool is_double, const double* gram_d, const double* bg_part, int64_t chunks, int64_t B, double D,
                     double* work, void* hsic, void* bg, void* stats, cudaStream_t stream);

// ---- backward
void launch_adjoint(bool is_double, const void* gram, int64_t B, const void* grad_hsic, const void* grad_bg,
                    const void* stats, double D, double* work, void* A, int64_t Bp, void* bg_terms,
                    cudaStream_t stream);
// pass 1 over R, x, M: the planes dM_u, dM_v, g, and dx when dx is not null
void launch_backward_planes(Dtype dtype, const void* R, const void* x, const Map4& map_r, const Map4& map_x,
                            const void* mask, const void* A, int64_t Bp, const void* bg_terms, const Shape& s,
                            void* dx, const Map4& map_dx, const BackwardPlanes& planes, cudaStream_t stream);
void launch_mask_adjoint_t2(bool is_double, void* dM_u, const void* dM_v, const PlaneLayout& layout, const void* grad_mask,
                            const void* mask, const int64_t* ranks, const Shape& s, const QuantileWindows& win,
                            double slope, cudaStream_t stream);
void launch_mask_adjoint_h(bool is_double, void* dh, const void* g, const PlaneLayout& layout, const void* stats,
                           const int64_t* ranks, const Shape& s, const QuantileWindows& win, double slope,
                           cudaStream_t stream);
// pass 2 over R, M: dR, from da (in planes.dM_u) and g
void launch_backward_grad_r(Dtype dtype, const void* R, const Map4& map_r, const void* mask, const void* A, int64_t Bp,
                            const void* bg_terms, const Shape& s, void* dR, const Map4& map_dr,
                            const BackwardPlanes& planes, cudaStream_t stream);

}  // namespace cuda
}  // namespace sib_fast
