// A block of points in SIMD lanes, for the CPU kernels that run one point per lane
// (sh_cpu_small.cpp, sh_cpu_lanes.cpp): loading and normalising the block, and the powers
// (x + i y)^m of the Cartesian form. Internal to csrc/cpu.
#pragma once

#include <cmath>
#include <cstdint>

#include "legendre_tables.h"  // cpu::unit_point
#include "vector_exp.h"      // Double4

namespace locdiff {
namespace cpu {

constexpr int kPointLanes = 8;

// The fast paths' range of squared norms: in [2^-1000, 2^1000], r^2 = x^2 + y^2 + z^2
// neither overflows nor underflows (a component's square that does is below r^2's last
// bit), so 1 / sqrt(r^2) normalises to the last bit. NaN and inf fail the tests. Rows
// outside it go through cpu::unit_point, which scales first.
constexpr double kOrdinaryMinR2 = 0x1p-1000, kOrdinaryMaxR2 = 0x1p1000;

// row[0, kPointLanes) = v by full-width vector stores. A plain loop, unrolled at a fixed
// degree, compiled to scalar (or half-width) stores, and the full-width load that reads the
// row next cannot be forwarded from those: a stall that doubled a block's time at L = 1.
LOCDIFF_INLINE void fill_lanes(double* row, double v) {
  static_assert(kPointLanes == 8, "two Double4 per row");
  store4(row, splat4(v));
  store4(row + 4, splat4(v));
}

// dst[0, kPointLanes) = src[0, kPointLanes) by full-width vector moves; a plain loop became
// half-width moves there too, with the same stall when dst is next read a vector at a time.
LOCDIFF_INLINE void copy_lanes(double* dst, const double* src) {
  store4(dst, load4(src));
  store4(dst + 4, load4(src + 4));
}

// Normalised coordinates and (x + i y)^m, m <= kMaxDegree, for a block of kPointLanes points
// (padding lanes get the pole).
template <int kMaxDegree>
struct PointBlock {
  static constexpr int kLanes = kPointLanes;
  int count;
  alignas(64) double x[kLanes], y[kLanes], z[kLanes], inv_norm[kLanes];
  alignas(64) double re[(kMaxDegree + 1) * kLanes], im[(kMaxDegree + 1) * kLanes];  // re[m*kLanes+p] = Re (x_p+i y_p)^m

  // Returns the first lane that is non-finite or zero, or -1 (such lanes compute the pole).
  // Inlined so that it is compiled for the caller's clone (out of line it would be the
  // portable SSE2 code whatever the CPU).
  template <typename T>
  __attribute__((always_inline)) int load(const T* xyz, int count_, int L) {
    count = count_;
    const int bad = count == kLanes && load_ordinary(xyz) ? -1 : load_careful(xyz);
    fill_lanes(re, 1.0);
    fill_lanes(im, 0.0);
    for (int m = 1; m <= L; ++m) {
      const double* pr = &re[(m - 1) * kLanes];
      const double* pi = &im[(m - 1) * kLanes];
#pragma omp simd
      for (int p = 0; p < kLanes; ++p) {
        re[m * kLanes + p] = pr[p] * x[p] - pi[p] * y[p];
        im[m * kLanes + p] = pr[p] * y[p] + pi[p] * x[p];
      }
    }
    return bad;
  }

  // The common case, branch-free across lanes: a full block whose squared norms all lie in
  // [kOrdinaryMinR2, kOrdinaryMaxR2]. Returns false (having written nothing) otherwise.
  template <typename T>
  __attribute__((always_inline)) bool load_ordinary(const T* xyz) {
    double px[kLanes], py[kLanes], pz[kLanes], r2[kLanes];
    for (int p = 0; p < kLanes; ++p) {
      px[p] = double(xyz[3 * p]);
      py[p] = double(xyz[3 * p + 1]);
      pz[p] = double(xyz[3 * p + 2]);
    }
    int ordinary = 1;
#pragma omp simd reduction(& : ordinary)
    for (int p = 0; p < kLanes; ++p) {
      r2[p] = px[p] * px[p] + py[p] * py[p] + pz[p] * pz[p];
      ordinary &= int(r2[p] >= kOrdinaryMinR2) & int(r2[p] <= kOrdinaryMaxR2);
    }
    if (!ordinary) return false;
#pragma omp simd
    for (int p = 0; p < kLanes; ++p) {
      const double inv = 1.0 / std::sqrt(r2[p]);
      x[p] = px[p] * inv;
      y[p] = py[p] * inv;
      z[p] = pz[p] * inv;
      inv_norm[p] = inv;
    }
    return true;
  }

  // Any block, through cpu::unit_point (exact for huge and tiny vectors); non-finite or
  // zero lanes, and the padding past count, get the pole. Returns the first bad lane, or -1.
  template <typename T>
  int load_careful(const T* xyz) {
    static const T pole[3] = {T(0), T(0), T(1)};
    int bad = -1;
    for (int p = 0; p < kLanes; ++p) {
      const cpu::Point u = cpu::unit_point(p < count ? xyz + 3 * p : pole);
      if (!u.valid && bad < 0) bad = p;
      x[p] = u.x;
      y[p] = u.y;
      z[p] = u.z;
      inv_norm[p] = u.inv_norm;
    }
    return bad;
  }
};

}  // namespace cpu
}  // namespace locdiff
