// Shared math of the spherical-harmonic kernels (CPU and CUDA). No torch here.
//
// Convention (docs/conventions.md): real orthonormal Y_lm without Condon-Shortley phase, flat index
// k = l*l + l + m. For a unit vector (x, y, z), s = sqrt(x^2 + y^2), E_m = exp(i m phi)
// (E = 1 on the axis, where phi is undefined):
//   Y_l0      = P_l0(z)
//   Y_l,+m    = sqrt2 * s * R_lm * Re(E_m)       (m >= 1)
//   Y_l,-m    = sqrt2 * s * R_lm * Im(E_m)
// where P_lm is the orthonormal associated Legendre function and R_lm = P_lm / s.
// R_lm is finite on the axis (it equals the Cartesian factor N_lm Q_l^m(z) s^(m-1)), so
// the analytic gradient below is finite everywhere, poles included.
//
// Both P_l0 and R_lm (fixed m) obey the same three-term recurrence in l:
//   X_lm = a_lm z X_{l-1,m} - b_lm X_{l-2,m},   X_{m+1,m} = sqrt(2m+3) z X_mm,
// seeded by P_00 = 1/sqrt(4 pi) and R_mm = c_m s^(m-1), c_m = prod_{k=1..m} sqrt((2k+1)/(2k)) / sqrt(4 pi).
// The seed s^(m-1) underflows for large m near the poles (float64: below 2^-1022), while
// the recurrence later grows the column back to significant values; kernels carry such
// columns as (mantissa, power of 2^SCALE_BITS) pairs until they are representable.
//
// Gradient of the polynomial extension (x, y, z) -> N_lm Q_l^m(z) Re/Im (x + i y)^m:
//   d/dx Y_l,+m = sqrt2 m R_lm Re(E_{m-1}),   d/dy Y_l,+m = -sqrt2 m R_lm Im(E_{m-1})
//   d/dx Y_l,-m = sqrt2 m R_lm Im(E_{m-1}),   d/dy Y_l,-m =  sqrt2 m R_lm Re(E_{m-1})
//   d/dz Y_l,+-m = sqrt2 sqrt((l-m)(l+m+1)) R_{l,m+1} Re/Im(E_m)   (m >= 1; R_{l,l+1} = 0)
//   d/dz Y_l0    = sqrt(l(l+1)) R_l1
// and the input gradient is (I - u u^T) g / |r| for u = r / |r| (Y depends on r / |r| only).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LOCDIFF_HD __host__ __device__ __forceinline__
#else
#define LOCDIFF_HD inline
#endif

namespace locdiff {

// Columns whose seed falls below 2^-SEED_FLOOR_BITS are carried in scaled form; values
// below 2^-OUTPUT_FLOOR_BITS are written as exact zeros (they are ~1e-289, far under every
// tolerance, and keeping them would need subnormals).
constexpr int SCALE_BITS = 256;
constexpr int SEED_FLOOR_BITS = 900;
constexpr int OUTPUT_FLOOR_BITS = 960;

constexpr double kInvSqrt4Pi = 0.28209479177387814347;  // 1 / sqrt(4 pi) = Y_00
constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kPi = 3.14159265358979323846;

LOCDIFF_HD int64_t sh_size(int degree) { return int64_t(degree + 1) * (degree + 1); }
LOCDIFF_HD int64_t sh_index(int l, int m) { return int64_t(l) * l + l + m; }

// a_lm and b_lm of the three-term recurrence (valid for l >= m + 2).
LOCDIFF_HD double sh_rec_a(int l, int m) {
  const double ll = double(l) * l, mm = double(m) * m;
  return std::sqrt((4.0 * ll - 1.0) / (ll - mm));
}
LOCDIFF_HD double sh_rec_b(int l, int m) {
  const double ll = double(l) * l, mm = double(m) * m, l1 = double(l - 1) * (l - 1);
  return std::sqrt((l1 - mm) * (2.0 * l + 1.0) / ((ll - mm) * (2.0 * l - 3.0)));
}
// Ratio of consecutive seeds: c_m / c_{m-1} = sqrt((2m+1) / (2m)).
LOCDIFF_HD double sh_seed_ratio(int m) { return std::sqrt((2.0 * m + 1.0) / (2.0 * m)); }
// sqrt((l-m)(l+m+1)): the z-derivative factor linking R_{l,m+1} to Y_lm.
LOCDIFF_HD double sh_dz_factor(int l, int m) { return std::sqrt(double(l - m) * double(l + m + 1)); }

}  // namespace locdiff
