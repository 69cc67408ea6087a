// Pieces of the Legendre recurrence shared by the CPU kernels that run it point by point
// (sh_cpu.cpp: spherical harmonics; shdd_cpu.cpp: f and its gradient at points, ring
// tables): the coefficient tables, the per-point scratch, and the seeds with their scaled
// columns. Internal to csrc/cpu; the recurrence itself is described in locdiff/sh_math.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "locdiff/sh_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// AVX2+FMA clone next to the portable one, chosen at load time. Not "arch=haswell": GCC
// dispatches that on the CPU model (__builtin_cpu_is), so AMD CPUs with AVX2 got the
// portable clone; "arch=x86-64-v3" dispatches on the ISA level (AVX2, FMA, BMI2).
#define LOCDIFF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LOCDIFF_CLONES
#endif
// Hot helpers called from a LOCDIFF_CLONES function must be inlined into it: an
// out-of-line copy is compiled once, for the portable target, whatever the caller's clone.
#define LOCDIFF_INLINE __attribute__((always_inline)) inline
// A lambda's body is a function of its own: compiled for the portable target unless it is
// inlined into the caller's clone.
#define LOCDIFF_LAMBDA_INLINE __attribute__((always_inline))

namespace locdiff {
namespace cpu {

inline int64_t tri(int l) { return int64_t(l) * (l + 1) / 2; }

// Recurrence coefficients in triangular layout (row l holds m = 0..l), shared by all
// degrees: the table for degree L is a prefix of the table for any larger degree.
// Row l, m <= l-2: a_lm, b_lm. m = l-1: a = sqrt(2l+1), b = 0 (the first step of a column).
// dz[tri(l)+m] = sqrt((l-m)(l+m+1)) (sqrt(2) folded in for m >= 1), used by gradients.
// rho[tri(l)+m] = sqrt((2l+1)(l+m) / ((2l-1)(l-m))) is the ratio X_lm / X_{l-1,m} on the
// pole and e = b_lm / rho_{l-1,m} (0 for m = l-1): the coefficients of Reinsch's form.
struct Tables {
  int degree = -1;
  std::vector<double> a, b, dz, rho, e, seed_ratio;
};

// The tables for at least `degree`, built once and kept (one process-wide copy).
inline std::shared_ptr<const Tables> tables_for(int degree) {
  static std::mutex mutex;
  static std::shared_ptr<const Tables> cached;
  std::lock_guard<std::mutex> lock(mutex);
  if (cached && cached->degree >= degree) return cached;
  auto t = std::make_shared<Tables>();
  const int L = degree;
  t->degree = L;
  t->a.assign(tri(L + 1), 0.0);
  t->b.assign(tri(L + 1), 0.0);
  t->dz.assign(tri(L + 1), 0.0);
  t->rho.assign(tri(L + 1), 0.0);
  t->e.assign(tri(L + 1), 0.0);
  t->seed_ratio.assign(L + 1, 0.0);
  // long double: the tables are built once, and near the poles their rounding is what
  // accumulates along a column.
  using ld = long double;
  auto rho = [](int l, int m) { return std::sqrt(ld(2 * l + 1) * (l + m) / (ld(2 * l - 1) * (l - m))); };
  for (int l = 0; l <= L; ++l) {
    for (int m = 0; m <= l; ++m) {
      const int64_t i = tri(l) + m;
      const ld ll = ld(l) * l, mm = ld(m) * m, l1 = ld(l - 1) * (l - 1);
      if (m + 2 <= l) {
        const ld b = std::sqrt((l1 - mm) * (2 * l + 1) / ((ll - mm) * (2 * l - 3)));
        t->a[i] = double(std::sqrt((4 * ll - 1) / (ll - mm)));
        t->b[i] = double(b);
        t->e[i] = double(b / rho(l - 1, m));
      } else if (m + 1 == l) {
        t->a[i] = double(std::sqrt(ld(2 * l + 1)));
      }
      if (m < l) t->rho[i] = double(rho(l, m));
      t->dz[i] = (m == 0 ? 1.0 : kSqrt2) * sh_dz_factor(l, m);
    }
    if (l >= 1) t->seed_ratio[l] = sh_seed_ratio(l);
  }
  cached = t;
  return cached;
}

// A column whose scaled recurrence became representable at degree l: its values at l and
// l-1 take over in the vectorised loop from there on.
struct Injection {
  int l, m;
  double value, previous;
};

// Per-thread scratch for one point.
struct Scratch {
  std::vector<double> x1, x2;          // column values at degrees l-1 and l-2 (then l)
  std::vector<double> cs, sn;          // sqrt2 * s * cos(m phi), sqrt2 * s * sin(m phi)
  std::vector<double> c1, s1;          // cos(m phi), sin(m phi)  (gradients)
  std::vector<double> wx, wy;          // gradients: sqrt2 * m * cos((m-1)phi), sqrt2 * m * sin((m-1)phi)
  std::vector<double> diag;            // seeds R_mm (0 where scaled)
  std::vector<Injection> injections;
  // Near the poles (|z| >= 1/2) sh_cpu.cpp runs the columns in Reinsch's form.
  bool reinsch = false;
  double sigma = 1, t = 0;  // sign of z, and 1 - |z| computed from s without cancellation
  void resize(int L) {
    const size_t n = size_t(L) + 2;
    for (auto* v : {&x1, &x2, &cs, &sn, &c1, &s1, &wx, &wy, &diag}) v->assign(n, 0.0);
    injections.clear();
  }
};

// A direction: the unit vector, s = hypot(x, y), and 1 / |r| for the input gradient.
struct Point {
  double x, y, z, s, inv_norm;
  bool valid;  // finite and non-zero
};

// Normalises one input vector. Scales by the largest component first so that huge or tiny
// (but finite, non-zero) vectors normalise exactly; non-finite or zero vectors are not
// valid and give the north pole (so the kernels compute something finite meanwhile).
template <typename T>
Point unit_point(const T* p) {
  const double x = double(p[0]), y = double(p[1]), z = double(p[2]);
  const double big = std::max(std::fabs(x), std::max(std::fabs(y), std::fabs(z)));
  Point u;
  // Each component is tested: std::max drops a NaN in its second argument, so a NaN y or z
  // beside a finite x would leave big finite.
  u.valid = std::isfinite(x) && std::isfinite(y) && std::isfinite(z) && big > 0.0;
  if (!u.valid) {
    u.x = u.y = u.s = 0.0;
    u.z = u.inv_norm = 1.0;
    return u;
  }
  // 1 / big overflows for subnormal vectors: lift those by 2^600 first (exact).
  const double lift = big < 0x1p-600 ? 0x1p600 : 1.0;
  const double scale = 1.0 / (big * lift);
  const double xs = x * lift * scale, ys = y * lift * scale, zs = z * lift * scale;
  const double norm = std::sqrt(xs * xs + ys * ys + zs * zs), inv = 1.0 / norm;
  u.x = xs * inv;
  u.y = ys * inv;
  u.z = zs * inv;
  u.s = std::hypot(u.x, u.y);
  u.inv_norm = inv * scale * lift;
  return u;
}

// cos(m phi), sin(m phi) for m = 0..L by repeated complex multiplication (error ~ m eps),
// from a unit vector's x, y and s = hypot(x, y) (phi = 0 on the axis).
LOCDIFF_INLINE void azimuth(double x, double y, double s, int L, double* c, double* sn) {
  double c1 = 1.0, s1 = 0.0;
  if (s > 0) {
    c1 = x / s;
    s1 = y / s;
  }
  c[0] = 1.0;
  sn[0] = 0.0;
  for (int m = 1; m <= L; ++m) {
    c[m] = c[m - 1] * c1 - sn[m - 1] * s1;
    sn[m] = sn[m - 1] * c1 + c[m - 1] * s1;
  }
}

// Seeds of every column at (s, z) = (sin, cos of the colatitude) (diag[m] = R_mm, diag[0] =
// P_00), and the scaled recurrence of the columns whose seed underflows; fills
// sc.injections sorted by degree.
inline void seeds(double s, double z, int L, const Tables& t, Scratch& sc) {
  double* diag = sc.diag.data();
  diag[0] = kInvSqrt4Pi;
  if (L == 0) return;
  diag[1] = t.seed_ratio[1] * kInvSqrt4Pi;
  const double floor = std::ldexp(1.0, -SEED_FLOOR_BITS);
  int m = 2;
  for (; m <= L; ++m) {
    const double v = diag[m - 1] * t.seed_ratio[m] * s;
    if (v < floor) break;
    diag[m] = v;
  }
  if (m > L || s == 0.0) return;  // on the axis every column m >= 2 is exactly zero
  // Scaled seeds: mantissa in [2^-SCALE_BITS, 1], value = mant * 2^(SCALE_BITS * e). s is
  // split the same way, and the first mantissa normalised: diag[m-1] * s alone underflows
  // to 0 once s < ~1e-150 (and the loop below would never end), or to a subnormal that has
  // lost the seed's low bits. Powers of two scale exactly, subnormal s included.
  const double up = std::ldexp(1.0, SCALE_BITS), down = std::ldexp(1.0, -SCALE_BITS);
  const double out_floor = std::ldexp(1.0, -OUTPUT_FLOOR_BITS);
  double mant = diag[m - 1], s_mant = s;
  int e = 0, s_e = 0;
  while (mant < down) {
    mant *= up;
    --e;
  }
  while (s_mant < down) {
    s_mant *= up;
    --s_e;
  }
  for (; m <= L; ++m) {
    mant *= t.seed_ratio[m] * s_mant;  // >= 2^-2 SCALE_BITS: normal
    e += s_e;
    while (mant < down) {
      mant *= up;
      --e;
    }
    diag[m] = 0.0;
    // Run column m in scaled form until it is representable above the output floor.
    double prev = 0.0, cur = mant;
    int ec = e;
    for (int l = m; l <= L; ++l) {
      if (l > m) {
        const int64_t i = tri(l) + m;
        const double next = t.a[i] * z * cur - t.b[i] * prev;
        prev = cur;
        cur = next;
        if (std::fabs(cur) > up) {
          cur *= down;
          prev *= down;
          ++ec;
        }
      }
      if (ec >= -4) {
        const double v = std::ldexp(cur, SCALE_BITS * ec);
        if (std::fabs(v) >= out_floor) {
          sc.injections.push_back({l, m, v, std::ldexp(prev, SCALE_BITS * ec)});
          break;
        }
      }
    }
  }
  std::sort(sc.injections.begin(), sc.injections.end(),
            [](const Injection& p, const Injection& q) { return p.l < q.l; });
}

// Threads for `work` independent items: the request, at least 1, at most work.
inline int threads(int requested, int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(std::max(1, requested), work)));
}

}  // namespace cpu
}  // namespace locdiff
