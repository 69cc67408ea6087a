// SHDD kernels on the CPU: ring-grid synthesis and its adjoint, mode candidates,
// log-partition, the SHDD-KL loss and backward. (f at points and the Newton refinement:
// shdd_point_cpu.cpp; the synthesis in SIMD lanes: ring_lanes.h; the local-maximum scan:
// grid_scan.h; softmax and KL of one pair: ring_softmax.h.)
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
#include <limits>
#include <vector>

#include "fft.h"
#include "grid_scan.h"
#include "legendre_tables.h"
#include "ring_lanes.h"
#include "ring_softmax.h"
#include "locdiff/sh_math.h"
#include "locdiff/shdd_kernels.h"

namespace locdiff {
namespace {

using cpu::fft;
using cpu::fft_plan;
using cpu::FftPlan;
using cpu::kl_pair;
using cpu::KlScratch;
using cpu::log_partition;
using cpu::scan_candidates;
using cpu::ScanScratch;
using cpu::Scratch;
using cpu::seeds;
using cpu::tables_for;
using cpu::threads;
using cpu::tri;


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
