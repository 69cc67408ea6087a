// Spherical harmonics of four points at a compile-time degree L <= kRegisterDegreeMax, every
// value a 4-lane vector variable (registers, or spill slots of the same width). Internal to
// csrc/cpu; sh_cpu_small.cpp runs it on each half of its blocks of kPointLanes points.
//
// Why a second low-degree path: at low degree a point has few outputs (16 at L = 3), so the
// block kernel's round trips through memory (the normalised block, the powers of x + i y,
// the columns of Qbar, the lane-major tile) cost more than the arithmetic, and some of them
// (narrow stores read back by wide loads) stall on store forwarding. Here nothing but the
// output (and what the compiler spills) is stored. Same Cartesian form and recurrence as
// the block kernel:
//   Y_l,+-m = sqrt2 Qbar_lm(z) Re/Im (x + i y)^m.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cartesian_orders.h"
#include "lane_transpose.h"  // transpose4_store
#include "legendre_tables.h" // LOCDIFF_INLINE
#include "locdiff/sh_math.h" // kSqrt2
#include "point_block.h"      // kOrdinaryMinR2, kOrdinaryMaxR2
#include "vector_exp.h"      // Double4

namespace locdiff {
namespace cpu {

// Where the groups run (sh_cpu_small.cpp routes): past L = 3 the values outgrow the vector
// registers and spill, yet the groups beat the block kernel's round trips through memory,
// up to L = 20 (docs/kernels.md, "Register groups").
constexpr int kRegisterDegreeMax = 20;

// {p[0], p[3], p[6], p[9]}: one coordinate of four points, built in registers (writing lanes
// to memory and reading them back as a vector would stall on store forwarding).
template <typename T>
LOCDIFF_INLINE Double4 strided4(const T* p) {
  return Double4{double(p[0]), double(p[3]), double(p[6]), double(p[9])};
}
// Writes the (L+1)^2 values of points xyz[0..3] to dst + p * K (p < 4) and returns true, or
// returns false having written nothing when a point's squared norm is outside
// [kOrdinaryMinR2, kOrdinaryMaxR2] (non-finite, zero, or too large or small to normalise
// without scaling: the block kernel's careful path handles those). Tables: seed[m] = Qbar_mm, and the recurrence
// coefficients a[l][m], b[l][m] (a[m+1][m] = sqrt(2m+3)), as in sh_cpu_small.cpp.
// All arithmetic in float64, float32 output included (as the other CPU kernels). after() runs
// once after each of the K values is computed (forward_groups_v3 streams its last tile there).
template <typename T, int L, typename Tables, typename After = NoHook>
LOCDIFF_INLINE bool sh_register_group(const T* xyz, const Tables& tb, T* dst, After after = {}) {
  static_assert(1 <= L && L <= kRegisterDegreeMax, "degree outside the register path");
  constexpr int K = (L + 1) * (L + 1);
  Double4 x = strided4(xyz), y = strided4(xyz + 1), z = strided4(xyz + 2);
  const Double4 r2 = x * x + y * y + z * z;
  const Long4 ok = (r2 >= splat4(kOrdinaryMinR2)) & (r2 <= splat4(kOrdinaryMaxR2));
  if (!(ok[0] & ok[1] & ok[2] & ok[3])) return false;
  alignas(32) double r2_lanes[4], inv_lanes[4];
  store4(r2_lanes, r2);
#pragma omp simd
  for (int p = 0; p < 4; ++p) inv_lanes[p] = 1.0 / std::sqrt(r2_lanes[p]);
  const Double4 inv = load4(inv_lanes);
  x *= inv;
  y *= inv;
  z *= inv;

  Double4 v[K];
  const auto seed = [&](int m) LOCDIFF_LAMBDA_INLINE { return m == 0 ? tb.seed[0] : kSqrt2 * tb.seed[m]; };
  cartesian_orders<L, 0>(x, y, z, tb, seed, v, after);

  // Four values of the four points at a time to point-major rows; the last K mod 4 (one, at
  // even L) by one more transpose over the last four, rewriting three with the same values.
  typedef typename Vec4<T>::type V;
  auto emit = [&](int k) LOCDIFF_LAMBDA_INLINE {
    V r0, r1, r2, r3;
    if constexpr (std::is_same_v<T, double>) {
      r0 = v[k], r1 = v[k + 1], r2 = v[k + 2], r3 = v[k + 3];
    } else {
      r0 = __builtin_convertvector(v[k], V), r1 = __builtin_convertvector(v[k + 1], V);
      r2 = __builtin_convertvector(v[k + 2], V), r3 = __builtin_convertvector(v[k + 3], V);
    }
    transpose4_store<T>(r0, r1, r2, r3, dst + k, K);
  };
#pragma GCC unroll 8
  for (int k = 0; k + 4 <= K; k += 4) emit(k);
  if constexpr (K % 4 != 0) emit(K - 4);
  return true;
}

}  // namespace cpu
}  // namespace locdiff
