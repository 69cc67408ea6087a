// A block of points in SIMD lanes, for the CPU kernels that run one point per lane
// (sh_cpu_small.cpp, sh_cpu_lanes.cpp): loading and normalising the block, and the powers
// (x + i y)^m of the Cartesian form. Internal to csrc/cpu.
#pragma once

#include <cmath>
#include <cstdint>

#include "legendre_tables.h"  // cpu::unit_point

namespace locdiff {
namespace cpu {

constexpr int kPointLanes = 8;

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
    for (int p = 0; p < kLanes; ++p) {
      re[p] = 1.0;
      im[p] = 0.0;
    }
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

  // The common case, branch-free across lanes: a full block whose largest components lie
  // in [2^-500, 2^500], where x^2 + y^2 + z^2 can neither overflow nor lose the direction.
  // Returns false (having written nothing) otherwise.
  template <typename T>
  __attribute__((always_inline)) bool load_ordinary(const T* xyz) {
    double px[kLanes], py[kLanes], pz[kLanes];
    for (int p = 0; p < kLanes; ++p) {
      px[p] = double(xyz[3 * p]);
      py[p] = double(xyz[3 * p + 1]);
      pz[p] = double(xyz[3 * p + 2]);
    }
    int ordinary = 1;
#pragma omp simd reduction(& : ordinary)
    for (int p = 0; p < kLanes; ++p) {
      const double ax = std::fabs(px[p]), ay = std::fabs(py[p]), az = std::fabs(pz[p]);
      const double big = ax > ay ? (ax > az ? ax : az) : (ay > az ? ay : az);
      // NaN fails the <= tests, so every lane here is finite.
      ordinary &= int(ax <= 0x1p500) & int(ay <= 0x1p500) & int(az <= 0x1p500) & int(big >= 0x1p-500);
    }
    if (!ordinary) return false;
#pragma omp simd
    for (int p = 0; p < kLanes; ++p) {
      const double inv = 1.0 / std::sqrt(px[p] * px[p] + py[p] * py[p] + pz[p] * pz[p]);
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
