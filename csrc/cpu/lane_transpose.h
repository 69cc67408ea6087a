// Lane-major to point-major transposes for the kernels that run one point per SIMD lane.
// Internal to csrc/cpu.
#pragma once

#include <cstdint>
#include <cstring>

#include "vector_exp.h"  // Double4

namespace locdiff {
namespace cpu {

// Lane-major to point-major: the kernels compute value k of 4 points as one 4-lane vector
// (cols[k][p]); the output wants each point's K values contiguous. A 4x4 transpose in
// registers (vector extensions: AVX in the x86-64-v3 clone, SSE pairs in the default one)
// turns 4 such vectors into 4 contiguous runs, so the stores are full-width instead of
// one lane at a time (the scalar scatter cost more than the harmonics at L <= 16).
template <typename T>
struct Vec4;
template <>
struct Vec4<double> {
  typedef Double4 type;
  typedef Long4 mask;
};
template <>
struct Vec4<float> {
  typedef float type __attribute__((vector_size(16)));
  typedef int mask __attribute__((vector_size(16)));
};

#if defined(__clang__)
#define LOCDIFF_SHUFFLE(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
#else
#define LOCDIFF_SHUFFLE(a, b, i, j, k, l) __builtin_shuffle(a, b, typename Vec4<T>::mask{i, j, k, l})
#endif

// In registers: r_j holds value k0 + j of 4 points (lane p = point p); afterwards r_p holds
// values k0..k0+3 of point p.
template <typename T>
__attribute__((always_inline)) inline void transpose4(typename Vec4<T>::type& r0, typename Vec4<T>::type& r1,
                                                      typename Vec4<T>::type& r2, typename Vec4<T>::type& r3) {
  typedef typename Vec4<T>::type V;
  // Each pattern is one instruction for its type: for 4 doubles (AVX) in-lane unpacks, then
  // 128-bit lane permutes; for 4 floats (SSE) unpcklps/unpckhps, then movlhps/movhlps (the
  // double patterns cost floats two instructions each).
  if constexpr (sizeof(T) == 8) {
    const V t0 = LOCDIFF_SHUFFLE(r0, r1, 0, 4, 2, 6), t1 = LOCDIFF_SHUFFLE(r0, r1, 1, 5, 3, 7);
    const V t2 = LOCDIFF_SHUFFLE(r2, r3, 0, 4, 2, 6), t3 = LOCDIFF_SHUFFLE(r2, r3, 1, 5, 3, 7);
    r0 = LOCDIFF_SHUFFLE(t0, t2, 0, 1, 4, 5);
    r1 = LOCDIFF_SHUFFLE(t1, t3, 0, 1, 4, 5);
    r2 = LOCDIFF_SHUFFLE(t0, t2, 2, 3, 6, 7);
    r3 = LOCDIFF_SHUFFLE(t1, t3, 2, 3, 6, 7);
  } else {
    const V t0 = LOCDIFF_SHUFFLE(r0, r1, 0, 4, 1, 5), t1 = LOCDIFF_SHUFFLE(r0, r1, 2, 6, 3, 7);
    const V t2 = LOCDIFF_SHUFFLE(r2, r3, 0, 4, 1, 5), t3 = LOCDIFF_SHUFFLE(r2, r3, 2, 6, 3, 7);
    r0 = LOCDIFF_SHUFFLE(t0, t2, 0, 1, 4, 5);
    r1 = LOCDIFF_SHUFFLE(t0, t2, 2, 3, 6, 7);
    r2 = LOCDIFF_SHUFFLE(t1, t3, 0, 1, 4, 5);
    r3 = LOCDIFF_SHUFFLE(t1, t3, 2, 3, 6, 7);
  }
}

// out[p * K + j] = lane p of r_j for p, j < 4: four values of four points, from registers.
template <typename T>
__attribute__((always_inline)) inline void transpose4_store(typename Vec4<T>::type r0, typename Vec4<T>::type r1,
                                                            typename Vec4<T>::type r2, typename Vec4<T>::type r3,
                                                            T* out, int64_t K) {
  typedef typename Vec4<T>::type V;
  transpose4<T>(r0, r1, r2, r3);
  std::memcpy(out, &r0, sizeof(V));
  std::memcpy(out + K, &r1, sizeof(V));
  std::memcpy(out + 2 * K, &r2, sizeof(V));
  std::memcpy(out + 3 * K, &r3, sizeof(V));
}

// out[p * K + k0 + j] = cols[k0 + j][lane0 + p] for p, j < 4.
template <typename T>
__attribute__((always_inline)) inline void transpose4_store(const T* c0, const T* c1, const T* c2,
                                                            const T* c3, T* out, int64_t K) {
  typedef typename Vec4<T>::type V;
  V r0, r1, r2, r3;
  std::memcpy(&r0, c0, sizeof(V));
  std::memcpy(&r1, c1, sizeof(V));
  std::memcpy(&r2, c2, sizeof(V));
  std::memcpy(&r3, c3, sizeof(V));
  transpose4_store<T>(r0, r1, r2, r3, out, K);
}

}  // namespace cpu
}  // namespace locdiff
