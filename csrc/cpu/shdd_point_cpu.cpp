// SHDD at points on the CPU: f, its gradient and its Hessian on the sphere at arbitrary
// points (the Legendre recurrence of sh_cpu.cpp fused with the dot product), and the
// trust-region Newton refinement that decoding runs from the grid candidates.
//
// Hessian. f is the restriction to the sphere of the polynomial F(x, y, z) = sum_k c_k
// F_k, F_l,+-m = sqrt2 N_lm Q_l^m(z) Re/Im (x + i y)^m (locdiff/sh_math.h). Its Cartesian
// second derivatives follow from the same column values R_lm (R_lm = P_lm / s), with
// R'_lk = R_lk / s (finite for k >= 2, the only columns that enter):
//   d2/dx2  F_l,+m =  sqrt2 m(m-1) R'_lm Re E_{m-2} = -d2/dy2,  d2/dxdy F_l,+m = -sqrt2 m(m-1) R'_lm Im E_{m-2}
//   d2/dx2  F_l,-m =  sqrt2 m(m-1) R'_lm Im E_{m-2} = -d2/dy2,  d2/dxdy F_l,-m =  sqrt2 m(m-1) R'_lm Re E_{m-2}
//   d2/dxdz F_l,+m =  dz_lm m R'_{l,m+1} Re E_{m-1},  d2/dydz F_l,+m = -dz_lm m R'_{l,m+1} Im E_{m-1}
//   d2/dxdz F_l,-m =  dz_lm m R'_{l,m+1} Im E_{m-1},  d2/dydz F_l,-m =  dz_lm m R'_{l,m+1} Re E_{m-1}
//   d2/dz2  F_l,+-m = dz_lm f_{l,m+1} R'_{l,m+2} Re/Im E_m      (f_lm = sqrt((l-m)(l+m+1)))
// (dz_lm: the gradient's z factor, sqrt2 f_lm for m >= 1, f_l0 for m = 0). On the sphere,
// the chart g(a, b) = f(normalise(u + a e1 + b e2)) has the Hessian
//   e_i^T H_F e_j - (u . grad F) delta_ij,
// since normalise(u + v) = u + v - |v|^2 u / 2 + O(v^3) for v orthogonal to u. On the axis
// (s = 0) R'_lk = s^(k-2) (...) vanishes for k >= 3 and R_l2 / s is 0/0: there the column
// R'_l2 runs its own recurrence from R'_22 = c_2 (the seed without its factor s).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "legendre_tables.h"
#include "locdiff/sh_math.h"
#include "locdiff/shdd_kernels.h"

namespace locdiff {
namespace {

using cpu::Scratch;
using cpu::Tables;
using cpu::seeds;
using cpu::tables_for;
using cpu::threads;
using cpu::tri;

constexpr double kInvSqrt2 = 0.70710678118654752440;
// Below this distance from the axis (s = hypot(x, y)) the Hessian takes the axis form (the
// columns k >= 3 it drops are below s, 1e-100 relative): R_lk / s is exact for any s > 0,
// but R_l2 ~ s loses bits as a subnormal.
constexpr double kAxis = 1e-100;

// Per-thread scratch: the recurrence's, plus the azimuthal factors of the x-y second
// derivatives, sqrt2 m(m-1) cos/sin((m-2) phi).
struct PointScratch {
  Scratch sc;
  std::vector<double> vx, vy;
};

// Cartesian second derivatives of F at a unit vector (symmetric: xx, xy, xz, yz, zz, with
// yy = -xx since each F_k is harmonic in x, y), and u . grad F.
struct Curvature {
  double xx = 0, xy = 0, xz = 0, yz = 0, zz = 0, radial = 0;
};

double dot3(const double* a, const double* b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }

// a / |a| into out (out may be a).
void normalise(const double* a, double* out) {
  const double n = std::sqrt(dot3(a, a));
  for (int i = 0; i < 3; ++i) out[i] = a[i] / n;
}

// a^T H_F b for tangent vectors a, b.
double quad(const Curvature& h, const double* a, const double* b) {
  const double hyy = -h.xx;
  return a[0] * (h.xx * b[0] + h.xy * b[1] + h.xz * b[2]) + a[1] * (h.xy * b[0] + hyy * b[1] + h.yz * b[2]) +
         a[2] * (h.xz * b[0] + h.yz * b[1] + h.zz * b[2]);
}

// f, its gradient w.r.t. the vector r as given ((I - u u^T) grad F / |r|, may be null) and,
// when kHess, the curvature of F at u = r / |r|.
template <bool kHess, typename T>
LOCDIFF_CLONES void eval_point(const T* c, int L, const Tables& t, const double* r, PointScratch& ps,
                               double* value, double* grad, Curvature* curv) {
  Scratch& sc = ps.sc;
  const double big = std::max(std::fabs(r[0]), std::max(std::fabs(r[1]), std::fabs(r[2])));
  const double xs = r[0] / big, ys = r[1] / big, zs = r[2] / big;
  const double norm = std::sqrt(xs * xs + ys * ys + zs * zs);
  const double ux = xs / norm, uy = ys / norm, uz = zs / norm, us = std::hypot(ux, uy);
  const double inv_norm = 1.0 / (norm * big);
  // The Hessian reads x[m + 2] for m <= l (zero beyond l, hence L + 1) and dz up to row l + 1
  // (the callers pass tables for degree L + 1).
  sc.resize(kHess ? L + 1 : L);
  cpu::azimuth(ux, uy, us, L, sc.c1.data(), sc.s1.data());
  for (int m = 0; m <= L; ++m) {
    sc.cs[m] = kSqrt2 * us * sc.c1[m];
    sc.sn[m] = kSqrt2 * us * sc.s1[m];
  }
  for (int m = 1; m <= L; ++m) {
    sc.wx[m] = kSqrt2 * m * sc.c1[m - 1];
    sc.wy[m] = kSqrt2 * m * sc.s1[m - 1];
  }
  if constexpr (kHess) {
    ps.vx.resize(size_t(L) + 2);
    ps.vy.resize(size_t(L) + 2);
    ps.vx[0] = ps.vx[1] = ps.vy[0] = ps.vy[1] = 0.0;
    for (int m = 2; m <= L; ++m) {
      ps.vx[m] = kSqrt2 * m * (m - 1) * sc.c1[m - 2];
      ps.vy[m] = kSqrt2 * m * (m - 1) * sc.s1[m - 2];
    }
  }
  seeds(us, uz, L, t, sc);
  double* x1 = sc.x1.data();
  double* x2 = sc.x2.data();
  size_t next = 0;
  double f = 0, gx = 0, gy = 0, gz = 0;
  double hxx = 0, hxy = 0, hxz = 0, hyz = 0, hzz = 0;
  const bool axis = us <= kAxis;
  double r2 = 0, r2_prev = 0;  // on the axis: R'_l2, R'_{l-1,2}
  for (int l = 0; l <= L; ++l) {
    {
      const double* __restrict a = t.a.data() + tri(l);
      const double* __restrict b = t.b.data() + tri(l);
      double* __restrict p1 = x1;
      double* __restrict p2 = x2;
#pragma omp simd
      for (int m = 0; m < l; ++m) p2[m] = a[m] * uz * p1[m] - b[m] * p2[m];
      p2[l] = sc.diag[l];
      p2[l + 1] = 0.0;
      while (next < sc.injections.size() && sc.injections[next].l == l) {
        const cpu::Injection& in = sc.injections[next++];
        p2[in.m] = in.value;
        p1[in.m] = in.previous;
      }
      std::swap(x1, x2);
    }
    const T* __restrict g = c + int64_t(l) * l + l;
    const double* __restrict x = x1;  // R_lm, m = 0..l, then zeros
    const double* __restrict cs = sc.cs.data();
    const double* __restrict sn = sc.sn.data();
    const double* __restrict wx = sc.wx.data();
    const double* __restrict wy = sc.wy.data();
    const double* __restrict cc = sc.c1.data();
    const double* __restrict ss = sc.s1.data();
    const double* __restrict dz = t.dz.data() + tri(l);
    double fl = double(g[0]) * x[0];
    double ax = 0, ay = 0, az = l ? dz[0] * double(g[0]) * x[1] : 0.0;
    // Second derivatives (kHess) in units of R (divided by s at the end) and of sqrt2 for
    // the z terms (see the top); they share the gradient's azimuthal combinations A, B, C.
    const double* __restrict vx = ps.vx.data();
    const double* __restrict vy = ps.vy.data();
    double bxx = 0, bxy = 0, bxz = 0, byz = 0, bzz = kHess ? dz[0] * dz[1] * double(g[0]) * x[2] : 0.0;
#pragma omp simd reduction(+ : fl, ax, ay, az, bxx, bxy, bxz, byz, bzz)
    for (int m = 1; m <= l; ++m) {
      const double gp = double(g[m]), gm = double(g[-m]);
      const double xm = x[m], xz = dz[m] * x[m + 1];
      const double A = gp * wx[m] + gm * wy[m], B = gm * wx[m] - gp * wy[m], C = gp * cc[m] + gm * ss[m];
      fl += xm * (gp * cs[m] + gm * sn[m]);
      ax += xm * A;
      ay += xm * B;
      az += xz * C;
      if constexpr (kHess) {
        bxx += xm * (gp * vx[m] + gm * vy[m]);
        bxy += xm * (gm * vx[m] - gp * vy[m]);
        bxz += xz * A;
        byz += xz * B;
        bzz += dz[m] * dz[m + 1] * x[m + 2] * C;
      }
    }
    if constexpr (kHess) {
      if (!axis) {
        hxx += bxx;
        hxy += bxy;
        hxz += bxz;
        hyz += byz;
        hzz += bzz;
      } else if (l >= 2) {
        // Only the terms in R'_l2 survive: m = 2 (xx, xy), m = 1 (xz, yz), m = 0 (zz).
        if (l == 2) {
          r2 = kInvSqrt4Pi * t.seed_ratio[1] * t.seed_ratio[2];
        } else {
          const double r2_next = t.a[tri(l) + 2] * uz * r2 - t.b[tri(l) + 2] * r2_prev;
          r2_prev = r2;
          r2 = r2_next;
        }
        const double g2 = double(g[2]), gm2 = double(g[-2]), g1 = double(g[1]), gm1 = double(g[-1]);
        hxx += r2 * (g2 * vx[2] + gm2 * vy[2]);
        hxy += r2 * (gm2 * vx[2] - g2 * vy[2]);
        hxz += dz[1] * r2 * (g1 * wx[1] + gm1 * wy[1]);
        hyz += dz[1] * r2 * (gm1 * wx[1] - g1 * wy[1]);
        hzz += dz[0] * dz[1] * double(g[0]) * r2;
      }
    }
    f += fl;
    gx += ax;
    gy += ay;
    gz += az;
  }
  *value = f;
  const double radial = gx * ux + gy * uy + gz * uz;
  if (grad) {
    grad[0] = (gx - radial * ux) * inv_norm;
    grad[1] = (gy - radial * uy) * inv_norm;
    grad[2] = (gz - radial * uz) * inv_norm;
  }
  if constexpr (kHess) {
    const double inv_s = axis ? 1.0 : 1.0 / us;  // the axis sums are in units of R' already
    curv->radial = radial;
    curv->xx = hxx * inv_s;
    curv->xy = hxy * inv_s;
    curv->xz = hxz * (kInvSqrt2 * inv_s);
    curv->yz = hyz * (kInvSqrt2 * inv_s);
    curv->zz = hzz * (kInvSqrt2 * inv_s);
  }
}

// Tangent basis at a unit vector u: e1 = normalise(a x u), e2 = u x e1, a = z unless u is
// near the axis (then x).
void tangent_basis(const double* u, double* e1, double* e2) {
  if (std::fabs(u[2]) < 0.9) {
    e1[0] = -u[1], e1[1] = u[0], e1[2] = 0;  // z x u
  } else {
    e1[0] = 0, e1[1] = -u[2], e1[2] = u[1];  // x x u
  }
  normalise(e1, e1);
  e2[0] = u[1] * e1[2] - u[2] * e1[1];
  e2[1] = u[2] * e1[0] - u[0] * e1[2];
  e2[2] = u[0] * e1[1] - u[1] * e1[0];
}

// The chart Hessian (H11, H12, H22) at u in the tangent basis e1, e2.
void chart_hessian(const Curvature& curv, const double* e1, const double* e2, double* H) {
  H[0] = quad(curv, e1, e1) - curv.radial;
  H[1] = quad(curv, e1, e2);
  H[2] = quad(curv, e2, e2) - curv.radial;
}

// The scale of f for refine_point (a bound on |f| over the sphere): a step that loses less
// than 1e-14 of it is rounding, not a loss.
template <typename T>
double f_scale(const T* c, int L) {
  const int64_t K = sh_size(L);
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += std::fabs(double(c[k]));
  return sum * kInvSqrt4Pi * (L + 1);
}

// Trust-region Newton ascent of f on the sphere from u (unit vector, updated in place);
// returns f there. Chart around u: g(a, b) = f(normalise(u + a e1 + b e2)), with exact
// gradient and Hessian from one evaluation (chart_hessian). Steps that do not increase f
// shrink the trust radius; non-concave charts take a gradient step to it.
//
// Stop when a concave step is under 1e-9 r, or earlier once convergence is quadratic: after
// steps d1 > d2 the next one is about d2^3 / d1^2, so when that is under 1e-9 r the last
// step already landed at that precision, and one more evaluation would not move the point.
template <typename T>
double refine_point(const T* c, int L, const Tables& t, double r, double fscale, int max_iter,
                    PointScratch& ps, double* u) {
  normalise(u, u);
  double f, g[3];
  Curvature curv;
  eval_point<true>(c, L, t, u, ps, &f, g, &curv);
  double trust = r, prev_step = 0;  // prev_step: the last accepted concave step (0: none)
  for (int it = 0; it < max_iter; ++it) {
    double e1[3], e2[3], H[3];
    tangent_basis(u, e1, e2);
    const double G0 = dot3(g, e1), G1 = dot3(g, e2);
    const double gnorm = std::sqrt(G0 * G0 + G1 * G1);
    if (gnorm == 0) break;
    chart_hessian(curv, e1, e2, H);
    const double det = H[0] * H[2] - H[1] * H[1];
    const bool concave = H[0] + H[2] < 0 && det > 0;
    double d0, d1;
    if (concave) {
      d0 = -(H[2] * G0 - H[1] * G1) / det;
      d1 = -(H[0] * G1 - H[1] * G0) / det;
    } else {
      d0 = G0 * trust / gnorm;
      d1 = G1 * trust / gnorm;
    }
    double dn = std::sqrt(d0 * d0 + d1 * d1);
    if (dn > trust) {
      d0 *= trust / dn;
      d1 *= trust / dn;
      dn = trust;
    }
    // Whether this step ends the ascent if f accepts it is known before evaluating there:
    // then f alone is needed (no Hessian, which costs as much again as f and gradient).
    const bool last = concave && (dn < 1e-9 * r || (prev_step > dn && dn < 1e-4 * r &&
                                                    dn * dn * dn < 1e-9 * r * prev_step * prev_step));
    double un[3], fn, gn[3];
    Curvature cn;
    for (int i = 0; i < 3; ++i) un[i] = u[i] + d0 * e1[i] + d1 * e2[i];
    normalise(un, un);
    if (last) {
      eval_point<false>(c, L, t, un, ps, &fn, nullptr, nullptr);
    } else {
      eval_point<true>(c, L, t, un, ps, &fn, gn, &cn);
    }
    const bool tiny = dn < 1e-6 * r;  // below this, f differences are rounding noise: trust Newton
    const bool ok = fn >= f - 1e-14 * fscale || (concave && tiny);
    if (ok) {
      std::copy(un, un + 3, u);
      f = fn;
      if (last) break;
      std::copy(gn, gn + 3, g);
      curv = cn;
      trust = std::min(std::max(trust, 2 * dn), r);
      prev_step = concave ? dn : 0;
    } else {
      trust = dn / 4;
      if (trust < 1e-14 * r) break;
    }
  }
  return f;
}

// Runs point(ps, i) for every i < n in parallel, each thread with its own scratch: at
// least per_thread points to a thread, in dynamic chunks of `chunk` (refinements vary in
// length, evaluations do not).
template <class Point>
void for_each_point(int64_t n, int num_threads, int64_t per_thread, int chunk, Point point) {
#pragma omp parallel num_threads(threads(num_threads, n / per_thread + 1))
  {
    PointScratch ps;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < n; ++i) point(ps, i);
  }
}

}  // namespace

// ---- entry points ------------------------------------------------------------------------

template <typename T>
void shdd_eval_cpu(const T* coeffs, int degree, const double* xyz, const int64_t* row, int64_t n,
                   double* value, double* grad, int num_threads) {
  if (n <= 0) return;
  const auto tables = tables_for(degree);
  const int64_t K = sh_size(degree);
  for_each_point(n, num_threads, 16, 4, [&](PointScratch& ps, int64_t i) {
    eval_point<false>(coeffs + K * row[i], degree, *tables, xyz + 3 * i, ps, value + i,
                      grad ? grad + 3 * i : nullptr, nullptr);
  });
}

template <typename T>
void shdd_hessian_cpu(const T* coeffs, int degree, const double* xyz, const int64_t* row, int64_t n,
                      double* hess, int num_threads) {
  if (n <= 0) return;
  const auto tables = tables_for(degree + 1);  // eval_point<true> reads dz of row L + 1
  const int64_t K = sh_size(degree);
  for_each_point(n, num_threads, 16, 4, [&](PointScratch& ps, int64_t i) {
    double u[3], e1[3], e2[3], g[3], H[3], f;
    normalise(xyz + 3 * i, u);
    Curvature curv;
    eval_point<true>(coeffs + K * row[i], degree, *tables, u, ps, &f, g, &curv);
    tangent_basis(u, e1, e2);
    chart_hessian(curv, e1, e2, H);
    double* out = hess + 9 * i;
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b)
        out[3 * a + b] = H[0] * e1[a] * e1[b] + H[1] * (e1[a] * e2[b] + e2[a] * e1[b]) + H[2] * e2[a] * e2[b];
  });
}

template <typename T>
void shdd_refine_cpu(const T* coeffs, int degree, double radius, const int64_t* row, int64_t n,
                     int max_iter, double* xyz, double* value, int num_threads) {
  if (n <= 0) return;
  const auto tables = tables_for(degree + 1);  // eval_point<true> reads dz of row L + 1
  const int64_t K = sh_size(degree);
  for_each_point(n, num_threads, 4, 1, [&](PointScratch& ps, int64_t i) {
    const T* c = coeffs + K * row[i];
    value[i] = refine_point(c, degree, *tables, radius, f_scale(c, degree), max_iter, ps, xyz + 3 * i);
  });
}

template <typename T>
void shdd_decode_refine_cpu(const T* coeffs, int64_t batch, int degree, double radius, int ncand,
                            const double* cand_value, const double* cand_start, int nrefine,
                            int max_iter, double* xyz, double* value, int num_threads) {
  if (batch <= 0) return;
  const auto tables = tables_for(degree + 1);  // eval_point<true> reads dz of row L + 1
  const int64_t K = sh_size(degree);
  const double inf = std::numeric_limits<double>::infinity();
#pragma omp parallel num_threads(threads(num_threads, batch / 4 + 1))
  {
    PointScratch ps;
    std::vector<double> u(3 * size_t(ncand)), f(ncand);
    std::vector<char> done(ncand), todo(ncand);
    std::vector<int> order(ncand);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const T* c = coeffs + K * b;
      const double* v0 = cand_value + b * ncand;
      const double* st = cand_start + 2 * b * ncand;
      const double fscale = f_scale(c, degree);
      const double mean = double(c[0]) * kInvSqrt4Pi;  // the average of f over the sphere
      for (int i = 0; i < ncand; ++i) {
        f[i] = -inf;
        done[i] = 0;
        todo[i] = std::isfinite(v0[i]) && (i == 0 || (i < nrefine && v0[i] >= mean + 0.5 * (v0[0] - mean)));
      }
      for (bool any = true; any;) {
        for (int i = 0; i < ncand; ++i) {
          if (!todo[i]) continue;
          // The start from (colatitude, longitude) only for candidates refined: most are not,
          // and their sines and cosines cost as much as a refinement at L = 16.
          const double th = st[2 * i], ph = st[2 * i + 1];
          u[3 * i] = std::sin(th) * std::cos(ph);
          u[3 * i + 1] = std::sin(th) * std::sin(ph);
          u[3 * i + 2] = std::cos(th);
          f[i] = refine_point(c, degree, *tables, radius, fscale, max_iter, ps, &u[3 * i]);
          done[i] = 1;
        }
        double gain = 0, best = -inf;
        for (int i = 0; i < ncand; ++i)
          if (done[i]) {
            gain = std::max(gain, f[i] - v0[i]);
            best = std::max(best, f[i]);
          }
        any = false;
        for (int i = 0; i < ncand; ++i) {
          todo[i] = std::isfinite(v0[i]) && !done[i] &&
                    (v0[i] + 2 * gain >= best || v0[i] >= mean + 0.5 * (best - mean));
          any |= bool(todo[i]);
        }
      }
      // Best first, ties in candidate order (std::sort with an index tie-break: stable_sort
      // allocates per call); candidates not refined (f = -inf) get zero vectors.
      for (int i = 0; i < ncand; ++i) order[i] = i;
      std::sort(order.begin(), order.end(), [&](int p, int q) { return f[p] > f[q] || (f[p] == f[q] && p < q); });
      for (int r = 0; r < ncand; ++r) {
        const int i = order[r];
        value[b * ncand + r] = f[i];
        for (int d = 0; d < 3; ++d) xyz[3 * (b * ncand + r) + d] = done[i] ? u[3 * i + d] : 0.0;
      }
    }
  }
}

#define LOCDIFF_INSTANTIATE(T)                                                                     \
  template void shdd_eval_cpu<T>(const T*, int, const double*, const int64_t*, int64_t, double*,   \
                                 double*, int);                                                    \
  template void shdd_hessian_cpu<T>(const T*, int, const double*, const int64_t*, int64_t, double*, \
                                    int);                                                          \
  template void shdd_refine_cpu<T>(const T*, int, double, const int64_t*, int64_t, int, double*,   \
                                   double*, int);                                                  \
  template void shdd_decode_refine_cpu<T>(const T*, int64_t, int, double, int, const double*,      \
                                          const double*, int, int, double*, double*, int);
LOCDIFF_INSTANTIATE(float)
LOCDIFF_INSTANTIATE(double)
#undef LOCDIFF_INSTANTIATE

}  // namespace locdiff
