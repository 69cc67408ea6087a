// Ring-grid synthesis and its adjoint with one coefficient vector per SIMD lane, for
// csrc/cpu/shdd_cpu.cpp (grid synthesis, the decode's candidates, the adjoint, and the
// log-partition and SHDD-KL on grids of up to 2^17 values).
//
// The per-vector route spends most of its time on overheads at decoding degrees (short
// Legendre dot products, scalar FFT butterflies). Here kLanes vectors go through both stages
// together, one per lane: no horizontal sums, each table entry and twiddle loaded once per
// block (figures: docs/kernels.md, "Decode grid stage on the CPU").
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
#include "vector_exp.h"  // Double4

namespace locdiff {
namespace cpu {

constexpr int kLanes = 8;
// Lambdas inside a LOCDIFF_CLONES function are separate functions, compiled for the
// portable target unless inlined.
#define LOCDIFF_INLINE_LAMBDA __attribute__((always_inline))

// kLanes values as SIMD vectors: 8 floats are one GCC/Clang vector (one AVX2 register); 8
// doubles are a pair of 4-double vectors, since a 64-byte vector type is lowered
// generically without AVX-512 (every scalar broadcast went through the stack: 10 times
// slower).
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));
struct DoubleLanes {
  Double4 lo, hi;
  LOCDIFF_INLINE DoubleLanes& operator+=(const DoubleLanes& o) {
    lo += o.lo;
    hi += o.hi;
    return *this;
  }
  LOCDIFF_INLINE double operator[](int v) const { return v < 4 ? lo[v] : hi[v - 4]; }
};
LOCDIFF_INLINE DoubleLanes operator+(const DoubleLanes& a, const DoubleLanes& b) { return {a.lo + b.lo, a.hi + b.hi}; }
LOCDIFF_INLINE DoubleLanes operator-(const DoubleLanes& a, const DoubleLanes& b) { return {a.lo - b.lo, a.hi - b.hi}; }
LOCDIFF_INLINE DoubleLanes operator*(double s, const DoubleLanes& a) { return {s * a.lo, s * a.hi}; }
LOCDIFF_INLINE DoubleLanes operator*(const DoubleLanes& a, double s) { return {a.lo * s, a.hi * s}; }
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
  // Float lanes: two northern rings per pass, so that each coefficient load serves both
  // rings' sums (the loop is bound by loads and by the FMA latency chains, eight of them
  // here). Double lanes are two registers each: eight accumulators would fill all sixteen
  // and spill to the stack (measured 10 times slower), so one ring per pass.
  constexpr int kRings = sizeof(S) == sizeof(float) ? 2 : 1;
  for (int j = 0; j < nhalf; j += kRings) {
    const bool two = kRings == 2 && j + 1 < nhalf;
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
        const S q0 = S(p0[i]), r0 = S(p0[i + 1]);
        ea0 += q0 * ae;
        eb0 += q0 * be;
        oa0 += r0 * ao;
        ob0 += r0 * bo;
        if constexpr (kRings == 2) {
          const S q1 = S(p1[i]), r1 = S(p1[i + 1]);
          ea1 += q1 * ae;
          eb1 += q1 * be;
          oa1 += r1 * ao;
          ob1 += r1 * bo;
        }
      }
      if (i < n) {
        const S q0 = S(p0[i]);
        ea0 += q0 * a[i];
        eb0 += q0 * b[i];
        if constexpr (kRings == 2) {
          const S q1 = S(p1[i]);
          ea1 += q1 * a[i];
          eb1 += q1 * b[i];
        }
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

// The adjoint of synth_lanes: out[v] (K values, flat l*l + l + m) = sum_i wgt[v]_i Y(x_i)
// over the grid, for nb <= kLanes weight grids (nlat * nlon each): per ring pair a forward
// FFT (ring j real, its mirror imaginary), then the transposed Legendre sums into the
// coefficient lanes.
template <typename S, typename W, typename T>
LOCDIFF_CLONES void adjoint_lanes(const W* const* wgt, int nb, const RingGrid& g, const FftPlan& plan,
                                  LaneWork<S>& w, T* const* out) {
  using V = Lanes<S>;
  const int L = w.L, N = w.nlon, nlat = w.nlat, nhalf = w.nhalf;
  std::fill(w.coef.data, w.coef.data + 2 * w.tsize * kLanes, S(0));
  V* cA = w.lanes(w.coef, 0);
  V* cB = w.lanes(w.coef, w.tsize);
  V* zr = w.lanes(w.z, 0);
  V* zi = w.lanes(w.z, N);
  V* tmp = w.lanes(w.z, 4 * N);
  S* zr_s = w.z.data;
  S* zi_s = w.z.data + N * kLanes;
  for (int j = 0; j < nhalf; ++j) {
    const int js = nlat - 1 - j;
    const bool pair = js != j;
    // Lanes past nb keep stale values: lanes never mix, and their results are not read.
    for (int v = 0; v < nb; ++v) {
      const W* north = wgt[v] + int64_t(j) * N;
      const W* south = wgt[v] + int64_t(js) * N;
      for (int k = 0; k < N; ++k) {
        zr_s[k * kLanes + v] = S(north[k]);
        zi_s[k * kLanes + v] = pair ? S(south[k]) : S(0);
      }
    }
    fft<S>(plan, zr, zi, -1, tmp);
    for (int m = 0; m <= L; ++m) {
      // X = FFT at m, X' = FFT at -m: the north ring's spectrum is (X + conj X') / 2, the
      // south's (X - conj X') / 2i; rotated by exp(-i m lon0), their real parts and minus
      // their imaginary parts are sum_k w cos(m phi_k) and sum_k w sin(m phi_k).
      const int bp = m % N, bm = (N - bp) % N;
      const V xr = zr[bp], xi = zi[bp], yr = zr[bm], yi = zi[bm];
      const S c = w.half_cos[m], s = w.half_sin[m];
      const V nre = xr + yr, nim = xi - yi, sre = xi + yi, sim = yr - xr;  // twice the spectra
      const V rn = nre * c + nim * s, in = nre * s - nim * c;
      V rs{}, is{};
      if (pair) {
        rs = sre * c + sim * s;
        is = sre * s - sim * c;
      }
      // Transposed Legendre sums: even l - m take north + south, odd north - south.
      const int n = L + 1 - m;
      const int64_t off = legendre_offset(L, m);
      const double* __restrict p = g.table + int64_t(nhalf) * off + int64_t(j) * n;
      V* __restrict a = cA + off;
      V* __restrict b = cB + off;
      const V ea = rn + rs, oa = rn - rs, eb = in + is, ob = in - is;
      int i = 0;
      for (; i + 1 < n; i += 2) {
        const S p0 = S(p[i]), p1 = S(p[i + 1]);
        a[i] += p0 * ea;
        b[i] += p0 * eb;
        a[i + 1] += p1 * oa;
        b[i + 1] += p1 * ob;
      }
      if (i < n) {
        a[i] += S(p[i]) * ea;
        b[i] += S(p[i]) * eb;
      }
    }
  }
  const S* a = w.coef.data;
  const S* b = a + w.tsize * kLanes;
  for (int v = 0; v < nb; ++v) {
    T* o = out[v];
    for (int m = 0; m <= L; ++m) {
      const int64_t off = legendre_offset(L, m);
      for (int l = m; l <= L; ++l) {
        const int64_t at = (off + l - m) * kLanes + v;
        o[int64_t(l) * l + l + m] = T(a[at]);
        if (m) o[int64_t(l) * l + l - m] = T(b[at]);
      }
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
