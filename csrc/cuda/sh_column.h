// One column (fixed order m) of the spherical-harmonic recurrence, as the CUDA kernels run
// it: host-and-device code, so the same functions can be checked on the CPU.
//
// Same numerics as csrc/cpu/sh_cpu.cpp (see sh_math.h for the formulas):
//  * float64 arithmetic whatever the output dtype;
//  * away from the poles (|z| < 1/2) the plain three-term recurrence
//      X_l = a_l z X_{l-1} - b_l X_{l-2};
//    near them Reinsch's form, which carries D_l = X_l - sigma rho_l X_{l-1}:
//      D_l = sigma (e_l D_{l-1} - a_l t X_{l-1}),  X_l = sigma rho_l X_{l-1} + D_l,
//    with z = sigma (1 - t) and t = s^2 / (1 + |z|) free of cancellation;
//  * a column whose seed c_m s^(m-1) is below 2^-SEED_FLOOR_BITS runs in scaled form
//    (mantissa times 2^(SCALE_BITS * ec), plain recurrence) and is written as zeros until
//    its value reaches 2^-OUTPUT_FLOOR_BITS; from that degree on it continues unscaled.
//
// Coefficients. The CPU reads tables; a GPU thread instead computes them per step from one
// reciprocal square root, because at high degree a table read per step would cost more
// memory traffic than the output itself. With N1 = 2l+1, N2 = 2l-1, lp = l+m, lm = l-m
// (all exact integers in double) and r = rsqrt(N1 N2 lp lm) (the product is below 2^53):
//   a_l = N1 N2 r,  1/a_l = lp lm r,  rho_l = N1 lp r,  1/rho_l = N2 lm r,
//   b_l = a_l / a_{l-1},  e_l = b_l / rho_{l-1} = a_l / (a_{l-1} rho_{l-1}).
// Each is within ~2 ulp (CUDA's double rsqrt is within 1 ulp), against ~1 ulp for the CPU
// tables; along a column of 2048 steps that is ~1e-13 relative, far inside the contract.
#pragma once

#include <cstdint>

#include "locdiff/sh_math.h"

#if defined(__CUDACC__)
#define LOCDIFF_COL_HD __host__ __device__ __forceinline__
#else
#define LOCDIFF_COL_HD inline
#endif

namespace locdiff {
namespace cuda_detail {

LOCDIFF_COL_HD double rsqrt_d(double v) {
#if defined(__CUDA_ARCH__)
  return ::rsqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// 2^SCALE_BITS and friends as exact doubles.
constexpr double kUp = 1.157920892373162e77;     // 2^256
constexpr double kDown = 8.636168555094445e-78;  // 2^-256
static_assert(SCALE_BITS == 256, "kUp/kDown assume SCALE_BITS == 256");

// A positive number as m * 2^e with m in [0.5, 1), or m == 0 (then e == 0): seeds and
// their prefix products, which underflow double long before the columns need them.
struct Scaled {
  double m;
  int e;
};

LOCDIFF_COL_HD Scaled scaled_one() { return {0.5, 1}; }

LOCDIFF_COL_HD Scaled scaled_from(double v) {  // v >= 0 and normal (or zero)
  int e = 0;
  const double m = std::frexp(v, &e);
  return {m, m == 0.0 ? 0 : e};
}

LOCDIFF_COL_HD Scaled scaled_mul(Scaled a, Scaled b) {
  double m = a.m * b.m;  // in [0.25, 1): one doubling renormalises
  int e = a.e + b.e;
  if (m == 0.0) return {0.0, 0};
  if (m < 0.5) {
    m *= 2.0;
    e -= 1;
  }
  return {m, e};
}

// Per-point constants.
struct PointMode {
  double z;
  bool reinsch;  // |z| >= 1/2
  double sigma;  // sign of z
  double t;      // 1 - |z|
};

LOCDIFF_COL_HD PointMode point_mode(double z, double s) {
  PointMode p;
  p.z = z;
  p.reinsch = std::fabs(z) >= 0.5;
  p.sigma = z < 0 ? -1.0 : 1.0;
  p.t = s * s / (1.0 + std::fabs(z));
  return p;
}

// Factor f_m of the seed prefix product R_mm = f_0 f_1 ... f_m:
// f_0 = P_00, f_1 = sqrt(3/2), f_m = sqrt((2m+1)/(2m)) s for m >= 2 (1 past the degree).
// s is passed split as s_m * 2^s_e so that a subnormal s stays exact.
LOCDIFF_COL_HD Scaled seed_factor(int m, int L, double s_m, int s_e) {
  if (m > L) return scaled_one();
  if (m == 0) return scaled_from(kInvSqrt4Pi);
  const double ratio = sh_seed_ratio(m);
  if (m == 1) return scaled_from(ratio);
  Scaled f = scaled_from(ratio * s_m);
  if (f.m != 0.0) f.e += s_e;
  return f;
}

LOCDIFF_COL_HD void split_s(double s, double& s_m, int& s_e) {
  // frexp of a subnormal is exact in IEEE arithmetic, but scale it up first anyway so that
  // every later product stays normal.
  if (s == 0.0) {
    s_m = 0.0;
    s_e = 0;
    return;
  }
  const bool tiny = s < 0x1p-900;
  s_m = std::frexp(tiny ? s * 0x1p+600 : s, &s_e);
  if (tiny) s_e -= 600;
}

// State of one column: x = X_l (P_l0 or R_lm), y = X_{l-1} (plain) or D_l (Reinsch),
// k = 1/a_l (plain) or 1/(a_l rho_l) (Reinsch), 0 before the first step; ec < 0 while the
// column is carried scaled (value = x 2^(SCALE_BITS ec)).
struct Column {
  double x, y, k;
  int ec;
};

LOCDIFF_COL_HD bool try_inject(Column& c, const PointMode& p, double rho) {
  if (c.ec < -4) return false;
  const double v = std::ldexp(c.x, SCALE_BITS * c.ec);
  if (!(std::fabs(v) >= 0x1p-960)) return false;
  static_assert(OUTPUT_FLOOR_BITS == 960, "injection floor literal");
  const double prev = std::ldexp(c.y, SCALE_BITS * c.ec);
  c.x = v;
  c.y = p.reinsch ? v - p.sigma * rho * prev : prev;
  c.ec = 0;
  return true;
}

// Column m at its first degree l = m, from its seed R_mm = seed.m * 2^seed.e.
LOCDIFF_COL_HD Column column_start(Scaled seed, const PointMode& p) {
  Column c{0.0, 0.0, 0.0, 0};
  if (seed.m == 0.0) return c;  // on the axis: columns m >= 2 vanish identically
  if (seed.e >= 1 - SEED_FLOOR_BITS) {
    // Value >= 2^-SEED_FLOOR_BITS: an ordinary column.
    c.x = std::ldexp(seed.m, seed.e);
    c.y = p.reinsch ? c.x : 0.0;
    return c;
  }
  // Scaled: mantissa in [2^-256, 1), value = x 2^(256 ec), ec <= -3.
  const int q = (-seed.e) / SCALE_BITS, rem = (-seed.e) % SCALE_BITS;
  c.ec = -q;
  c.x = std::ldexp(seed.m, -rem);
  try_inject(c, p, 0.0);  // rho_mm = 0: D_m = X_m
  return c;
}

// Advances column m from degree l-1 to l (l > m).
LOCDIFF_COL_HD void column_step(Column& c, int l, int m, const PointMode& p) {
  const double n1 = 2.0 * l + 1.0, n2 = 2.0 * l - 1.0;
  const double lp = double(l + m), lm = double(l - m);
  const double n12 = n1 * n2, plm = lp * lm;
  const double r = rsqrt_d(n12 * plm);
  const double a = n12 * r;
  const double inv_a = plm * r;
  if (c.ec < 0 || !p.reinsch) {
    const double b = a * c.k;
    const double next = a * p.z * c.x - b * c.y;
    c.y = c.x;
    c.x = next;
    c.k = inv_a;
    if (c.ec < 0) {
      if (std::fabs(c.x) > kUp) {
        c.x *= kDown;
        c.y *= kDown;
        ++c.ec;
      }
      if (try_inject(c, p, n1 * lp * r) && p.reinsch) c.k = inv_a * (n2 * lm * r);
    }
  } else {
    const double e = a * c.k;
    const double rho = n1 * lp * r;
    c.y = (p.sigma * e) * c.y - a * (p.sigma * p.t) * c.x;
    c.x = (p.sigma * rho) * c.x + c.y;
    c.k = inv_a * (n2 * lm * r);
  }
}

// X_l of the column as written to the output (0 while scaled).
LOCDIFF_COL_HD double column_value(const Column& c) { return c.ec == 0 ? c.x : 0.0; }

// (cos, sin) of k phi by binary powers of (c1, s1) = exp(i phi): error ~ k ulp, as the
// CPU's repeated products.
LOCDIFF_COL_HD void complex_pow(double c1, double s1, int k, double& ck, double& sk) {
  double rc = 1.0, rs = 0.0, bc = c1, bs = s1;
  while (k > 0) {
    if (k & 1) {
      const double t = rc * bc - rs * bs;
      rs = rs * bc + rc * bs;
      rc = t;
    }
    k >>= 1;
    if (k > 0) {
      const double t = bc * bc - bs * bs;
      bs = 2.0 * bc * bs;
      bc = t;
    }
  }
  ck = rc;
  sk = rs;
}

LOCDIFF_COL_HD void complex_mul(double& c, double& s, double c2, double s2) {
  const double t = c * c2 - s * s2;
  s = s * c2 + c * s2;
  c = t;
}

struct UnitPoint {
  double x, y, z, s, inv_norm;
};

// As unit_point() in sh_cpu.cpp: scale by the largest component first so that huge or tiny
// (finite, non-zero) vectors normalise exactly.
LOCDIFF_COL_HD UnitPoint unit_point(double x, double y, double z) {
  const double big = std::fmax(std::fabs(x), std::fmax(std::fabs(y), std::fabs(z)));
  const double xs = x / big, ys = y / big, zs = z / big;
  const double norm = std::sqrt(xs * xs + ys * ys + zs * zs);
  UnitPoint u;
  u.x = xs / norm;
  u.y = ys / norm;
  u.z = zs / norm;
  u.s = std::hypot(u.x, u.y);
  u.inv_norm = 1.0 / (norm * big);
  return u;
}

}  // namespace cuda_detail
}  // namespace locdiff
