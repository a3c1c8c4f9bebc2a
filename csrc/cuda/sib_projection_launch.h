// The interface between the host side of the CUDA masked projections (sib_projection_cuda_ops.cpp:
// checks, allocation, registration) and their kernels (sib_projection_cuda.cu), as
// sib_cuda_launch.h is for the head: plain pointers, sizes, strides and the stream.
#pragma once

#include <cstdint>

#include "cuda/sib_cuda_launch.h"

namespace sib_fast {
namespace cuda {

// How the forward splits its work: blocks over (F blocks of pairs, chunks of d, image blocks),
// each chunk's partial sums written to part[chunk] (2 B F proj values, then 2 B sq values) and
// summed over the chunks in order.
struct ProjectionPlan {
  int64_t fblocks, chunks, iblocks;
  int64_t tiles_per_chunk;  // d-tiles of kProjTileRows rows per chunk
  int64_t part_stride;      // 2 B F + 2 B
};

ProjectionPlan projection_plan(int64_t B, int64_t D, int64_t F, bool is_double);

// part: plan.chunks * plan.part_stride values of the compute type
void launch_projection_forward(Dtype dtype, const void* R, const void* x, const Map4& map_r, const Map4& map_x,
                               const void* mask, const Shape& s, int64_t F, int64_t seed, const ProjectionPlan& plan,
                               void* part, cudaStream_t stream);
void launch_projection_reduce(bool is_double, const void* part, const ProjectionPlan& plan, int64_t B, int64_t F,
                              void* proj, void* sq, cudaStream_t stream);
// gp (2, B, F) and gs (2, B) or null, contiguous in the compute type; dx null unless wanted
void launch_projection_backward(Dtype dtype, const void* gp, const void* gs, const void* R, const void* x,
                                const Map4& map_r, const Map4& map_x, const void* mask, const Shape& s, int64_t F,
                                int64_t seed, void* dR, const Map4& map_dr, void* dx,
                                const Map4& map_dx, void* dmask, cudaStream_t stream);

}  // namespace cuda
}  // namespace sib_fast
