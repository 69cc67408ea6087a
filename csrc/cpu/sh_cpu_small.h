// The CPU spherical-harmonic paths that run one point per SIMD lane; internal to csrc/cpu.
// sh_cpu.cpp routes between them and its per-point kernel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace locdiff {

// Forward, by degree (measured on AVX2, two threads unless noted, float64 / float32 ns per
// value; L = 32: small 0.29 / 0.16, lanes 0.19 / 0.14; L = 64: lanes 0.26 / 0.19, per point
// 0.43 / 0.29):
// - registers (sh_register_group.h) for the full blocks of small at 1 <= L <= 3, and on CPUs
//   with AVX2 at 4 <= L <= 20 in float64 and 6 <= L <= 20 in float32 (elsewhere to L = 16 in
//   float64; kRegisterDegreeMax says where each was measured): four points at a time with
//   every value in a vector variable, nothing stored but the output (pipelined through two L1
//   tiles where it streams: sh_cpu_small.cpp, forward_groups_v3). On the
//   Intel Xeon VM (benchmarks/sh_kernel_ab.py: 32768 points, a reused buffer, one thread, ns
//   per point), small before cpu::fill_lanes -> small -> registers: float64 L = 1, 2, 3:
//   4.4 -> 3.0 -> 2.5, 9.6 -> 8.2 -> 5.5, 14.3 -> 12.8 -> 8.4; float32 8.0 -> 3.5 -> 3.1,
//   9.8 -> 8.5 -> 6.6, 12.3 -> 11.0 -> 10.1.
// - float lanes (sh_float_lanes.h) for the full blocks of float32 output at 3 <= L <= 5:
//   eight points a vector in float32 arithmetic (normalisation and m = 0 in float64). Same
//   machine and tool, block kernel (registers at L = 3) -> float lanes: L = 3, 4, 5: 12.3 ->
//   8.4, 18.4 -> 11.9, 24.2 -> 14.7; at L = 1, 2, 6, 7, 8 it was slower (0.58x, 0.92x,
//   0.76-1.39x, 0.64x, 0.71x), so the range stops there.
// - small (sh_cpu_small.cpp, compile-time degree, column by column through an L1 tile; the
//   register groups within it) up to kSmallForwardMax. Below L = 19 lanes is level in
//   float64 at best (at L = 19-20 the groups beat it 1.45-2.6x), and with some output
//   addresses (relative to its scratch) twice as slow (one thread, L = 16: 0.35-0.82 against
//   a steady 0.36); float32's tile holds twice the values, so small leads to higher L.
// - lanes (sh_cpu_lanes.cpp, degree by degree, no tile) up to kLanesDegreeMax. Numerics:
//   the plain recurrence loses about l^2 ulp within ~0.01 rad of an axis (1.13e-11 per unit
//   at L = 320, 1.15e-11 at 512), so in float64 sh_cpu_fwd recomputes points within 0.063
//   rad of an axis by the per-point kernel; elsewhere the lanes stay within 8e-13 even at
//   L = 512 (mpmath). So numerics would allow 512; speed decides, and it depends on the
//   machine: above L = 320 the four state rows of lane vectors (4 x (L+1) x 64 bytes)
//   outgrow L1. On the Intel Xeon VM (same-process A/B, 64 points, reused / fresh outputs)
//   lanes vs per point at L = 512: float64 0.55 / 0.95 vs 0.70 / 0.97, float32 0.26 / 0.48
//   vs 0.44 / 0.64 (fresh outputs are page-fault bound); on a second Intel Xeon VM (105 MB
//   of L3; benchmarks/sh_kernel_ab.py --points 64 --threads 2, builds alternated) per point
//   -> lanes at L = 400, 512: float64 1.58x, 1.77x faster, float32 1.41x, 1.50x; on the AMD
//   EPYC, where these kernels were tuned, lanes 0.38 / 0.23 vs per point 0.28 / 0.13
//   (float64 / float32). So lanes run to kLanesDegreeMax on Intel CPUs and to
//   kLanesDegreeMaxOther elsewhere (sh_cpu.cpp: lanes_forward_max), and only with a full
//   block of points for every thread (at L = 512 a point is 263,169 values, and a call may
//   have a handful).
// - per point (sh_cpu.cpp) above: scaled seeds and Reinsch's form, exact to L = 2048.
template <typename T>
constexpr int kSmallForwardMax = std::is_same_v<T, double> ? 20 : 24;
constexpr int kLanesDegreeMax = 512, kLanesDegreeMaxOther = 320;

// Backward, by degree: lanes (sh_cpu_lanes.cpp, the forward's recurrence, then each group of
// four orders of four points loaded by transposes and summed per lane) from L = 6 (float64)
// or 4 (float32) up to kLanesBackwardMax; small (sh_cpu_small.cpp) below, whose per-lane
// loop over the orders costs less where a degree has fewer than four; per point above.
// Measured as above, ns per input value, small or per point -> lanes: float64 L = 4, 8, 16,
// 32: 0.78 -> 0.92, 1.11 -> 0.63, 0.74 -> 0.30, 0.67 -> 0.26; L = 64, 128, 256, 320: 0.35 ->
// 0.19, 0.30 -> 0.21, 0.34 -> 0.27, 0.36 -> 0.31; float32 L = 320: 0.27 -> 0.29.
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
