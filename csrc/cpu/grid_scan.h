// The local-maximum scan of one vector's grid values (shdd_cpu.cpp: the decode's candidates,
// on grids it synthesised or that the GEMM route computed). Internal to csrc/cpu.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "legendre_tables.h"  // LOCDIFF_CLONES
#include "locdiff/shdd_kernels.h"

namespace locdiff {
namespace cpu {

// Up to ncand grid local maxima of one vector's f, best first (see shdd_kernels.h). rows[j]:
// ring j's nlon values (the caller's layout may fold the southern rings elsewhere).
//
// An SHDD vector's f oscillates over the whole sphere (ring-shaped side lobes): at L = 16
// the 24 x 64 grid holds about 95 local maxima, 1300 at L = 64, on every ring. So the scan
// is three branch-light passes instead of a search point by point: (1) per ring, the eight
// neighbour tests run vectorised across the ring and leave f at the local maxima, -inf
// elsewhere (`masked`), folded into the chunk maxima (chunk: one column of a block of 8
// rings, an elementwise max over the block's rings); (2) a floor that at least ncand chunk
// maxima reach, by bisection with vectorised counts (distinct chunks hold distinct maxima,
// so the answer is above it); (3) only chunks reaching the floor are searched, and the few
// maxima found are sorted.
// (Inserting each maximum into a sorted list, ring by ring, cost twice the synthesis at
// L = 16; nth_element for the floor cost more than the neighbour tests.)
template <typename F>
struct ScanScratch {
  std::vector<F> masked;     // (nlat, nlon): f at local maxima, -inf elsewhere
  std::vector<F> chunk_max;  // (ring blocks of 8, nlon)
  std::vector<int64_t> selected;  // chunks reaching the floor
  std::vector<std::pair<F, int64_t>> found;
};

template <typename F>
LOCDIFF_CLONES void scan_candidates(const F* const* rows, const RingGrid& grid, int ncand, ScanScratch<F>& ss,
                                    int64_t* index, double* value, double* start) {
  const int N = grid.nlon, nlat = grid.nlat, half = N / 2;
  const F ninf = -std::numeric_limits<F>::infinity();
  // Value at (ring j, column k); rings past a pole fold back onto the same ring, half a turn
  // away, and columns wrap at the antimeridian.
  auto at = [&](int j, int k) {
    if (j < 0) {
      j = 0;
      k += half;
    } else if (j >= nlat) {
      j = nlat - 1;
      k += half;
    }
    // k is within 1.5 turns of the ring (callers step one column): no division.
    if (k >= N) k -= N;
    if (k >= N) k -= N;
    if (k < 0) k += N;
    return double(rows[j][k]);
  };
  ss.masked.resize(size_t(nlat) * N);
  ss.chunk_max.assign(size_t((nlat + 7) / 8) * N, ninf);
  for (int j = 0; j < nlat; ++j) {
    const F* __restrict row = rows[j];
    // Interior rings compare with the rows above and below directly; the polar rings
    // compare along the ring here and across the pole below (half a turn away, via at()).
    const bool interior = j > 0 && j < nlat - 1;
    const F* __restrict above = interior ? rows[j - 1] : row;
    const F* __restrict below = interior ? rows[j + 1] : row;
    F* __restrict mj = ss.masked.data() + int64_t(j) * N;
    // NaN is never a maximum (every comparison with it fails); a NaN neighbour blocks nothing.
    auto peak = [&](int k, int kl, int kr) {
      const F v = row[k];
      const bool is = (v >= row[kl]) & (v >= row[kr]) & !(above[kl] > v) & !(above[k] > v) & !(above[kr] > v) &
                      !(below[kl] > v) & !(below[k] > v) & !(below[kr] > v) & (v > ninf);
      return is ? v : ninf;
    };
    mj[0] = peak(0, N - 1, N > 1 ? 1 : 0);
#pragma omp simd
    for (int k = 1; k < N - 1; ++k) mj[k] = peak(k, k - 1, k + 1);
    if (N > 1) mj[N - 1] = peak(N - 1, N - 2, 0);
    if (!interior) {
      for (int k = 0; k < N; ++k) {
        if (!(mj[k] > ninf)) continue;
        const double v = double(mj[k]);
        for (int dj = -1; dj <= 1; dj += 2)
          for (int dk = -1; dk <= 1; ++dk)
            if (at(j + dj, k + dk) > v) mj[k] = ninf;
      }
      // A polar ring close to its pole holds at most one mode: keep its best node (the last
      // of equals, as the Triton scan), since a lobe on the pole makes the ring a plateau
      // whose rounding noise would otherwise fill the pool with copies of that lobe.
      if (grid.one_mode_per_polar_ring) {
        int best = -1;
        for (int k = 0; k < N; ++k)
          if (mj[k] > ninf && (best < 0 || mj[k] >= mj[best])) best = k;
        for (int k = 0; k < N; ++k)
          if (k != best) mj[k] = ninf;
      }
    }
    F* __restrict cm = ss.chunk_max.data() + int64_t(j / 8) * N;
#pragma omp simd
    for (int k = 0; k < N; ++k) cm[k] = mj[k] > cm[k] ? mj[k] : cm[k];
  }
  // The floor: a value that at least ncand chunk maxima reach (-inf if fewer chunks hold
  // maxima), within 1/1024 of the range of the exact ncand-th largest.
  const int64_t nchunks = int64_t((nlat + 7) / 8) * N;
  const F* cms = ss.chunk_max.data();
  auto reaching = [&](F t) {
    int64_t n = 0;
#pragma omp simd reduction(+ : n)
    for (int64_t c = 0; c < nchunks; ++c) n += cms[c] >= t;
    return n;
  };
  F top = ninf;
#pragma omp simd reduction(max : top)
  for (int64_t c = 0; c < nchunks; ++c) top = cms[c] > top ? cms[c] : top;
  F floor = ninf;
  F lo = top;  // the lowest chunk maximum above -inf
#pragma omp simd reduction(min : lo)
  for (int64_t c = 0; c < nchunks; ++c) {
    const F x = cms[c] > ninf ? cms[c] : top;
    lo = x < lo ? x : lo;
  }
  if (top > ninf && reaching(top) >= ncand) {
    floor = top;
  } else if (top > ninf && reaching(lo) >= ncand) {
    F hi = top;  // invariant: reaching(lo) >= ncand > reaching(hi)
    for (int it = 0; it < 10; ++it) {
      const F mid = lo + (hi - lo) / 2;
      if (!(mid > lo && mid < hi)) break;
      (reaching(mid) >= ncand ? lo : hi) = mid;
    }
    floor = lo;
  }
  // Chunks reaching the floor, then their maxima reaching it: compacted without branches
  // (store always, advance when kept), since which chunks pass is unpredictable.
  const F keep = floor > ninf ? floor : std::numeric_limits<F>::lowest();
  auto& sel = ss.selected;
  sel.resize(size_t(nchunks));
  int64_t nsel = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    sel[nsel] = c;
    nsel += cms[c] >= keep;
  }
  auto& found = ss.found;
  found.resize(size_t(8 * nsel));
  int64_t nfound = 0;
  for (int64_t i = 0; i < nsel; ++i) {
    const int64_t c = sel[i];
    const int j0 = 8 * int(c / N), k = int(c % N);
    for (int j = j0; j < std::min(nlat, j0 + 8); ++j) {
      const F v = ss.masked[int64_t(j) * N + k];
      found[nfound] = {v, int64_t(j) * N + k};
      nfound += v >= keep;
    }
  }
  found.resize(size_t(nfound));
  // Highest first, ties in grid order (deterministic).
  std::sort(found.begin(), found.end(), [](const auto& p, const auto& q) {
    return p.first > q.first || (p.first == q.first && p.second < q.second);
  });
  const int count = int(std::min<size_t>(size_t(ncand), found.size()));
  // Parabolic step in each direction (index units, clamped to half a cell).
  auto step = [](double fm, double f0, double fp) {
    const double d = fm - 2 * f0 + fp;
    if (!(d < 0)) return 0.0;
    return std::clamp(0.5 * (fm - fp) / d, -0.5, 0.5);
  };
  for (int c = 0; c < ncand; ++c) {
    if (c >= count) {
      index[c] = -1;
      value[c] = -std::numeric_limits<double>::infinity();
      start[2 * c] = start[2 * c + 1] = 0.0;
      continue;
    }
    const int j = int(found[c].second / N), k = int(found[c].second % N);
    const double f0 = double(found[c].first);
    const double dk = step(at(j, k - 1), f0, at(j, k + 1));
    const double dj = step(at(j - 1, k), f0, at(j + 1, k));
    const double th = grid.theta[j];
    const double up = j > 0 ? grid.theta[j - 1] : -grid.theta[0];
    const double dn = j < nlat - 1 ? grid.theta[j + 1] : 2 * kPi - grid.theta[nlat - 1];
    index[c] = found[c].second;
    value[c] = f0;
    // A colatitude past a pole is fine: (sin t cos p, sin t sin p, cos t) stays valid.
    start[2 * c] = dj >= 0 ? th + dj * (dn - th) : th + dj * (th - up);
    start[2 * c + 1] = grid.lon0 + 2 * kPi * (k + dk) / N;
  }
}

}  // namespace cpu
}  // namespace locdiff
