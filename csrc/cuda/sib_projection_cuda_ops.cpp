// Host side of the CUDA kernels of sib_fast::masked_projection_forward / _backward (the
// random-feature HSIC's projections, docs/loss.md section 4b; kernels in
// sib_projection_cuda.cu): the checks and conversions of csrc/cpu/projection_cpu.cpp (the
// model for the semantics), allocation, launches on the current stream and the registration
// under the CUDA dispatch key. Built by the C++ compiler, as sib_head_cuda_ops.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/sib_cuda_host.h"
#include "cuda/sib_projection_launch.h"
#include "sib_head_host.h"

namespace sib_fast {
namespace cuda {
namespace {

constexpr const char* kOp = "masked_projection";

// Any strides (the kernels index every element, no vectors).
Map4 map_of(const at::Tensor& t) {
  Map4 m = make_map(t);
  m.vec = false;
  return m;
}

void check_inputs(const at::Tensor& R, const at::Tensor& x, const at::Tensor& mask, int64_t features, int64_t seed) {
  TORCH_CHECK(on_device(R) && R.device() == x.device() && R.device() == mask.device(), kOp, " (", kKernelKind,
              "): R, x and mask must be on the same GPU, got ", R.device(), ", ", x.device(), " and ", mask.device());
  check_projection_inputs(R, x, mask, features, seed);
  (void)dtype_of(R, kOp);
  TORCH_CHECK(R.size(0) <= 8 * 65535, kOp, " (", kKernelKind, "): batches of more than ", 8 * 65535,
              " images are not supported");
}

std::tuple<at::Tensor, at::Tensor> masked_projection_forward_cuda(const at::Tensor& R, const at::Tensor& x,
                                                                  const at::Tensor& mask, int64_t features,
                                                                  int64_t seed) {
  check_inputs(R, x, mask, features, seed);
  SIB_DEVICE_GUARD(R);
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
  launch_projection_forward(dtype_of(R, kOp), R.data_ptr(), x.data_ptr(), map_of(R), map_of(x), m.data_ptr(), sh,
                            features, seed, plan, part.data_ptr(), stream);
  launch_projection_reduce(dbl, part.data_ptr(), plan, sh.B, features, proj.data_ptr(), sq.data_ptr(), stream);
  return {proj, sq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_projection_backward_cuda(
    const at::Tensor& grad_proj, const std::optional<at::Tensor>& grad_sq, const at::Tensor& R, const at::Tensor& x,
    const at::Tensor& mask, int64_t features, int64_t seed, bool compute_grad_x) {
  check_inputs(R, x, mask, features, seed);
  const auto acc = compute_type(R);
  const bool has_sq = grad_sq.has_value() && grad_sq->defined();
  check_projection_grads(grad_proj, has_sq ? &*grad_sq : nullptr, R, features);
  TORCH_CHECK(grad_proj.device() == R.device() && (!has_sq || grad_sq->device() == R.device()),
              "masked_projection_backward: grad_proj and grad_sq must be on R's device");
  SIB_DEVICE_GUARD(R);
  const at::Tensor gp = grad_proj.to(acc).contiguous();
  const at::Tensor gs = has_sq ? grad_sq->to(acc).contiguous() : at::Tensor();
  const at::Tensor m = mask.contiguous();
  at::Tensor dR = at::empty_like(R);
  at::Tensor dx = compute_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dmask = at::empty_like(m);
  launch_projection_backward(dtype_of(R, kOp), gp.data_ptr(), gs.defined() ? gs.data_ptr() : nullptr, R.data_ptr(),
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
