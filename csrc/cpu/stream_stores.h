// Non-temporal stores for the CPU kernels: outputs too large to stay in the cache leave
// through them, whole cache lines at a time, without the output first being read in.
// Internal to csrc/cpu.
#pragma once

#if defined(__SSE2__)
#include <immintrin.h>  // SSE2, and AVX where the CPU has it
#define LOCDIFF_STREAM_STORES 1
#else
#define LOCDIFF_STREAM_STORES 0
#endif

#include <cstdint>
#include <type_traits>

namespace locdiff {
namespace cpu {

// Outputs of at least this many bytes stream (they cannot stay in the L2 of a couple of
// cores anyway); each kernel says at which degrees (sh_cpu_small.cpp may_stream, the
// lanes' forward_block_streamed).
constexpr int64_t kStreamBytes = int64_t(4) << 20;

#if LOCDIFF_STREAM_STORES
// out[0, n) = tile[0, n) by non-temporal stores: 32-byte ones where the CPU has AVX and out
// is 32-byte aligned, else 16-byte SSE2 ones. Fewer store instructions matter because the
// store port is what a small-degree block waits on (docs/kernels.md, "Streaming stores").
// The AVX copy is out of line: an inlined AVX intrinsic would not compile into the
// portable clone of the caller.
template <typename T>
__attribute__((target("avx"), noinline)) void stream_copy_avx(const T* tile, T* out, int n) {
  constexpr int kWidth = 32 / sizeof(T);
  for (int i = 0; i < n; i += kWidth) {
    if constexpr (std::is_same_v<T, double>) _mm256_stream_pd(out + i, _mm256_load_pd(tile + i));
    else _mm256_stream_ps(out + i, _mm256_load_ps(tile + i));
  }
}
inline const bool kCpuHasAvx = (__builtin_cpu_init(), __builtin_cpu_supports("avx"));  // init: runs as a constructor

template <typename T>
__attribute__((always_inline)) inline void stream_copy(const T* tile, T* out, int n) {
  if (kCpuHasAvx && reinterpret_cast<std::uintptr_t>(out) % 32 == 0) return stream_copy_avx(tile, out, n);
  constexpr int kWidth = 16 / sizeof(T);
  for (int i = 0; i < n; i += kWidth) {
    if constexpr (std::is_same_v<T, double>) _mm_stream_pd(out + i, _mm_load_pd(tile + i));
    else _mm_stream_ps(out + i, _mm_load_ps(tile + i));
  }
}
#endif

}  // namespace cpu
}  // namespace locdiff
