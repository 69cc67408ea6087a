// Softmax over ring-grid values, for the log-partition and the SHDD-KL (shdd_cpu.cpp): the
// exponentials run four lanes at a time (vector_exp.h). Internal to csrc/cpu.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "legendre_tables.h"  // LOCDIFF_CLONES, LOCDIFF_INLINE
#include "locdiff/shdd_kernels.h"
#include "vector_exp.h"

namespace locdiff {
namespace cpu {

// exp(f_i * inv_t + log_area - max) into e (the grid's layout; not kept if e is null) ->
// (max, sum of the exponentials): the unnormalised softmax of one vector's grid values, four
// lanes at a time (vector_exp.h).
LOCDIFF_INLINE std::pair<double, double> softmax_terms(const double* f, const RingGrid& g, double inv_t, double* e) {
  const int N = g.nlon;
  double mx = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < g.nlat; ++j) {
    const double* row = f + int64_t(j) * N;
    double rmax = row[0];
#pragma omp simd reduction(max : rmax)
    for (int k = 1; k < N; ++k) rmax = row[k] > rmax ? row[k] : rmax;
    mx = std::max(mx, rmax * inv_t + g.log_area[j]);
  }
  double sum = 0;
  for (int j = 0; j < g.nlat; ++j) {
    const double b = g.log_area[j] - mx;
    const double* row = f + int64_t(j) * N;
    double* out = e ? e + int64_t(j) * N : nullptr;
    Double4 acc = splat4(0.0);
    int k = 0;
    for (; k + 4 <= N; k += 4) {
      const Double4 v = exp4(load4(row + k) * inv_t + b);
      if (out) store4(out + k, v);
      acc += v;
    }
    sum += (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (; k < N; ++k) {
      const double v = exp1(row[k] * inv_t + b);
      if (out) out[k] = v;
      sum += v;
    }
  }
  return {mx, sum};
}

// log sum_i exp(v_i) with v_i = f_i * inv_t + log_area(ring).
LOCDIFF_CLONES double log_partition(const double* f, const RingGrid& g, double inv_t) {
  const auto [mx, sum] = softmax_terms(f, g, inv_t, nullptr);
  return mx + std::log(sum);
}

// Scratch of kl_pair: the two softmax numerators (one grid each).
struct KlScratch {
  std::vector<double> ep, eq;
};

// KL(p || q) of one pair, with fp, ft the grid values; fills weights for the backward
// when wp / wt are non-null: wp = (q - p) / t, wt = p (log p - log q - KL) / t, times scale.
// Two exponentials per point (p and q, kept), where the log-partitions, the KL sum and the
// weights each took their own before.
LOCDIFF_CLONES double kl_pair(const double* fp, const double* ft, const RingGrid& g, double inv_t, double scale,
                              double* wp, double* wt, KlScratch& ks) {
  const int N = g.nlon;
  const int64_t G = int64_t(g.nlat) * N;
  ks.ep.resize(size_t(G));
  ks.eq.resize(size_t(G));
  const auto [mp, sp] = softmax_terms(ft, g, inv_t, ks.ep.data());  // p from the target
  const auto [mq, sq] = softmax_terms(fp, g, inv_t, ks.eq.data());
  const double lzp = mp + std::log(sp), lzq = mq + std::log(sq);
  const double cp = 1 / sp, cq = 1 / sq;
  const double* ep = ks.ep.data();
  const double* eq = ks.eq.data();
  // KL = sum_i p_i (log p_i - log q_i) = sum_i p_i (ft_i - fp_i) / t - lzp + lzq.
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < G; ++i) acc += ep[i] * (ft[i] - fp[i]);
  const double kl = acc * cp * inv_t - lzp + lzq;
  if (wp || wt) {
    // Point by point: wp and wt may be fp and ft themselves (each value is read before its
    // weight is written).
    const double sw = scale * inv_t, dz = lzq - lzp - kl;
    for (int64_t i = 0; i < G; ++i) {
      const double p = ep[i] * cp;
      const double dl = (ft[i] - fp[i]) * inv_t + dz;  // log p - log q - KL
      if (wt) wt[i] = sw * p * dl;
      if (wp) wp[i] = sw * (eq[i] * cq - p);
    }
  }
  return kl;
}

}  // namespace cpu
}  // namespace locdiff
