// Host side of the CUDA kernels of sib_fast::sib_head_forward / sib_head_backward:
// argument checks, allocation, the order of the launches (all on the current stream,
// no host synchronisation) and the registration under the CUDA dispatch key. The
// kernels are in sib_head_cuda.cu, sib_gram_cuda.cu and sib_backward_cuda.cu; see the
// first for the list of stages. Compiled by the C++ compiler (ATen's headers would
// multiply nvcc's build time).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "cuda/sib_cuda_host.h"
#include "cuda/sib_cuda_launch.h"
#include "sib_head_host.h"
#include "sib_head_schema.h"

namespace sib_fast {
namespace cuda {
namespace {

constexpr const char* kOp = "sib_head";

QuantileWindows make_windows(std::initializer_list<int> quantiles, int64_t N, double temperature) {
  QuantileWindows w{};
  for (int q : quantiles) {
    const int k = w.count++;
    const RankWindow rw = rank_window(N, kQuantileLevel[q]);
    w.quantile[k] = q;
    w.first[k] = static_cast<int>(rw.first);
    w.len[k] = rw.count;
    rank_weights(N, kQuantileLevel[q], temperature, rw, w.weight[k]);
  }
  return w;
}

// The backward's three planes: channels C-3, C-2, C-1 of dR when dR holds the compute type,
// has three channels or more and evenly spaced pixels (contiguous or channels_last): pass 2
// reads each pixel of them before it writes dR there. Forward and backward together then
// allocate dR, the saved mask and small buffers: 1.33x the size of R in float32 with three
// channels (the target is 1.5x). Otherwise a buffer of their own, kept alive in `own`.
BackwardPlanes backward_planes(const at::Tensor& dR, at::ScalarType acc, at::Tensor& own) {
  const int64_t B = dR.size(0), C = dR.size(1), N = dR.size(2) * dR.size(3);
  const int64_t bytes = static_cast<int64_t>(at::elementSize(acc));
  const Map4 map = make_map(dR);
  const bool in_dR = dR.scalar_type() == acc && C >= 3 && map.linear && map.sw < (int64_t(1) << 31);
  if (!in_dR) own = at::empty({3, B, N}, dR.options().dtype(acc));
  char* base = in_dR ? static_cast<char*>(dR.data_ptr()) + (C - 3) * map.sc * bytes : static_cast<char*>(own.data_ptr());
  const int64_t next = (in_dR ? map.sc : B * N) * bytes;  // from one plane to the next
  BackwardPlanes planes;
  planes.g = base;                 // channel C-3 of dR
  planes.dM_v = base + next;       // channel C-2
  planes.dM_u = base + 2 * next;   // channel C-1
  planes.layout = in_dR ? PlaneLayout{map.sb, map.sw} : PlaneLayout{N, 1};
  const int64_t per_vector = 16 / bytes;
  planes.aligned = planes.layout.pixel == 1 && planes.layout.image % per_vector == 0 && N % per_vector == 0 &&
                   reinterpret_cast<uintptr_t>(base) % 16 == 0;
  return planes;
}

int64_t check_maps(const at::Tensor& R, const at::Tensor& x, int64_t window, double temperature, double slope) {
  TORCH_CHECK(on_device(R) && R.device() == x.device(), kOp, " (", kKernelKind,
              "): R and x must be tensors on the same GPU, got ", R.device(), " and ", x.device());
  const int64_t effective_window = check_head_inputs(R, x, window, temperature, slope);
  TORCH_CHECK(R.size(0) <= 32768, kOp, " (", kKernelKind, "): batches of more than 32768 images are not supported");
  TORCH_CHECK(R.numel() < (int64_t(1) << 32), kOp, " (", kKernelKind,
              "): tensors of 2^32 elements or more are not supported");
  (void)dtype_of(R, kOp);
  return effective_window;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sib_head_forward_cuda(
    const at::Tensor& R, const at::Tensor& x, int64_t window_size, double temperature, double slope) {
  window_size = check_maps(R, x, window_size, temperature, slope);
  SIB_DEVICE_GUARD(R);
  const Shape sh = shape_of(R);
  const int64_t B = sh.B, N = sh.N;
  const bool dbl = compute_type(R) == at::kDouble;
  const auto opts = R.options().dtype(compute_type(R));
  const auto dopts = R.options().dtype(at::kDouble);
  const cudaStream_t stream = current_stream();
  at::Tensor hsic = at::empty({}, opts), bg = at::empty({}, opts);
  at::Tensor mask = at::empty({B, sh.H, sh.W}, opts);
  at::Tensor gram = at::empty({2, B, B}, opts);
  at::Tensor stats = at::empty({B, kImageStats}, opts);
  at::Tensor ranks = at::empty({B, kQuantiles, kRankWindow}, R.options().dtype(at::kLong));

  // the mask chain on planes: g, then d, in `plane`; row window sums in `rows`, which
  // also hold the selections' candidate lists (2 int32 per pixel) while they are free
  {
    at::Tensor plane = at::empty({B, N}, opts);
    at::Tensor rows = at::empty({B, N}, dopts);
    auto* lists = static_cast<int32_t*>(rows.data_ptr());
    launch_channel_mean(dtype_of(R, kOp), R.data_ptr(), make_map(R), sh, plane.data_ptr(), stream);
    launch_select(dbl, /*abs_values=*/true, plane.data_ptr(), sh,
                  make_windows({kQuantLow, kQuantMaskLevel, kQuantHigh}, N, temperature), lists, stats.data_ptr(),
                  ranks.data_ptr<int64_t>(), nullptr, slope, stream);
    launch_box_mean_h(dbl, plane.data_ptr(), stats.data_ptr(), slope, sh, window_size, rows.data_ptr<double>(),
                      plane.data_ptr(), stream);
    launch_select(dbl, /*abs_values=*/false, plane.data_ptr(), sh, make_windows({kQuantT2}, N, temperature), lists,
                  stats.data_ptr(), ranks.data_ptr<int64_t>(), mask.data_ptr(), slope, stream);
  }

  // one pass over R, x and M: partial Gram matrices and background sums, then their sums
  const GramPlan plan = gram_plan(B, N, dbl);
  at::Tensor bg_part = at::empty({static_cast<int64_t>(plan.chunks) * B * 2}, dopts);
  at::Tensor gram_d = at::empty({2, B, B}, dopts);
  {
    at::Tensor gram_part = at::empty({plan.partial_elements()}, opts);
    launch_gram(dtype_of(R, kOp), R.data_ptr(), x.data_ptr(), make_map(R), make_map(x), mask.data_ptr(), sh, plan,
                gram_part.data_ptr(), bg_part.data_ptr<double>(), stream);
    launch_gram_reduce(dbl, gram_part.data_ptr(), plan, B, gram.data_ptr(), gram_d.data_ptr<double>(), stream);
  }
  at::Tensor work = at::empty({6 * B}, dopts);
  launch_finalize(dbl, gram_d.data_ptr<double>(), bg_part.data_ptr<double>(), plan.chunks, B,
                  static_cast<double>(sh.C * N), work.data_ptr<double>(), hsic.data_ptr(), bg.data_ptr(),
                  stats.data_ptr(), stream);
  return {hsic, bg, mask, gram, stats, ranks};
}

std::tuple<at::Tensor, at::Tensor> sib_head_backward_cuda(
    const at::Tensor& grad_hsic, const at::Tensor& grad_bg, const std::optional<at::Tensor>& grad_mask,
    const at::Tensor& R, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& gram,
    const at::Tensor& image_stats, const at::Tensor& rank_index, int64_t window_size, double temperature,
    double slope, bool compute_grad_x) {
  window_size = check_maps(R, x, window_size, temperature, slope);
  const Shape sh = shape_of(R);
  const int64_t B = sh.B, N = sh.N;
  const auto acc = compute_type(R);
  TORCH_CHECK(mask.scalar_type() == acc && gram.scalar_type() == acc && image_stats.scalar_type() == acc &&
                  rank_index.scalar_type() == at::kLong && mask.is_contiguous() && gram.is_contiguous() &&
                  image_stats.is_contiguous() && rank_index.is_contiguous() && mask.numel() == B * N &&
                  gram.numel() == 2 * B * B && image_stats.numel() == B * kImageStats &&
                  rank_index.numel() == B * kQuantiles * kRankWindow,
              "sib_head_backward: the saved tensors must be the forward op's outputs");
  for (const at::Tensor* t : {&mask, &gram, &image_stats, &rank_index})
    TORCH_CHECK(t->device() == R.device(), "sib_head_backward: the saved tensors must be on R's device");
  SIB_DEVICE_GUARD(R);
  const bool dbl = acc == at::kDouble;
  const auto opts = R.options().dtype(acc);
  const auto dopts = R.options().dtype(at::kDouble);
  const cudaStream_t stream = current_stream();
  const double D = static_cast<double>(sh.C * N);
  at::Tensor dR = at::empty_like(R);
  at::Tensor dx = compute_grad_x ? at::empty_like(x) : at::empty({0}, x.options());

  // B x B factors and background terms, computed on the device from the device scalars
  const int64_t tile = image_tile(B, dbl), Bp = (B + tile - 1) / tile * tile;
  at::Tensor A = at::zeros({2, Bp, Bp}, opts);
  at::Tensor bg_terms = at::empty({1 + B}, opts);
  {
    const at::Tensor gh = grad_hsic.to(opts).reshape({}).contiguous();
    const at::Tensor gb = grad_bg.to(opts).reshape({}).contiguous();
    at::Tensor work = at::empty({6 * B}, dopts);
    launch_adjoint(dbl, gram.data_ptr(), B, gh.data_ptr(), gb.data_ptr(), image_stats.data_ptr(), D,
                   work.data_ptr<double>(), A.data_ptr(), Bp, bg_terms.data_ptr(), stream);
  }

  // pass 1 over R, x, M: the planes dM_u, dM_v, g, and dx
  at::Tensor own_planes;
  const BackwardPlanes planes = backward_planes(dR, acc, own_planes);
  launch_backward_planes(dtype_of(R, kOp), R.data_ptr(), x.data_ptr(), make_map(R), make_map(x), mask.data_ptr(),
                         A.data_ptr(), Bp, bg_terms.data_ptr(), sh, compute_grad_x ? dx.data_ptr() : nullptr,
                         compute_grad_x ? make_map(dx) : make_map(x), planes, stream);

  // the mask chain's adjoint on the planes: dd in dM_u; dh = box(dd) by rows into dM_v, by
  // columns back into dM_u; da in dM_u
  at::Tensor gm;
  if (grad_mask.has_value() && grad_mask->defined()) gm = grad_mask->to(opts).contiguous();
  launch_mask_adjoint_t2(dbl, planes.dM_u, planes.dM_v, planes.layout, gm.defined() ? gm.data_ptr() : nullptr,
                         mask.data_ptr(), rank_index.data_ptr<int64_t>(), sh, make_windows({kQuantT2}, N, temperature),
                         slope, stream);
  launch_box_mean(dbl, planes.dM_u, planes.layout, sh, window_size, planes.dM_v, planes.dM_u, stream);
  launch_mask_adjoint_h(dbl, planes.dM_u, planes.g, planes.layout, image_stats.data_ptr(),
                        rank_index.data_ptr<int64_t>(), sh,
                        make_windows({kQuantLow, kQuantMaskLevel, kQuantHigh}, N, temperature), slope, stream);

  // pass 2 over R, M: dR with the mask chain's share, written once (over the planes when
  // they are its channels)
  launch_backward_grad_r(dtype_of(R, kOp), R.data_ptr(), make_map(R), mask.data_ptr(), A.data_ptr(), Bp,
                         bg_terms.data_ptr(), sh, dR.data_ptr(), make_map(dR), planes, stream);
  return {dR, dx};
}

}  // namespace
}  // namespace cuda

#ifdef SIB_CUDA_EMULATE
// The emulated kernels run on CPU tensors under their own namespace, beside the real ops.
TORCH_LIBRARY(sib_fast_emu, m) { sib_fast::define_head_ops(m); }

TORCH_LIBRARY_IMPL(sib_fast_emu, CPU, m) {
  m.impl("sib_head_forward", &cuda::sib_head_forward_cuda);
  m.impl("sib_head_backward", &cuda::sib_head_backward_cuda);
}
#else
TORCH_LIBRARY_IMPL(sib_fast, CUDA, m) {
  m.impl("sib_head_forward", &cuda::sib_head_forward_cuda);
  m.impl("sib_head_backward", &cuda::sib_head_backward_cuda);
}
#endif

}  // namespace sib_fast
