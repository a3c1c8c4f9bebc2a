"""The Triton backend: the fused S-IB head as Triton kernels, one module per stage."""
