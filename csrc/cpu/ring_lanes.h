// Ring-grid synthesis with one coefficient vector per SIMD lane (csrc/cpu/shdd_cpu.cpp).
//
// The per-vector route (shdd_cpu.cpp: legendre_sums, fourier_synth) spends most of its time
// on overheads at the degrees decoding runs at (L <= 128): each Legendre column is a dot
// product of only L+1-m terms ending in a horizontal sum, and each radix-2 butterfly is a
// few scalar flops next to its twiddle loads. Here kLanes vectors go through both stages
// together, each lane a vector: the Legendre sums broadcast one table entry against the
// block's coefficients (no horizontal sums, the table streamed once per block), and every
// FFT butterfly is one vector op over the block with the twiddle loaded once. Measured
// (benchmarks/test_decode_bench.py, see ops/shdd.py) 2 to 4 times faster than the
// per-vector route for the candidate grids.
//
// Precision: S, the lane type, is the precision of the whole synthesis (float for the
// decode's candidate grids, which only pick starting points for the float64 refinement;
// double where the values are the result).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fft.h"
#include "legendre_tables.h"
#include "locdiff/shdd_kernels.h"

namespace locdiff {
namespace cpu {

constexpr int kLanes = 8;
// Lambdas inside a LOCDIFF_CLONES function are separate functions, compiled for the
// portable target unless inlined.
#define LOCDIFF_INLINE_LAMBDA __attribute__((always_inline))

// GCC/Clang vector types of kLanes elements (8 floats: one AVX2 register; 8 doubles: two).
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef double DoubleLanes __attribute__((vector_size(kLanes * sizeof(double))));
template <typename S>
struct LaneType {
  typedef DoubleLanes type;
};
template <>
struct LaneType<float> {
  typedef FloatLanes type;
};
template <typename S>
using Lanes = typename LaneType<S>::type;

// Zero-filled storage of n values aligned for Lanes<S> (std::vector only guarantees the
// alignment of S).
template <typename S>
struct LaneBuffer {
  std::vector<S> raw;
  S* data = nullptr;
  void assign(size_t n) {
    constexpr size_t align = sizeof(Lanes<S>) / sizeof(S);
    raw.assign(n + align, S(0));
    const size_t skip = (align - (reinterpret_cast<uintptr_t>(raw.data()) / sizeof(S)) % align) % align;
    data = raw.data() + skip;
  }
};

// Per-thread scratch for one block of kLanes vectors.
template <typename S>
struct LaneWork {
  int L = -1, nlat = 0, nlon = 0, nhalf = 0;
  int64_t tsize = 0, gsize = 0;
  LaneBuffer<S> coef;             // (2, tsize, kLanes): m-major cos (A) then sin (B) coefficients
  LaneBuffer<S> z;                // (6, nlon, kLanes): FFT re, im of two ring pairs, the direct DFT's scratch
  std::vector<S> half_cos, half_sin;  // cos, sin(m lon0) / 2
  std::vector<S> grid;            // (kLanes, nlat * nlon): f of each vector of the block, if kept here
  std::vector<const S*> rows;     // (kLanes, nlat): ring j of vector v's grid
  void resize(int degree, const RingGrid& g, bool with_grid) {
    L = degree;
    nlat = g.nlat;
    nlon = g.nlon;
    nhalf = (nlat + 1) / 2;
    tsize = legendre_offset(L, L + 1);
    gsize = int64_t(nlat) * nlon;
    coef.assign(size_t(2 * tsize * kLanes));
    z.assign(size_t(6 * nlon * kLanes));
    half_cos.resize(L + 1);
    half_sin.resize(L + 1);
    for (int m = 0; m <= L; ++m) {
      half_cos[m] = S(0.5 * std::cos(m * g.lon0));
      half_sin[m] = S(0.5 * std::sin(m * g.lon0));
    }
    if (!with_grid) return;
    grid.assign(size_t(kLanes * gsize), S(0));
    rows.resize(size_t(kLanes) * nlat);
    for (int v = 0; v < kLanes; ++v)
      for (int j = 0; j < nlat; ++j) rows[size_t(v) * nlat + j] = grid.data() + v * gsize + int64_t(j) * nlon;
  }
  Lanes<S>* lanes(LaneBuffer<S>& a, int64_t at) { return reinterpret_cast<Lanes<S>*>(a.data + at * kLanes); }
};

// Coefficients of vector v (flat l*l + l + m) into lane v, m-major.
template <typename S, typename T>
void load_lane(const T* c, int v, LaneWork<S>& w) {
  const int L = w.L;
  S* a = w.coef.data;
  S* b = a + w.tsize * kLanes;
  for (int m = 0; m <= L; ++m) {
    const int64_t off = legendre_offset(L, m);
    for (int l = m; l <= L; ++l) {
      const int64_t at = (off + l - m) * kLanes + v;
      a[at] = S(c[int64_t(l) * l + l + m]);
      b[at] = m ? S(c[int64_t(l) * l + l - m]) : S(0);
    }
  }
}

// f of nb <= kLanes vectors (coeffs[v]) on the whole grid, into outs[v] (nlat * nlon each).
template <typename S, typename T>
LOCDIFF_CLONES void synth_lanes(const T* const* coeffs, int nb, const RingGrid& g, const FftPlan& plan,
                                LaneWork<S>& w, S* const* outs) {
  using V = Lanes<S>;
  const int L = w.L, N = w.nlon, nlat = w.nlat, nhalf = w.nhalf;
  // Lanes past nb keep the previous block's vectors: lanes never mix, so they are left alone.
  for (int v = 0; v < nb; ++v) load_lane(coeffs[v], v, w);
  const V* cA = w.lanes(w.coef, 0);
  const V* cB = w.lanes(w.coef, w.tsize);
  V* tmp = w.lanes(w.z, 4 * N);
  // Adds order m of one ring pair's sums (even / odd l - m, cos / sin) to its FFT input.
  auto add_order = [&](V* zr, V* zi, int m, bool pair, V ea, V oa, V eb, V ob) LOCDIFF_INLINE_LAMBDA {
    // The mirror ring has P_lm(-z) = (-1)^(l-m) P_lm(z): north = even + odd, south = even - odd.
    const V an = ea + oa, as = ea - oa;
    if (m == 0) {
      zr[0] += an;
      if (pair) zi[0] += as;
      return;
    }
    const V bn = eb + ob, bs = eb - ob;
    // G_m = (A - iB)/2 exp(i m lon0) per ring, G_-m = conj(G_m); the FFT input is
    // Z = G_north + i G_south, so that one complex FFT gives both rings.
    const S c = w.half_cos[m], s = w.half_sin[m];
    const V nr = an * c + bn * s, ni = an * s - bn * c;
    V sr{}, si{};
    if (pair) {
      sr = as * c + bs * s;
      si = as * s - bs * c;
    }
    const int bp = m % N, bm = (N - bp) % N;
    zr[bp] += nr - si;
    zi[bp] += ni + sr;
    zr[bm] += nr + si;
    zi[bm] += sr - ni;
  };
  // Lane v of z (nlon values) into ring `ring` of vector v's grid.
  auto store_ring = [&](const V* z, int ring) LOCDIFF_INLINE_LAMBDA {
    const int64_t at = int64_t(ring) * N;
    for (int k = 0; k < N; ++k) {
      const V x = z[k];
      for (int v = 0; v < nb; ++v) outs[v][at + k] = x[v];
    }
  };
  // Two northern rings per pass: each coefficient load serves both rings' sums (the loop
  // is bound by loads and by the FMA latency chains, eight of them here).
  for (int j = 0; j < nhalf; j += 2) {
    const bool two = j + 1 < nhalf;
    std::fill(w.z.data, w.z.data + 4 * N * kLanes, S(0));
    V* zr0 = w.lanes(w.z, 0);
    V* zi0 = w.lanes(w.z, N);
    V* zr1 = w.lanes(w.z, 2 * N);
    V* zi1 = w.lanes(w.z, 3 * N);
    for (int m = 0; m <= L; ++m) {
      const int n = L + 1 - m;
      const int64_t off = legendre_offset(L, m);
      const double* __restrict p0 = g.table + int64_t(nhalf) * off + int64_t(j) * n;
      const double* __restrict p1 = two ? p0 + n : p0;
      const V* __restrict a = cA + off;
      const V* __restrict b = cB + off;
      V ea0{}, oa0{}, eb0{}, ob0{}, ea1{}, oa1{}, eb1{}, ob1{};
      int i = 0;
      for (; i + 1 < n; i += 2) {
        const V ae = a[i], ao = a[i + 1], be = b[i], bo = b[i + 1];
        const S q0 = S(p0[i]), r0 = S(p0[i + 1]), q1 = S(p1[i]), r1 = S(p1[i + 1]);
        ea0 += q0 * ae;
        eb0 += q0 * be;
        oa0 += r0 * ao;
        ob0 += r0 * bo;
        ea1 += q1 * ae;
        eb1 += q1 * be;
        oa1 += r1 * ao;
        ob1 += r1 * bo;
      }
      if (i < n) {
        const S q0 = S(p0[i]), q1 = S(p1[i]);
        ea0 += q0 * a[i];
        eb0 += q0 * b[i];
        ea1 += q1 * a[i];
        eb1 += q1 * b[i];
      }
      add_order(zr0, zi0, m, nlat - 1 - j != j, ea0, oa0, eb0, ob0);
      if (two) add_order(zr1, zi1, m, nlat - 2 - j != j + 1, ea1, oa1, eb1, ob1);
    }
    for (int r = 0; r < (two ? 2 : 1); ++r) {
      V* zr = r ? zr1 : zr0;
      V* zi = r ? zi1 : zi0;
      const int jn = j + r, js = nlat - 1 - jn;
      fft<S>(plan, zr, zi, +1, tmp);
      store_ring(zr, jn);
      if (js != jn) store_ring(zi, js);
    }
  }
}

// Runs block(w, plan, b0, nb) for the blocks of kLanes vectors b0 .. b0 + nb - 1 in
// parallel, w being the thread's LaneWork (with its kLanes grids if with_grid).
// make_block() runs once per thread, so a block function can keep its own scratch.
template <typename S, class MakeBlock>
void for_each_lane_block(int64_t batch, int degree, const RingGrid& grid, int num_threads, bool with_grid,
                         MakeBlock make_block) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t nblocks = (batch + kLanes - 1) / kLanes;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    LaneWork<S> w;
    w.resize(degree, grid, with_grid);
    auto block = make_block();
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk)
      block(w, *plan, blk * kLanes, int(std::min<int64_t>(kLanes, batch - blk * kLanes)));
  }
}

// f of every coefficient vector into out_row(b) (nlat * nlon values).
template <typename S, typename T, class OutRow>
void synthesise_lanes(const T* coeffs, int64_t batch, int degree, const RingGrid& grid, int num_threads,
                      OutRow out_row) {
  const int64_t K = int64_t(degree + 1) * (degree + 1);
  for_each_lane_block<S>(batch, degree, grid, num_threads, false, [&] {
    return [&](LaneWork<S>& w, const FftPlan& plan, int64_t b0, int nb) {
      const T* rows[kLanes];
      S* outs[kLanes];
      for (int v = 0; v < nb; ++v) {
        rows[v] = coeffs + K * (b0 + v);
        outs[v] = out_row(b0 + v);
      }
      synth_lanes<S>(rows, nb, grid, plan, w, outs);
    };
  });
}

// f of every coefficient vector into the thread's scratch (kLanes grids: keep to moderate
// degrees), then visit(grid, rows, b) with vector b's values (nlat * nlon, and the pointer
// of each ring). make_visitor() runs once per thread, so a visitor can keep its own scratch.
template <typename S, typename T, class MakeVisitor>
void for_each_synthesis_lanes(const T* coeffs, int64_t batch, int degree, const RingGrid& grid, int num_threads,
                              MakeVisitor make_visitor) {
  const int64_t K = int64_t(degree + 1) * (degree + 1);
  for_each_lane_block<S>(batch, degree, grid, num_threads, true, [&] {
    return [&, visit = make_visitor()](LaneWork<S>& w, const FftPlan& plan, int64_t b0, int nb) mutable {
      const T* rows[kLanes];
      S* outs[kLanes];
      for (int v = 0; v < nb; ++v) {
        rows[v] = coeffs + K * (b0 + v);
        outs[v] = w.grid.data() + v * w.gsize;
      }
      synth_lanes<S>(rows, nb, grid, plan, w, outs);
      for (int v = 0; v < nb; ++v) visit(static_cast<const S*>(outs[v]), w.rows.data() + size_t(v) * w.nlat, b0 + v);
    };
  });
}

}  // namespace cpu
}  // namespace locdiff
