// A host emulation of the subset of CUDA that csrc/cuda uses, so that the CUDA
// kernels can be run and tested on a machine without a GPU (tests/test_cuda_emulated.py).
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one
// after another. Fibers switch only at barriers (__syncthreads, __syncwarp and the
// warp collectives), so between two barriers every thread runs alone: a valid CUDA
// schedule. SIB_EMU_ORDER=reverse (or random) resumes the threads in another order,
// which exposes a missing barrier. A barrier that some threads never reach is reported
// as a deadlock instead of hanging. __shared__ variables become function statics
// (shared by the threads of a block, and blocks run one at a time). WMMA fragments hold
// the whole tile in every lane (layout-agnostic code gives the same result as on a GPU);
// load/store check the alignment rules of the real API, and tf32 products drop the 13
// low mantissa bits as tensor cores do.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;
using cudaStream_t = void*;
constexpr int warpSize = 32;

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

namespace sib_emu {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "sib_emu: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  bool done = false;
};

struct Block {
  static constexpr size_t kStack = 256 * 1024;
  ucontext_t main_ctx;
  std::vector<Fiber> fibers;
  std::vector<unsigned> order;
  int current = -1;
  bool progress = false;
  const std::function<void()>* body = nullptr;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> slots;   // shuffle exchange, one per thread
  std::vector<unsigned char> dynamic_smem;
  std::mt19937 rng{12345};

  ~Block() {
    for (auto& f : fibers) std::free(f.stack);
  }

  static void entry() {
    Block& b = instance();
    (*b.body)();
    b.fibers[b.current].done = true;
    b.progress = true;
  }

  static Block& instance() {
    static Block block;
    return block;
  }

  void set_thread(unsigned t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
  }

  // Runs one block: every thread of it, to the end.
  void run(unsigned nthreads) {
    if (fibers.size() < nthreads) fibers.resize(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
      Fiber& f = fibers[t];
      if (!f.stack) f.stack = static_cast<char*>(std::malloc(kStack));
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &main_ctx;
      makecontext(&f.ctx, &Block::entry, 0);
    }
    block_barrier = Barrier{static_cast<int>(nthreads)};
    warp_barriers.assign((nthreads + 31) / 32, Barrier{32});
    slots.assign(nthreads, 0);
    order.resize(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) order[t] = t;
    const char* mode = std::getenv("SIB_EMU_ORDER");
    const bool reverse = mode && std::strcmp(mode, "reverse") == 0;
    const bool shuffle = mode && std::strcmp(mode, "random") == 0;
    if (reverse) std::reverse(order.begin(), order.end());
    for (;;) {
      if (shuffle) std::shuffle(order.begin(), order.end(), rng);
      bool any_live = false;
      progress = false;
      for (unsigned t : order) {
        if (fibers[t].done) continue;
        any_live = true;
        current = static_cast<int>(t);
        set_thread(t);
        swapcontext(&main_ctx, &fibers[t].ctx);
      }
      if (!any_live) break;
      if (!progress) fail("deadlock: threads wait at a barrier that the others never reach");
    }
    current = -1;
  }

  void yield() {
    Fiber& f = fibers[current];
    swapcontext(&f.ctx, &main_ctx);
  }

  void wait(Barrier& b) {
    const uint64_t gen = b.generation;
    progress = true;
    if (++b.arrived == b.expected) {
      b.arrived = 0;
      ++b.generation;
      return;
    }
    while (b.generation == gen) yield();
    progress = true;
  }

  unsigned tid() const { return static_cast<unsigned>(current); }
  Barrier& warp_barrier() { return warp_barriers[tid() / 32]; }
};

inline void check_in_kernel(const char* what) {
  if (Block::instance().current < 0) fail(std::string(what) + " called outside a kernel");
}

// The host code's view of the GPU, from the environment of the test process:
// SIB_FAST_EMU_NUM_SMS multiprocessors (default 4: small grids for the slow emulation), and
// SIB_FAST_EMU_DRY_RUN=1 checks each launch's configuration without running it, so that the
// host code's allocations can be measured at full size (grids and buffers of a real GPU).
inline int num_sms() {
  const char* v = std::getenv("SIB_FAST_EMU_NUM_SMS");
  return v && std::atoi(v) > 0 ? std::atoi(v) : 4;
}
inline bool dry_run() {
  const char* v = std::getenv("SIB_FAST_EMU_DRY_RUN");
  return v && std::strcmp(v, "1") == 0;
}
inline int64_t& launches_checked() {
  static int64_t count = 0;
  return count;
}

template <typename Kernel>
void launch(dim3 grid, dim3 block, size_t smem, Kernel&& kernel) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0)
    fail("block size must be a positive multiple of 32 up to 1024, got " + std::to_string(nthreads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("bad grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z));
  ++launches_checked();
  if (dry_run()) return;
  Block& b = Block::instance();
  // Fresh garbage in dynamic shared memory for every block: reading it before writing shows.
  b.dynamic_smem.assign(smem + 256, 0);
  const std::function<void()> body = kernel;
  b.body = &body;
  blockDim = block;
  gridDim = grid;
  std::mt19937 garbage(7);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        for (auto& byte : b.dynamic_smem) byte = static_cast<unsigned char>(garbage() | 0x7f);
        blockIdx = dim3(x, y, z);
        b.run(nthreads);
      }
  b.body = nullptr;
}

inline unsigned char* dynamic_smem() {
  Block& b = Block::instance();
  auto addr = reinterpret_cast<uintptr_t>(b.dynamic_smem.data());
  return reinterpret_cast<unsigned char*>((addr + 127) & ~uintptr_t(127));
}

template <typename T>
T exchange(T value, unsigned src_lane_of_me_xor_or_abs, bool is_xor) {
  static_assert(sizeof(T) <= 8, "exchange of at most 8 bytes");
  Block& b = Block::instance();
  const unsigned me = b.tid();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  b.slots[me] = bits;
  b.wait(b.warp_barrier());
  const unsigned lane = me % 32;
  const unsigned src_lane = is_xor ? (lane ^ src_lane_of_me_xor_or_abs) : src_lane_of_me_xor_or_abs;
  T out = value;
  if (src_lane < 32) {
    const uint64_t got = b.slots[(me / 32) * 32 + src_lane];
    std::memcpy(&out, &got, sizeof(T));
  }
  b.wait(b.warp_barrier());
  return out;
}

inline void require_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks are emulated");
}

}  // namespace sib_emu

inline void __syncthreads() {
  sib_emu::check_in_kernel("__syncthreads");
  auto& b = sib_emu::Block::instance();
  b.wait(b.block_barrier);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  sib_emu::require_full_mask(mask);
  auto& b = sib_emu::Block::instance();
  b.wait(b.warp_barrier());
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
  sib_emu::require_full_mask(mask);
  return sib_emu::exchange(v, static_cast<unsigned>(lane_mask), true);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int = 32) {
  sib_emu::require_full_mask(mask);
  return sib_emu::exchange(v, static_cast<unsigned>(src_lane) % 32, false);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int = 32) {
  sib_emu::require_full_mask(mask);
  const unsigned lane = sib_emu::Block::instance().tid() % 32;
  // lanes below delta keep their own value
  const T got = sib_emu::exchange(v, lane >= delta ? lane - delta : lane, false);
  return got;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
  sib_emu::require_full_mask(mask);
  const unsigned lane = sib_emu::Block::instance().tid() % 32;
  return sib_emu::exchange(v, lane + delta < 32 ? lane + delta : lane, false);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  sib_emu::require_full_mask(mask);
  auto& b = sib_emu::Block::instance();
  const unsigned me = b.tid();
  b.slots[me] = predicate ? 1 : 0;
  b.wait(b.warp_barrier());
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (b.slots[(me / 32) * 32 + l]) out |= 1u << l;
  b.wait(b.warp_barrier());
  return out;
}

template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  sib_emu::require_full_mask(mask);
  auto& b = sib_emu::Block::instance();
  const unsigned me = b.tid();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  b.slots[me] = bits;
  b.wait(b.warp_barrier());
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (b.slots[(me / 32) * 32 + l] == bits) out |= 1u << l;
  b.wait(b.warp_barrier());
  return out;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }

// A 16-byte vector load or store (Pack16 in csrc/cuda) must be 16-byte aligned, as on a GPU.
namespace sib_emu {
inline void check_vector_alignment(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("16-byte vector access at a pointer not 16-byte aligned");
}
}  // namespace sib_emu

// One OS thread runs all fibers, so plain read-modify-writes are atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void __trap() { sib_emu::fail("__trap"); }

// ---- WMMA -------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename T>
struct storage_of {
  using type = T;
};
template <>
struct storage_of<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct shape_of;
template <int M, int N, int K>
struct shape_of<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape_of<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape_of<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename storage_of<T>::type;
  using tag_type = T;
  static constexpr int rows = shape_of<Use, M, N, K>::rows;
  static constexpr int cols = shape_of<Use, M, N, K>::cols;
  enum { num_elements = rows * cols };
  element_type x[num_elements];  // the whole tile, row-major, in every lane
};

template <typename T>
void check_pointer(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    sib_emu::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) sib_emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const E* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators need a layout");
  using F = fragment<Use, M, N, K, T, Layout>;
  check_pointer(p, ldm, "load_matrix_sync");
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = row ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T, typename E>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const E* p, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, "load_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T, typename E>
void store_matrix_sync(E* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, "store_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      if (layout == mem_row_major) {
        p[r * ldm + c] = f.x[r * N + c];
      } else {
        p[c * ldm + r] = f.x[r * N + c];
      }
    }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(v);
}

inline float tf32_truncate(float v) { return __uint_as_float(__float_as_uint(v) & 0xffffe000u); }

template <int M, int N, int K, typename TA, typename LA, typename LB, typename E>
void mma_sync(fragment<accumulator, M, N, K, E>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, E>& c) {
  constexpr bool tf32 = std::is_same<TA, precision::tf32>::value;
  E out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      E acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        E av = a.x[i * K + k], bv = b.x[k * N + j];
        if constexpr (tf32) {
          av = tf32_truncate(av);
          bv = tf32_truncate(bv);
        }
        acc = std::fma(av, bv, acc);
      }
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
