// Schemas of the fused S-IB head ops, declared once for every device.
// Kernels register under their dispatch key in cpu/ and cuda/; autograd and
// fake (meta) kernels are registered from Python (sib_fast/backends/extension.py).
//
// sib_head_forward outputs, all in the compute dtype (float64 if R or x is
// float64, else float32):
//   hsic, bg      0-dim                 SPEC sections 4 and 5
//   mask          (B, H, W)             SPEC section 3
//   gram          (2, B, B)             raw Gram matrices of R*M and x*M
//                                       (before normalisation)
//   image_stats   (B, kImageStats)      per-image scalars, columns in sib_head.h
//   rank_index    (B, kQuantiles, kRankWindow) int64: flat pixel index of the
//                 element at each rank of each quantile's window, -1 past the
//                 ends; quantiles in the order of sib_head.h
// sib_head_backward takes the upstream gradients of hsic, bg and (optionally)
// mask, with the saved tensors, and returns grad_R and grad_x (an empty
// tensor unless compute_grad_x).
#include <torch/library.h>

TORCH_LIBRARY(sib_fast, m) {
  m.def(
      "sib_head_forward(Tensor R, Tensor x, int window_size, float temperature, float slope) "
      "-> (Tensor hsic, Tensor bg, Tensor mask, Tensor gram, Tensor image_stats, Tensor rank_index)");
  m.def(
      "sib_head_backward(Tensor grad_hsic, Tensor grad_bg, Tensor? grad_mask, Tensor R, Tensor x, "
      "Tensor mask, Tensor gram, Tensor image_stats, Tensor rank_index, int window_size, "
      "float temperature, float slope, bool compute_grad_x) -> (Tensor grad_R, Tensor grad_x)");
}
