// Spherical harmonics on the CPU: forward and vector-Jacobian product. The forward pass
// hands low and mid degrees to the kernels that run points in SIMD lanes (sh_cpu_small.h
// says which degrees, for both passes); the per-point kernel here serves the rest.
//
// Work layout. One point at a time per thread (OpenMP over points); for that point the
// degrees l run in the outer loop and the orders m in the inner loop. The inner loop is a
// straight SIMD loop over m (coefficient tables, two state rows), and each degree's 2l+1
// outputs are contiguous in memory, so stores stream. All arithmetic is float64 whatever
// the output dtype: the float32 contract (2e-6 at degree 2048) is out of reach of a float32
// recurrence, and at high degree the store, not the arithmetic, sets the speed.
//
// Underflow. Column m starts from the seed R_mm = c_m s^(m-1), which underflows near the
// poles at high m. Such columns are first run alone in scaled arithmetic (mantissa and a
// power of 2^SCALE_BITS) until their value is representable, then "injected" into the
// vectorised recurrence at that degree. Below that degree their outputs are exact zeros
// (they are under 2^-960).
#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "legendre_tables.h"
#include "locdiff/sh_kernels.h"
#include "locdiff/sh_math.h"
#include "point_block.h"  // kPointLanes
#include "sh_cpu_small.h"

namespace locdiff {
namespace {

using cpu::Injection;
using cpu::Point;
using cpu::Scratch;
using cpu::Tables;
using cpu::tables_for;
using cpu::tri;
using cpu::unit_point;

LOCDIFF_INLINE void azimuth(const Point& u, int L, double* c, double* s) { cpu::azimuth(u.x, u.y, u.s, L, c, s); }

// Seeds of every column (cpu::seeds), and the state of Reinsch's form near the poles.
void seeds(const Point& u, int L, const Tables& t, Scratch& sc) {
  sc.reinsch = std::fabs(u.z) >= 0.5;
  sc.sigma = u.z < 0 ? -1.0 : 1.0;
  sc.t = u.s * u.s / (1.0 + std::fabs(u.z));
  cpu::seeds(u.s, u.z, L, t, sc);
}

// Advances every column to degree l, seeds column l, and injects the scaled columns that
// become representable at l. Afterwards x1[m] holds X_lm (P_l0 for m = 0, R_lm otherwise),
// and emit(m, X_lm) has been called for every m (the forward pass stores outputs there,
// while the value is still in a register, so the row is written in the same pass).
//
// Away from the poles: X_l = a z X_{l-1} - b X_{l-2}, with x2 holding degree l-2 (swapped).
// Near the poles the plain recurrence does not oscillate and its rounding errors grow like
// l^2 (5e-11 per unit at l = 2048 on the pole). Reinsch's form instead carries, in x2, the
// small difference D_l = X_l - sigma rho_l X_{l-1} (rho: the column's ratio on the pole):
//   D_l = sigma (e_l D_{l-1} - a_l t X_{l-1}),   X_l = sigma rho_l X_{l-1} + D_l,
// with z = sigma (1 - t); the error then stays at a few ulp per unit.
template <int kSign, class Emit>
LOCDIFF_INLINE void reinsch_step(int l, double t_abs, const Tables& tb, double* __restrict x,
                         double* __restrict d, const Emit& emit) {
  const double* __restrict a = tb.a.data() + tri(l);
  const double* __restrict e = tb.e.data() + tri(l);
  const double* __restrict rho = tb.rho.data() + tri(l);
  const double st = kSign * t_abs;
#pragma omp simd
  for (int m = 0; m < l; ++m) {
    const double dm = (kSign * e[m]) * d[m] - a[m] * st * x[m];
    const double xm = (kSign * rho[m]) * x[m] + dm;
    d[m] = dm;
    x[m] = xm;
    emit(m, xm);
  }
}

template <class Emit>
LOCDIFF_INLINE void plain_step(int l, double z, const Tables& tb, const double* __restrict x1,
                       double* __restrict x2, const Emit& emit) {
  const double* __restrict a = tb.a.data() + tri(l);
  const double* __restrict b = tb.b.data() + tri(l);
#pragma omp simd
  for (int m = 0; m < l; ++m) {
    const double xm = a[m] * z * x1[m] - b[m] * x2[m];
    x2[m] = xm;
    emit(m, xm);
  }
}

template <class Emit>
LOCDIFF_INLINE void step(int l, double z, const Tables& tb, Scratch& sc, size_t& next_injection,
                 double*& x1, double*& x2, const Emit& emit) {
  if (sc.reinsch) {
    if (sc.sigma > 0) {
      reinsch_step<1>(l, sc.t, tb, x1, x2, emit);
    } else {
      reinsch_step<-1>(l, sc.t, tb, x1, x2, emit);
    }
    x1[l] = x2[l] = sc.diag[l];  // D_l = X_l: nothing precedes the seed
  } else {
    plain_step(l, z, tb, x1, x2, emit);
    x2[l] = sc.diag[l];
    std::swap(x1, x2);
  }
  emit(l, sc.diag[l]);
  while (next_injection < sc.injections.size() && sc.injections[next_injection].l == l) {
    const Injection& in = sc.injections[next_injection++];
    x1[in.m] = in.value;
    x2[in.m] = sc.reinsch ? in.value - sc.sigma * tb.rho[tri(l) + in.m] * in.previous : in.previous;
    emit(in.m, in.value);
  }
}

// Writes degree l of one point: row[0] = P_l0, row[+-m] = X_lm * sqrt2 s cos/sin(m phi).
// cs[0] = 1 and sn[0] = 0, so m = 0 writes 0 to row[-0] first, then P_l0 to row[0]: the two
// stores are ordered because they are in one lane.
template <typename T>
struct RowWriter {
  T* row;
  const double* cs;
  const double* sn;
  LOCDIFF_INLINE void operator()(int m, double v) const {
    row[-m] = T(v * sn[m]);
    row[m] = T(v * cs[m]);
  }
};

struct NoEmit {
  inline void operator()(int, double) const {}
};

template <typename T>
LOCDIFF_CLONES bool forward_point(const T* xyz, int L, const Tables& t, Scratch& sc, T* out) {
  const Point u = unit_point(xyz);
  if (!u.valid) return false;
  sc.resize(L);
  azimuth(u, L, sc.c1.data(), sc.s1.data());
  const double f = kSqrt2 * u.s;
  for (int m = 1; m <= L; ++m) {
    sc.cs[m] = f * sc.c1[m];
    sc.sn[m] = f * sc.s1[m];
  }
  sc.cs[0] = 1.0;
  sc.sn[0] = 0.0;
  seeds(u, L, t, sc);
  double* x1 = sc.x1.data();
  double* x2 = sc.x2.data();
  size_t next_injection = 0;
  for (int l = 0; l <= L; ++l) {
    const RowWriter<T> emit{out + int64_t(l) * l + l, sc.cs.data(), sc.sn.data()};
    step(l, u.z, t, sc, next_injection, x1, x2, emit);
  }
  return true;
}

template <typename T>
LOCDIFF_CLONES void backward_point(const T* xyz, const T* grad, int L, const Tables& t,
                                   Scratch& sc, T* grad_xyz) {
  const Point u = unit_point(xyz);
  sc.resize(L);
  azimuth(u, L, sc.c1.data(), sc.s1.data());
  // wx[m] = sqrt2 m cos((m-1) phi), wy[m] = sqrt2 m sin((m-1) phi): the x/y derivatives.
  for (int m = 1; m <= L; ++m) {
    sc.wx[m] = kSqrt2 * m * sc.c1[m - 1];
    sc.wy[m] = kSqrt2 * m * sc.s1[m - 1];
  }
  seeds(u, L, t, sc);
  double* x1 = sc.x1.data();
  double* x2 = sc.x2.data();
  size_t next_injection = 0;
  double gx = 0, gy = 0, gz = 0;
  for (int l = 0; l <= L; ++l) {
    step(l, u.z, t, sc, next_injection, x1, x2, NoEmit{});
    if (l == 0) continue;  // Y_00 is constant
    const T* __restrict g = grad + int64_t(l) * l + l;
    const double* __restrict x = x1;
    const double* __restrict wx = sc.wx.data();
    const double* __restrict wy = sc.wy.data();
    const double* __restrict c1 = sc.c1.data();
    const double* __restrict s1 = sc.s1.data();
    const double* __restrict dz = t.dz.data() + tri(l);
    double ax = 0, ay = 0, az = dz[0] * double(g[0]) * x[1];
#pragma omp simd reduction(+ : ax, ay, az)
    for (int m = 1; m <= l; ++m) {
      const double gp = double(g[m]), gm = double(g[-m]);
      ax += x[m] * (gp * wx[m] + gm * wy[m]);
      ay += x[m] * (gm * wx[m] - gp * wy[m]);
      // R_{l,m+1} with x[l+1] = 0 (dz[l] = 0 as well).
      az += dz[m] * x[m + 1] * (gp * c1[m] + gm * s1[m]);
    }
    gx += ax;
    gy += ay;
    gz += az;
  }
  // Project out the radial part: Y depends on r / |r| only.
  const double radial = gx * u.x + gy * u.y + gz * u.z;
  grad_xyz[0] = T((gx - radial * u.x) * u.inv_norm);
  grad_xyz[1] = T((gy - radial * u.y) * u.inv_norm);
  grad_xyz[2] = T((gz - radial * u.z) * u.inv_norm);
}

// Fresh multi-megabyte outputs come straight from mmap, and every first write to a 4 KiB
// page faults, which can cost more than the harmonics. Ask for transparent huge pages over
// the whole output rounded out to 4 KiB pages (docs/kernels.md, "Output memory").
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096, kHuge = uintptr_t(1) << 21;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes + kPage - 1) & ~(kPage - 1);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory
#else
  (void)data, (void)bytes;
#endif
}

// Points per dynamic-schedule chunk: 16 amortises the scheduling, but at high degree a call
// may have only a few dozen points (L = 512: 263,169 values each), and one chunk of 16
// would leave the other threads idle.
int points_per_chunk(int64_t n, int num_threads) {
  return int(std::clamp<int64_t>(n / (4 * std::max(1, num_threads)), 1, 16));
}

// The lane kernel's plain recurrence loses about l^2 ulp within ~0.01 rad of the poles:
// at L = 320, up to 1.13e-11 per unit 1.7e-5 rad from the axis, over the 1e-11 contract
// (2e-12 at 0.01-0.1 rad, 6e-14 beyond; 1.2e-12 at L = 128). So in float64, points within
// 0.063 rad of an axis (|z| >= kPolarZ) are computed again, one at a time, by the
// per-point kernel (Reinsch's form there: ~1e-13). They are 0.2% of the sphere, so the
// second pass costs a pass over xyz and little else; below kPolarRedoMinDegree the lanes
// are exact enough.
constexpr double kPolarZ = 0.998;  // |z| >= cos(0.063 rad)
constexpr int kPolarRedoMinDegree = 128;

// fn(i, tables, scratch) for each valid point i within 0.063 rad of an axis.
template <typename T, typename Fn>
void for_polar_points(const T* xyz, int64_t n, int degree, int num_threads, Fn&& fn) {
  const auto tables = tables_for(degree);
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 256)
    for (int64_t i = 0; i < n; ++i) {
      const Point u = unit_point(xyz + 3 * i);
      if (u.valid && std::fabs(u.z) >= kPolarZ) fn(i, *tables, sc);
    }
  }
}

template <typename T>
void redo_polar_points(const T* xyz, int64_t n, int degree, T* out, int num_threads) {
  const int64_t K = sh_size(degree);
  for_polar_points(xyz, n, degree, num_threads, [&](int64_t i, const Tables& t, Scratch& sc) {
    forward_point(xyz + 3 * i, degree, t, sc, out + K * i);
  });
}

// The same for the backward's lanes (up to kLanesBackwardMax): near an axis at L = 288
// their gradients differed from the per-point kernel's by up to 6.3e-12 of their size, and
// from the exact VJP (mpmath) by 3.7e-13 to 4e-12 at 3e-3 rad, where the per-point kernel
// stays within 2.4e-13 (tests/test_sh_accuracy.py compares the two kernels).
template <typename T>
void redo_polar_points_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                           int num_threads) {
  const int64_t K = sh_size(degree);
  for_polar_points(xyz, n, degree, num_threads, [&](int64_t i, const Tables& t, Scratch& sc) {
    backward_point(xyz + 3 * i, grad_out + K * i, degree, t, sc, grad_xyz + 3 * i);
  });
}

// The highest degree the forward's lane kernel takes for n points (sh_cpu_small.h says why
// it depends on the CPU's maker). Above kLanesDegreeMaxOther it also needs a full block of
// kPointLanes points per thread: the lanes split the work by blocks, the per-point kernel
// by points.
int lanes_forward_max(int64_t n, int num_threads) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool intel = __builtin_cpu_is("intel");
#else
  constexpr bool intel = false;
#endif
  const bool full_blocks = n >= int64_t(cpu::kPointLanes) * std::max(1, num_threads);
  return intel && full_blocks ? kLanesDegreeMax : kLanesDegreeMaxOther;
}

// Threads worth waking for n points of K values: waking a second one costs about as much
// as 2000 values take, so each thread gets at least that (docs/kernels.md, "Per-call costs").
int threads_for(int64_t n, int64_t K, int num_threads) {
  constexpr int64_t kValuesPerThread = 2048;
  return int(std::clamp<int64_t>(n * K / kValuesPerThread, 1, std::max(1, num_threads)));
}

// Whether n points are too few for the lanes above the small degrees: a lane block costs
// eight points whatever n is, so with at most two points per thread the per-point kernel
// is faster (docs/kernels.md, "Per-call costs").
bool few_points(int64_t n, int num_threads) { return n <= 2 * int64_t(std::max(1, num_threads)); }

}  // namespace

template <typename T>
int64_t sh_cpu_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads) {
  if (n <= 0) return -1;
  const int64_t K = sh_size(degree);
  num_threads = threads_for(n, K, num_threads);
  advise_huge_pages(out, size_t(n) * K * sizeof(T));
  // Points in SIMD lanes up to lanes_forward_max (sh_cpu_small.h), one at a time above.
  if (degree <= kSmallForwardMax<T>) return sh_cpu_small_fwd(xyz, n, degree, out, num_threads);
  if (!few_points(n, num_threads) && degree <= lanes_forward_max(n, num_threads)) {
    const int64_t first_bad = sh_cpu_lanes_fwd(xyz, n, degree, out, num_threads);
    if constexpr (std::is_same_v<T, double>)
      if (degree >= kPolarRedoMinDegree) redo_polar_points(xyz, n, degree, out, num_threads);
    return first_bad;
  }
  const auto tables = tables_for(degree);
  const int chunk = points_per_chunk(n, num_threads);
  int64_t first_bad = n;
#pragma omp parallel num_threads(std::max(1, num_threads)) reduction(min : first_bad)
  {
    Scratch sc;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < n; ++i)
      if (!forward_point(xyz + 3 * i, degree, *tables, sc, out + K * i)) first_bad = std::min(first_bad, i);
  }
  return first_bad == n ? -1 : first_bad;
}

template <typename T>
void sh_cpu_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                int num_threads) {
  if (n <= 0) return;
  num_threads = threads_for(n, sh_size(degree), num_threads);
  if (degree <= kSmallBackwardMax<T>) return sh_cpu_small_bwd(xyz, grad_out, n, degree, grad_xyz, num_threads);
  if (!few_points(n, num_threads) && degree <= kLanesBackwardMax) {
    sh_cpu_lanes_bwd(xyz, grad_out, n, degree, grad_xyz, num_threads);
    if constexpr (std::is_same_v<T, double>)
      if (degree >= kPolarRedoMinDegree) redo_polar_points_bwd(xyz, grad_out, n, degree, grad_xyz, num_threads);
    return;
  }
  const auto tables = tables_for(degree);
  const int64_t K = sh_size(degree);
  const int chunk = points_per_chunk(n, num_threads);
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    Scratch sc;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < n; ++i)
      backward_point(xyz + 3 * i, grad_out + K * i, degree, *tables, sc, grad_xyz + 3 * i);
  }
}

template int64_t sh_cpu_fwd<float>(const float*, int64_t, int, float*, int);
template int64_t sh_cpu_fwd<double>(const double*, int64_t, int, double*, int);
template void sh_cpu_bwd<float>(const float*, const float*, int64_t, int, float*, int);
template void sh_cpu_bwd<double>(const double*, const double*, int64_t, int, double*, int);

}  // namespace locdiff
