// Schemas of the fused S-IB head ops, written once: sib_head.cpp defines them for every
// device under the sib_fast namespace, and the CUDA emulation test under sib_fast_emu.
// Kernels register under their dispatch key in cpu/ and cuda/; autograd and fake (meta)
// kernels are registered from Python (sib_fast/backends/autograd.py).
//
// sib_head_forward outputs, all in the compute dtype (float64 if R or x is
// float64, else float32):
//   hsic, bg      0-dim                 docs/loss.md sections 4 and 5
//   mask          (B, H, W)             docs/loss.md section 3
//   gram          (2, B, B)             raw Gram matrices of R*M and x*M
//                                       (before normalisation)
//   image_stats   (B, kImageStats)      per-image scalars, columns in sib_head.h
//   rank_index    (B, kQuantiles, kRankWindow) int64: flat pixel index of the
//                 element at each rank of each quantile's window, -1 past the
//                 ends; quantiles in the order of sib_head.h
// sib_head_backward takes the upstream gradients of hsic, bg and (optionally)
// mask, with the saved tensors, and returns grad_R and grad_x (an empty
// tensor unless compute_grad_x). sib_head_backward_add_ adds the same gradients into grad_R
// and grad_x (when given) instead of returning them, and may overwrite grad_mask (contiguous,
// in the mask's dtype), which it uses as scratch: the random-feature HSIC's backward passes the
// projection's gradients so that no second R-sized gradient is allocated.
//
// masked_projection_forward / _backward: the random-feature HSIC's projections (docs/loss.md
// section 4b). With u = R*M, v = x*M (M broadcast over C), flattened over the logical index
// d = c*H*W + h*W + w, and W = the (C*H*W) x features Gaussian matrix of the seed
// (sib_fast/backends/random_features.py; never stored, each entry computed where it is used):
//   proj (2, B, features)   proj[0] = u @ W, proj[1] = v @ W      compute dtype
//   sq   (2, B)             sq[0] = ||u_b||^2, sq[1] = ||v_b||^2  compute dtype
// The backward, with du = grad_proj[0] @ W^T + 2 grad_sq[0] u and dv likewise (grad_sq None:
// zeros), returns grad_R = M du, grad_x = M dv (an empty tensor unless compute_grad_x) and
// grad_mask = sum over c of (R du + x dv), each in its input's dtype.
#pragma once

#include <torch/library.h>

namespace sib_fast {

inline void define_head_ops(torch::Library& m) {
  m.def(
      "sib_head_forward(Tensor R, Tensor x, int window_size, float temperature, float slope) "
      "-> (Tensor hsic, Tensor bg, Tensor mask, Tensor gram, Tensor image_stats, Tensor rank_index)");
  m.def(
      "sib_head_backward(Tensor grad_hsic, Tensor grad_bg, Tensor? grad_mask, Tensor R, Tensor x, "
      "Tensor mask, Tensor gram, Tensor image_stats, Tensor rank_index, int window_size, "
      "float temperature, float slope, bool compute_grad_x) -> (Tensor grad_R, Tensor grad_x)");
  m.def(
      "sib_head_backward_add_(Tensor(a!) grad_R, Tensor(b!)? grad_x, Tensor(c!) grad_mask, Tensor grad_hsic, "
      "Tensor grad_bg, Tensor R, Tensor x, Tensor mask, Tensor gram, Tensor image_stats, Tensor rank_index, "
      "int window_size, float temperature, float slope) -> ()");
  m.def(
      "masked_projection_forward(Tensor R, Tensor x, Tensor mask, int features, int seed) "
      "-> (Tensor proj, Tensor sq)");
  m.def(
      "masked_projection_backward(Tensor grad_proj, Tensor? grad_sq, Tensor R, Tensor x, Tensor mask, "
      "int features, int seed, bool compute_grad_x) -> (Tensor grad_R, Tensor grad_x, Tensor grad_mask)");
}

}  // namespace sib_fast
