// Spherical harmonics at low degree (L <= kSmallDegreeMax), CPU.
//
// At low degree a point has few outputs (25 at L = 4), so the per-point set-up of the
// general kernel (tables, seeds, scratch rows) costs more than the harmonics. Here the
// SIMD lanes run across a block of kLanes points instead, in the Cartesian form
//   Y_l,+-m = sqrt2 Qbar_lm(z) Re/Im (x + i y)^m,
// with Qbar_lm = P_lm / s^m, a polynomial in z. At these degrees Qbar stays below 1e9 and
// the plain recurrence loses under 1e-14, so neither scaled seeds nor Reinsch's form are
// needed; (x + i y)^m may underflow for tiny s, but only where Y itself is below 1e-300.
#include <omp.h>
#if defined(__SSE2__)
#include <emmintrin.h>  // non-temporal stores (store_point_major)
#define LOCDIFF_STREAM_STORES 1
#else
#define LOCDIFF_STREAM_STORES 0
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "locdiff/sh_math.h"
#include "legendre_tables.h"  // LOCDIFF_CLONES
#include "sh_cpu_small.h"


namespace locdiff {
namespace {

constexpr int kLanes = 8;
constexpr int kMax = kSmallDegreeMax;

// Coefficients for every (l, m) up to kMax, built once (sqrt per block would dominate).
struct SmallTables {
  double a[kMax + 1][kMax + 1] = {}, b[kMax + 1][kMax + 1] = {}, dz[kMax + 1][kMax + 1] = {};
  double seed[kMax + 1] = {};
  SmallTables() {
    seed[0] = kInvSqrt4Pi;
    for (int m = 1; m <= kMax; ++m) seed[m] = seed[m - 1] * sh_seed_ratio(m);
    for (int l = 0; l <= kMax; ++l)
      for (int m = 0; m <= l; ++m) {
        if (m + 2 <= l) {
          a[l][m] = sh_rec_a(l, m);
          b[l][m] = sh_rec_b(l, m);
        } else if (m + 1 == l) {
          a[l][m] = std::sqrt(2.0 * m + 3.0);
        }
        dz[l][m] = (m == 0 ? 1.0 : kSqrt2) * sh_dz_factor(l, m);
      }
  }
};
const SmallTables& small_tables() {
  static const SmallTables tables;
  return tables;
}

// Normalised coordinates and (x + i y)^m for a block of points (padding lanes get the pole).
struct Block {
  int count;
  alignas(64) double x[kLanes], y[kLanes], z[kLanes], inv_norm[kLanes];
  alignas(64) double re[(kMax + 1) * kLanes], im[(kMax + 1) * kLanes];  // re[m*kLanes+p] = Re (x_p+i y_p)^m

  // Returns the first lane that is non-finite or zero, or -1 (such lanes compute the pole).
  // Inlined so that it is compiled for the caller's clone (out of line it would be the
  // portable SSE2 code whatever the CPU).
  template <typename T>
  __attribute__((always_inline)) int load(const T* xyz, int count_, int L) {
    count = count_;
    const int bad = count == kLanes && load_ordinary(xyz) ? -1 : load_careful(xyz);
    for (int p = 0; p < kLanes; ++p) {
      re[p] = 1.0;
      im[p] = 0.0;
    }
    for (int m = 1; m <= L; ++m) {
      const double* pr = &re[(m - 1) * kLanes];
      const double* pi = &im[(m - 1) * kLanes];
#pragma omp simd
      for (int p = 0; p < kLanes; ++p) {
        re[m * kLanes + p] = pr[p] * x[p] - pi[p] * y[p];
        im[m * kLanes + p] = pr[p] * y[p] + pi[p] * x[p];
      }
    }
    return bad;
  }

  // The common case, branch-free across lanes: a full block whose largest components lie
  // in [2^-500, 2^500], where x^2 + y^2 + z^2 can neither overflow nor lose the direction.
  // Returns false (having written nothing) otherwise.
  template <typename T>
  __attribute__((always_inline)) bool load_ordinary(const T* xyz) {
    double px[kLanes], py[kLanes], pz[kLanes];
    for (int p = 0; p < kLanes; ++p) {
      px[p] = double(xyz[3 * p]);
      py[p] = double(xyz[3 * p + 1]);
      pz[p] = double(xyz[3 * p + 2]);
    }
    int ordinary = 1;
#pragma omp simd reduction(& : ordinary)
    for (int p = 0; p < kLanes; ++p) {
      const double ax = std::fabs(px[p]), ay = std::fabs(py[p]), az = std::fabs(pz[p]);
      const double big = ax > ay ? (ax > az ? ax : az) : (ay > az ? ay : az);
      // NaN fails the <= tests, so every lane here is finite.
      ordinary &= int(ax <= 0x1p500) & int(ay <= 0x1p500) & int(az <= 0x1p500) & int(big >= 0x1p-500);
    }
    if (!ordinary) return false;
#pragma omp simd
    for (int p = 0; p < kLanes; ++p) {
      const double inv = 1.0 / std::sqrt(px[p] * px[p] + py[p] * py[p] + pz[p] * pz[p]);
      x[p] = px[p] * inv;
      y[p] = py[p] * inv;
      z[p] = pz[p] * inv;
      inv_norm[p] = inv;
    }
    return true;
  }

  // Any block, through cpu::unit_point (exact for huge and tiny vectors); non-finite or
  // zero lanes, and the padding past count, get the pole. Returns the first bad lane, or -1.
  template <typename T>
  int load_careful(const T* xyz) {
    static const T pole[3] = {T(0), T(0), T(1)};
    int bad = -1;
    for (int p = 0; p < kLanes; ++p) {
      const cpu::Point u = cpu::unit_point(p < count ? xyz + 3 * p : pole);
      if (!u.valid && bad < 0) bad = p;
      x[p] = u.x;
      y[p] = u.y;
      z[p] = u.z;
      inv_norm[p] = u.inv_norm;
    }
    return bad;
  }
};

// Column m of Qbar for every degree l = m..L: q[l * kLanes + p].
LOCDIFF_INLINE void qbar_column(const Block& bk, int m, int L, double* q) {
  const SmallTables& tb = small_tables();
  const double seed = tb.seed[m];
  for (int p = 0; p < kLanes; ++p) q[m * kLanes + p] = seed;
  if (m + 1 <= L) {
    const double a = tb.a[m + 1][m];
#pragma omp simd
    for (int p = 0; p < kLanes; ++p) q[(m + 1) * kLanes + p] = a * bk.z[p] * seed;
  }
  for (int l = m + 2; l <= L; ++l) {
    const double a = tb.a[l][m], b = tb.b[l][m];
    const double* q1 = q + (l - 1) * kLanes;
    const double* q2 = q + (l - 2) * kLanes;
#pragma omp simd
    for (int p = 0; p < kLanes; ++p) q[l * kLanes + p] = a * bk.z[p] * q1[p] - b * q2[p];
  }
}

// Lane-major to point-major: the kernels compute value k of 4 points as one 4-lane vector
// (cols[k][p]); the output wants each point's K values contiguous. A 4x4 transpose in
// registers (vector extensions: AVX in the x86-64-v3 clone, SSE pairs in the default one)
// turns 4 such vectors into 4 contiguous runs, so the stores are full-width instead of
// one lane at a time (the scalar scatter cost more than the harmonics at L <= 16).
template <typename T>
struct Vec4;
template <>
struct Vec4<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef long long mask __attribute__((vector_size(32)));
};
template <>
struct Vec4<float> {
  typedef float type __attribute__((vector_size(16)));
  typedef int mask __attribute__((vector_size(16)));
};

#if defined(__clang__)
#define LOCDIFF_SHUFFLE(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
#else
#define LOCDIFF_SHUFFLE(a, b, i, j, k, l) __builtin_shuffle(a, b, typename Vec4<T>::mask{i, j, k, l})
#endif

// out[p * K + k0 + j] = cols[k0 + j][lane0 + p] for p, j < 4.
template <typename T>
__attribute__((always_inline)) inline void transpose4_store(const T* c0, const T* c1, const T* c2,
                                                            const T* c3, T* out, int64_t K) {
  typedef typename Vec4<T>::type V;
  V r0, r1, r2, r3;
  std::memcpy(&r0, c0, sizeof(V));
  std::memcpy(&r1, c1, sizeof(V));
  std::memcpy(&r2, c2, sizeof(V));
  std::memcpy(&r3, c3, sizeof(V));
  const V t0 = LOCDIFF_SHUFFLE(r0, r1, 0, 4, 2, 6), t1 = LOCDIFF_SHUFFLE(r0, r1, 1, 5, 3, 7);
  const V t2 = LOCDIFF_SHUFFLE(r2, r3, 0, 4, 2, 6), t3 = LOCDIFF_SHUFFLE(r2, r3, 1, 5, 3, 7);
  const V o0 = LOCDIFF_SHUFFLE(t0, t2, 0, 1, 4, 5), o1 = LOCDIFF_SHUFFLE(t1, t3, 0, 1, 4, 5);
  const V o2 = LOCDIFF_SHUFFLE(t0, t2, 2, 3, 6, 7), o3 = LOCDIFF_SHUFFLE(t1, t3, 2, 3, 6, 7);
  std::memcpy(out, &o0, sizeof(V));
  std::memcpy(out + K, &o1, sizeof(V));
  std::memcpy(out + 2 * K, &o2, sizeof(V));
  std::memcpy(out + 3 * K, &o3, sizeof(V));
}

// The full block of cols[K][kLanes] (lane-major) to out (point-major, K per point), by 4x4
// transposes; the last K mod 4 columns (one, for every even L) by one more transpose over
// the last four, rewriting up to three with the same values (cheaper than scalar stores).
template <typename T, int K>
__attribute__((always_inline)) inline void transpose_block(const T (&cols)[K][kLanes], T* out) {
  for (int half = 0; half < kLanes; half += 4) {
    T* o = out + int64_t(half) * K;
    int k = 0;
    for (; k + 4 <= K; k += 4)
      transpose4_store(&cols[k][half], &cols[k + 1][half], &cols[k + 2][half], &cols[k + 3][half], o + k, K);
    if constexpr (K < 4) {  // L = 0
      for (; k < K; ++k)
        for (int p = 0; p < 4; ++p) o[int64_t(p) * K + k] = cols[k][half + p];
    } else if (k < K) {
      k = K - 4;
      transpose4_store(&cols[k][half], &cols[k + 1][half], &cols[k + 2][half], &cols[k + 3][half], o + k, K);
    }
  }
}

// Writes `count` points of cols[K][kLanes] (lane-major) to out (point-major, K per point).
// Two ways for a full block, by `stream`: transposed stores straight into the output, or
// transposed into an L1 tile that non-temporal stores then copy out. A full block's values
// are one contiguous run of the output (kLanes points of K), 16-byte aligned, so streaming
// fills whole cache lines without first reading them. Streaming leaves the output out of
// the cache, which would cost its next reader where it fits there: see may_stream for when
// it is used. (Staging in a tile with ordinary stores was slower.)
template <typename T, int K>
__attribute__((always_inline)) inline void store_point_major(const T (&cols)[K][kLanes], int count, T* out,
                                                             bool stream) {
  if (count < kLanes) {
    for (int p = 0; p < count; ++p)
      for (int k = 0; k < K; ++k) out[int64_t(p) * K + k] = cols[k][p];
    return;
  }
#if LOCDIFF_STREAM_STORES
  // Only float64 streams (may_stream); kLanes * K is even, and out 16-byte aligned.
  if constexpr (std::is_same_v<T, double>) {
    if (stream) {
      constexpr int kTotal = kLanes * K;
      alignas(64) double tile[kTotal];
      transpose_block(cols, tile);
      for (int i = 0; i < kTotal; i += 2) _mm_stream_pd(out + i, _mm_load_pd(tile + i));
      return;
    }
  }
#else
  (void)stream;
#endif
  transpose_block(cols, out);
}

// One block of points at compile-time degree L: every loop bound is a constant, so the
// compiler unrolls over l and vectorises over lanes. Values go to an L1 tile in lane-major
// order (full-width stores) and leave it through the transposing store above.
template <typename T, int L>
LOCDIFF_CLONES int forward_block_fixed(const T* xyz, int count, Block& bk, T* out, bool stream) {
  constexpr int K = (L + 1) * (L + 1);
  const SmallTables& tb = small_tables();
  const int bad = bk.load(xyz, count, L);
  alignas(64) T cols[K][kLanes];
  alignas(64) double q[L + 1][kLanes];
  for (int m = 0; m <= L; ++m) {
    const double* re = &bk.re[m * kLanes];
    const double* im = &bk.im[m * kLanes];
    for (int p = 0; p < kLanes; ++p) q[m][p] = tb.seed[m];
    if (m + 1 <= L) {
#pragma omp simd
      for (int p = 0; p < kLanes; ++p) q[m + 1][p] = tb.a[m + 1][m] * bk.z[p] * q[m][p];
    }
    for (int l = m + 2; l <= L; ++l) {
      const double a = tb.a[l][m], b = tb.b[l][m];
#pragma omp simd
      for (int p = 0; p < kLanes; ++p) q[l][p] = a * bk.z[p] * q[l - 1][p] - b * q[l - 2][p];
    }
    for (int l = m; l <= L; ++l) {
      const int k = l * l + l;
      if (m == 0) {
#pragma omp simd
        for (int p = 0; p < kLanes; ++p) cols[k][p] = T(q[l][p]);
      } else {
#pragma omp simd
        for (int p = 0; p < kLanes; ++p) {
          cols[k + m][p] = T(kSqrt2 * q[l][p] * re[p]);
          cols[k - m][p] = T(kSqrt2 * q[l][p] * im[p]);
        }
      }
    }
  }
  store_point_major<T, K>(cols, count, out, stream);
  return bad;
}

// When store_point_major streams: float64 outputs of at least kStreamBytes (they cannot stay
// in the L2 of a couple of cores anyway), at degrees whose values and tile both fit in L1
// (2 x 8 x K doubles <= 40 KB: L <= 16), from L = 6; on x86 (SSE2) only. Measured on the Xeon, two threads, ns
// per value, direct -> streamed: float64 L = 6, 8, 12, 16: 0.39 -> 0.33, 0.40 -> 0.32,
// 0.37 -> 0.34, 0.37 -> 0.33; but L = 24, 32: 0.31 -> 0.44 (the tile spills to L2), and
// float32 (16-byte direct stores) 3-20% slower streamed at every L, L = 4 in both dtypes
// 5-10% slower.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

template <typename T, int L>
constexpr bool may_stream() {
  return LOCDIFF_STREAM_STORES && std::is_same_v<T, double> && L >= 6 &&
         2 * kLanes * (L + 1) * (L + 1) * sizeof(T) <= 40 * 1024;
}

template <typename T, int L>
int64_t forward_fixed(const T* xyz, int64_t n, T* out, int num_threads) {
  constexpr int64_t K = (L + 1) * (L + 1);
  const bool stream = may_stream<T, L>() && n * K * int64_t(sizeof(T)) >= kStreamBytes &&
                      reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  int64_t first_bad = n;
#pragma omp parallel num_threads(std::max(1, num_threads)) reduction(min : first_bad)
  {
    Block bk;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kLanes;
      const int count = int(std::min<int64_t>(kLanes, n - first));
      const int bad = forward_block_fixed<T, L>(xyz + 3 * first, count, bk, out + K * first, stream);
      if (bad >= 0) first_bad = std::min(first_bad, first + bad);
    }
#if LOCDIFF_STREAM_STORES
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the region ends
#endif
  }
  return first_bad == n ? -1 : first_bad;
}

template <typename T, int... Ls>
int64_t forward_dispatch(const T* xyz, int64_t n, int degree, T* out, int num_threads,
                         std::integer_sequence<int, Ls...>) {
  int64_t first_bad = -1;
  ((degree == Ls ? void(first_bad = forward_fixed<T, Ls>(xyz, n, out, num_threads)) : void()), ...);
  return first_bad;
}

// Columns in descending m, so that column m+1 (for the z-derivative) is at hand.
template <typename T>
LOCDIFF_CLONES void backward_block(const T* xyz, const T* grad, int count, int L, Block& bk,
                                   double* q, double* q_next, T* grad_xyz) {
  bk.load(xyz, count, L);
  const int64_t K = sh_size(L);
  double gx[kLanes] = {}, gy[kLanes] = {}, gz[kLanes] = {};
  for (int p = 0; p < kLanes * (L + 2); ++p) q_next[p] = 0.0;
  for (int m = L; m >= 0; --m) {
    qbar_column(bk, m, L, q);
    for (int l = m; l <= L; ++l) {
      const double* ql = q + l * kLanes;
      const double* qn = q_next + l * kLanes;  // Qbar_{l,m+1} (0 for m = l)
      const double dzf = small_tables().dz[l][m];
      const int64_t k = sh_index(l, m), kn = sh_index(l, -m);
      for (int p = 0; p < count; ++p) {
        const double gp = double(grad[p * K + k]);
        if (m == 0) {
          gz[p] += gp * dzf * qn[p];
          continue;
        }
        const double gm = double(grad[p * K + kn]);
        const double re = bk.re[m * kLanes + p], im = bk.im[m * kLanes + p];
        const double re1 = bk.re[(m - 1) * kLanes + p], im1 = bk.im[(m - 1) * kLanes + p];
        const double w = kSqrt2 * m * ql[p];
        gx[p] += w * (gp * re1 + gm * im1);
        gy[p] += w * (gm * re1 - gp * im1);
        gz[p] += dzf * qn[p] * (gp * re + gm * im);
      }
    }
    std::swap(q, q_next);
    for (int p = 0; p < kLanes; ++p) q_next[(m - 1 >= 0 ? m - 1 : 0) * kLanes + p] = 0.0;
  }
  for (int p = 0; p < count; ++p) {
    const double radial = gx[p] * bk.x[p] + gy[p] * bk.y[p] + gz[p] * bk.z[p];
    grad_xyz[3 * p] = T((gx[p] - radial * bk.x[p]) * bk.inv_norm[p]);
    grad_xyz[3 * p + 1] = T((gy[p] - radial * bk.y[p]) * bk.inv_norm[p]);
    grad_xyz[3 * p + 2] = T((gz[p] - radial * bk.z[p]) * bk.inv_norm[p]);
  }
}

}  // namespace

template <typename T>
int64_t sh_cpu_small_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads) {
  return forward_dispatch(xyz, n, degree, out, num_threads, std::make_integer_sequence<int, kMax + 1>{});
}

template <typename T>
void sh_cpu_small_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                      int num_threads) {
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  const int64_t K = sh_size(degree);
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    Block bk;
    std::vector<double> q(size_t(degree + 2) * kLanes), q_next(size_t(degree + 2) * kLanes);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kLanes;
      const int count = int(std::min<int64_t>(kLanes, n - first));
      backward_block(xyz + 3 * first, grad_out + K * first, count, degree, bk, q.data(),
                     q_next.data(), grad_xyz + 3 * first);
    }
  }
}

template int64_t sh_cpu_small_fwd<float>(const float*, int64_t, int, float*, int);
template int64_t sh_cpu_small_fwd<double>(const double*, int64_t, int, double*, int);
template void sh_cpu_small_bwd<float>(const float*, const float*, int64_t, int, float*, int);
template void sh_cpu_small_bwd<double>(const double*, const double*, int64_t, int, double*, int);

}  // namespace locdiff
