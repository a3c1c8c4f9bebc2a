// Host-side parts of the head ops that the CPU and CUDA kernels share: the input
// checks of docs/loss.md section 8 that do not depend on the device (each kernel adds its
// own device checks) and the compute dtype of the outputs. Uses ATen, so only .cpp
// files include it (sib_head.h is the math shared with device code).
#pragma once

#include <algorithm>

#include <ATen/ATen.h>

#include <cstdint>

namespace sib_fast {

// Checks the op's arguments; returns the window the kernels run: every window from
// 2 max(H, W) - 1 up holds the whole image at every pixel and gives the same mask (M = 1/2,
// sib_fast.backends.reference.whole_image_window), so the smallest of them stands for the rest and
// k * k stays far from overflowing.
inline int64_t check_head_inputs(const at::Tensor& R, const at::Tensor& x, int64_t window, double temperature,
                                 double slope) {
  TORCH_CHECK(R.dim() == 4, "sib_head: R must be (B, C, H, W), got ", R.sizes());
  TORCH_CHECK(R.sizes() == x.sizes(), "sib_head: R and x must have the same shape, got ", R.sizes(), " and ",
              x.sizes());
  TORCH_CHECK(R.scalar_type() == x.scalar_type(), "sib_head: R and x must have the same dtype, got ",
              R.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(R.size(0) >= 2, "sib_head: needs a batch of at least 2 images, got ", R.size(0));
  TORCH_CHECK(R.size(1) * R.size(2) * R.size(3) >= 2, "sib_head: needs C*H*W >= 2");
  TORCH_CHECK(R.size(2) * R.size(3) < (int64_t(1) << 31), "sib_head: images of 2^31 pixels or more are not supported");
  TORCH_CHECK(window > 0 && window % 2 == 1, "sib_head: window_size must be a positive odd integer, got ", window);
  TORCH_CHECK(temperature > 0 && slope > 0, "sib_head: temperature and slope must be > 0");
  return std::min(window, 2 * std::max(R.size(2), R.size(3)) - 1);
}

// float64 if R (and so x) is float64, else float32 (docs/loss.md section 6: reductions in float32 or better).
inline at::ScalarType compute_type(const at::Tensor& R) {
  return R.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The masked projections' checks (docs/loss.md section 4b) that do not depend on the device; each
// kernel adds its own device checks.
inline void check_projection_inputs(const at::Tensor& R, const at::Tensor& x, const at::Tensor& mask,
                                    int64_t features, int64_t seed) {
  TORCH_CHECK(R.dim() == 4 && R.sizes() == x.sizes(),
              "masked_projection: R and x must be (B, C, H, W) of one shape, got ", R.sizes(), " and ", x.sizes());
  TORCH_CHECK(R.scalar_type() == x.scalar_type(), "masked_projection: R and x must have the same dtype, got ",
              R.scalar_type(), " and ", x.scalar_type());
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
}

// The projections' upstream gradients: grad_proj (2, B, features), grad_sq (2, B) when given.
inline void check_projection_grads(const at::Tensor& grad_proj, const at::Tensor* grad_sq, const at::Tensor& R,
                                   int64_t features) {
  TORCH_CHECK(grad_proj.dim() == 3 && grad_proj.size(0) == 2 && grad_proj.size(1) == R.size(0) &&
                  grad_proj.size(2) == features,
              "masked_projection_backward: grad_proj must be (2, B, features), got ", grad_proj.sizes());
  TORCH_CHECK(grad_sq == nullptr || (grad_sq->dim() == 2 && grad_sq->size(0) == 2 && grad_sq->size(1) == R.size(0)),
              "masked_projection_backward: grad_sq must be (2, B), got ", grad_sq ? grad_sq->sizes() : R.sizes());
}

}  // namespace sib_fast
