// Spherical harmonics on CUDA: forward and vector-Jacobian product. No torch here.
//
// Where the time goes. Each point writes (L+1)^2 values, so beyond a few degrees the
// output store sets the speed; the arithmetic (float64, as on the CPU) must only keep up.
// Two work layouts:
//
//  * L <= kLowMaxDegree: one thread per point. The whole recurrence is unrolled at compile
//    time (template on L) with the CPU's coefficient tables passed as a kernel argument, so
//    there is no index arithmetic and no table read in the loop. A thread's row is not
//    contiguous with its neighbours' rows, so results go to shared memory first and the
//    block then writes (or, backward, reads) its tile of rows, which is one contiguous
//    range, with fully coalesced accesses.
//
//  * Higher degree: a group of G threads per point, thread `rank` owning the columns
//    m = rank + j G (j < C) of one "pass" of G*C columns. Every column keeps its
//    recurrence state in registers (sh_column.h), and at each degree l the group writes
//    Y[l^2+l+m] and Y[l^2+l-m] for consecutive m: two contiguous runs per degree, so the
//    stores coalesce. No synchronisation inside the degree loop: columns are independent.
//    Seeds are prefix products over m, done once per point with a group scan in scaled
//    (mantissa, exponent) arithmetic. Forward passes of one point run in separate blocks
//    (blockIdx.y), so even a few high-degree points fill the chip; the backward walks its
//    passes in one block to reduce the gradient without atomics (deterministic).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "locdiff/sh_kernels.h"
#include "locdiff/sh_math.h"
#include "sh_column.h"

namespace locdiff {
namespace {

using namespace cuda_detail;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kLowMaxDegree = 8;
constexpr int kLowThreads = 128;
constexpr int kGroupBlock = 128;      // threads per block of the group kernels
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this many point tiles

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("locdiff: ") + what + " kernel launch failed: " +
                             cudaGetErrorString(err));
}

template <typename T>
__device__ __forceinline__ UnitPoint load_point(const T* p) {
  return unit_point(double(p[0]), double(p[1]), double(p[2]));
}

// ---- low degree: one thread per point ------------------------------------------------------

__host__ __device__ constexpr int tri_index(int l) { return l * (l + 1) / 2; }

// The CPU's tables for degrees <= L (sh_cpu.cpp, plain form): a, b in triangular layout,
// dz with sqrt(2) folded in for m >= 1, seed ratios. Passed by value: the kernel reads them
// from the constant bank with compile-time offsets.
template <int L>
struct LowTables {
  double a[tri_index(L + 1)];
  double b[tri_index(L + 1)];
  double dz[tri_index(L + 1)];
  double ratio[L + 1];
};

template <int L>
LowTables<L> make_low_tables() {
  LowTables<L> t{};
  for (int l = 0; l <= L; ++l) {
    for (int m = 0; m <= l; ++m) {
      const int i = tri_index(l) + m;
      if (m + 2 <= l) {
        t.a[i] = sh_rec_a(l, m);
        t.b[i] = sh_rec_b(l, m);
      } else if (m + 1 == l) {
        t.a[i] = std::sqrt(2.0 * l + 1.0);
      }
      t.dz[i] = (m == 0 ? 1.0 : kSqrt2) * sh_dz_factor(l, m);
    }
    t.ratio[l] = l >= 1 ? sh_seed_ratio(l) : 0.0;
  }
  return t;
}

// Shared tile of kLowThreads (or fewer) rows of K values; the row stride is odd so that
// each thread's row starts in another bank.
template <int L>
struct LowShape {
  static constexpr int K = (L + 1) * (L + 1);
  static constexpr int KP = K | 1;
};

// The column values X_lm of one point for every (l, m), l <= L, in the plain recurrence.
// At these degrees the recurrence's rounding near the poles (which the CPU avoids with
// Reinsch's form) stays at a few ulp, and seeds below 2^-900 (s < 1e-38 at m = 8) only feed
// outputs far below every tolerance, so neither special form is needed.
template <int L, typename Visit>
__device__ __forceinline__ void low_recurrence(const UnitPoint& u, const LowTables<L>& tab,
                                               Visit&& visit) {
  double diag[L + 1];
  diag[0] = kInvSqrt4Pi;
  if (L >= 1) diag[1 % (L + 1)] = tab.ratio[1 % (L + 1)] * kInvSqrt4Pi;
#pragma unroll
  for (int m = 2; m <= L; ++m) diag[m] = diag[m - 1] * tab.ratio[m] * u.s;
  double cur[L + 2], prev[L + 2];
#pragma unroll
  for (int m = 0; m < L + 2; ++m) cur[m] = prev[m] = 0.0;
#pragma unroll
  for (int l = 0; l <= L; ++l) {
#pragma unroll
    for (int m = 0; m < l; ++m) {
      const int i = tri_index(l) + m;
      const double next = tab.a[i] * u.z * cur[m] - tab.b[i] * prev[m];
      prev[m] = cur[m];
      cur[m] = next;
    }
    cur[l] = diag[l];
    visit(l, cur);
  }
}

template <int L>
__device__ __forceinline__ void low_azimuth(const UnitPoint& u, double* c, double* s) {
  double c1 = 1.0, s1 = 0.0;
  if (u.s > 0) {
    c1 = u.x / u.s;
    s1 = u.y / u.s;
  }
  c[0] = 1.0;
  s[0] = 0.0;
#pragma unroll
  for (int m = 1; m <= L; ++m) {
    c[m] = c[m - 1] * c1 - s[m - 1] * s1;
    s[m] = s[m - 1] * c1 + c[m - 1] * s1;
  }
}

template <typename T, int L>
__global__ void __launch_bounds__(kLowThreads)
sh_fwd_low(const T* __restrict__ xyz, int64_t n, T* __restrict__ out, const LowTables<L> tab) {
  using S = LowShape<L>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);
  const int P = blockDim.x;
  for (int64_t p0 = int64_t(blockIdx.x) * P; p0 < n; p0 += int64_t(gridDim.x) * P) {
    const int64_t p = p0 + threadIdx.x;
    if (p < n) {
      const UnitPoint u = load_point(xyz + 3 * p);
      double c[L + 1], s[L + 1];
      low_azimuth<L>(u, c, s);
      const double f = kSqrt2 * u.s;
      T* row = tile + threadIdx.x * S::KP;
      low_recurrence<L>(u, tab, [&](int l, const double* x) {
        T* r = row + l * l + l;
        r[0] = T(x[0]);
#pragma unroll
        for (int m = 1; m <= l; ++m) {
          r[m] = T(x[m] * (f * c[m]));
          r[-m] = T(x[m] * (f * s[m]));
        }
      });
    }
    __syncthreads();
    // The tile's rows are one contiguous range of the output.
    const int count = int(min(int64_t(P), n - p0)) * S::K;
    T* dst = out + p0 * S::K;
    for (int e = threadIdx.x; e < count; e += P) dst[e] = tile[(e / S::K) * S::KP + e % S::K];
    __syncthreads();
  }
}

template <typename T, int L>
__global__ void __launch_bounds__(kLowThreads)
sh_bwd_low(const T* __restrict__ xyz, const T* __restrict__ grad, int64_t n,
           T* __restrict__ grad_xyz, const LowTables<L> tab) {
  using S = LowShape<L>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);
  const int P = blockDim.x;
  for (int64_t p0 = int64_t(blockIdx.x) * P; p0 < n; p0 += int64_t(gridDim.x) * P) {
    const int count = int(min(int64_t(P), n - p0)) * S::K;
    const T* src = grad + p0 * S::K;
    for (int e = threadIdx.x; e < count; e += P) tile[(e / S::K) * S::KP + e % S::K] = src[e];
    __syncthreads();
    const int64_t p = p0 + threadIdx.x;
    if (p < n) {
      const UnitPoint u = load_point(xyz + 3 * p);
      double c[L + 1], s[L + 1];
      low_azimuth<L>(u, c, s);
      const T* g0 = tile + threadIdx.x * S::KP;
      double gx = 0.0, gy = 0.0, gz = 0.0;
      low_recurrence<L>(u, tab, [&](int l, const double* x) {
        if (l == 0) return;  // Y_00 is constant
        const T* g = g0 + l * l + l;
        const double* dz = tab.dz + tri_index(l);
        gz += dz[0] * double(g[0]) * x[1];
#pragma unroll
        for (int m = 1; m <= l; ++m) {
          const double gp = double(g[m]), gm = double(g[-m]);
          const double wx = kSqrt2 * m * c[m - 1], wy = kSqrt2 * m * s[m - 1];
          gx += x[m] * (gp * wx + gm * wy);
          gy += x[m] * (gm * wx - gp * wy);
          if (m < l) gz += dz[m] * x[m + 1] * (gp * c[m] + gm * s[m]);
        }
      });
      const double radial = gx * u.x + gy * u.y + gz * u.z;
      grad_xyz[3 * p + 0] = T((gx - radial * u.x) * u.inv_norm);
      grad_xyz[3 * p + 1] = T((gy - radial * u.y) * u.inv_norm);
      grad_xyz[3 * p + 2] = T((gz - radial * u.z) * u.inv_norm);
    }
    __syncthreads();
  }
}

// ---- higher degree: a group of G threads per point -----------------------------------------

// Group-wide operations. G <= 32: the group is an aligned segment of a warp (shuffles with
// width G). G == kGroupBlock: the group is the whole block (shuffles, then shared memory).
template <int G>
struct Group {
  static_assert(G == 8 || G == 16 || G == 32 || G == kGroupBlock, "unsupported group size");
  static constexpr int kWarps = G > 32 ? G / 32 : 1;
  static constexpr int kWidth = G > 32 ? 32 : G;

  __device__ static Scaled shfl_up(Scaled v, int d) {
    return {__shfl_up_sync(kFullMask, v.m, d, kWidth), __shfl_up_sync(kFullMask, v.e, d, kWidth)};
  }
  __device__ static Scaled shfl_xor(Scaled v, int d) {
    return {__shfl_xor_sync(kFullMask, v.m, d, kWidth), __shfl_xor_sync(kFullMask, v.e, d, kWidth)};
  }
  __device__ static Scaled shfl_idx(Scaled v, int lane) {
    return {__shfl_sync(kFullMask, v.m, lane, kWidth), __shfl_sync(kFullMask, v.e, lane, kWidth)};
  }

  // Inclusive prefix product over ranks 0..rank; `total` gets the product over the group.
  __device__ static Scaled scan_mul(Scaled v, int rank, Scaled& total) {
    const int lane = rank % kWidth;
#pragma unroll
    for (int d = 1; d < kWidth; d <<= 1) {
      const Scaled o = shfl_up(v, d);
      if (lane >= d) v = scaled_mul(o, v);
    }
    total = shfl_idx(v, kWidth - 1);
    if constexpr (kWarps > 1) {
      __shared__ double sm[kWarps];
      __shared__ int se[kWarps];
      const int w = rank / 32;
      if (lane == 31) {
        sm[w] = total.m;
        se[w] = total.e;
      }
      __syncthreads();
      Scaled before = scaled_one();
      total = scaled_one();
#pragma unroll
      for (int i = 0; i < kWarps; ++i) {
        const Scaled wi{sm[i], se[i]};
        if (i < w) before = scaled_mul(before, wi);
        total = scaled_mul(total, wi);
      }
      v = scaled_mul(before, v);
      __syncthreads();
    }
    return v;
  }

  __device__ static Scaled reduce_mul(Scaled v, int rank) {
#pragma unroll
    for (int d = kWidth / 2; d > 0; d >>= 1) v = scaled_mul(v, shfl_xor(v, d));
    if constexpr (kWarps > 1) {
      __shared__ double sm[kWarps];
      __shared__ int se[kWarps];
      const int w = rank / 32;
      if (rank % 32 == 0) {
        sm[w] = v.m;
        se[w] = v.e;
      }
      __syncthreads();
      v = scaled_one();
#pragma unroll
      for (int i = 0; i < kWarps; ++i) v = scaled_mul(v, Scaled{sm[i], se[i]});
      __syncthreads();
    }
    return v;
  }

  __device__ static double reduce_sum(double v, int rank) {
#pragma unroll
    for (int d = kWidth / 2; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d, kWidth);
    if constexpr (kWarps > 1) {
      __shared__ double sm[kWarps];
      if (rank % 32 == 0) sm[rank / 32] = v;
      __syncthreads();
      v = 0.0;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) v += sm[i];
      __syncthreads();
    }
    return v;
  }
};

// Column states of one thread for one pass (columns m = first + rank + j G), and the
// (cos, sin) of (m - shift) phi for each, shift = 0 forward and 1 backward.
template <int G, int C>
struct Pass {
  Column col[C];
  double c[C], s[C];
  int first;  // first column of the pass
};

// Seeds and azimuths of the pass starting at column `first`. Every thread of the group
// calls this (it synchronises the group).
template <int G, int C>
__device__ __forceinline__ void start_pass(Pass<G, C>& ps, int first, int rank, int L,
                                           const UnitPoint& u, const PointMode& pm, int shift) {
  using Grp = Group<G>;
  ps.first = first;
  double s_m;
  int s_e;
  split_s(u.s, s_m, s_e);
  // Product of the seed factors of all earlier columns: each thread its share, then one
  // reduction (a few multiplications per thread even at degree 4096).
  Scaled carry = scaled_one();
  for (int m = rank; m < first; m += G) carry = scaled_mul(carry, seed_factor(m, L, s_m, s_e));
  carry = Grp::reduce_mul(carry, rank);
#pragma unroll
  for (int j = 0; j < C; ++j) {
    const int m = first + rank + j * G;
    Scaled total;
    const Scaled incl = Grp::scan_mul(seed_factor(m, L, s_m, s_e), rank, total);
    ps.col[j] = column_start(scaled_mul(carry, incl), pm);
    carry = scaled_mul(carry, total);
  }
  double c1 = 1.0, s1 = 0.0;
  if (u.s > 0) {
    c1 = u.x / u.s;
    s1 = u.y / u.s;
  }
  double cg, sg;
  complex_pow(c1, s1, G, cg, sg);
  complex_pow(c1, s1, max(first + rank - shift, 0), ps.c[0], ps.s[0]);
#pragma unroll
  for (int j = 1; j < C; ++j) {
    ps.c[j] = ps.c[j - 1];
    ps.s[j] = ps.s[j - 1];
    complex_mul(ps.c[j], ps.s[j], cg, sg);
  }
}

template <typename T, int G, int C>
__global__ void __launch_bounds__(kGroupBlock)
sh_fwd_group(const T* __restrict__ xyz, int64_t n, int L, T* __restrict__ out) {
  constexpr int P = kGroupBlock / G;  // points per block
  const int rank = threadIdx.x % G;
  const int64_t K = sh_size(L);
  const int first = blockIdx.y * (G * C);
  for (int64_t p0 = int64_t(blockIdx.x) * P; p0 < n; p0 += int64_t(gridDim.x) * P) {
    const int64_t p = p0 + threadIdx.x / G;
    const bool active = p < n;  // idle groups of the last tile still join the group ops
    const UnitPoint u = load_point(xyz + 3 * (active ? p : n - 1));
    const PointMode pm = point_mode(u.z, u.s);
    Pass<G, C> ps;
    start_pass(ps, first, rank, L, u, pm, 0);
    const double f = kSqrt2 * u.s;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      ps.c[j] *= f;  // sqrt2 s cos(m phi), sqrt2 s sin(m phi)
      ps.s[j] *= f;
    }
    T* const out_p = out + p * K;
    for (int l = first; l <= L; ++l) {
      T* row = out_p + int64_t(l) * l + l;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const int m = first + rank + j * G;
        if (m > l) break;  // later columns start at later degrees
        if (m < l) column_step(ps.col[j], l, m, pm);
        const double v = column_value(ps.col[j]);
        if (active) {
          if (m == 0) {
            row[0] = T(v);
          } else {
            row[m] = T(v * ps.c[j]);
            row[-m] = T(v * ps.s[j]);
          }
        }
      }
    }
  }
}

template <typename T, int G, int C>
__global__ void __launch_bounds__(kGroupBlock)
sh_bwd_group(const T* __restrict__ xyz, const T* __restrict__ grad, int64_t n, int L,
             T* __restrict__ grad_xyz) {
  using Grp = Group<G>;
  constexpr int P = kGroupBlock / G;
  const int rank = threadIdx.x % G;
  const int64_t K = sh_size(L);
  for (int64_t p0 = int64_t(blockIdx.x) * P; p0 < n; p0 += int64_t(gridDim.x) * P) {
    const int64_t p = p0 + threadIdx.x / G;
    const bool active = p < n;
    const UnitPoint u = load_point(xyz + 3 * (active ? p : n - 1));
    const PointMode pm = point_mode(u.z, u.s);
    const T* const g_p = grad + p * K;
    double gx = 0.0, gy = 0.0, gz = 0.0;
    for (int first = 0; first <= L; first += G * C) {
      Pass<G, C> ps;
      start_pass(ps, first, rank, L, u, pm, 1);  // c, s: cos, sin of (m-1) phi
      for (int l = first; l <= L; ++l) {
        const T* g = g_p + int64_t(l) * l + l;
        const double dl = l;
#pragma unroll
        for (int j = 0; j < C; ++j) {
          const int m = first + rank + j * G;
          if (m > l) break;
          if (m < l) column_step(ps.col[j], l, m, pm);
          // Column m >= 1 adds its x/y terms and the z term of order m-1, which needs
          // R_{l,m} (this column): d/dz Y_{l,+-(m-1)} = dz_{l,m-1} R_lm Re/Im E_{m-1}.
          if (m == 0 || !active) continue;
          const double x = column_value(ps.col[j]);
          const double gp = double(g[m]), gm = double(g[-m]);
          const double gp1 = double(g[m - 1]), gm1 = m >= 2 ? double(g[1 - m]) : 0.0;
          const double wx = kSqrt2 * m * ps.c[j], wy = kSqrt2 * m * ps.s[j];
          gx += x * (gp * wx + gm * wy);
          gy += x * (gm * wx - gp * wy);
          const double dzf = m == 1 ? sqrt(dl * (dl + 1.0))
                                    : kSqrt2 * sqrt((dl - m + 1.0) * (dl + m));
          gz += dzf * x * (gp1 * ps.c[j] + gm1 * ps.s[j]);
        }
      }
    }
    gx = Grp::reduce_sum(gx, rank);
    gy = Grp::reduce_sum(gy, rank);
    gz = Grp::reduce_sum(gz, rank);
    if (active && rank == 0) {
      const double radial = gx * u.x + gy * u.y + gz * u.z;
      grad_xyz[3 * p + 0] = T((gx - radial * u.x) * u.inv_norm);
      grad_xyz[3 * p + 1] = T((gy - radial * u.y) * u.inv_norm);
      grad_xyz[3 * p + 2] = T((gz - radial * u.z) * u.inv_norm);
    }
  }
}

// ---- launch ----------------------------------------------------------------------------------

unsigned grid_for(int64_t tiles) { return unsigned(std::min<int64_t>(std::max<int64_t>(tiles, 1), kMaxBlocks)); }

template <typename T, int L>
void launch_low(const T* xyz, const T* grad, int64_t n, T* out, cudaStream_t stream) {
  static const LowTables<L> tables = make_low_tables<L>();
  // 128 rows per block when the tile fits the default 48 KiB of shared memory, else 64.
  const int threads =
      size_t(kLowThreads) * LowShape<L>::KP * sizeof(T) <= 48 * 1024 ? kLowThreads : kLowThreads / 2;
  const size_t smem = size_t(threads) * LowShape<L>::KP * sizeof(T);
  const unsigned blocks = grid_for((n + threads - 1) / threads);
  if (grad == nullptr)
    sh_fwd_low<T, L><<<blocks, threads, smem, stream>>>(xyz, n, out, tables);
  else
    sh_bwd_low<T, L><<<blocks, threads, smem, stream>>>(xyz, grad, n, out, tables);
}

template <typename T, int L = 0>
void dispatch_low(int degree, const T* xyz, const T* grad, int64_t n, T* out, cudaStream_t stream) {
  if constexpr (L <= kLowMaxDegree) {
    if (degree == L) return launch_low<T, L>(xyz, grad, n, out, stream);
    dispatch_low<T, L + 1>(degree, xyz, grad, n, out, stream);
  }
}

template <typename T, int G, int C>
void launch_group(const T* xyz, const T* grad, int64_t n, int degree, T* out, cudaStream_t stream) {
  constexpr int P = kGroupBlock / G;
  const int64_t tiles = (n + P - 1) / P;
  if (grad == nullptr) {
    const unsigned passes = unsigned((degree + 1 + G * C - 1) / (G * C));
    const dim3 grid(grid_for(tiles), passes);
    sh_fwd_group<T, G, C><<<grid, kGroupBlock, 0, stream>>>(xyz, n, degree, out);
  } else {
    sh_bwd_group<T, G, C><<<grid_for(tiles), kGroupBlock, 0, stream>>>(xyz, grad, n, degree, out);
  }
}

// Group size by degree: about C = 4 columns per thread, so that every thread has work and
// few threads idle; from degree 128 on, whole blocks of 128 threads per point and several
// passes of 512 columns (register use stays that of 4 columns at any degree).
template <typename T>
void dispatch(int degree, const T* xyz, const T* grad, int64_t n, T* out, cudaStream_t stream) {
  if (degree <= kLowMaxDegree) {
    dispatch_low<T>(degree, xyz, grad, n, out, stream);
  } else if (degree < 32) {
    launch_group<T, 8, 4>(xyz, grad, n, degree, out, stream);
  } else if (degree < 64) {
    launch_group<T, 16, 4>(xyz, grad, n, degree, out, stream);
  } else if (degree < 128) {
    launch_group<T, 32, 4>(xyz, grad, n, degree, out, stream);
  } else {
    launch_group<T, kGroupBlock, 4>(xyz, grad, n, degree, out, stream);
  }
}

}  // namespace

template <typename T>
void sh_cuda_fwd(const T* xyz, int64_t n, int degree, T* out, void* stream) {
  if (n <= 0) return;
  dispatch<T>(degree, xyz, nullptr, n, out, static_cast<cudaStream_t>(stream));
  check_launch("spherical_harmonics forward");
}

template <typename T>
void sh_cuda_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz, void* stream) {
  if (n <= 0) return;
  dispatch<T>(degree, xyz, grad_out, n, grad_xyz, static_cast<cudaStream_t>(stream));
  check_launch("spherical_harmonics backward");
}

template void sh_cuda_fwd<float>(const float*, int64_t, int, float*, void*);
template void sh_cuda_fwd<double>(const double*, int64_t, int, double*, void*);
template void sh_cuda_bwd<float>(const float*, const float*, int64_t, int, float*, void*);
template void sh_cuda_bwd<double>(const double*, const double*, int64_t, int, double*, void*);

}  // namespace locdiff
