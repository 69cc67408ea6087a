// SHDD kernels on the CPU: ring-grid synthesis and its adjoint, mode candidates,
// log-partition, the SHDD-KL loss and backward. (f at points and the Newton refinement:
// shdd_point_cpu.cpp.)
//
// Work layout. OpenMP over blocks of coefficient vectors, so no batch x grid matrix is
// ever allocated. Per vector: (1) reorder the coefficients m-major, (2) per order m, the
// Legendre sums of each northern ring, even and odd l - m apart (north = even + odd, south
// = even - odd): the O(L^3) part, (3) per ring pair, one complex inverse FFT of (north + i
// south) gives both rings. The adjoint runs the same steps backwards (forward FFT, then
// transposed Legendre sums). All of it runs with one vector per SIMD lane, blocks of 8
// (ring_lanes.h); grids of more than kLaneGridMax values (L > ~150), whose 8-grid scratch
// would not fit in cache, take the per-vector form below for the log-partition and the KL
// (legendre_sums, fourier_synth, ...: one float64 grid per thread, 12 MB at L = 512).
// Exponentials (log-partition, KL) run four lanes at a time (vector_exp.h).
//
// Decoding on the CPU takes the GEMM route for the grid at L > 64 and at L = 33..64 below 32
// vectors (locdiff/ops/shdd.py: float32 GEMMs for the Legendre sums and torch's real FFT)
// and comes here for the local-maximum scan (shdd_scan_cpu) and the Newton refinement
// (shdd_point_cpu.cpp).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "fft.h"
#include "legendre_tables.h"
#include "ring_lanes.h"
#include "vector_exp.h"
#include "locdiff/sh_math.h"
#include "locdiff/shdd_kernels.h"

namespace locdiff {
namespace {

using cpu::FftPlan;
using cpu::Scratch;
using cpu::fft;
using cpu::fft_plan;
using cpu::Tables;
using cpu::seeds;
using cpu::tables_for;
using cpu::threads;
using cpu::tri;

constexpr double kPi = 3.14159265358979323846;

// ---- ring-grid synthesis and adjoint -----------------------------------------------------
// Vectors go through the Legendre stage in blocks of kBlock: each table row (one ring, one
// m) is loaded once per block instead of once per vector. At L = 256 the table is 49 MB,
// so without blocking every vector streams it from DRAM.
constexpr int kBlock = 8;

struct Work {
  int L = -1, nlat = 0, nlon = 0, nhalf = 0;
  int64_t tsize = 0, rsize = 0;
  // Per vector v of the block (offset v * tsize): m-major coefficients, and copies with
  // odd l-m negated (the southern mirror ring), for the cos (A) and sin (B) parts.
  std::vector<double> cA, cAs, cB, cBs;
  // Per vector (offset v * rsize): ring sums (nhalf, L+1), north / south, cos / sin.
  std::vector<double> AN, AS, BN, BS;
  std::vector<double> zr, zi, tmp;  // FFT buffers
  std::vector<double> pc, ps;       // cos, sin(m lon0)
  std::vector<double> grid, grid2;  // (nlat, nlon) f values of one vector
  std::vector<const double*> rows;  // rows[j] = ring j of grid
  void resize(int degree, const RingGrid& g) {
    L = degree;
    nlat = g.nlat;
    nlon = g.nlon;
    nhalf = (nlat + 1) / 2;
    tsize = legendre_offset(L, L + 1);
    rsize = int64_t(nhalf) * (L + 1);
    for (auto* v : {&cA, &cAs, &cB, &cBs}) v->assign(size_t(kBlock * tsize), 0.0);
    for (auto* v : {&AN, &AS, &BN, &BS}) v->assign(size_t(kBlock * rsize), 0.0);
    zr.assign(nlon, 0.0);
    zi.assign(nlon, 0.0);
    tmp.assign(2 * size_t(nlon), 0.0);
    pc.assign(L + 1, 0.0);
    ps.assign(L + 1, 0.0);
    for (int m = 0; m <= L; ++m) {
      pc[m] = std::cos(m * g.lon0);
      ps[m] = std::sin(m * g.lon0);
    }
    grid.assign(size_t(nlat) * nlon, 0.0);
    rows.resize(nlat);
    for (int j = 0; j < nlat; ++j) rows[j] = grid.data() + int64_t(j) * nlon;
  }
};

template <typename T>
void load_coeffs(const T* c, int L, Work& w, int v) {
  double* cA = w.cA.data() + v * w.tsize;
  double* cAs = w.cAs.data() + v * w.tsize;
  double* cB = w.cB.data() + v * w.tsize;
  double* cBs = w.cBs.data() + v * w.tsize;
  for (int m = 0; m <= L; ++m) {
    const int64_t off = legendre_offset(L, m);
    for (int l = m; l <= L; ++l) {
      const double sign = ((l - m) & 1) ? -1.0 : 1.0;
      const double a = double(c[int64_t(l) * l + l + m]);
      const double b = m ? double(c[int64_t(l) * l + l - m]) : 0.0;
      cA[off + l - m] = a;
      cAs[off + l - m] = sign * a;
      cB[off + l - m] = b;
      cBs[off + l - m] = sign * b;
    }
  }
}

// Ring sums A, B of the first nb vectors of the block, every northern ring and its mirror.
LOCDIFF_CLONES void legendre_sums(int L, const RingGrid& g, Work& w, int nb) {
  const int nhalf = w.nhalf;
  for (int m = 0; m <= L; ++m) {
    const int n = L + 1 - m;
    const int64_t off = legendre_offset(L, m);
    const double* __restrict block = g.table + int64_t(nhalf) * off;
    for (int j = 0; j < nhalf; ++j) {
      const double* __restrict p = block + int64_t(j) * n;
      for (int v = 0; v < nb; ++v) {
        const double* __restrict a = w.cA.data() + v * w.tsize + off;
        const double* __restrict as = w.cAs.data() + v * w.tsize + off;
        const double* __restrict b = w.cB.data() + v * w.tsize + off;
        const double* __restrict bs = w.cBs.data() + v * w.tsize + off;
        double an = 0, asum = 0, bn = 0, bsum = 0;
#pragma omp simd reduction(+ : an, asum, bn, bsum)
        for (int i = 0; i < n; ++i) {
          an += p[i] * a[i];
          asum += p[i] * as[i];
          bn += p[i] * b[i];
          bsum += p[i] * bs[i];
        }
        const int64_t o = v * w.rsize + int64_t(j) * (L + 1) + m;
        w.AN[o] = an;
        w.AS[o] = asum;
        w.BN[o] = bn;
        w.BS[o] = bsum;
      }
    }
  }
}

// f of vector v of the block on the whole grid: one complex FFT per ring pair.
LOCDIFF_CLONES void fourier_synth(int L, const RingGrid& g, const FftPlan& plan, Work& w, int v, double* f) {
  const int N = g.nlon, nlat = g.nlat;
  for (int j = 0; j < w.nhalf; ++j) {
    const int js = nlat - 1 - j;
    const bool pair = js != j;
    double* zr = w.zr.data();
    double* zi = w.zi.data();
    std::fill(zr, zr + N, 0.0);
    std::fill(zi, zi + N, 0.0);
    const int64_t o = v * w.rsize + int64_t(j) * (L + 1);
    const double* AN = w.AN.data() + o;
    const double* AS = w.AS.data() + o;
    const double* BN = w.BN.data() + o;
    const double* BS = w.BS.data() + o;
    zr[0] += AN[0];
    if (pair) zi[0] += AS[0];
    for (int m = 1; m <= L; ++m) {
      // G_m = (A - iB)/2 * exp(i m lon0); G_-m = conj(G_m).
      const double c = w.pc[m], s = w.ps[m];
      const double nr = 0.5 * (AN[m] * c + BN[m] * s), ni = 0.5 * (AN[m] * s - BN[m] * c);
      double sr = 0, si = 0;
      if (pair) {
        sr = 0.5 * (AS[m] * c + BS[m] * s);
        si = 0.5 * (AS[m] * s - BS[m] * c);
      }
      const int bp = m % N, bm = (N - bp) % N;
      // Z = G_N + i G_S at +m, conj(G_N) + i conj(G_S) at -m.
      zr[bp] += nr - si;
      zi[bp] += ni + sr;
      zr[bm] += nr + si;
      zi[bm] += -ni + sr;
    }
    fft<double>(plan, zr, zi, +1, w.tmp.data());
    std::copy(zr, zr + N, f + int64_t(j) * N);
    if (pair) std::copy(zi, zi + N, f + int64_t(js) * N);
  }
}

// Loads up to kBlock coefficient vectors (rows[v]) and runs the Legendre stage on them.
template <typename T>
void legendre_block(const T* const* rows, int nb, int L, const RingGrid& g, Work& w) {
  for (int v = 0; v < nb; ++v) load_coeffs(rows[v], L, w, v);
  legendre_sums(L, g, w, nb);
}

// Adjoint, per vector v of the block: spectra of the weight grid wgt (forward FFT per ring
// pair) into AN.. (cos / sin parts).
LOCDIFF_CLONES void fourier_adjoint(const double* wgt, int L, const RingGrid& g, const FftPlan& plan, Work& w, int v) {
  const int N = g.nlon, nlat = g.nlat, nhalf = w.nhalf;
  for (int j = 0; j < nhalf; ++j) {
    const int js = nlat - 1 - j;
    const bool pair = js != j;
    double* zr = w.zr.data();
    double* zi = w.zi.data();
    std::copy(wgt + int64_t(j) * N, wgt + int64_t(j + 1) * N, zr);
    if (pair) {
      std::copy(wgt + int64_t(js) * N, wgt + int64_t(js + 1) * N, zi);
    } else {
      std::fill(zi, zi + N, 0.0);
    }
    fft<double>(plan, zr, zi, -1, w.tmp.data());
    const int64_t o = v * w.rsize + int64_t(j) * (L + 1);
    double* RN = w.AN.data() + o;
    double* RS = w.AS.data() + o;
    double* IN = w.BN.data() + o;
    double* IS = w.BS.data() + o;
    for (int m = 0; m <= L; ++m) {
      const int bp = m % N, bm = (N - bp) % N;
      const double xr = zr[bp], xi = zi[bp], yr = zr[bm], yi = -zi[bm];  // X[m], conj(X[-m])
      // W_N = (X + conj X[-m]) / 2, W_S = (X - conj X[-m]) / (2i); V = exp(-i m lon0) W.
      const double wnr = 0.5 * (xr + yr), wni = 0.5 * (xi + yi);
      const double wsr = 0.5 * (xi - yi), wsi = -0.5 * (xr - yr);
      const double c = w.pc[m], s = w.ps[m];
      const double vnr = wnr * c + wni * s, vni = wni * c - wnr * s;
      const double vsr = wsr * c + wsi * s, vsi = wsi * c - wsr * s;
      // sum_k w cos(m phi_k) = Re V, sum_k w sin(m phi_k) = -Im V.
      RN[m] = vnr;
      IN[m] = -vni;
      RS[m] = pair ? vsr : 0.0;
      IS[m] = pair ? -vsi : 0.0;
    }
  }
}

// Transposed Legendre sums of the first nb vectors of the block (spectra from
// fourier_adjoint) into out[v] (K each).
template <typename T>
LOCDIFF_CLONES void legendre_adjoint(int L, const RingGrid& g, Work& w, int nb, T* const* out) {
  const int nhalf = w.nhalf;
  for (auto* vec : {&w.cA, &w.cAs, &w.cB, &w.cBs}) std::fill(vec->begin(), vec->begin() + nb * w.tsize, 0.0);
  for (int m = 0; m <= L; ++m) {
    const int n = L + 1 - m;
    const int64_t off = legendre_offset(L, m);
    const double* __restrict block = g.table + int64_t(nhalf) * off;
    for (int j = 0; j < nhalf; ++j) {
      const double* __restrict p = block + int64_t(j) * n;
      for (int v = 0; v < nb; ++v) {
        double* __restrict a = w.cA.data() + v * w.tsize + off;
        double* __restrict as = w.cAs.data() + v * w.tsize + off;
        double* __restrict b = w.cB.data() + v * w.tsize + off;
        double* __restrict bs = w.cBs.data() + v * w.tsize + off;
        const int64_t o = v * w.rsize + int64_t(j) * (L + 1) + m;
        const double rn = w.AN[o], rs = w.AS[o], in = w.BN[o], is = w.BS[o];
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          a[i] += p[i] * rn;
          as[i] += p[i] * rs;
          b[i] += p[i] * in;
          bs[i] += p[i] * is;
        }
      }
    }
  }
  for (int v = 0; v < nb; ++v) {
    const double* a = w.cA.data() + v * w.tsize;
    const double* as = w.cAs.data() + v * w.tsize;
    const double* b = w.cB.data() + v * w.tsize;
    const double* bs = w.cBs.data() + v * w.tsize;
    T* o = out[v];
    for (int m = 0; m <= L; ++m) {
      const int64_t off = legendre_offset(L, m);
      for (int l = m; l <= L; ++l) {
        const double sign = ((l - m) & 1) ? -1.0 : 1.0;
        o[int64_t(l) * l + l + m] = T(a[off + l - m] + sign * as[off + l - m]);
        if (m) o[int64_t(l) * l + l - m] = T(b[off + l - m] + sign * bs[off + l - m]);
      }
    }
  }
}

// Up to ncand grid local maxima of one vector's f, best first (see shdd_kernels.h). rows[j]:
// ring j's nlon values (the caller's layout may fold the southern rings elsewhere).
//
// An SHDD vector's f oscillates over the whole sphere (ring-shaped side lobes): at L = 16
// the 24 x 64 grid holds about 95 local maxima, 1300 at L = 64, on every ring. So the scan
// is three branch-light passes instead of a search point by point: (1) per ring, the eight
// neighbour tests run vectorised across the ring and leave f at the local maxima, -inf
// elsewhere (`masked`), then the maximum of each of 8 strided chunks... per chunk of the
// ring (chunk c: columns c, c + nch, ..., so the chunk maxima are an elementwise max of 8
// slices); (2) a floor that at least ncand chunk maxima reach, by bisection with
// vectorised counts (distinct chunks hold distinct maxima, so the answer is above it);
// (3) only chunks reaching the floor are searched, and the few maxima found are sorted.
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
    cpu::Double4 acc = cpu::splat4(0.0);
    int k = 0;
    for (; k + 4 <= N; k += 4) {
      const cpu::Double4 v = cpu::exp4(cpu::load4(row + k) * inv_t + b);
      if (out) cpu::store4(out + k, v);
      acc += v;
    }
    sum += (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (; k < N; ++k) {
      const double v = cpu::exp1(row[k] * inv_t + b);
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

// Synthesises f on the grid for every coefficient vector, in parallel blocks of kBlock
// vectors (one Legendre pass per block), and calls visit(w, b) with vector b's values in the
// thread's Work (w.grid, w.rows). make_visitor() runs once per thread, so a visitor can keep
// its own scratch.
template <typename T, class MakeVisitor>
void for_each_synthesis(const T* coeffs, int64_t batch, int degree, const RingGrid& grid,
                        int num_threads, MakeVisitor make_visitor) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree);
  const int64_t nblocks = (batch + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
    auto visit = make_visitor();
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kBlock;
      const int nb = int(std::min<int64_t>(kBlock, batch - b0));
      const T* rows[kBlock];
      for (int v = 0; v < nb; ++v) rows[v] = coeffs + K * (b0 + v);
      legendre_block(rows, nb, degree, grid, w);
      for (int v = 0; v < nb; ++v) {
        fourier_synth(degree, grid, *plan, w, v, w.grid.data());
        visit(w, b0 + v);
      }
    }
  }
}

// The SHDD-KL pairs (pred b, target b) in parallel blocks of kBlock / 2 pairs: one Legendre
// pass per block for both vectors of every pair, whose ring sums land in slots 2s (pred
// b0 + s) and 2s + 1 (target b0 + s); then visit(w, plan, b0, ns). make_visitor() runs once
// per thread, so a visitor can keep its own scratch.
template <typename T, class MakeVisitor>
void for_each_pair_block(const T* pred, const T* target, int64_t batch, int degree, const RingGrid& grid,
                         int num_threads, MakeVisitor make_visitor) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree);
  constexpr int kPairs = kBlock / 2;
  const int64_t nblocks = (batch + kPairs - 1) / kPairs;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
    w.grid2.assign(int64_t(grid.nlat) * grid.nlon, 0.0);
    auto visit = make_visitor();
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kPairs;
      const int ns = int(std::min<int64_t>(kPairs, batch - b0));
      const T* rows[kBlock];
      for (int s = 0; s < ns; ++s) {
        rows[2 * s] = pred + K * (b0 + s);
        rows[2 * s + 1] = target + K * (b0 + s);
      }
      legendre_block(rows, 2 * ns, degree, grid, w);
      visit(w, *plan, b0, ns);
    }
  }
}

// f of pair s of the block: pred into w.grid, target into w.grid2.
void synth_pair(int L, const RingGrid& g, const FftPlan& plan, Work& w, int s) {
  fourier_synth(L, g, plan, w, 2 * s, w.grid.data());
  fourier_synth(L, g, plan, w, 2 * s + 1, w.grid2.data());
}

// The SHDD-KL on the lane engine (ring_lanes.h), for grids of at most kLaneGridMax
// values (the log-partition too; larger grids take the per-vector engine, one grid per thread): blocks of kLanes pairs, the block's pred and target grids in the thread's scratch
// (2 kLanes float64 grids: 12 MB at L = 128), the backward weights written over them, then
// one adjoint pass per gradient asked for. kl, grad_pred, grad_target: null when not wanted.
constexpr int64_t kLaneGridMax = int64_t(1) << 17;

template <typename T>
void kl_lanes(const T* pred, const T* target, const T* grad_kl, int64_t batch, int degree, const RingGrid& grid,
              double inv_t, T* kl, T* grad_pred, T* grad_target, int num_threads) {
  constexpr int kL = cpu::kLanes;
  const int64_t K = sh_size(degree), G = int64_t(grid.nlat) * grid.nlon;
  cpu::for_each_lane_block<double>(batch, degree, grid, num_threads, false, [&] {
    return [&, fp = std::vector<double>(kL * G), ft = std::vector<double>(kL * G), ks = KlScratch()](
               cpu::LaneWork<double>& w, const FftPlan& plan, int64_t b0, int nb) mutable {
      const T* rows[kL];
      double* grids[2][kL];
      for (int v = 0; v < nb; ++v) {
        grids[0][v] = fp.data() + v * G;
        grids[1][v] = ft.data() + v * G;
      }
      for (int side = 0; side < 2; ++side) {
        for (int v = 0; v < nb; ++v) rows[v] = (side ? target : pred) + K * (b0 + v);
        cpu::synth_lanes<double>(rows, nb, grid, plan, w, grids[side]);
      }
      for (int v = 0; v < nb; ++v) {
        const double scale = grad_kl ? double(grad_kl[b0 + v]) : 1.0;
        const double value = kl_pair(grids[0][v], grids[1][v], grid, inv_t, scale, grad_pred ? grids[0][v] : nullptr,
                                     grad_target ? grids[1][v] : nullptr, ks);
        if (kl) kl[b0 + v] = T(value);
      }
      for (int side = 0; side < 2; ++side) {
        T* grad = side ? grad_target : grad_pred;
        if (!grad) continue;
        T* outs[kL];
        for (int v = 0; v < nb; ++v) outs[v] = grad + K * (b0 + v);
        cpu::adjoint_lanes<double>(grids[side], nb, grid, plan, w, outs);
      }
    };
  });
}

}  // namespace

// ---- entry points ------------------------------------------------------------------------
// Each parallelises over blocks of vectors (kBlock, or kBlock / 2 pairs for the KL).

template <typename T>
void shdd_synth_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid, T* out,
                    int num_threads) {
  const int64_t G = int64_t(grid.nlat) * grid.nlon;
  cpu::synthesise_lanes<T>(coeffs, batch, degree, grid, num_threads, [&](int64_t b) { return out + G * b; });
}

template <typename T>
void shdd_adjoint_cpu(const T* weights, int64_t batch, int degree, const RingGrid& grid,
                      T* out_coeffs, int num_threads) {
  // float64 lanes whatever T: each coefficient sums over the whole grid.
  const int64_t K = sh_size(degree), G = int64_t(grid.nlat) * grid.nlon;
  cpu::for_each_lane_block<double>(batch, degree, grid, num_threads, false, [&] {
    return [&](cpu::LaneWork<double>& w, const FftPlan& plan, int64_t b0, int nb) {
      const T* wgt[cpu::kLanes];
      T* outs[cpu::kLanes];
      for (int v = 0; v < nb; ++v) {
        wgt[v] = weights + G * (b0 + v);
        outs[v] = out_coeffs + K * (b0 + v);
      }
      cpu::adjoint_lanes<double>(wgt, nb, grid, plan, w, outs);
    };
  });
}

template <typename T>
void shdd_candidates_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid,
                         int ncand, int64_t* index, double* value, double* start,
                         int num_threads) {
  cpu::for_each_synthesis_lanes<T>(coeffs, batch, degree, grid, num_threads, [&] {
    return [&, scratch = ScanScratch<T>()](const T*, const T* const* rows, int64_t b) mutable {
      const int64_t o = b * ncand;
      scan_candidates(rows, grid, ncand, scratch, index + o, value + o, start + 2 * o);
    };
  });
}

template <typename T>
void shdd_scan_cpu(const T* f, int64_t batch, const RingGrid& grid, bool folded, int ncand,
                   int64_t* index, double* value, double* start, int num_threads) {
  if (batch <= 0) return;
  const int N = grid.nlon, nlat = grid.nlat, nhalf = (nlat + 1) / 2;
  const int64_t G = int64_t(folded ? 2 * nhalf : nlat) * N;
#pragma omp parallel num_threads(threads(num_threads, batch / 4 + 1))
  {
    ScanScratch<T> scratch;
    std::vector<const T*> rows(nlat);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      for (int j = 0; j < nlat; ++j) {
        const int r = !folded || j < nhalf ? j : nhalf + (nlat - 1 - j);
        rows[j] = f + G * b + int64_t(r) * N;
      }
      scan_candidates(rows.data(), grid, ncand, scratch, index + b * ncand, value + b * ncand,
                      start + 2 * b * ncand);
    }
  }
}

template <typename T>
void shdd_logz_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid,
                   double inv_temperature, double* out, int num_threads) {
  if (int64_t(grid.nlat) * grid.nlon <= kLaneGridMax) {
    cpu::for_each_synthesis_lanes<double>(coeffs, batch, degree, grid, num_threads, [&] {
      return [&](const double* f, const double* const*, int64_t b) { out[b] = log_partition(f, grid, inv_temperature); };
    });
    return;
  }
  for_each_synthesis(coeffs, batch, degree, grid, num_threads, [&] {
    return [&](Work& w, int64_t b) { out[b] = log_partition(w.grid.data(), grid, inv_temperature); };
  });
}

template <typename T>
void shdd_kl_fwd_cpu(const T* pred, const T* target, int64_t batch, int degree,
                     const RingGrid& grid, double inv_temperature, T* kl, int num_threads) {
  if (int64_t(grid.nlat) * grid.nlon <= kLaneGridMax)
    return kl_lanes(pred, target, static_cast<const T*>(nullptr), batch, degree, grid, inv_temperature, kl,
                    static_cast<T*>(nullptr), static_cast<T*>(nullptr), num_threads);
  for_each_pair_block(pred, target, batch, degree, grid, num_threads, [&] {
    return [&, ks = KlScratch()](Work& w, const FftPlan& plan, int64_t b0, int ns) mutable {
      for (int s = 0; s < ns; ++s) {
        synth_pair(degree, grid, plan, w, s);
        kl[b0 + s] = T(kl_pair(w.grid.data(), w.grid2.data(), grid, inv_temperature, 1.0, nullptr, nullptr, ks));
      }
    };
  });
}

template <typename T>
void shdd_kl_bwd_cpu(const T* pred, const T* target, const T* grad_kl, int64_t batch,
                     int degree, const RingGrid& grid, double inv_temperature, T* grad_pred,
                     T* grad_target, int num_threads) {
  if (!grad_pred && !grad_target) return;
  const int64_t K = sh_size(degree), G = int64_t(grid.nlat) * grid.nlon;
  if (G <= kLaneGridMax)
    return kl_lanes(pred, target, grad_kl, batch, degree, grid, inv_temperature, static_cast<T*>(nullptr),
                    grad_pred, grad_target, num_threads);
  for_each_pair_block(pred, target, batch, degree, grid, num_threads, [&] {
    return [&, wp = std::vector<double>(grad_pred ? G : 0),
            wt = std::vector<double>(grad_target ? G : 0), ks = KlScratch()](Work& w, const FftPlan& plan, int64_t b0,
                                                           int ns) mutable {
      // Pair s reads ring sums from slots 2s, 2s+1, then writes its adjoint spectra to the
      // next free slots, which are never beyond 2s+1: a slot is overwritten only once read.
      T* outs[kBlock];
      int na = 0;
      for (int s = 0; s < ns; ++s) {
        synth_pair(degree, grid, plan, w, s);
        kl_pair(w.grid.data(), w.grid2.data(), grid, inv_temperature, double(grad_kl[b0 + s]),
                grad_pred ? wp.data() : nullptr, grad_target ? wt.data() : nullptr, ks);
        if (grad_pred) {
          fourier_adjoint(wp.data(), degree, grid, plan, w, na);
          outs[na++] = grad_pred + K * (b0 + s);
        }
        if (grad_target) {
          fourier_adjoint(wt.data(), degree, grid, plan, w, na);
          outs[na++] = grad_target + K * (b0 + s);
        }
      }
      legendre_adjoint(degree, grid, w, na, outs);
    };
  });
}

template <typename T>
void shdd_kl_grad_cpu(const T* pred, const T* target, int64_t batch, int degree, const RingGrid& grid,
                      double inv_temperature, T* kl, T* grad_pred, T* grad_target, int num_threads) {
  if (int64_t(grid.nlat) * grid.nlon <= kLaneGridMax)
    return kl_lanes(pred, target, static_cast<const T*>(nullptr), batch, degree, grid, inv_temperature, kl,
                    grad_pred, grad_target, num_threads);
  shdd_kl_fwd_cpu(pred, target, batch, degree, grid, inv_temperature, kl, num_threads);
  const std::vector<T> ones(size_t(std::max<int64_t>(batch, 0)), T(1));
  shdd_kl_bwd_cpu(pred, target, ones.data(), batch, degree, grid, inv_temperature, grad_pred, grad_target,
                  num_threads);
}

void shdd_legendre_table_cpu(const double* theta, int nhalf, int degree, double* out,
                             int num_threads) {
  if (nhalf <= 0) return;
  const auto tables = tables_for(degree);
  const int L = degree;
#pragma omp parallel num_threads(threads(num_threads, nhalf))
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int j = 0; j < nhalf; ++j) {
      const double s = std::sin(theta[j]), z = std::cos(theta[j]);
      sc.resize(L);
      seeds(std::fabs(s), z, L, *tables, sc);
      double* x1 = sc.x1.data();
      double* x2 = sc.x2.data();
      size_t next = 0;
      for (int l = 0; l <= L; ++l) {
        const double* a = tables->a.data() + tri(l);
        const double* b = tables->b.data() + tri(l);
        for (int m = 0; m < l; ++m) x2[m] = a[m] * z * x1[m] - b[m] * x2[m];
        x2[l] = sc.diag[l];
        while (next < sc.injections.size() && sc.injections[next].l == l) {
          const cpu::Injection& in = sc.injections[next++];
          x2[in.m] = in.value;
          x1[in.m] = in.previous;
        }
        std::swap(x1, x2);
        // P_lm = s R_lm; sqrt(2) folded in for m > 0.
        for (int m = 0; m <= l; ++m)
          out[int64_t(nhalf) * legendre_offset(L, m) + int64_t(j) * (L + 1 - m) + (l - m)] =
              m ? kSqrt2 * std::fabs(s) * x1[m] : x1[0];
      }
    }
  }
}

#define LOCDIFF_INSTANTIATE(T)                                                                  \
  template void shdd_synth_cpu<T>(const T*, int64_t, int, const RingGrid&, T*, int);           \
  template void shdd_adjoint_cpu<T>(const T*, int64_t, int, const RingGrid&, T*, int);         \
  template void shdd_candidates_cpu<T>(const T*, int64_t, int, const RingGrid&, int, int64_t*, \
                                       double*, double*, int);                                 \
  template void shdd_logz_cpu<T>(const T*, int64_t, int, const RingGrid&, double, double*, int); \
  template void shdd_kl_fwd_cpu<T>(const T*, const T*, int64_t, int, const RingGrid&, double,  \
                                   T*, int);                                                   \
  template void shdd_kl_bwd_cpu<T>(const T*, const T*, const T*, int64_t, int, const RingGrid&, \
                                   double, T*, T*, int);                                       \
  template void shdd_kl_grad_cpu<T>(const T*, const T*, int64_t, int, const RingGrid&, double, T*, T*, T*, \
                                    int);                                                        \
  template void shdd_scan_cpu<T>(const T*, int64_t, const RingGrid&, bool, int, int64_t*,       \
                                 double*, double*, int);
LOCDIFF_INSTANTIATE(float)
LOCDIFF_INSTANTIATE(double)
#undef LOCDIFF_INSTANTIATE

}  // namespace locdiff
