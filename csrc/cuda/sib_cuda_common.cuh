// Helpers shared by the CUDA kernels of the S-IB head (csrc/cuda/*.cu).
//
// Built by nvcc into sib_fast._C; with SIB_CUDA_EMULATE defined the same sources
// compile as plain C++ against tests/cuda_emulation/cuda_emu.h, which runs the
// kernels on the CPU (the tests of machines without a GPU).
#pragma once

#include "cuda/sib_cuda_launch.h"

#ifndef SIB_CUDA_EMULATE
#include <c10/cuda/CUDAException.h>  // C10_CUDA_CHECK, C10_CUDA_KERNEL_LAUNCH_CHECK
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace sib_fast {
namespace cuda {

namespace wmma = nvcuda::wmma;

// ---------------------------------------------------------------------------------
// Launching
// ---------------------------------------------------------------------------------

// Launches on `stream` (the caller's current stream) and checks the launch;
// `kernel` is a function pointer.
#ifdef SIB_CUDA_EMULATE
#define SIB_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::sib_emu::launch((grid), (block), (smem), [&] { kernel(__VA_ARGS__); })
#define SIB_DYNAMIC_SMEM(name) unsigned char* name = ::sib_emu::dynamic_smem()
#else
#define SIB_LAUNCH(kernel, grid, block, smem, stream, ...)            \
  do {                                                               \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__);      \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                  \
  } while (0)
#define SIB_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

struct DeviceInfo {
  int num_sms;
  size_t max_smem;  // dynamic shared memory a block may opt in to
};

// The current device's multiprocessor count and shared-memory limit, queried once per device.
inline DeviceInfo device_info() {
#ifdef SIB_CUDA_EMULATE
  return {::sib_emu::num_sms(), 163 * 1024};  // an A100's opt-in limit: the smaller of the two targets
#else
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 0 && device < kMaxDevices && cache[device].num_sms > 0) return cache[device];
  int sms = 0, smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const DeviceInfo info{sms, static_cast<size_t>(smem)};
  if (device >= 0 && device < kMaxDevices) cache[device] = info;  // same value from any thread
  return info;
#endif
}

// Raises a kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
#ifdef SIB_CUDA_EMULATE
  (void)kernel;
  (void)bytes;
#else
  const size_t limit = device_info().max_smem;
  TORCH_CHECK(bytes <= limit, "sib_head (CUDA kernel): needs ", bytes, " bytes of shared memory per block, the GPU allows ",
              limit);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#endif
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------
// Element access: any strides, 16-byte vectors where the layout allows
// ---------------------------------------------------------------------------------

// Values per 16-byte vector: 4 float, 8 half/bfloat16, 2 double.
template <typename scalar_t>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(scalar_t));
};

template <typename T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

// The 16 bytes at p as one vector. A GPU faults on a misaligned vector access ("misaligned
// address"); the CPU emulation, whose loads would silently work, checks the alignment instead.
template <typename T>
__device__ __forceinline__ Pack16<T>& pack16_at(T* p) {
#ifdef SIB_CUDA_EMULATE
  ::sib_emu::check_vector_alignment(p);
#endif
  return *reinterpret_cast<Pack16<T>*>(p);
}
template <typename T>
__device__ __forceinline__ const Pack16<T>& pack16_at(const T* p) {
#ifdef SIB_CUDA_EMULATE
  ::sib_emu::check_vector_alignment(p);
#endif
  return *reinterpret_cast<const Pack16<T>*>(p);
}

// Conversions of the input dtypes to and from the compute type. Half and bfloat16 go
// through their bits (c10's operators take the value's address, which costs a stack
// slot in the kernels); the rounding is c10's: to nearest even, NaN to a quiet NaN.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}
#ifndef SIB_CUDA_EMULATE
template <>
__device__ __forceinline__ float to_acc<float, c10::Half>(c10::Half v) {
  return __half2float(__ushort_as_half(v.x));
}
template <>
__device__ __forceinline__ float to_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.x) << 16);
}
template <>
__device__ __forceinline__ c10::Half from_acc<c10::Half, float>(float v) {
  return c10::Half(__half_as_ushort(__float2half_rn(v)), c10::Half::from_bits());
}
template <>
__device__ __forceinline__ c10::BFloat16 from_acc<c10::BFloat16, float>(float v) {
  uint32_t u = __float_as_uint(v);
  u = v != v ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
}
#endif

// Loads V consecutive pixels p0 .. p0 + V - 1 of (b, c) as acc_t; pixels >= N read as 0.
// With m.vec, p0 is a multiple of V and N too, so a group is all in or all out.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void load_group(const scalar_t* __restrict__ base, const Map4& m, int64_t b, int64_t c,
                                           int64_t p0, int64_t N, acc_t (&out)[V]) {
  static_assert(V == VecWidth<scalar_t>::value, "one 16-byte vector per group");
  if (m.vec) {
    if (p0 < N) {
      const Pack16<scalar_t> pk = pack16_at(base + m.offset(b, c, p0));
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = to_acc<acc_t>(pk.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = acc_t(0);
    }
  } else if (m.linear) {
    const scalar_t* q = base + b * m.sb + c * m.sc + p0 * m.sw;
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = p0 + i < N ? to_acc<acc_t>(q[i * m.sw]) : acc_t(0);
  } else {
    const scalar_t* q = base + b * m.sb + c * m.sc;
    int64_t h = static_cast<uint32_t>(p0) / static_cast<uint32_t>(m.W), w = p0 - h * m.W;  // N < 2^31
#pragma unroll
    for (int i = 0; i < V; ++i) {
      out[i] = p0 + i < N ? to_acc<acc_t>(q[h * m.sh + w * m.sw]) : acc_t(0);
      if (++w == m.W) {
        w = 0;
        ++h;
      }
    }
  }
}

// Stores V consecutive pixels (those < N) of (b, c).
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void store_group(scalar_t* __restrict__ base, const Map4& m, int64_t b, int64_t c,
                                            int64_t p0, int64_t N, const acc_t (&in)[V]) {
  if (m.vec) {
    if (p0 < N) {
      Pack16<scalar_t> pk;
#pragma unroll
      for (int i = 0; i < V; ++i) pk.v[i] = from_acc<scalar_t>(in[i]);
      pack16_at(base + m.offset(b, c, p0)) = pk;
    }
  } else if (m.linear) {
    scalar_t* q = base + b * m.sb + c * m.sc + p0 * m.sw;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (p0 + i < N) q[i * m.sw] = from_acc<scalar_t>(in[i]);
  } else {
    scalar_t* q = base + b * m.sb + c * m.sc;
    int64_t h = static_cast<uint32_t>(p0) / static_cast<uint32_t>(m.W), w = p0 - h * m.W;  // N < 2^31
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (p0 + i < N) q[h * m.sh + w * m.sw] = from_acc<scalar_t>(in[i]);
      if (++w == m.W) {
        w = 0;
        ++h;
      }
    }
  }
}

// V consecutive values of a contiguous plane row (acc_t), pixels >= N read as 0.
template <typename acc_t, int V>
__device__ __forceinline__ void load_plane(const acc_t* __restrict__ plane, int64_t p0, int64_t N, bool aligned,
                                           acc_t (&out)[V]) {
  if (aligned && p0 + V <= N) {
    constexpr int kPer = 16 / sizeof(acc_t);
    static_assert(V % kPer == 0 || kPer % V == 0, "plane group");
    if constexpr (V % kPer == 0) {
#pragma unroll
      for (int j = 0; j < V / kPer; ++j) {
        const Pack16<acc_t> pk = pack16_at(plane + p0 + j * kPer);
#pragma unroll
        for (int i = 0; i < kPer; ++i) out[j * kPer + i] = pk.v[i];
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = p0 + i < N ? plane[p0 + i] : acc_t(0);
}

// ---------------------------------------------------------------------------------
// Reductions in a fixed order (the same result on every run)
// ---------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Sum over the block of `v` (blockDim.x a multiple of 32, at most 1024); every thread
// gets the total. `scratch` holds 32 values; the function synchronises the block.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < nwarps ? scratch[lane] : T(0);
  total = warp_sum(total);
  return total;
}

// ---------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------

__device__ __forceinline__ float exact_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double exact_div(double a, double b) { return a / b; }

__device__ __forceinline__ float fast_exp(float v) { return __expf(v); }
__device__ __forceinline__ double fast_exp(double v) { return exp(v); }

// sigmoid(slope * ((f - shift) / range - offset)), as the CPU kernels write it.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_of(acc_t f, acc_t shift, acc_t range, acc_t offset, acc_t slope) {
  return acc_t(1) / (acc_t(1) + fast_exp(-slope * ((f - shift) / range - offset)));
}

// The per-image scalars of the mask chain (docs/loss.md section 3) from image_stats.
template <typename acc_t>
struct MaskScalars {
  acc_t lo, range, t1;
  __device__ __forceinline__ MaskScalars(acc_t lo_, acc_t q80, acc_t hi)
      : lo(lo_), range(hi - lo_ + static_cast<acc_t>(kRangeEps)), t1((q80 - lo_) / range) {}
  __device__ __forceinline__ acc_t u(acc_t a) const { return (a - lo) / range; }
};

template <typename acc_t>
__device__ __forceinline__ acc_t abs_of(acc_t v) {
  return v < acc_t(0) ? -v : (v == acc_t(0) ? acc_t(0) : v);  // |-0| = +0, NaN stays NaN
}

// ---------------------------------------------------------------------------------
// Tensor-core products (WMMA): float planes use 3xTF32 (each operand split into a
// tf32 "big" part and a tf32 remainder; big*big + big*small + small*big), which keeps
// float32 accuracy; double planes use the double MMA (sm_80+).
// ---------------------------------------------------------------------------------

__device__ __forceinline__ float tf32_round(float v) {
  return __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xffffe000u);  // nearest, ties away
}

template <typename acc_t>
struct Mma;

template <>
struct Mma<float> {
  static constexpr int M = 16, N = 16, K = 8;
  using Tag = wmma::precision::tf32;
  template <typename Layout>
  using FragA = wmma::fragment<wmma::matrix_a, M, N, K, Tag, Layout>;
  template <typename Layout>
  using FragB = wmma::fragment<wmma::matrix_b, M, N, K, Tag, Layout>;
  using Acc = wmma::fragment<wmma::accumulator, M, N, K, float>;

  // An operand as loaded (float) -> its big part in place, the remainder in `small`.
  template <typename Frag>
  static __device__ __forceinline__ void split(Frag& big, Frag& small) {
#pragma unroll
    for (int t = 0; t < big.num_elements; ++t) {
      const float v = big.x[t];
      const float b = tf32_round(v);
      big.x[t] = b;
      small.x[t] = tf32_round(v - b);
    }
  }

  template <typename FA, typename FB>
  static __device__ __forceinline__ void mma(Acc& acc, const FA& a_big, const FA& a_small, const FB& b_big,
                                             const FB& b_small) {
    wmma::mma_sync(acc, a_small, b_big, acc);
    wmma::mma_sync(acc, a_big, b_small, acc);
    wmma::mma_sync(acc, a_big, b_big, acc);
  }

  // A fragment on the diagonal of a Gram (a and b the same rows): S = big big^T + 2 big small^T
  // in two products, whose symmetric part (S + S^T) / 2 is the three-product result; the
  // reduction takes it.
  template <typename FA, typename FB>
  static __device__ __forceinline__ void mma_self(Acc& acc, const FA& a_big, const FB& b_big, FB b_small) {
#pragma unroll
    for (int t = 0; t < b_small.num_elements; ++t) b_small.x[t] *= 2.0f;  // exact
    wmma::mma_sync(acc, a_big, b_small, acc);
    wmma::mma_sync(acc, a_big, b_big, acc);
  }
};

template <>
struct Mma<double> {
  static constexpr int M = 8, N = 8, K = 4;
  template <typename Layout>
  using FragA = wmma::fragment<wmma::matrix_a, M, N, K, double, Layout>;
  template <typename Layout>
  using FragB = wmma::fragment<wmma::matrix_b, M, N, K, double, Layout>;
  using Acc = wmma::fragment<wmma::accumulator, M, N, K, double>;

  template <typename Frag>
  static __device__ __forceinline__ void split(Frag&, Frag&) {}

  template <typename FA, typename FB>
  static __device__ __forceinline__ void mma(Acc& acc, const FA& a, const FA&, const FB& b, const FB&) {
    wmma::mma_sync(acc, a, b, acc);
  }

  template <typename FA, typename FB>
  static __device__ __forceinline__ void mma_self(Acc& acc, const FA& a, const FB& b, const FB&) {
    wmma::mma_sync(acc, a, b, acc);
  }
};

// ---------------------------------------------------------------------------------
// Dispatch of the input dtypes (host side of the .cu files)
// ---------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename F>
void with_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat:
      f(Tag<float>{});
      return;
    case Dtype::kDouble:
      f(Tag<double>{});
      return;
    case Dtype::kHalf:
      f(Tag<c10::Half>{});
      return;
    case Dtype::kBFloat16:
      f(Tag<c10::BFloat16>{});
      return;
  }
  TORCH_CHECK(false, "sib_head (CUDA kernel): unsupported dtype");
}

}  // namespace cuda
}  // namespace sib_fast
