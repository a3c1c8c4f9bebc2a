// What the host sides of the CUDA ops share (sib_head_cuda_ops.cpp, sib_projection_cuda_ops.cpp):
// the device they run on (a GPU, or the CPU under the emulation of tests/cuda_emulation), the
// current stream, the dtype code and the shape and strides the kernels take. ATen, so .cpp only.
#pragma once

#include <ATen/ATen.h>

#ifndef SIB_CUDA_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>

#include "cuda/sib_cuda_launch.h"

namespace sib_fast {
namespace cuda {

#ifdef SIB_CUDA_EMULATE
constexpr const char* kKernelKind = "emulated CUDA kernel";
inline bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
inline cudaStream_t current_stream() { return nullptr; }
#define SIB_DEVICE_GUARD(t) (void)(t)
#else
constexpr const char* kKernelKind = "CUDA kernel";
inline bool on_device(const at::Tensor& t) { return t.device().is_cuda(); }
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#define SIB_DEVICE_GUARD(t) const c10::cuda::CUDAGuard device_guard((t).device())
#endif

// The kernels' code for R's dtype; ``op`` names the op in the error.
inline Dtype dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat;
    case at::kDouble:
      return Dtype::kDouble;
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, " (", kKernelKind, "): R and x must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return Dtype::kFloat;
}

inline Shape shape_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3), t.size(2) * t.size(3)};
}

// Strides of a (B, C, H, W) tensor for the kernels; size-1 dimensions take the stride that keeps
// the pixels linear. ``vec``: 16-byte vectors can load it (linear, unit pixel stride, aligned).
inline Map4 make_map(const at::Tensor& t) {
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3), N = H * W;
  Map4 m;
  m.sb = t.stride(0);
  m.sc = C == 1 ? 0 : t.stride(1);
  m.sh = t.stride(2);
  m.sw = t.stride(3);
  if (W == 1) m.sw = m.sh;      // w is always 0
  if (H == 1) m.sh = W * m.sw;  // h is always 0
  m.W = W;
  m.linear = m.sh == W * m.sw;
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  m.vec = m.linear && m.sw == 1 && N % vec == 0 && m.sb % vec == 0 && m.sc % vec == 0 && addr % 16 == 0;
  return m;
}

}  // namespace cuda
}  // namespace sib_fast
