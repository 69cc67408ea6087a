// Spherical harmonics at mid degree, CPU: forward (kSmallForwardMax < L <= lanes_forward_max)
// and backward (kSmallBackwardMax < L <= kLanesBackwardMax), see sh_cpu_small.h.
//
// The general kernel (sh_cpu.cpp) runs one point at a time with its SIMD lanes across the
// orders m: each step reloads two coefficients and the point's two state rows for two
// outputs, so at these degrees its loads, not its stores, set the speed. Here the lanes run
// across kPointLanes points instead, as in sh_cpu_small.cpp, so a coefficient is loaded once
// per eight points, while the degrees stay in the outer loop (state: two rows of lane
// vectors, in L1): degree l's 2l+1 outputs of four points then leave as 4x4 transposes of
// groups of four orders, full-width stores into each point's contiguous row, with no tile
// in between.
//
// Numerics: the Cartesian form of sh_cpu_small.cpp, Y_l,+-m = sqrt2 Qbar_lm(z) Re/Im (x+iy)^m
// with Qbar_lm = P_lm / s^m. Up to L = 320, Qbar stays below 1e67, so no scaled seeds are
// needed, and away from the poles the plain recurrence stays within 2e-12 per unit. Within
// ~0.01 rad of an axis it loses about l^2 ulp (1.13e-11 per unit at L = 320, over the
// contract): in float64 sh_cpu_fwd and sh_cpu_bwd compute such points again with the
// per-point kernel (redo_polar_points, sh_cpu.cpp), rather than carrying Reinsch's form in
// the lanes. (x + i y)^m underflows only where the harmonic is below 1e-300 times Qbar's
// bound, so its absolute error stays far inside the contract. tests/test_sh_accuracy.py checks
// these degrees against mpmath.
#include <omp.h>
#if defined(__unix__)
#include <unistd.h>  // sysconf: the L3 size
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "lane_transpose.h"
#include "locdiff/sh_kernels.h"  // sh_cpu_lanes_stream_bytes
#include "legendre_tables.h"
#include "locdiff/sh_math.h"
#include "point_block.h"
#include "sh_cpu_small.h"
#include "stream_stores.h"  // stream_copy, kStreamBytes
#include "vector_exp.h"  // Double4, load4

namespace locdiff {
namespace {

constexpr int kLanes = cpu::kPointLanes;
using Block = cpu::PointBlock<kLanesDegreeMax>;
using cpu::tri;
using cpu::Double4;
using cpu::load4;
using cpu::Vec4;
constexpr double kInvSqrt2 = 0.70710678118654752440;

// Per-thread state: the block, and column values at degrees l-1 and l-2 (q[m * kLanes + p]).
struct LaneScratch {
  Block block;
  alignas(64) double q1[(kLanesDegreeMax + 2) * kLanes];
  alignas(64) double q2[(kLanesDegreeMax + 2) * kLanes];
};

// Four lanes between the float64 arithmetic and the output type T.
template <typename T>
LOCDIFF_INLINE typename Vec4<T>::type to_output(Double4 v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return __builtin_convertvector(v, typename Vec4<T>::type);
  }
}
template <typename T>
LOCDIFF_INLINE Double4 to_double(typename Vec4<T>::type v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return __builtin_convertvector(v, Double4);
  }
}

template <typename V, typename T>
LOCDIFF_INLINE void store_pair(T* plus, const V& c, const V& s, T* minus) {
  std::memcpy(plus, &c, sizeof(V));
  std::memcpy(minus, &s, sizeof(V));
}

// Runs every column up to degree L for the block's points and calls visit(l, q) with degree
// l's values, q[m * kLanes + p] = Qbar_lm (times sqrt2 for m >= 1; q[l+1] = 0), the seeds
// being seed[m] (Qbar_mm, times sqrt2 for m >= 1).
template <class Visit>
LOCDIFF_INLINE void for_each_degree(int L, const cpu::Tables& tb, const double* seed, const Block& bk,
                                    LaneScratch& ls, const Visit& visit) {
  double* __restrict q1 = ls.q1;  // degree l-1
  double* __restrict q2 = ls.q2;  // degree l-2, then l
  // Entry m of a row is first written at degree m; the step to l = m+1 reads the other
  // row's entry m (times b = 0), and degree l reads entry l+1 as Qbar_l,l+1 = 0.
  std::fill(q1, q1 + (L + 2) * kLanes, 0.0);
  std::fill(q2, q2 + (L + 2) * kLanes, 0.0);
  for (int l = 0; l <= L; ++l) {
    const double* __restrict a = tb.a.data() + tri(l);
    const double* __restrict b = tb.b.data() + tri(l);
    for (int m = 0; m < l; ++m) {
      const double am = a[m], bm = b[m];
      double* __restrict x2 = q2 + m * kLanes;
      const double* __restrict x1 = q1 + m * kLanes;
#pragma omp simd
      for (int p = 0; p < kLanes; ++p) x2[p] = am * bk.z[p] * x1[p] - bm * x2[p];
    }
    cpu::fill_lanes(q2 + l * kLanes, seed[l]);
    std::swap(q1, q2);
    visit(l, q1);
  }
}

// Degree l of the block's points: row[p * K + m] = Y_l,m of point p (row points at m = 0),
// from q[m * kLanes + p] = sqrt2 Qbar_lm (Qbar_l0 for m = 0). Groups of four orders
// g..g+3 leave by transposes: the +m values ascending at row[g], the -m values, reversed, at
// row[-g-3]. The last group is moved back to end at m = l, rewriting up to three values
// with the same numbers (needs l >= 4).
template <typename T>
LOCDIFF_INLINE void write_degree(const double* __restrict q, const Block& bk, int l, int64_t K, int count,
                                 T* __restrict row) {
  typedef typename Vec4<T>::type V;
  if (l < 4) {
    for (int p = 0; p < count; ++p) {
      row[p * K] = T(q[p]);
      for (int m = 1; m <= l; ++m) {
        row[p * K + m] = T(q[m * kLanes + p] * bk.re[m * kLanes + p]);
        row[p * K - m] = T(q[m * kLanes + p] * bk.im[m * kLanes + p]);
      }
    }
    return;
  }
  for (int p = 0; p < count; ++p) row[p * K] = T(q[p]);
  for (int m0 = 1; m0 <= l; m0 += 4) {
    const int g = std::min(m0, l - 3);
    for (int half = 0; half < kLanes; half += 4) {
      // Named vectors, not arrays: an array indexed in the store loop stays on the stack.
      const double* qg = q + g * kLanes + half;
      const double* re = bk.re + g * kLanes + half;
      const double* im = bk.im + g * kLanes + half;
      const Double4 q0 = load4(qg), q1 = load4(qg + kLanes), q2 = load4(qg + 2 * kLanes), q3 = load4(qg + 3 * kLanes);
      V c0 = to_output<T>(q0 * load4(re)), c1 = to_output<T>(q1 * load4(re + kLanes));
      V c2 = to_output<T>(q2 * load4(re + 2 * kLanes)), c3 = to_output<T>(q3 * load4(re + 3 * kLanes));
      V s0 = to_output<T>(q0 * load4(im)), s1 = to_output<T>(q1 * load4(im + kLanes));
      V s2 = to_output<T>(q2 * load4(im + 2 * kLanes)), s3 = to_output<T>(q3 * load4(im + 3 * kLanes));
      cpu::transpose4<T>(c0, c1, c2, c3);
      cpu::transpose4<T>(s3, s2, s1, s0);  // point p's -m run (m = g+3 .. g) is now in s(3-p)
      T* r = row + half * K;
      const int points = std::min(4, count - half);
      if (points <= 0) break;
      store_pair(r + g, c0, s3, r - g - 3);
      if (points > 1) store_pair(r + K + g, c1, s2, r + K - g - 3);
      if (points > 2) store_pair(r + 2 * K + g, c2, s1, r + 2 * K - g - 3);
      if (points > 3) store_pair(r + 3 * K + g, c3, s0, r + 3 * K - g - 3);
    }
  }
}

// One block of `count` points at degree L; seed[m] = Qbar_mm, times sqrt2 for m >= 1.
template <typename T>
LOCDIFF_CLONES int forward_block(const T* xyz, int count, int L, const cpu::Tables& tb, const double* seed,
                                 LaneScratch& ls, T* out) {
  Block& bk = ls.block;
  const int bad = bk.load(xyz, count, L);
  const int64_t K = sh_size(L);
  for_each_degree(L, tb, seed, bk, ls, [&](int l, const double* q) LOCDIFF_LAMBDA_INLINE {
    write_degree<T>(q, bk, l, K, count, out + int64_t(l) * l + l);
  });
  return bad;
}

// From how many bytes the lanes' outputs stream: a quarter of the L3 in float64, half in
// float32, at least kStreamBytes. While the output stays in the L3 ordinary stores are
// faster (docs/kernels.md, "Streaming stores").
int64_t lanes_stream_bytes(size_t value_bytes) {
  static const int64_t quarter_l3 = [] {
    long l3 = 0;
#if defined(__unix__) && defined(_SC_LEVEL3_CACHE_SIZE)
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? std::max<int64_t>(cpu::kStreamBytes, l3 / 4) : int64_t(32) << 20;
  }();
  return value_bytes == sizeof(double) ? quarter_l3 : 2 * quarter_l3;
}

#if LOCDIFF_STREAM_STORES
// A block's rows on their way to a large output. Ordinary stores into memory that is not in
// the cache first read each line in, doubling the traffic, so write_degree stages each
// point's degrees with the output's alignment and streams whole lines from the stage
// while the next degrees compute; a row's partial end lines take ordinary stores
// (docs/kernels.md, "Streaming stores").
template <typename T>
struct RowStage {
  static constexpr int kLine = 64 / int(sizeof(T));  // values per cache line
  static constexpr int kFlushValues = 8 * kLine;
  int64_t stride = 0;
  std::unique_ptr<T[]> storage;
  T* base = nullptr;  // 64-byte aligned

  explicit RowStage(int L) {
    const int64_t K = sh_size(L), need = 3 * kLine + kFlushValues + 2 * L + 1;
    stride = need + ((K - need) % kLine + kLine) % kLine;
    storage.reset(new T[stride * kLanes + 2 * kLine]);
    const auto at = reinterpret_cast<std::uintptr_t>(storage.get());
    base = storage.get() + ((64 - at % 64) % 64) / sizeof(T);
  }
};

// forward_block for a full block into a large output (out a multiple of sizeof(T)).
template <typename T>
LOCDIFF_CLONES int forward_block_streamed(const T* xyz, int L, const cpu::Tables& tb, const double* seed,
                                          LaneScratch& ls, RowStage<T>& st, T* out) {
  constexpr int kLine = RowStage<T>::kLine;
  Block& bk = ls.block;
  const int bad = bk.load(xyz, kLanes, L);
  const int64_t K = sh_size(L), S = st.stride;
  const auto line_offset = [](const T* at) { return int64_t(reinterpret_cast<std::uintptr_t>(at) / sizeof(T) % kLine); };
  T* const stage = st.base + line_offset(out);  // stage + p * S + i - w0 is in the same place of its line as out + p * K + i
  int64_t w0 = 0;                               // row index at stage + p * S, a whole number of lines
  int64_t done[kLanes] = {};                    // per point, how much of its row is in the output
  for_each_degree(L, tb, seed, bk, ls, [&](int l, const double* q) LOCDIFF_LAMBDA_INLINE {
    write_degree<T>(q, bk, l, S, kLanes, stage + (int64_t(l) * l + l - w0));
    const int64_t hi = int64_t(l + 1) * (l + 1);
    if (hi - w0 < RowStage<T>::kFlushValues && l < L) return;
    int64_t low = hi;
    for (int p = 0; p < kLanes; ++p) {
      T* row = out + p * K;
      const T* from = stage + p * S - w0;  // from[i]: value i of point p
      const int64_t head = (kLine - line_offset(row)) % kLine;  // first line boundary in the row
      int64_t i = done[p];
      for (; i < std::min(hi, head); ++i) row[i] = from[i];
      if (i >= head) {
        const int64_t lines = (hi - i) / kLine * kLine;
        if (lines > 0) cpu::stream_copy(from + i, row + i, int(lines));
        i += lines;
        if (hi == K)
          for (; i < K; ++i) row[i] = from[i];
      }
      done[p] = i;
      low = std::min(low, i);
    }
    const int64_t w1 = low / kLine * kLine;
    if (w1 == w0) return;
    for (int p = 0; p < kLanes; ++p)
      std::memmove(stage + p * S + (done[p] - w1), stage + p * S + (done[p] - w0), size_t(hi - done[p]) * sizeof(T));
    w0 = w1;
  });
  return bad;
}
#endif

// Point-major to lane-major, the inverse of write_degree's stores: v_j = grad[p * K + k0 + j]
// of the four points p, as lanes.
template <typename T>
LOCDIFF_INLINE void load_group(const T* __restrict g, int64_t K, int points, Double4& v0, Double4& v1,
                               Double4& v2, Double4& v3) {
  typedef typename Vec4<T>::type V;
  V r0{}, r1{}, r2{}, r3{};
  std::memcpy(&r0, g, sizeof(V));
  if (points > 1) std::memcpy(&r1, g + K, sizeof(V));
  if (points > 2) std::memcpy(&r2, g + 2 * K, sizeof(V));
  if (points > 3) std::memcpy(&r3, g + 3 * K, sizeof(V));
  cpu::transpose4<T>(r0, r1, r2, r3);
  v0 = to_double<T>(r0), v1 = to_double<T>(r1), v2 = to_double<T>(r2), v3 = to_double<T>(r3);
}

// Gradient sums of one block, as lanes (halves of four points).
struct GradSums {
  Double4 x[2] = {}, y[2] = {}, z[2] = {};
};

// Degree l's share of dL/dxyz, from q[m * kLanes + p] = sqrt2 Qbar_lm (m >= 1; q[l+1] = 0):
//   gx += m q_m (g+ Re w^(m-1) + g- Im w^(m-1)),  gy += m q_m (g- Re w^(m-1) - g+ Im w^(m-1)),
//   gz += dz_lm / sqrt2 q_(m+1) (g+ Re w^m + g- Im w^m),  w = x + i y
// (the terms of sh_cpu_small.cpp's backward_block, with the sqrt2 carried in q). Orders run in
// groups of four as in write_degree; the last group, moved back to end at m = l, skips the
// orders the group before it took. m = 0 adds only its gz term.
// Order m's terms for the half of lanes at `half`, gp / gm the incoming gradient at +-m.
LOCDIFF_INLINE void add_order(const double* __restrict q, const Block& bk, const double* __restrict dz, int m,
                              int half, Double4 gp, Double4 gm, Double4& ax, Double4& ay, Double4& az) {
  const int i = m * kLanes + half, i1 = i - kLanes;
  const Double4 w = double(m) * load4(q + i), c = (dz[m] * kInvSqrt2) * load4(q + i + kLanes);
  const Double4 re1 = load4(bk.re + i1), im1 = load4(bk.im + i1);
  ax += w * (gp * re1 + gm * im1);
  ay += w * (gm * re1 - gp * im1);
  az += c * (gp * load4(bk.re + i) + gm * load4(bk.im + i));
}

template <typename T>
LOCDIFF_INLINE void grad_degree(const double* __restrict q, const Block& bk, const double* __restrict dz, int l,
                                int64_t K, int count, const T* __restrict row, GradSums& sum) {
  for (int half = 0; half < kLanes && half < count; half += 4) {
    const int points = std::min(4, count - half);
    const T* r = row + half * K;
    Double4 g0{};
    for (int p = 0; p < points; ++p) g0[p] = double(r[p * K]);
    Double4 ax = sum.x[half / 4], ay = sum.y[half / 4];
    Double4 az = sum.z[half / 4] + (dz[0] * kInvSqrt2) * load4(q + kLanes + half) * g0;
    if (l < 4) {
      for (int m = 1; m <= l; ++m) {
        Double4 gp{}, gm{};
        for (int p = 0; p < points; ++p) gp[p] = double(r[p * K + m]), gm[p] = double(r[p * K - m]);
        add_order(q, bk, dz, m, half, gp, gm, ax, ay, az);
      }
    } else {
      for (int m0 = 1; m0 <= l; m0 += 4) {
        const int g = std::min(m0, l - 3);
        Double4 gp[4], gm[4];
        load_group<T>(r + g, K, points, gp[0], gp[1], gp[2], gp[3]);
        load_group<T>(r - g - 3, K, points, gm[3], gm[2], gm[1], gm[0]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
          if (g + j >= m0) add_order(q, bk, dz, g + j, half, gp[j], gm[j], ax, ay, az);  // else the group before took it
      }
    }
    sum.x[half / 4] = ax, sum.y[half / 4] = ay, sum.z[half / 4] = az;
  }
}

template <typename T>
LOCDIFF_CLONES void backward_block(const T* xyz, const T* grad, int count, int L, const cpu::Tables& tb,
                                   const double* seed, LaneScratch& ls, T* grad_xyz) {
  Block& bk = ls.block;
  bk.load(xyz, count, L);
  const int64_t K = sh_size(L);
  GradSums sum;
  // Up to L = 32 a point's row is a few cache lines, read degree by degree across a block's
  // rows, which the hardware prefetchers do not follow: each degree prefetches its part of
  // the next block (docs/kernels.md, "Backward prefetch").
  const bool prefetch = L <= 32;
  const T* next = grad + kLanes * K;
  for_each_degree(L, tb, seed, bk, ls, [&](int l, const double* q) LOCDIFF_LAMBDA_INLINE {
    if (l > 0) grad_degree<T>(q, bk, tb.dz.data() + tri(l), l, K, count, grad + int64_t(l) * l + l, sum);
    if (prefetch) {
      constexpr int kLine = 64 / sizeof(T);
      for (int p = 0; p < kLanes; ++p)
        for (int j = 0; j < 2 * l + 1; j += kLine) __builtin_prefetch(next + p * K + int64_t(l) * l + j, 0, 3);
    }
  });
  // Project out the radial part: Y depends on r / |r| only.
  for (int p = 0; p < count; ++p) {
    const double gx = sum.x[p / 4][p % 4], gy = sum.y[p / 4][p % 4], gz = sum.z[p / 4][p % 4];
    const double radial = gx * bk.x[p] + gy * bk.y[p] + gz * bk.z[p];
    grad_xyz[3 * p] = T((gx - radial * bk.x[p]) * bk.inv_norm[p]);
    grad_xyz[3 * p + 1] = T((gy - radial * bk.y[p]) * bk.inv_norm[p]);
    grad_xyz[3 * p + 2] = T((gz - radial * bk.z[p]) * bk.inv_norm[p]);
  }
}

// seed[m] = Qbar_mm, times sqrt2 for m >= 1.
std::vector<double> lane_seeds(const cpu::Tables& t, int degree) {
  std::vector<double> seed(degree + 1);
  seed[0] = kInvSqrt4Pi;
  double c = kInvSqrt4Pi;
  for (int m = 1; m <= degree; ++m) {
    c *= t.seed_ratio[m];
    seed[m] = kSqrt2 * c;  // the sqrt2 of the m >= 1 harmonics, carried along the column
  }
  return seed;
}

// Blocks a thread takes at a time: runs of about eight per thread, so a busy machine stays
// balanced while each thread fetches work eight times rather than once per block and writes
// one stretch of the output (docs/kernels.md, "Lane blocks per run").
int blocks_per_run(int64_t blocks, int team) { return int(std::max<int64_t>(1, blocks / (8 * team))); }

}  // namespace

int64_t sh_cpu_lanes_stream_bytes(int value_bytes) {
  return LOCDIFF_STREAM_STORES ? lanes_stream_bytes(size_t(value_bytes)) : INT64_MAX;
}

template <typename T>
int64_t sh_cpu_lanes_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads) {
  const auto tables = cpu::tables_for(degree);
  const std::vector<double> seed = lane_seeds(*tables, degree);
  const int64_t K = sh_size(degree);
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  int64_t first_bad = n;
  const bool stream = LOCDIFF_STREAM_STORES && n * K * int64_t(sizeof(T)) >= lanes_stream_bytes(sizeof(T)) &&
                      reinterpret_cast<std::uintptr_t>(out) % sizeof(T) == 0;
  const int team = cpu::threads(num_threads, blocks);
  const int run = blocks_per_run(blocks, team);
#pragma omp parallel num_threads(team) reduction(min : first_bad)
  {
    auto ls = std::make_unique<LaneScratch>();
#if LOCDIFF_STREAM_STORES
    std::unique_ptr<RowStage<T>> stage;
    if (stream) stage = std::make_unique<RowStage<T>>(degree);
#endif
#pragma omp for schedule(dynamic, run)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kLanes;
      const int count = int(std::min<int64_t>(kLanes, n - first));
      int bad;
#if LOCDIFF_STREAM_STORES
      if (stream && count == kLanes)
        bad = forward_block_streamed(xyz + 3 * first, degree, *tables, seed.data(), *ls, *stage, out + K * first);
      else
#endif
        bad = forward_block(xyz + 3 * first, count, degree, *tables, seed.data(), *ls, out + K * first);
      if (bad >= 0) first_bad = std::min(first_bad, first + bad);
    }
#if LOCDIFF_STREAM_STORES
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the region ends
#endif
  }
  return first_bad == n ? -1 : first_bad;
}

template <typename T>
void sh_cpu_lanes_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz, int num_threads) {
  const auto tables = cpu::tables_for(degree);
  const std::vector<double> seed = lane_seeds(*tables, degree);
  const int64_t K = sh_size(degree);
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  const int team = cpu::threads(num_threads, blocks);
  const int run = blocks_per_run(blocks, team);  // backward_block prefetches the next block
#pragma omp parallel num_threads(team)
  {
    auto ls = std::make_unique<LaneScratch>();
#pragma omp for schedule(dynamic, run)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kLanes;
      const int count = int(std::min<int64_t>(kLanes, n - first));
      backward_block(xyz + 3 * first, grad_out + K * first, count, degree, *tables, seed.data(), *ls,
                     grad_xyz + 3 * first);
    }
  }
}

template int64_t sh_cpu_lanes_fwd<float>(const float*, int64_t, int, float*, int);
template int64_t sh_cpu_lanes_fwd<double>(const double*, int64_t, int, double*, int);
template void sh_cpu_lanes_bwd<float>(const float*, const float*, int64_t, int, float*, int);
template void sh_cpu_lanes_bwd<double>(const double*, const double*, int64_t, int, double*, int);

}  // namespace locdiff
