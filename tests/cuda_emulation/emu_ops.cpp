// csrc/cuda/sib_head_cuda_ops.cpp (the host side) built for the CUDA emulation.
#define SIB_CUDA_EMULATE 1
#include "cuda/sib_head_cuda_ops.cpp"

// Launches configured so far (run, or only checked under SIB_FAST_EMU_DRY_RUN=1).
TORCH_LIBRARY_FRAGMENT(sib_fast_emu, m) {
  m.def("launches_checked() -> int", [] { return ::sib_emu::launches_checked(); });
}
