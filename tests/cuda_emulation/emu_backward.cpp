// csrc/cuda/sib_backward_cuda.cu compiled as C++ against the CUDA emulation (cuda_emu.h).
#define SIB_CUDA_EMULATE 1
#include "cuda/sib_backward_cuda.cu"
