// float32 spherical harmonics of a full block of 8 points at a compile-time low degree, in
// float32 arithmetic, 8 points per vector. Internal to csrc/cpu; sh_cpu_small.cpp runs it on
// the full blocks of float32 output at kFloatLanesMinDegree <= L <= kFloatLanesMaxDegree.
//
// Why: at low degree the float64 block kernel is bound by its own instructions, and for a
// float32 output half of them are the second half of every vector (4 doubles a vector) and
// the conversions; here one vector holds all 8 points, and each 4x4 transpose in a 128-bit
// lane serves two groups of four points. Numerics: the normalisation (1/|r|, on which every
// value depends) and the m = 0 column run in float64 and are rounded once, since in float32
// they alone cost 6.4e-7 per unit of sqrt((2l+1)/4pi) at L = 4 and 1.8e-6 at L = 8; the
// m >= 1 columns ((x + i y)^m and the Qbar recurrence) run in float32. Measured against
// float64 at the rounded input (400k random points): 2.8e-7 at L = 3, 4.3e-7 at L = 4,
// 5.9e-7 at L = 5, against the 2e-6 contract. There is no range problem: |Qbar| stays below
// 30 and the powers of a unit vector below 1 (their underflow near the axis is below the
// float32 output's last bit).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cartesian_orders.h"
#include "legendre_tables.h"  // LOCDIFF_INLINE
#include "locdiff/sh_math.h"  // kSqrt2
#include "point_block.h"      // kOrdinaryMinR2, kOrdinaryMaxR2
#include "vector_exp.h"       // Double4

namespace locdiff {
namespace cpu {

typedef float Float8 __attribute__((vector_size(32)));
typedef int Int8 __attribute__((vector_size(32)));

constexpr int kFloatLanesMinDegree = 3, kFloatLanesMaxDegree = 5;

// Coefficients in float32: seed[m] = Qbar_mm (times sqrt2 for m > 0, which rides along the
// linear recurrence into Y_l,+-m), a[l][m] and b[l][m] as in sh_cpu_small.cpp.
template <int kMax>
struct FloatTables {
  float seed[kMax + 1], a[kMax + 1][kMax + 1], b[kMax + 1][kMax + 1];
  double seed0, a0[kMax + 1], b0[kMax + 1];  // column m = 0 in float64
  template <typename Tables>
  explicit FloatTables(const Tables& tb) {
    for (int m = 0; m <= kMax; ++m) seed[m] = float(m == 0 ? tb.seed[0] : kSqrt2 * tb.seed[m]);
    for (int l = 0; l <= kMax; ++l)
      for (int m = 0; m <= kMax; ++m) a[l][m] = float(tb.a[l][m]), b[l][m] = float(tb.b[l][m]);
    seed0 = tb.seed[0];
    for (int l = 0; l <= kMax; ++l) a0[l] = tb.a[l][0], b0[l] = tb.b[l][0];
  }
};

#if defined(__clang__)
#define LOCDIFF_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LOCDIFF_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, Int8{__VA_ARGS__})
#endif

// r_j holds value k + j of points 0..7; writes them to dst + p * K + k (p < 8, j < 4). A 4x4
// transpose within each 128-bit lane (unpcklps / unpckhps / shufps) leaves point p's four
// values in the low half of one vector and point p + 4's in its high half.
template <int K>
LOCDIFF_INLINE void transpose8x4_store(Float8 r0, Float8 r1, Float8 r2, Float8 r3, float* dst) {
  const Float8 t0 = LOCDIFF_SHUFFLE8(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13);
  const Float8 t1 = LOCDIFF_SHUFFLE8(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
  const Float8 t2 = LOCDIFF_SHUFFLE8(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13);
  const Float8 t3 = LOCDIFF_SHUFFLE8(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
  const Float8 rows[4] = {LOCDIFF_SHUFFLE8(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13),
                          LOCDIFF_SHUFFLE8(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15),
                          LOCDIFF_SHUFFLE8(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13),
                          LOCDIFF_SHUFFLE8(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15)};
  for (int p = 0; p < 4; ++p) {
    std::memcpy(dst + p * K, &rows[p], 16);
    std::memcpy(dst + (p + 4) * K, reinterpret_cast<const char*>(&rows[p]) + 16, 16);
  }
}

// Writes the (L+1)^2 values of points xyz[0..7] to dst + p * K and returns true, or returns
// false having written nothing when a squared norm is outside [kOrdinaryMinR2,
// kOrdinaryMaxR2] (point_block.h: the float64 block kernel handles those).
template <int L, int kMax>
LOCDIFF_INLINE bool sh_float_block(const float* xyz, const FloatTables<kMax>& tb, float* dst) {
  static_assert(L <= kMax, "degree above the tables");
  constexpr int K = (L + 1) * (L + 1);
  // Normalised in float64 (as the float64 kernels do), then rounded once: normalising in
  // float32 put 1.5 ulp into z, which Y_l0's slope (about l^2 / 2 per unit) multiplied to
  // 1.5e-6 per unit at L = 4. Lanes are built in registers: written to memory one by one and
  // read back as a vector, they would stall on store forwarding.
  typedef float Float4 __attribute__((vector_size(16)));
  Float8 x, y, z, col0[L + 1];
  for (int half = 0; half < 8; half += 4) {
    const float* p = xyz + 3 * half;
    const Double4 px = {p[0], p[3], p[6], p[9]}, py = {p[1], p[4], p[7], p[10]}, pz = {p[2], p[5], p[8], p[11]};
    const Double4 r2 = px * px + py * py + pz * pz;
    const Long4 ok = (r2 >= splat4(kOrdinaryMinR2)) & (r2 <= splat4(kOrdinaryMaxR2));
    if (!(ok[0] & ok[1] & ok[2] & ok[3])) return false;
    alignas(32) double lanes[4];
    store4(lanes, r2);
#pragma omp simd
    for (int i = 0; i < 4; ++i) lanes[i] = 1.0 / std::sqrt(lanes[i]);
    const Double4 inv = load4(lanes);
    const Float4 fx = __builtin_convertvector(px * inv, Float4), fy = __builtin_convertvector(py * inv, Float4),
                 fz = __builtin_convertvector(pz * inv, Float4);
    for (int i = 0; i < 4; ++i) x[half + i] = fx[i], y[half + i] = fy[i], z[half + i] = fz[i];
    const Double4 zd = pz * inv;
    Double4 q2 = splat4(0.0), q1 = splat4(tb.seed0);
#pragma GCC unroll 16
    for (int l = 0; l <= L; ++l) {
      Double4 q = q1;
      if (l == 1) q = tb.a0[1] * zd * q1;
      if (l >= 2) q = tb.a0[l] * zd * q1 - tb.b0[l] * q2;
      if (l > 0) q2 = q1, q1 = q;
      const Float4 fq = __builtin_convertvector(q, Float4);
      for (int i = 0; i < 4; ++i) col0[l][half + i] = fq[i];
    }
  }

  alignas(32) Float8 v[K];
#pragma GCC unroll 8
  for (int l = 0; l <= L; ++l) v[l * l + l] = col0[l];
  cartesian_orders<L, 1>(x, y, z, tb, [&](int m) LOCDIFF_LAMBDA_INLINE { return tb.seed[m]; }, v);
  // The last K mod 4 values (one, at even L) by one more transpose over the last four.
#pragma GCC unroll 8
  for (int k = 0; k + 4 <= K; k += 4) transpose8x4_store<K>(v[k], v[k + 1], v[k + 2], v[k + 3], dst + k);
  if constexpr (K % 4 != 0) transpose8x4_store<K>(v[K - 4], v[K - 3], v[K - 2], v[K - 1], dst + K - 4);
  return true;
}

}  // namespace cpu
}  // namespace locdiff
