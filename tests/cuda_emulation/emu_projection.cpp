// csrc/cuda/sib_projection_cuda.cu (the masked projections' kernels) and their host side
// built for the CUDA emulation, registered as sib_fast_emu::masked_projection_forward / _backward.
#define SIB_CUDA_EMULATE 1
#include "cuda/sib_projection_cuda.cu"
#include "cuda/sib_projection_cuda_ops.cpp"
