// csrc/cuda/sib_head_cuda_ops.cpp (the host side) built for the CUDA emulation.
#define SIB_CUDA_EMULATE 1
#include "cuda/sib_head_cuda_ops.cpp"
