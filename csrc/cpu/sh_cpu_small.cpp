// Spherical harmonics at low degree, CPU: forward up to kSmallForwardMax, backward up to
// kSmallBackwardMax (sh_cpu_small.h).
//
// At low degree a point has few outputs (25 at L = 4), so the per-point set-up of the
// general kernel (tables, seeds, scratch rows) costs more than the harmonics. Here the
// SIMD lanes run across a block of kLanes points instead, in the Cartesian form
//   Y_l,+-m = sqrt2 Qbar_lm(z) Re/Im (x + i y)^m,
// with Qbar_lm = P_lm / s^m, a polynomial in z. At these degrees Qbar stays below 1e9 and
// the plain recurrence loses under 1e-14, so neither scaled seeds nor Reinsch's form are
// needed; (x + i y)^m may underflow for tiny s, but only where Y itself is below 1e-300.
#include <omp.h>
#include "stream_stores.h"  // LOCDIFF_STREAM_STORES, stream_copy
// forward_groups_v3: GCC's x86-64-v3 target and ISA-level dispatch (as LOCDIFF_CLONES).
#if LOCDIFF_STREAM_STORES && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LOCDIFF_GROUPS_V3 1
#else
#define LOCDIFF_GROUPS_V3 0
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "locdiff/sh_kernels.h"  // sh_cpu_forward_path
#include "locdiff/sh_math.h"
#include "lane_transpose.h"
#include "legendre_tables.h"  // LOCDIFF_CLONES
#include "point_block.h"
#include "sh_float_lanes.h"
#include "sh_register_group.h"
#include "sh_cpu_small.h"


namespace locdiff {
namespace {

using cpu::transpose4_store;
using cpu::Vec4;
#if LOCDIFF_STREAM_STORES
using cpu::stream_copy;
#endif
using cpu::kStreamBytes;
constexpr int kLanes = cpu::kPointLanes;
constexpr int kMax = kSmallDegreeMax;
using Block = cpu::PointBlock<kMax>;

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


// Column m of Qbar for every degree l = m..L: q[l * kLanes + p].
LOCDIFF_INLINE void qbar_column(const Block& bk, int m, int L, double* q) {
  const SmallTables& tb = small_tables();
  const double seed = tb.seed[m];
  cpu::fill_lanes(q + m * kLanes, seed);
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


// One full block of kTotal values (kLanes points, contiguous in the output): compute(dst)
// writes them to dst, the output itself or, when `stream`, an L1 tile that non-temporal
// stores then copy out. compute returns false for a block it cannot take (nothing is
// streamed then; the caller redoes the block), and so does this.
template <typename T, int kTotal, typename Compute>
__attribute__((always_inline)) inline bool write_full_block(T* out, bool stream, Compute compute) {
#if LOCDIFF_STREAM_STORES
  if (stream) {
    alignas(64) T tile[kTotal];
    if (!compute(tile)) return false;
    stream_copy(tile, out, kTotal);
    return true;
  }
#else
  (void)stream;
#endif
  return compute(out);
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
  // kLanes * K values fill whole 32-byte vectors (8K values: a multiple of 4 and of 8), and
  // out is 16-byte aligned (forward_fixed checks).
  write_full_block<T, kLanes * K>(out, stream, [&](T* dst) LOCDIFF_LAMBDA_INLINE {
    transpose_block(cols, dst);
    return true;
  });
}

// One block of points at compile-time degree L: every loop bound is a constant, so the
// compiler unrolls over l and vectorises over lanes. Values go to an L1 tile in lane-major
// order (full-width stores) and leave it through the transposing store above.
template <typename T, int L>
LOCDIFF_INLINE int forward_block_fixed(const T* xyz, int count, Block& bk, T* out, bool stream) {
  constexpr int K = (L + 1) * (L + 1);
  const SmallTables& tb = small_tables();
  const int bad = bk.load(xyz, count, L);
  alignas(64) T cols[K][kLanes];
  alignas(64) double q[L + 1][kLanes];
  for (int m = 0; m <= L; ++m) {
    const double* re = &bk.re[m * kLanes];
    const double* im = &bk.im[m * kLanes];
    cpu::fill_lanes(q[m], tb.seed[m]);
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
        if constexpr (std::is_same_v<T, double>) {
          cpu::copy_lanes(cols[k], q[l]);  // see copy_lanes
        } else {
#pragma omp simd
          for (int p = 0; p < kLanes; ++p) cols[k][p] = T(q[l][p]);
        }
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

// When store_point_major streams: outputs of at least kStreamBytes at 4 <= L <= 16 in
// float64 and L = 5, 8 <= L <= 20 in float32, on x86 only. Above, the values and the tile
// outgrow L1; below, direct stores are as cheap (docs/kernels.md, "Streaming stores").

template <typename T, int L>
constexpr bool may_stream() {
  return LOCDIFF_STREAM_STORES && (std::is_same_v<T, double> ? 4 <= L && L <= 16 : L == 5 || (8 <= L && L <= 20));
}

// Where the portable clone (and every CPU at L <= 3) runs the register groups.
template <typename T>
constexpr int kPortableGroupMax = std::is_same_v<T, double> ? 16 : 3;

// A full block at 1 <= L <= kPortableGroupMax<T> by register groups, straight into the output
// or, where it streams (float64 from L = 4), into an L1 tile that non-temporal stores copy out.
// Falls back to forward_block_fixed (inlined here, so one clone dispatch per block) for
// partial blocks and for points that need the careful path, rewriting what the groups wrote.
template <typename T, int L>
LOCDIFF_CLONES int forward_block(const T* xyz, int count, Block& bk, T* out, bool stream) {
  if constexpr (std::is_same_v<T, float> && cpu::kFloatLanesMinDegree <= L && L <= cpu::kFloatLanesMaxDegree) {
    static_assert(kLanes == 8, "a block is one vector of float32 lanes");
    static const cpu::FloatTables<cpu::kFloatLanesMaxDegree> float_tables(small_tables());
    const auto float_block = [&](float* dst) LOCDIFF_LAMBDA_INLINE {
      return cpu::sh_float_block<L>(xyz, float_tables, dst);
    };
    if (count == kLanes && write_full_block<float, kLanes * (L + 1) * (L + 1)>(out, stream, float_block)) return -1;
  } else if constexpr (1 <= L && L <= kPortableGroupMax<T>) {
    constexpr int K = (L + 1) * (L + 1), kGroup = 4;
    static_assert(kLanes % kGroup == 0, "a block is whole register groups");
    const auto register_groups = [&](T* dst) LOCDIFF_LAMBDA_INLINE {
      bool done = true;
      for (int g = 0; done && g < kLanes; g += kGroup)
        done = cpu::sh_register_group<T, L>(xyz + 3 * g, small_tables(), dst + g * K);
      return done;
    };
    if (count == kLanes && write_full_block<T, kLanes * K>(out, stream, register_groups)) return -1;
  }
  return forward_block_fixed<T, L>(xyz, count, bk, out, stream);
}

#if LOCDIFF_GROUPS_V3
// The register groups at groups_v3 degrees on CPUs with AVX2, streamed or not. Every such
// call takes this one function, so a point's values are the same bits whatever the batch
// size or the output's alignment (the compiler fuses multiply-adds per inlining context, so
// two call sites could differ in the last bit; tests/test_sh_api.py checks).
// Streamed, it is a pipeline: each group of four points computes into one of two L1 tiles
// while the previous group's tile goes out; streaming a finished block at once stalls the
// core until the store buffers drain (figures: docs/kernels.md, "Register groups").
// LOCDIFF_CPU_PORTABLE=1 takes the path of CPUs without AVX2 (portable groups to
// kPortableGroupMax, the block kernel above), so that the tests can check it on any host.
bool cpu_has_v3() {
  const char* portable = std::getenv("LOCDIFF_CPU_PORTABLE");
  if (portable != nullptr && *portable != '\0' && std::strcmp(portable, "0") != 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3");
}
const bool kCpuHasV3 = cpu_has_v3();

template <typename T, int L>
constexpr bool groups_v3() {
  return (std::is_same_v<T, double> ? 4 : 6) <= L && L <= cpu::kRegisterDegreeMax;
}

template <typename T, int L, bool stream>
__attribute__((target("arch=x86-64-v3"))) int64_t forward_groups_v3(const T* xyz, int64_t n, T* out,
                                                                     int num_threads) {
  constexpr int K = (L + 1) * (L + 1), kGroup = 4, kTile = kGroup * K;
  // 32-byte streaming stores where out is 32-byte aligned (then so is every group: 4K
  // values), pairs of 16-byte ones where it is 16-byte aligned.
  const bool wide = std::is_same_v<T, double> && reinterpret_cast<std::uintptr_t>(out) % 32 == 0;
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  int64_t first_bad = n;
#pragma omp parallel num_threads(std::max(1, num_threads)) reduction(min : first_bad)
  {
    Block bk;
    alignas(64) T tiles[2][kTile];
    int current = 0;
    const T* src = nullptr;  // the previous group's tile, still going out to dst
    const T* src_end = nullptr;
    T* dst = nullptr;
    const auto drain_one = [&]() LOCDIFF_LAMBDA_INLINE {
      if (src == src_end) return;
      // In asm: the lambda is compiled for the portable target, where AVX intrinsics do not
      // inline; it only runs inlined into this x86-64-v3 function.
      if constexpr (std::is_same_v<T, float>) {
        asm volatile("vmovaps %1, %%xmm15\n\tvmovntps %%xmm15, %0"
                     : "=m"(*reinterpret_cast<float(*)[4]>(dst))
                     : "m"(*reinterpret_cast<const float(*)[4]>(src))
                     : "xmm15");
      } else if (wide) {
        asm volatile("vmovapd %1, %%ymm15\n\tvmovntpd %%ymm15, %0"
                     : "=m"(*reinterpret_cast<cpu::Double4*>(dst))
                     : "m"(*reinterpret_cast<const cpu::Double4*>(src))
                     : "xmm15");
      } else {
        asm volatile("vmovapd %2, %%xmm15\n\tvmovntpd %%xmm15, %0\n\tvmovapd %3, %%xmm15\n\tvmovntpd %%xmm15, %1"
                     : "=m"(*reinterpret_cast<double(*)[2]>(dst)), "=m"(*reinterpret_cast<double(*)[2]>(dst + 2))
                     : "m"(*reinterpret_cast<const double(*)[2]>(src)), "m"(*reinterpret_cast<const double(*)[2]>(src + 2))
                     : "xmm15");
      }
      src += 4;
      dst += 4;
    };
    const auto drain_all = [&]() LOCDIFF_LAMBDA_INLINE {
      while (src != src_end) drain_one();
    };
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kLanes;
      const int count = int(std::min<int64_t>(kLanes, n - first));
      T* block_out = out + K * first;
      bool done = count == kLanes;
      for (int g = 0; done && g < kLanes; g += kGroup) {
        T* group_out = block_out + g * K;
        T* tile = stream ? tiles[current] : group_out;
        if constexpr (stream) done = cpu::sh_register_group<T, L>(xyz + 3 * (first + g), small_tables(), tile, drain_one);
        else done = cpu::sh_register_group<T, L>(xyz + 3 * (first + g), small_tables(), tile);
        if (done && stream) {
          drain_all();  // a no-op: the group's K values drained the K stores of the last tile
          src = tile;
          src_end = tile + kTile;
          dst = group_out;
          current ^= 1;
        }
      }
      if (done) continue;
      drain_all();  // what was computed of this block goes out; the careful path rewrites it
      const int bad = forward_block_fixed<T, L>(xyz + 3 * first, count, bk, block_out, false);
      if (bad >= 0) first_bad = std::min(first_bad, first + bad);
    }
    drain_all();
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the region ends
  }
  return first_bad == n ? -1 : first_bad;
}
#endif

template <typename T, int L>
int64_t forward_fixed(const T* xyz, int64_t n, T* out, int num_threads) {
  constexpr int64_t K = (L + 1) * (L + 1);
  const bool big = n * K * int64_t(sizeof(T)) >= kStreamBytes && reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
#if LOCDIFF_GROUPS_V3
  if constexpr (groups_v3<T, L>()) {
    if (kCpuHasV3) {
      if (big && (may_stream<T, L>() || std::is_same_v<T, double>)) return forward_groups_v3<T, L, true>(xyz, n, out, num_threads);
      return forward_groups_v3<T, L, false>(xyz, n, out, num_threads);
    }
  }
#endif
  const bool stream = big && may_stream<T, L>();
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  int64_t first_bad = n;
#pragma omp parallel num_threads(std::max(1, num_threads)) reduction(min : first_bad)
  {
    Block bk;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kLanes;
      const int count = int(std::min<int64_t>(kLanes, n - first));
      const int bad = forward_block<T, L>(xyz + 3 * first, count, bk, out + K * first, stream);
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
  for (int l = 0; l < L + 2; ++l) cpu::fill_lanes(q_next + l * kLanes, 0.0);
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
    cpu::fill_lanes(q_next + (m - 1 >= 0 ? m - 1 : 0) * kLanes, 0.0);
  }
  for (int p = 0; p < count; ++p) {
    const double radial = gx[p] * bk.x[p] + gy[p] * bk.y[p] + gz[p] * bk.z[p];
    grad_xyz[3 * p] = T((gx[p] - radial * bk.x[p]) * bk.inv_norm[p]);
    grad_xyz[3 * p + 1] = T((gy[p] - radial * bk.y[p]) * bk.inv_norm[p]);
    grad_xyz[3 * p + 2] = T((gz[p] - radial * bk.z[p]) * bk.inv_norm[p]);
  }
}

}  // namespace

const char* sh_cpu_forward_path() {
#if LOCDIFF_GROUPS_V3
  if (kCpuHasV3) return "x86-64-v3";
#endif
  return "portable";
}

template <typename T>
int64_t sh_cpu_small_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads) {
  return forward_dispatch(xyz, n, degree, out, num_threads, std::make_integer_sequence<int, kSmallForwardMax<T> + 1>{});
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
