// SHDD kernels: grid synthesis of f(x) = sum_k c_k Y_k(x), mode candidates, log-partition,
// the SHDD-KL loss and its backward, and point evaluation with gradient. No torch here.
//
// Ring grids. Separable grids (equiangular, Gauss-Legendre) are nlat rings of nlon points,
// ring j at colatitude theta_j (north to south, symmetric about the equator: ring
// nlat-1-j mirrors ring j), point k at longitude lon0 + 2 pi k / nlon; flat index
// j * nlon + k. `table` holds the orthonormal Legendre functions of the northern rings
// j < (nlat+1)/2, m-major: for each m = 0..L a block (nhalf, L-m+1) of P_lm(cos theta_j),
// l = m..L, with sqrt(2) folded in for m > 0 (see legendre_offset). On such a grid
//   f(theta_j, phi) = sum_m A_jm cos(m phi) + B_jm sin(m phi),  A_jm = sum_l P_lm c_{l,+m},
// so synthesis is a Legendre sum per ring (the two mirror rings share it: P_lm(-z) =
// (-1)^(l+m) P_lm(z)) and one complex FFT per ring pair (north + i south): O(L^3) per
// vector instead of O(L^2 x grid) for the dense product.
//
// Coefficients: (B, (L+1)^2) contiguous, flat index l*l + l + m (sh_math.h). T is the
// storage type of coefficients and gradients. Arithmetic is float64, except the grid
// synthesis of shdd_synth_cpu and shdd_candidates_cpu, which runs in T (float32 values
// within a few roundings of the largest, enough to pick starting points).
#pragma once

#include <cstdint>

namespace locdiff {

struct RingGrid {
  int nlat = 0, nlon = 0;
  const double* table = nullptr;     // Legendre table, layout above
  const double* theta = nullptr;     // (nlat,) colatitudes, radians
  const double* log_area = nullptr;  // (nlat,) log of the cell area of each ring (steradians)
  double lon0 = 0.0;                 // longitude of column 0, radians
  // The local-maximum scan keeps one maximum per polar ring (rings close to their pole:
  // locdiff.ops.candidates.one_mode_per_polar_ring).
  bool one_mode_per_polar_ring = false;
};

// Start of the block of order m in the table (units of nhalf * ...): sum_{m'<m} (L+1-m').
inline int64_t legendre_offset(int L, int m) { return int64_t(m) * (L + 1) - int64_t(m) * (m - 1) / 2; }

// f on every grid point: out (B, nlat * nlon).
template <typename T>
void shdd_synth_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid, T* out,
                    int num_threads);

// Adjoint of synthesis: out_coeffs (B, K) = sum_i w_i Y(x_i) for weights w (B, nlat * nlon).
template <typename T>
void shdd_adjoint_cpu(const T* weights, int64_t batch, int degree, const RingGrid& grid,
                      T* out_coeffs, int num_threads);

// Up to ncand local maxima of f on the grid per vector (8-neighbourhood, across the poles
// and the antimeridian), highest first. index: flat grid index (-1 where fewer exist);
// value: grid value; start: (colatitude, longitude) radians after a parabolic sub-cell
// step, a starting point for refinement.
template <typename T>
void shdd_candidates_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid,
                         int ncand, int64_t* index, double* value, double* start,
                         int num_threads);

// The scan of shdd_candidates_cpu alone, on grid values f computed elsewhere (locdiff.ops.shdd:
// Legendre stage as a BLAS GEMM, torch's real FFT): per vector (nlat, nlon), or if folded
// (2, nhalf, nlon): the northern rings j < nhalf, then their mirrors nlat-1-j (for odd nlat
// the last row of the second half is unused). Indices in the output are ring-major as usual.
template <typename T>
void shdd_scan_cpu(const T* f, int64_t batch, const RingGrid& grid, bool folded, int ncand,
                   int64_t* index, double* value, double* start, int num_threads);

// Trust-region Newton ascent of f to its local maximum from each point: xyz (N, 3) float64
// starts (any non-zero length), overwritten by the unit vector reached; value (N,) f there;
// row (N,) the coefficient row of each point; radius: the kernel's half-maximum radius
// (trust region and tolerances scale with it).
template <typename T>
void shdd_refine_cpu(const T* coeffs, int degree, double radius, const int64_t* row, int64_t n,
                     int max_iter, double* xyz, double* value, int num_threads);

// The decode's refinement of grid candidates (value (B, ncand), start (B, ncand, 2) as
// from shdd_scan_cpu), per vector: first the best candidate and, of the first nrefine, those
// whose grid value is at least halfway from the mean of f to the best; then, while any is
// left, every candidate whose value plus twice the largest gain of refinement so far
// (refined - grid value) reaches the best refined value, or that is halfway there. Out:
// xyz (B, ncand, 3) unit vectors and value (B, ncand) refined f, best first; candidates not
// refined get -inf (and zero vectors, not points).
template <typename T>
void shdd_decode_refine_cpu(const T* coeffs, int64_t batch, int degree, double radius, int ncand,
                            const double* cand_value, const double* cand_start, int nrefine,
                            int max_iter, double* xyz, double* value, int num_threads);

// log sum_i area_i exp(f_i / t) per vector (fused: the grid lives in per-thread scratch).
template <typename T>
void shdd_logz_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid,
                   double inv_temperature, double* out, int num_threads);

// KL(p || q), p = softmax(f_target / t + log area), q = softmax(f_pred / t + log area).
template <typename T>
void shdd_kl_fwd_cpu(const T* pred, const T* target, int64_t batch, int degree,
                     const RingGrid& grid, double inv_temperature, T* kl, int num_threads);

// Backward: grad_pred = g (q - p) / t . Y,  grad_target = g p (log p - log q - KL) / t . Y
// (either output may be null).
template <typename T>
void shdd_kl_bwd_cpu(const T* pred, const T* target, const T* grad_kl, int64_t batch,
                     int degree, const RingGrid& grid, double inv_temperature, T* grad_pred,
                     T* grad_target, int num_threads);

// Forward and backward in one pass, for training: kl as shdd_kl_fwd_cpu, and the
// gradients of each kl (grad_kl = 1) as shdd_kl_bwd_cpu (either may be null). The caller
// scales them by the incoming gradient: the backward then needs no second synthesis.
template <typename T>
void shdd_kl_grad_cpu(const T* pred, const T* target, int64_t batch, int degree, const RingGrid& grid,
                      double inv_temperature, T* kl, T* grad_pred, T* grad_target, int num_threads);

// f and its gradient at points: xyz (N, 3) (any non-zero length; the gradient is w.r.t. the
// vector as given, i.e. (I - u u^T) grad f / |r|), row (N,) the coefficient row of each
// point. grad may be null.
template <typename T>
void shdd_eval_cpu(const T* coeffs, int degree, const double* xyz, const int64_t* row, int64_t n,
                   double* value, double* grad, int num_threads);

// The Hessian of f on the sphere at u = xyz / |xyz|: hess (N, 3, 3), the symmetric map of
// the tangent plane at u (zero along u) whose quadratic form is the second derivative of f
// along great circles through u. Analytic, poles included (shdd_point_cpu.cpp).
template <typename T>
void shdd_hessian_cpu(const T* coeffs, int degree, const double* xyz, const int64_t* row, int64_t n,
                      double* hess, int num_threads);

// The Legendre table of a ring grid (layout above) for colatitudes theta[0..nhalf).
void shdd_legendre_table_cpu(const double* theta, int nhalf, int degree, double* out,
                             int num_threads);

#ifdef LOCDIFF_WITH_CUDA
template <typename T>
void shdd_synth_cuda(const T* coeffs, int64_t batch, int degree, const RingGrid& grid, T* out,
                     void* stream);
template <typename T>
void shdd_adjoint_cuda(const T* weights, int64_t batch, int degree, const RingGrid& grid,
                       T* out_coeffs, void* stream);
template <typename T>
void shdd_kl_fwd_cuda(const T* pred, const T* target, int64_t batch, int degree,
                      const RingGrid& grid, double inv_temperature, T* kl, void* stream);
template <typename T>
void shdd_kl_bwd_cuda(const T* pred, const T* target, const T* grad_kl, int64_t batch,
                      int degree, const RingGrid& grid, double inv_temperature, T* grad_pred,
                      T* grad_target, void* stream);
#endif

}  // namespace locdiff
