// The CPU spherical-harmonic paths that run one point per SIMD lane; internal to csrc/cpu.
// sh_cpu.cpp routes between them and its per-point kernel.
#pragma once

#include <cstdint>
#include <type_traits>

namespace locdiff {

// Forward, by degree (measured on AVX2, two threads unless noted, float64 / float32 ns per
// value; L = 32: small 0.29 / 0.16, lanes 0.19 / 0.14; L = 64: lanes 0.26 / 0.19, per point
// 0.43 / 0.29; L = 512: lanes 0.38 / 0.23, per point 0.28 / 0.13):
// - small (sh_cpu_small.cpp, compile-time degree, column by column through an L1 tile) up to
//   kSmallForwardMax. Below L = 19 lanes is level in float64 at best, and with some output
//   addresses (relative to its scratch) twice as slow (one thread, L = 16: 0.35-0.82 against
//   a steady 0.36); float32's tile holds twice the values, so small leads to higher L.
// - lanes (sh_cpu_lanes.cpp, degree by degree, no tile) up to kLanesDegreeMax, where its
//   four state rows of lane vectors (4 x (L+1) x 64 bytes) outgrow L1;
// - per point (sh_cpu.cpp) above.
template <typename T>
constexpr int kSmallForwardMax = std::is_same_v<T, double> ? 18 : 24;
constexpr int kLanesDegreeMax = 320;
// The backward pass runs points in lanes up to this degree (sh_cpu_small.cpp), per point above.
constexpr int kSmallDegreeMax = 32;

// Same contract as sh_cpu_fwd: returns -1 or the first non-finite / zero row.
template <typename T>
int64_t sh_cpu_small_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads);
template <typename T>
int64_t sh_cpu_lanes_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads);
template <typename T>
void sh_cpu_small_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                      int num_threads);

}  // namespace locdiff
