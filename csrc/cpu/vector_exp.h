// exp on four float64 lanes, for the log-partition and the SHDD-KL (csrc/cpu/shdd_cpu.cpp:
// five exponentials per grid point and pair). std::exp is a scalar libm call here (glibc
// declares its vector variants only under -ffast-math, which the numerics rule out), and it
// was 80% of the SHDD-KL's time.
//
// exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in [-ln2/2, ln2/2] (Cody-Waite:
// ln 2 in two parts, the first exact in k ln2_hi), exp(r) by its Taylor series to r^13 (the
// truncation is under 2e-17 relative), 2^k from its bits. Within a few ulp of exp for x in
// [-708, log(DBL_MAX)]; below -708 the result is 0 (exp(x) < 3.4e-308 there, far below any
// term these sums keep), above, +inf; NaN stays NaN. Internal to csrc/cpu; callers are LOCDIFF_CLONES.
#pragma once

#include <cstring>
#include <limits>

#include "legendre_tables.h"  // LOCDIFF_INLINE

// The vector types never cross a function boundary (everything here is inlined), so GCC's
// note about their ABI without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace locdiff {
namespace cpu {

typedef double Double4 __attribute__((vector_size(32)));  // also the halves of DoubleLanes (ring_lanes.h)
typedef long long Long4 __attribute__((vector_size(32)));

LOCDIFF_INLINE Double4 splat4(double v) { return Double4{v, v, v, v}; }

LOCDIFF_INLINE Double4 load4(const double* p) {
  Double4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

LOCDIFF_INLINE void store4(double* p, Double4 v) { std::memcpy(p, &v, sizeof v); }

LOCDIFF_INLINE Double4 exp4(Double4 x) {
  const Double4 lo = splat4(-708.0), hi = splat4(709.782712893384);  // log(DBL_MAX)
  const Double4 xc = x < lo ? lo : (x > hi ? hi : x);
  // t = x log2(e) + 1.5 2^52 rounds to an integer k held in the low mantissa bits of t.
  const Double4 shift = splat4(0x1.8p52);
  const Double4 t = xc * 1.4426950408889634 + shift;
  const Double4 k = t - shift;
  const Double4 r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  Double4 p = splat4(1.0 / 6227020800.0);  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^(k-1) then a doubling: k reaches 1024 below log(DBL_MAX), where 2^k is not a double.
  const Long4 ki = (Long4)t - (Long4)shift;
  const Double4 half_scale = (Double4)((ki + 1022) << 52);
  Double4 y = (p * half_scale) * 2.0;
  y = x < lo ? splat4(0.0) : y;
  y = x > hi ? splat4(std::numeric_limits<double>::infinity()) : y;
  return x != x ? x : y;
}

LOCDIFF_INLINE double exp1(double x) { return exp4(splat4(x))[0]; }

}  // namespace cpu
}  // namespace locdiff
