// SHDD kernels on the CPU: ring-grid synthesis and its adjoint, mode candidates,
// log-partition, the SHDD-KL loss and backward, point evaluation with gradient.
//
// Work layout. OpenMP over coefficient vectors; each thread keeps one vector's grid in
// scratch (nlat * nlon doubles, 12 MB at L = 512), so no batch x grid matrix is ever
// allocated. Per vector: (1) reorder the coefficients m-major, with a copy whose odd l-m
// entries are negated (the southern mirror ring), (2) per order m, dot the Legendre block
// of each northern ring with the four coefficient columns (cos/sin x north/south): this
// is the O(L^3) part and streams the table once per vector, (3) per ring pair, one complex
// inverse FFT of (north + i south) gives both rings. The adjoint runs the same steps
// backwards (forward FFT, then transposed Legendre sums).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "locdiff/sh_math.h"
#include "locdiff/shdd_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LOCDIFF_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define LOCDIFF_CLONES
#endif

namespace locdiff {
namespace {

constexpr double kPi = 3.14159265358979323846;

// ---- FFT ---------------------------------------------------------------------------------
// Iterative radix-2 complex FFT on split re/im arrays for power-of-two sizes; other sizes
// use a direct O(n^2) DFT (correct, slow: grids from locdiff.grids use powers of two).
struct FftPlan {
  int n = 0;
  bool pow2 = false;
  std::vector<int> rev;
  std::vector<double> c, s;  // cos, sin(2 pi k / n), k < n
};

std::shared_ptr<const FftPlan> fft_plan(int n) {
  static std::mutex mutex;
  static std::map<int, std::shared_ptr<const FftPlan>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(n);
  if (it != cache.end()) return it->second;
  auto p = std::make_shared<FftPlan>();
  p->n = n;
  p->pow2 = n > 0 && (n & (n - 1)) == 0;
  p->c.resize(n);
  p->s.resize(n);
  for (int k = 0; k < n; ++k) {
    p->c[k] = std::cos(2 * kPi * k / n);
    p->s[k] = std::sin(2 * kPi * k / n);
  }
  if (p->pow2) {
    int bits = 0;
    while ((1 << bits) < n) ++bits;
    p->rev.resize(n);
    for (int k = 0; k < n; ++k) {
      int r = 0;
      for (int b = 0; b < bits; ++b) r |= ((k >> b) & 1) << (bits - 1 - b);
      p->rev[k] = r;
    }
  }
  cache[n] = p;
  return p;
}

// In place: x_k <- sum_j x_j exp(sign * 2 pi i j k / n). tmp: 2n doubles of scratch.
void fft(const FftPlan& p, double* re, double* im, int sign, double* tmp) {
  const int n = p.n;
  if (!p.pow2) {
    double* tr = tmp;
    double* ti = tmp + n;
    for (int k = 0; k < n; ++k) {
      double ar = 0, ai = 0;
      int64_t idx = 0;
      for (int j = 0; j < n; ++j) {
        const double c = p.c[idx], s = sign * p.s[idx];
        ar += re[j] * c - im[j] * s;
        ai += re[j] * s + im[j] * c;
        idx += k;
        if (idx >= n) idx -= n;
      }
      tr[k] = ar;
      ti[k] = ai;
    }
    std::copy(tr, tr + n, re);
    std::copy(ti, ti + n, im);
    return;
  }
  for (int k = 0; k < n; ++k) {
    const int r = p.rev[k];
    if (r > k) {
      std::swap(re[k], re[r]);
      std::swap(im[k], im[r]);
    }
  }
  for (int len = 2; len <= n; len <<= 1) {
    const int half = len >> 1, stride = n / len;
    for (int start = 0; start < n; start += len) {
      double* __restrict ar = re + start;
      double* __restrict ai = im + start;
      double* __restrict br = re + start + half;
      double* __restrict bi = im + start + half;
      for (int j = 0; j < half; ++j) {
        const double wr = p.c[j * stride], wi = sign * p.s[j * stride];
        const double xr = br[j] * wr - bi[j] * wi, xi = br[j] * wi + bi[j] * wr;
        br[j] = ar[j] - xr;
        bi[j] = ai[j] - xi;
        ar[j] += xr;
        ai[j] += xi;
      }
    }
  }
}

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
void fourier_synth(int L, const RingGrid& g, const FftPlan& plan, Work& w, int v, double* f) {
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
    fft(plan, zr, zi, +1, w.tmp.data());
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
void fourier_adjoint(const double* wgt, int L, const RingGrid& g, const FftPlan& plan, Work& w, int v) {
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
    fft(plan, zr, zi, -1, w.tmp.data());
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

// log sum_i exp(v_i) with v_i = f_i * inv_t + log_area(ring).
double log_partition(const double* f, const RingGrid& g, double inv_t) {
  const int N = g.nlon;
  double mx = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < g.nlat; ++j) {
    const double la = g.log_area[j];
    const double* row = f + int64_t(j) * N;
    double rmax = row[0];
    for (int k = 1; k < N; ++k) rmax = std::max(rmax, row[k]);
    mx = std::max(mx, rmax * inv_t + la);
  }
  double sum = 0;
  for (int j = 0; j < g.nlat; ++j) {
    const double la = g.log_area[j];
    const double* row = f + int64_t(j) * N;
    double rs = 0;
    for (int k = 0; k < N; ++k) rs += std::exp(row[k] * inv_t + la - mx);
    sum += rs;
  }
  return mx + std::log(sum);
}

// ---- point evaluation (recurrence of sh_cpu.cpp, fused with the dot product) ----------
inline int64_t tri(int l) { return int64_t(l) * (l + 1) / 2; }

struct Tables {
  int degree = -1;
  std::vector<double> a, b, dz, seed_ratio;
};

std::shared_ptr<const Tables> tables_for(int degree) {
  static std::mutex mutex;
  static std::shared_ptr<const Tables> cached;
  std::lock_guard<std::mutex> lock(mutex);
  if (cached && cached->degree >= degree) return cached;
  auto t = std::make_shared<Tables>();
  const int L = degree;
  t->degree = L;
  t->a.assign(tri(L + 1), 0.0);
  t->b.assign(tri(L + 1), 0.0);
  t->dz.assign(tri(L + 1), 0.0);
  t->seed_ratio.assign(L + 1, 0.0);
  for (int l = 0; l <= L; ++l) {
    for (int m = 0; m <= l; ++m) {
      const int64_t i = tri(l) + m;
      if (m + 2 <= l) {
        t->a[i] = sh_rec_a(l, m);
        t->b[i] = sh_rec_b(l, m);
      } else if (m + 1 == l) {
        t->a[i] = std::sqrt(2.0 * l + 1.0);
      }
      t->dz[i] = (m == 0 ? 1.0 : kSqrt2) * sh_dz_factor(l, m);
    }
    if (l >= 1) t->seed_ratio[l] = sh_seed_ratio(l);
  }
  cached = t;
  return cached;
}

struct Injection {
  int l, m;
  double value, previous;
};

struct EvalScratch {
  std::vector<double> x1, x2, cs, sn, c1, s1, wx, wy, diag;
  std::vector<Injection> injections;
  void resize(int L) {
    const size_t n = size_t(L) + 2;
    for (auto* v : {&x1, &x2, &cs, &sn, &c1, &s1, &wx, &wy, &diag}) v->assign(n, 0.0);
    injections.clear();
  }
};

// Seeds R_mm of every column; columns whose seed underflows run in scaled arithmetic until
// representable and are injected at that degree (as in sh_cpu.cpp).
void seeds(double s, double z, int L, const Tables& t, EvalScratch& sc) {
  double* diag = sc.diag.data();
  diag[0] = kInvSqrt4Pi;
  if (L == 0) return;
  diag[1] = t.seed_ratio[1] * kInvSqrt4Pi;
  const double floor = std::ldexp(1.0, -SEED_FLOOR_BITS);
  int m = 2;
  for (; m <= L; ++m) {
    const double v = diag[m - 1] * t.seed_ratio[m] * s;
    if (v < floor) break;
    diag[m] = v;
  }
  if (m > L || s == 0.0) return;
  const double up = std::ldexp(1.0, SCALE_BITS), down = std::ldexp(1.0, -SCALE_BITS);
  const double out_floor = std::ldexp(1.0, -OUTPUT_FLOOR_BITS);
  double mant = diag[m - 1];
  int e = 0;
  for (; m <= L; ++m) {
    mant *= t.seed_ratio[m] * s;
    while (mant < down) {
      mant *= up;
      --e;
    }
    diag[m] = 0.0;
    double prev = 0.0, cur = mant;
    int ec = e;
    for (int l = m; l <= L; ++l) {
      if (l > m) {
        const int64_t i = tri(l) + m;
        const double next = t.a[i] * z * cur - t.b[i] * prev;
        prev = cur;
        cur = next;
        if (std::fabs(cur) > up) {
          cur *= down;
          prev *= down;
          ++ec;
        }
      }
      if (ec >= -4) {
        const double v = std::ldexp(cur, SCALE_BITS * ec);
        if (std::fabs(v) >= out_floor) {
          sc.injections.push_back({l, m, v, std::ldexp(prev, SCALE_BITS * ec)});
          break;
        }
      }
    }
  }
  std::sort(sc.injections.begin(), sc.injections.end(),
            [](const Injection& p, const Injection& q) { return p.l < q.l; });
}

template <typename T>
LOCDIFF_CLONES void eval_point(const T* c, int L, const Tables& t, const double* r,
                               EvalScratch& sc, double* value, double* grad) {
  const double big = std::max(std::fabs(r[0]), std::max(std::fabs(r[1]), std::fabs(r[2])));
  const double xs = r[0] / big, ys = r[1] / big, zs = r[2] / big;
  const double norm = std::sqrt(xs * xs + ys * ys + zs * zs);
  const double ux = xs / norm, uy = ys / norm, uz = zs / norm, us = std::hypot(ux, uy);
  const double inv_norm = 1.0 / (norm * big);
  sc.resize(L);
  double c1 = 1.0, s1 = 0.0;
  if (us > 0) {
    c1 = ux / us;
    s1 = uy / us;
  }
  sc.c1[0] = 1.0;
  sc.s1[0] = 0.0;
  for (int m = 1; m <= L; ++m) {
    sc.c1[m] = sc.c1[m - 1] * c1 - sc.s1[m - 1] * s1;
    sc.s1[m] = sc.s1[m - 1] * c1 + sc.c1[m - 1] * s1;
  }
  for (int m = 0; m <= L; ++m) {
    sc.cs[m] = kSqrt2 * us * sc.c1[m];
    sc.sn[m] = kSqrt2 * us * sc.s1[m];
  }
  for (int m = 1; m <= L; ++m) {
    sc.wx[m] = kSqrt2 * m * sc.c1[m - 1];
    sc.wy[m] = kSqrt2 * m * sc.s1[m - 1];
  }
  seeds(us, uz, L, t, sc);
  double* x1 = sc.x1.data();
  double* x2 = sc.x2.data();
  size_t next = 0;
  double f = 0, gx = 0, gy = 0, gz = 0;
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
        const Injection& in = sc.injections[next++];
        p2[in.m] = in.value;
        p1[in.m] = in.previous;
      }
      std::swap(x1, x2);
    }
    const T* __restrict g = c + int64_t(l) * l + l;
    const double* __restrict x = x1;
    const double* __restrict cs = sc.cs.data();
    const double* __restrict sn = sc.sn.data();
    const double* __restrict wx = sc.wx.data();
    const double* __restrict wy = sc.wy.data();
    const double* __restrict cc = sc.c1.data();
    const double* __restrict ss = sc.s1.data();
    const double* __restrict dz = t.dz.data() + tri(l);
    double fl = double(g[0]) * x[0];
    double ax = 0, ay = 0, az = l ? dz[0] * double(g[0]) * x[1] : 0.0;
#pragma omp simd reduction(+ : fl, ax, ay, az)
    for (int m = 1; m <= l; ++m) {
      const double gp = double(g[m]), gm = double(g[-m]);
      fl += x[m] * (gp * cs[m] + gm * sn[m]);
      ax += x[m] * (gp * wx[m] + gm * wy[m]);
      ay += x[m] * (gm * wx[m] - gp * wy[m]);
      az += dz[m] * x[m + 1] * (gp * cc[m] + gm * ss[m]);
    }
    f += fl;
    gx += ax;
    gy += ay;
    gz += az;
  }
  *value = f;
  if (grad) {
    const double radial = gx * ux + gy * uy + gz * uz;
    grad[0] = (gx - radial * ux) * inv_norm;
    grad[1] = (gy - radial * uy) * inv_norm;
    grad[2] = (gz - radial * uz) * inv_norm;
  }
}

int threads(int requested, int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(std::max(1, requested), work)));
}


// Up to ncand grid local maxima of one vector's f, best first (see shdd_kernels.h).
void scan_candidates(const double* f, const RingGrid& grid, int ncand, std::vector<double>& best_v,
                     std::vector<int64_t>& best_i, int64_t* index, double* value, double* start) {
  const int N = grid.nlon, nlat = grid.nlat, half = N / 2;
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
    k %= N;
    if (k < 0) k += N;
    return f[int64_t(j) * N + k];
  };
  int count = 0;
  for (int j = 0; j < nlat; ++j) {
    for (int k = 0; k < N; ++k) {
      const double v = f[int64_t(j) * N + k];
      if (count == ncand && v <= best_v[ncand - 1]) continue;
      bool peak = true;
      for (int dj = -1; dj <= 1 && peak; ++dj)
        for (int dk = -1; dk <= 1; ++dk) {
          if ((dj || dk) && at(j + dj, k + dk) > v) {
            peak = false;
            break;
          }
        }
      if (!peak) continue;
      int pos = count < ncand ? count++ : ncand - 1;
      while (pos > 0 && best_v[pos - 1] < v) {
        best_v[pos] = best_v[pos - 1];
        best_i[pos] = best_i[pos - 1];
        --pos;
      }
      best_v[pos] = v;
      best_i[pos] = int64_t(j) * N + k;
    }
  }
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
    const int j = int(best_i[c] / N), k = int(best_i[c] % N);
    const double f0 = best_v[c];
    const double dk = step(at(j, k - 1), f0, at(j, k + 1));
    const double dj = step(at(j - 1, k), f0, at(j + 1, k));
    const double th = grid.theta[j];
    const double up = j > 0 ? grid.theta[j - 1] : -grid.theta[0];
    const double dn = j < nlat - 1 ? grid.theta[j + 1] : 2 * kPi - grid.theta[nlat - 1];
    index[c] = best_i[c];
    value[c] = f0;
    // A colatitude past a pole is fine: (sin t cos p, sin t sin p, cos t) stays valid.
    start[2 * c] = dj >= 0 ? th + dj * (dn - th) : th + dj * (th - up);
    start[2 * c + 1] = grid.lon0 + 2 * kPi * (k + dk) / N;
  }
}

// KL(p || q) of one pair, with fp, ft the grid values; fills weights for the backward
// when wp / wt are non-null: wp = (q - p) / t, wt = p (log p - log q - KL) / t.
double kl_pair(const double* fp, const double* ft, const RingGrid& g, double inv_t, double scale,
               double* wp, double* wt) {
  const double lzp = log_partition(ft, g, inv_t);  // p from the target
  const double lzq = log_partition(fp, g, inv_t);
  const int N = g.nlon;
  double kl = 0;
  for (int j = 0; j < g.nlat; ++j) {
    const double la = g.log_area[j];
    double acc = 0;
    for (int k = 0; k < N; ++k) {
      const int64_t i = int64_t(j) * N + k;
      acc += std::exp(ft[i] * inv_t + la - lzp) * (ft[i] - fp[i]);
    }
    kl += acc;
  }
  kl = kl * inv_t - lzp + lzq;
  if (wp || wt) {
    for (int j = 0; j < g.nlat; ++j) {
      const double la = g.log_area[j];
      for (int k = 0; k < N; ++k) {
        const int64_t i = int64_t(j) * N + k;
        const double lp = ft[i] * inv_t + la - lzp, lq = fp[i] * inv_t + la - lzq;
        const double p = std::exp(lp);
        if (wp) wp[i] = scale * (std::exp(lq) - p) * inv_t;
        if (wt) wt[i] = scale * p * (lp - lq - kl) * inv_t;
      }
    }
  }
  return kl;
}

}  // namespace

// ---- entry points ------------------------------------------------------------------------
// Each parallelises over blocks of vectors (kBlock, or kBlock / 2 pairs for the KL).

template <typename T>
void shdd_synth_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid, T* out,
                    int num_threads) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree), G = int64_t(grid.nlat) * grid.nlon;
  const int64_t nblocks = (batch + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kBlock;
      const int nb = int(std::min<int64_t>(kBlock, batch - b0));
      const T* rows[kBlock];
      for (int v = 0; v < nb; ++v) rows[v] = coeffs + K * (b0 + v);
      legendre_block(rows, nb, degree, grid, w);
      for (int v = 0; v < nb; ++v) {
        fourier_synth(degree, grid, *plan, w, v, w.grid.data());
        T* o = out + G * (b0 + v);
        for (int64_t i = 0; i < G; ++i) o[i] = T(w.grid[i]);
      }
    }
  }
}

template <typename T>
void shdd_adjoint_cpu(const T* weights, int64_t batch, int degree, const RingGrid& grid,
                      T* out_coeffs, int num_threads) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree), G = int64_t(grid.nlat) * grid.nlon;
  const int64_t nblocks = (batch + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kBlock;
      const int nb = int(std::min<int64_t>(kBlock, batch - b0));
      T* outs[kBlock];
      for (int v = 0; v < nb; ++v) {
        const T* src = weights + G * (b0 + v);
        for (int64_t i = 0; i < G; ++i) w.grid[i] = double(src[i]);
        fourier_adjoint(w.grid.data(), degree, grid, *plan, w, v);
        outs[v] = out_coeffs + K * (b0 + v);
      }
      legendre_adjoint(degree, grid, w, nb, outs);
    }
  }
}

template <typename T>
void shdd_candidates_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid,
                         int ncand, int64_t* index, double* value, double* start,
                         int num_threads) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree);
  const int64_t nblocks = (batch + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
    std::vector<double> best_v(ncand);
    std::vector<int64_t> best_i(ncand);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kBlock;
      const int nb = int(std::min<int64_t>(kBlock, batch - b0));
      const T* rows[kBlock];
      for (int v = 0; v < nb; ++v) rows[v] = coeffs + K * (b0 + v);
      legendre_block(rows, nb, degree, grid, w);
      for (int v = 0; v < nb; ++v) {
        fourier_synth(degree, grid, *plan, w, v, w.grid.data());
        const int64_t o = (b0 + v) * ncand;
        scan_candidates(w.grid.data(), grid, ncand, best_v, best_i, index + o, value + o,
                        start + 2 * o);
      }
    }
  }
}

template <typename T>
void shdd_logz_cpu(const T* coeffs, int64_t batch, int degree, const RingGrid& grid,
                   double inv_temperature, double* out, int num_threads) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree);
  const int64_t nblocks = (batch + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kBlock;
      const int nb = int(std::min<int64_t>(kBlock, batch - b0));
      const T* rows[kBlock];
      for (int v = 0; v < nb; ++v) rows[v] = coeffs + K * (b0 + v);
      legendre_block(rows, nb, degree, grid, w);
      for (int v = 0; v < nb; ++v) {
        fourier_synth(degree, grid, *plan, w, v, w.grid.data());
        out[b0 + v] = log_partition(w.grid.data(), grid, inv_temperature);
      }
    }
  }
}

template <typename T>
void shdd_kl_fwd_cpu(const T* pred, const T* target, int64_t batch, int degree,
                     const RingGrid& grid, double inv_temperature, T* kl, int num_threads) {
  if (batch <= 0) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree), G = int64_t(grid.nlat) * grid.nlon;
  constexpr int kPairs = kBlock / 2;
  const int64_t nblocks = (batch + kPairs - 1) / kPairs;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
    w.grid2.assign(G, 0.0);
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
      for (int s = 0; s < ns; ++s) {
        fourier_synth(degree, grid, *plan, w, 2 * s, w.grid.data());
        fourier_synth(degree, grid, *plan, w, 2 * s + 1, w.grid2.data());
        kl[b0 + s] = T(kl_pair(w.grid.data(), w.grid2.data(), grid, inv_temperature, 1.0,
                               nullptr, nullptr));
      }
    }
  }
}

template <typename T>
void shdd_kl_bwd_cpu(const T* pred, const T* target, const T* grad_kl, int64_t batch,
                     int degree, const RingGrid& grid, double inv_temperature, T* grad_pred,
                     T* grad_target, int num_threads) {
  if (batch <= 0 || (!grad_pred && !grad_target)) return;
  const auto plan = fft_plan(grid.nlon);
  const int64_t K = sh_size(degree), G = int64_t(grid.nlat) * grid.nlon;
  constexpr int kPairs = kBlock / 2;
  const int64_t nblocks = (batch + kPairs - 1) / kPairs;
#pragma omp parallel num_threads(threads(num_threads, nblocks))
  {
    Work w;
    w.resize(degree, grid);
    w.grid2.assign(G, 0.0);
    std::vector<double> wp(grad_pred ? G : 0), wt(grad_target ? G : 0);
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
      // Sample s reads ring sums from slots 2s, 2s+1, then writes its adjoint spectra to the
      // next free slots, which are never beyond 2s+1: a slot is overwritten only once read.
      T* outs[kBlock];
      int na = 0;
      for (int s = 0; s < ns; ++s) {
        fourier_synth(degree, grid, *plan, w, 2 * s, w.grid.data());
        fourier_synth(degree, grid, *plan, w, 2 * s + 1, w.grid2.data());
        kl_pair(w.grid.data(), w.grid2.data(), grid, inv_temperature, double(grad_kl[b0 + s]),
                grad_pred ? wp.data() : nullptr, grad_target ? wt.data() : nullptr);
        if (grad_pred) {
          fourier_adjoint(wp.data(), degree, grid, *plan, w, na);
          outs[na++] = grad_pred + K * (b0 + s);
        }
        if (grad_target) {
          fourier_adjoint(wt.data(), degree, grid, *plan, w, na);
          outs[na++] = grad_target + K * (b0 + s);
        }
      }
      legendre_adjoint(degree, grid, w, na, outs);
    }
  }
}

template <typename T>
void shdd_eval_cpu(const T* coeffs, int degree, const double* xyz, const int64_t* row, int64_t n,
                   double* value, double* grad, int num_threads) {
  if (n <= 0) return;
  const auto tables = tables_for(degree);
  const int64_t K = sh_size(degree);
#pragma omp parallel num_threads(threads(num_threads, n / 16 + 1))
  {
    EvalScratch sc;
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < n; ++i)
      eval_point(coeffs + K * row[i], degree, *tables, xyz + 3 * i, sc, value + i,
                 grad ? grad + 3 * i : nullptr);
  }
}

void shdd_legendre_table_cpu(const double* theta, int nhalf, int degree, double* out,
                             int num_threads) {
  if (nhalf <= 0) return;
  const auto tables = tables_for(degree);
  const int L = degree;
#pragma omp parallel num_threads(threads(num_threads, nhalf))
  {
    EvalScratch sc;
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
          const Injection& in = sc.injections[next++];
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
  template void shdd_eval_cpu<T>(const T*, int, const double*, const int64_t*, int64_t, double*, \
                                 double*, int);
LOCDIFF_INSTANTIATE(float)
LOCDIFF_INSTANTIATE(double)
#undef LOCDIFF_INSTANTIATE

}  // namespace locdiff
