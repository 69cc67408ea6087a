// The CPU spherical-harmonic paths that run one point per SIMD lane; internal to csrc/cpu.
// sh_cpu.cpp routes between them and its per-point kernel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace locdiff {

// Forward, by degree (the measured reasons for each bound: docs/kernels.md, "CPU
// spherical harmonics"):
// - registers (sh_register_group.h): four points at a time, every value in a vector
//   variable, for the full blocks of small at 1 <= L <= 3, and with AVX2 to L = 20;
// - float lanes (sh_float_lanes.h): float32 output at 3 <= L <= 5, eight points a vector;
// - small (sh_cpu_small.cpp, compile-time degree, through an L1 tile) to kSmallForwardMax;
// - lanes (sh_cpu_lanes.cpp, degree by degree) to kLanesDegreeMax on Intel CPUs and
//   kLanesDegreeMaxOther elsewhere, with a full block of points for every thread; in
//   float64 points within 0.063 rad of an axis are recomputed by the per-point kernel (the
//   plain recurrence loses about l^2 ulp there);
// - per point (sh_cpu.cpp) above: scaled seeds and Reinsch's form, exact to L = 2048.
template <typename T>
constexpr int kSmallForwardMax = std::is_same_v<T, double> ? 20 : 24;
constexpr int kLanesDegreeMax = 512, kLanesDegreeMaxOther = 320;

// Backward, by degree: lanes (sh_cpu_lanes.cpp) from L = 6 (float64) or 4 (float32) up to
// kLanesBackwardMax; small (sh_cpu_small.cpp) below, whose per-lane loop over the orders
// costs less where a degree has fewer than four; per point above (docs/kernels.md).
template <typename T>
constexpr int kSmallBackwardMax = std::is_same_v<T, double> ? 5 : 3;
constexpr int kLanesBackwardMax = 288;

// The small kernels' coefficient tables go up to this degree.
constexpr int kSmallDegreeMax = std::max(kSmallForwardMax<double>, kSmallForwardMax<float>);

// Same contract as sh_cpu_fwd: returns -1 or the first non-finite / zero row.
template <typename T>
int64_t sh_cpu_small_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads);
template <typename T>
int64_t sh_cpu_lanes_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads);
template <typename T>
void sh_cpu_lanes_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz, int num_threads);
template <typename T>
void sh_cpu_small_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                      int num_threads);

}  // namespace locdiff
