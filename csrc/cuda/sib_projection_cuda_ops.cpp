// Host side of the CUDA kernels of sib_fast::masked_projection_forward / _backward (the
// random-feature HSIC's projections, docs/loss.md section 4b; kernels in
// sib_projection_cuda.cu): the checks and conversions of csrc/cpu/projection_cpu.cpp (the
// model for the semantics), allocation, launches on the current stream and the registration
// under the CUDA dispatch key. Built by the C++ compiler, as sib_head_cuda_ops.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#ifndef SIB_CUDA_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <optional>
#include <tuple>

#include "cuda/sib_projection_launch.h"
#include "sib_head_host.h"

namespace sib_fast {
namespace cuda {
namespace {

#ifdef SIB_CUDA_EMULATE
constexpr const char* kName = "masked_projection (emulated CUDA kernel)";
inline bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
inline cudaStream_t current_stream() { return nullptr; }
#define SIB_PROJECTION_GUARD(t) (void)(t)
#else
constexpr const char* kName = "masked_projection (CUDA kernel)";
inline bool on_device(const at::Tensor& t) { return t.device().is_cuda(); }
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#define SIB_PROJECTION_GUARD(t) const c10::cuda::CUDAGuard device_guard((t).device())
#endif

Dtype dtype_of(const at::Tensor& t) {
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
      TORCH_CHECK(false, kName, ": R and x must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
  return Dtype::kFloat;
}

// Any strides (the kernels index every element, no vectors); size-1 dimensions take the stride
// that keeps the pixels evenly spaced, as make_map of sib_head_cuda_ops.cpp.
Map4 map_of(const at::Tensor& t) {
  Map4 m;
  m.sb = t.stride(0);
  m.sc = t.size(1) == 1 ? 0 : t.stride(1);
  m.sh = t.stride(2);
  m.sw = t.stride(3);
  if (t.size(3) == 1) m.sw = m.sh;
  if (t.size(2) == 1) m.sh = t.size(3) * m.sw;
  m.W = t.size(3);
  m.linear = m.sh == t.size(3) * m.sw;
  m.vec = false;
  return m;
}

Shape shape_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3), t.size(2) * t.size(3)}; }

void check_inputs(const at::Tensor& R, const at::Tensor& x, const at::Tensor& mask, int64_t features, int64_t seed) {
  TORCH_CHECK(on_device(R) && R.device() == x.device() && R.device() == mask.device(), kName,
              ": R, x and mask must be on the same GPU, got ", R.device(), ", ", x.device(), " and ", mask.device());
  TORCH_CHECK(R.dim() == 4 && R.sizes() == x.sizes(),
              "masked_projection: R and x must be (B, C, H, W) of one shape, got ",
              R.sizes(), " and ", x.sizes());
  TORCH_CHECK(R.scalar_type() == x.scalar_type(), "masked_projection: R and x must have the same dtype, got ",
              R.scalar_type(), " and ", x.scalar_type());
  (void)dtype_of(R);
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == R.size(0) && mask.size(1) == R.size(2) && mask.size(2) == R.size(3),
              "masked_projection: mask must be (B, H, W) of R's B, H, W, got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == compute_type(R), "masked_projection: mask must be in the compute dtype ",
              compute_type(R), ", got ", mask.scalar_type());
  TORCH_CHECK(R.size(0) >= 1 && R.numel() > 0, "masked_projection: R must not be empty");
  TORCH_CHECK(R.size(1) * R.size(2) * R.size(3) <= (int64_t(1) << 32),
              "masked_projection: C*H*W must be at most 2^32 (the generator's row index is 32 bits)");
  TORCH_CHECK(features >= 1 && features < (int64_t(1) << 31), "masked_projection: features must be in [1, 2^31), got ",
              features);
  TORCH_CHECK(seed >= 0, "masked_projection: seed must be >= 0, got ", seed);
  TORCH_CHECK(R.size(0) <= 8 * 65535, kName, ": batches of more than ", 8 * 65535, " images are not supported");
}

std::tuple<at::Tensor, at::Tensor> masked_projection_forward_cuda(const at::Tensor& R, const at::Tensor& x,
                                                                  const at::Tensor& mask, int64_t features,
                                                                  int64_t seed) {
  check_inputs(R, x, mask, features, seed);
  SIB_PROJECTION_GUARD(R);
  const auto acc = compute_type(R);
  const bool dbl = acc == at::kDouble;
  const Shape sh = shape_of(R);
  const auto opts = R.options().dtype(acc);
  at::Tensor proj = at::empty({2, sh.B, features}, opts);
  at::Tensor sq = at::empty({2, sh.B}, opts);
  const at::Tensor m = mask.contiguous();
  const ProjectionPlan plan = projection_plan(sh.B, sh.C * sh.N, features, dbl);
  // every chunk writes all of its partials: no zeroing
  at::Tensor part = at::empty({plan.chunks * plan.part_stride}, opts);
  const cudaStream_t stream = current_stream();
  launch_projection_forward(dtype_of(R), R.data_ptr(), x.data_ptr(), map_of(R), map_of(x), m.data_ptr(), sh, features,
                            seed, plan, part.data_ptr(), stream);
  launch_projection_reduce(dbl, part.data_ptr(), plan, sh.B, features, proj.data_ptr(), sq.data_ptr(), stream);
  return {proj, sq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_projection_backward_cuda(
    const at::Tensor& grad_proj, const std::optional<at::Tensor>& grad_sq, const at::Tensor& R, const at::Tensor& x,
    const at::Tensor& mask, int64_t features, int64_t seed, bool compute_grad_x) {
  check_inputs(R, x, mask, features, seed);
  const auto acc = compute_type(R);
  TORCH_CHECK(grad_proj.dim() == 3 && grad_proj.size(0) == 2 && grad_proj.size(1) == R.size(0) &&
                  grad_proj.size(2) == features,
              "masked_projection_backward: grad_proj must be (2, B, features), got ", grad_proj.sizes());
  TORCH_CHECK(grad_proj.device() == R.device(), "masked_projection_backward: grad_proj must be on R's device");
  SIB_PROJECTION_GUARD(R);
  const at::Tensor gp = grad_proj.to(acc).contiguous();
  at::Tensor gs;
  if (grad_sq.has_value() && grad_sq->defined()) {
    TORCH_CHECK(grad_sq->dim() == 2 && grad_sq->size(0) == 2 && grad_sq->size(1) == R.size(0),
                "masked_projection_backward: grad_sq must be (2, B), got ", grad_sq->sizes());
    TORCH_CHECK(grad_sq->device() == R.device(), "masked_projection_backward: grad_sq must be on R's device");
    gs = grad_sq->to(acc).contiguous();
  }
  const at::Tensor m = mask.contiguous();
  at::Tensor dR = at::empty_like(R);
  at::Tensor dx = compute_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dmask = at::empty_like(m);
  launch_projection_backward(dtype_of(R), gp.data_ptr(), gs.defined() ? gs.data_ptr() : nullptr, R.data_ptr(),
                             x.data_ptr(), map_of(R), map_of(x), m.data_ptr(), shape_of(R), features, seed,
                             dR.data_ptr(), map_of(dR), compute_grad_x ? dx.data_ptr() : nullptr,
                             compute_grad_x ? map_of(dx) : map_of(x), dmask.data_ptr(), current_stream());
  return {dR, dx, dmask};
}

}  // namespace
}  // namespace cuda

#ifdef SIB_CUDA_EMULATE
// beside the emulated head ops of sib_head_cuda_ops.cpp, which defines the sib_fast_emu schemas
TORCH_LIBRARY_IMPL(sib_fast_emu, CPU, m) {
  m.impl("masked_projection_forward", &cuda::masked_projection_forward_cuda);
  m.impl("masked_projection_backward", &cuda::masked_projection_backward_cuda);
}
#else
TORCH_LIBRARY_IMPL(sib_fast, CUDA, m) {
  m.impl("masked_projection_forward", &cuda::masked_projection_forward_cuda);
  m.impl("masked_projection_backward", &cuda::masked_projection_backward_cuda);
}
#endif

}  // namespace sib_fast
