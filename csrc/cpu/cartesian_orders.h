// The Cartesian form of the low-degree register kernels, for one vector of points at a
// compile-time degree: Y_l,+-m = sqrt2 Qbar_lm(z) Re/Im (x + i y)^m (Y_l0 = Qbar_l0(z)), each
// value a vector variable. Internal to csrc/cpu; sh_register_group.h (four points in float64)
// and sh_float_lanes.h (eight points in float32) share it.
#pragma once

#include "legendre_tables.h"  // LOCDIFF_INLINE

namespace locdiff {
namespace cpu {

// The default `after` of cartesian_orders: nothing between values.
struct NoHook {
  LOCDIFF_INLINE void operator()() const {}
};

// Fills v[l * l + l +- m] for kFirstOrder <= m <= L from the unit vector (x, y, z). seed(m)
// is Qbar_mm, times sqrt2 for m > 0 (the recurrence is linear, so the factor rides along
// into every Y_l,+-m); tb.a[l][m], tb.b[l][m] are the recurrence coefficients of
// sh_cpu_small.cpp (a[m+1][m] = sqrt(2m+3)), in V's element type or one converting to it.
// after() runs once after each value is written to v, to interleave other work (stores of a
// previous result) with the arithmetic.
template <int L, int kFirstOrder, typename V, typename Tables, typename Seed, typename After = NoHook>
LOCDIFF_INLINE void cartesian_orders(V x, V y, V z, const Tables& tb, Seed seed, V* v, After after = {}) {
  static_assert(kFirstOrder == 0 || kFirstOrder == 1, "the powers of x + i y start at m = 0 or 1");
  V re = kFirstOrder == 0 ? V{} + 1 : x, im = kFirstOrder == 0 ? V{} : y;  // (x + i y)^m
#pragma GCC unroll 8
  for (int m = kFirstOrder; m <= L; ++m) {
    V q2 = V{}, q1 = V{} + seed(m);
#pragma GCC unroll 8
    for (int l = m; l <= L; ++l) {
      V q = q1;
      if (l == m + 1) q = tb.a[l][m] * z * q1;
      if (l >= m + 2) q = tb.a[l][m] * z * q1 - tb.b[l][m] * q2;
      if (l > m) {
        q2 = q1;
        q1 = q;
      }
      const int k = l * l + l;
      if (m == 0) {
        v[k] = q;
        after();
      } else {
        v[k + m] = q * re;
        after();
        v[k - m] = q * im;
        after();
      }
    }
    const V re_next = re * x - im * y;
    im = re * y + im * x;
    re = re_next;
  }
}

}  // namespace cpu
}  // namespace locdiff
