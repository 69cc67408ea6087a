// SHDD kernels on CUDA: ring-grid synthesis, and the SHDD-KL loss with its backward.
//
// Work layout. One block per (vector, northern ring): threads first split the orders m and
// form the ring sums A_m, B_m for the ring and its mirror (Legendre table rows, l-loop per
// thread), in shared memory; then threads split the longitudes and evaluate the two
// trigonometric sums directly (O(nlon L) per ring: no cuFFT dependency, and at these sizes
// the Legendre stage dominates). The KL runs over batch chunks whose grids live in a
// scratch buffer of at most kChunkElems doubles per operand, so no batch x grid matrix
// is allocated: per sample, a block reduces the log-partitions and the KL (backward: the
// weights, then the adjoint, which accumulates Legendre projections across rings with
// atomicAdd). All arithmetic is float64; T is the storage type. What has run on a GPU and
// what has not: docs/gpu.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "locdiff/shdd_kernels.h"

namespace locdiff {
namespace {

constexpr int kThreads = 256;
constexpr double kPi = 3.14159265358979323846;
constexpr int64_t kChunkElems = int64_t(1) << 24;  // 128 MB of float64 per scratch grid

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("locdiff CUDA ") + what + ": " + cudaGetErrorString(err));
}

// A float64 scratch buffer ordered on `stream`, freed on every way out (an error thrown by a
// later allocation or launch included), so a failed call leaks nothing.
class DeviceScratch {
 public:
  DeviceScratch(int64_t elems, cudaStream_t stream) : stream_(stream) {
    const cudaError_t err = cudaMallocAsync(&ptr_, sizeof(double) * elems, stream);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      cudaGetLastError();  // clear it, or the next launch check reports this failure as its own
      check(err, "alloc");
    }
  }
  ~DeviceScratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  double* get() const { return ptr_; }

 private:
  double* ptr_ = nullptr;
  cudaStream_t stream_;
};

__host__ __device__ inline int64_t leg_off(int L, int m) {
  return int64_t(m) * (L + 1) - int64_t(m) * (m - 1) / 2;
}

// Shared layout per block: AN, AS, BN, BS, each (L+1) doubles.
template <typename T>
__global__ void synth_kernel(const T* __restrict__ coeffs, int degree, int nlat, int nlon,
                             const double* __restrict__ table, double lon0,
                             double* __restrict__ out /* (B, nlat*nlon) */) {
  extern __shared__ double sh[];
  const int L = degree, nhalf = (nlat + 1) / 2;
  const int j = blockIdx.x, b = blockIdx.y;
  const int js = nlat - 1 - j;
  const bool pair = js != j;
  const int64_t K = int64_t(L + 1) * (L + 1);
  const T* c = coeffs + K * b;
  double* AN = sh;
  double* AS = sh + (L + 1);
  double* BN = sh + 2 * (L + 1);
  double* BS = sh + 3 * (L + 1);
  for (int m = threadIdx.x; m <= L; m += blockDim.x) {
    const int n = L + 1 - m;
    const double* p = table + int64_t(nhalf) * leg_off(L, m) + int64_t(j) * n;
    double an = 0, as = 0, bn = 0, bs = 0;
    for (int i = 0; i < n; ++i) {
      const int l = m + i;
      const double a = double(c[int64_t(l) * l + l + m]);
      const double bb = m ? double(c[int64_t(l) * l + l - m]) : 0.0;
      const double sign = (i & 1) ? -1.0 : 1.0;
      an += p[i] * a;
      as += sign * p[i] * a;
      bn += p[i] * bb;
      bs += sign * p[i] * bb;
    }
    AN[m] = an;
    AS[m] = as;
    BN[m] = bn;
    BS[m] = bs;
  }
  __syncthreads();
  const int64_t G = int64_t(nlat) * nlon;
  for (int k = threadIdx.x; k < nlon; k += blockDim.x) {
    const double phi = lon0 + 2.0 * kPi * k / nlon;
    double s1, c1;
    sincos(phi, &s1, &c1);
    double cm = 1.0, sm = 0.0, fn = AN[0], fs = AS[0];
    for (int m = 1; m <= L; ++m) {
      const double t = cm * c1 - sm * s1;
      sm = sm * c1 + cm * s1;
      cm = t;
      fn += AN[m] * cm + BN[m] * sm;
      fs += AS[m] * cm + BS[m] * sm;
    }
    out[G * b + int64_t(j) * nlon + k] = fn;
    if (pair) out[G * b + int64_t(js) * nlon + k] = fs;
  }
}

__device__ double block_reduce(double v, double* scratch, bool is_max) {
  for (int o = 16; o > 0; o >>= 1) {
    const double w = __shfl_down_sync(0xffffffffu, v, o);
    v = is_max ? fmax(v, w) : v + w;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x >> 5) ? scratch[lane] : (is_max ? -INFINITY : 0.0);
    for (int o = 16; o > 0; o >>= 1) {
      const double w = __shfl_down_sync(0xffffffffu, v, o);
      v = is_max ? fmax(v, w) : v + w;
    }
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const double r = scratch[0];
  __syncthreads();
  return r;
}

__device__ double log_partition(const double* f, int nlat, int nlon, const double* log_area,
                                double inv_t, double* scratch) {
  const int64_t G = int64_t(nlat) * nlon;
  double mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < G; i += blockDim.x) mx = fmax(mx, f[i] * inv_t + log_area[i / nlon]);
  mx = block_reduce(mx, scratch, true);
  double s = 0;
  for (int64_t i = threadIdx.x; i < G; i += blockDim.x) s += exp(f[i] * inv_t + log_area[i / nlon] - mx);
  s = block_reduce(s, scratch, false);
  return mx + log(s);
}

// One block per sample: KL, and (backward) the grid weights written over fp / ft.
template <typename T>
__global__ void kl_kernel(double* fp, double* ft, int nlat, int nlon, const double* log_area,
                          double inv_t, T* kl_out, const T* grad_kl, bool want_wp, bool want_wt) {
  __shared__ double scratch[32];
  const int64_t G = int64_t(nlat) * nlon;
  double* p_ = fp + G * blockIdx.x;
  double* t_ = ft + G * blockIdx.x;
  const double lzp = log_partition(t_, nlat, nlon, log_area, inv_t, scratch);
  const double lzq = log_partition(p_, nlat, nlon, log_area, inv_t, scratch);
  double acc = 0;
  for (int64_t i = threadIdx.x; i < G; i += blockDim.x)
    acc += exp(t_[i] * inv_t + log_area[i / nlon] - lzp) * (t_[i] - p_[i]);
  const double kl = block_reduce(acc, scratch, false) * inv_t - lzp + lzq;
  if (kl_out && threadIdx.x == 0) kl_out[blockIdx.x] = T(kl);
  if (!grad_kl) return;
  const double g = double(grad_kl[blockIdx.x]);
  for (int64_t i = threadIdx.x; i < G; i += blockDim.x) {
    const double la = log_area[i / nlon];
    const double lp = t_[i] * inv_t + la - lzp, lq = p_[i] * inv_t + la - lzq;
    const double p = exp(lp);
    const double wp = g * (exp(lq) - p) * inv_t, wt = g * p * (lp - lq - kl) * inv_t;
    if (want_wp) p_[i] = wp;
    if (want_wt) t_[i] = wt;
  }
}

// Adjoint: grad (B, K) += sum over grid of w * Y. One block per (sample, northern ring):
// Fourier sums of both mirror rings by threads over m, then Legendre projections by threads
// over (m, l), accumulated across rings with atomicAdd (grad must start at zero; float64).
// W is the storage type of the weights.
template <typename W>
__global__ void adjoint_kernel(const W* __restrict__ w, int degree, int nlat, int nlon,
                               const double* __restrict__ table, double lon0, double* grad) {
  extern __shared__ double sh[];
  const int L = degree, nhalf = (nlat + 1) / 2;
  const int j = blockIdx.x, b = blockIdx.y;
  const int js = nlat - 1 - j;
  const bool pair = js != j;
  const int64_t G = int64_t(nlat) * nlon, K = int64_t(L + 1) * (L + 1);
  const W* wn = w + G * b + int64_t(j) * nlon;
  const W* ws = w + G * b + int64_t(js) * nlon;
  double* RN = sh;  // sum_k w cos(m phi_k), north
  double* RS = sh + (L + 1);
  double* IN = sh + 2 * (L + 1);  // sum_k w sin(m phi_k)
  double* IS = sh + 3 * (L + 1);
  for (int m = threadIdx.x; m <= L; m += blockDim.x) {
    double rn = 0, rs = 0, in = 0, is = 0;
    for (int k = 0; k < nlon; ++k) {
      double s, c;
      sincos(m * (lon0 + 2.0 * kPi * k / nlon), &s, &c);
      const double a = double(wn[k]);
      rn += a * c;
      in += a * s;
      if (pair) {
        const double z = double(ws[k]);
        rs += z * c;
        is += z * s;
      }
    }
    RN[m] = rn;
    RS[m] = rs;
    IN[m] = in;
    IS[m] = is;
  }
  __syncthreads();
  double* g = grad + K * b;
  for (int m = 0; m <= L; ++m) {
    const int n = L + 1 - m;
    const double* p = table + int64_t(nhalf) * leg_off(L, m) + int64_t(j) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int l = m + i;
      const double sign = (i & 1) ? -1.0 : 1.0;
      atomicAdd(g + int64_t(l) * l + l + m, p[i] * (RN[m] + sign * RS[m]));
      if (m) atomicAdd(g + int64_t(l) * l + l - m, p[i] * (IN[m] + sign * IS[m]));
    }
  }
}

template <typename T>
__global__ void cast_kernel(const double* __restrict__ src, T* __restrict__ dst, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = T(src[i]);
}

// Four (L+1) float64 rows per block for the synthesis and the adjoint: past the default
// 48 KiB (L >= 1536) the kernel must opt in to more, up to what the GPU allows per block.
size_t ring_smem(int degree) { return 4 * size_t(degree + 1) * sizeof(double); }

template <typename Kernel>
void opt_in_smem(Kernel kernel, int degree, const char* what) {
  const size_t bytes = ring_smem(degree);
  if (bytes <= 48 * 1024) return;
  int device = 0, limit = 0;
  check(cudaGetDevice(&device), "get device");
  check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "shared memory limit");
  if (bytes > size_t(limit))
    throw std::invalid_argument(std::string("locdiff ") + what + ": degree " + std::to_string(degree) +
                                " needs " + std::to_string(bytes) + " bytes of shared memory per block, "
                                "more than the " + std::to_string(limit) + " this GPU allows; expected "
                                "degree <= " + std::to_string(limit / (4 * int(sizeof(double))) - 1));
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "shared memory opt-in");
}

void check_launch(const char* what) { check(cudaGetLastError(), what); }

template <typename T>
void launch_synth(const T* coeffs, int64_t batch, int degree, const RingGrid& g, double* out,
                  cudaStream_t stream) {
  const int nhalf = (g.nlat + 1) / 2;
  const dim3 grid(nhalf, unsigned(batch));
  opt_in_smem(synth_kernel<T>, degree, "shdd synthesis");
  synth_kernel<T><<<grid, kThreads, ring_smem(degree), stream>>>(coeffs, degree, g.nlat, g.nlon,
                                                                 g.table, g.lon0, out);
  check_launch("shdd synth launch");
}

// acc (nb, K) = sum over the grid of w * Y for nb weight rows (w: (nb, G)).
template <typename W>
void launch_adjoint(const W* w, int64_t nb, int degree, const RingGrid& g, double* acc,
                    cudaStream_t stream) {
  const int64_t K = int64_t(degree + 1) * (degree + 1);
  check(cudaMemsetAsync(acc, 0, sizeof(double) * K * nb, stream), "memset");
  const dim3 blocks((g.nlat + 1) / 2, unsigned(nb));
  opt_in_smem(adjoint_kernel<W>, degree, "shdd adjoint");
  adjoint_kernel<W><<<blocks, kThreads, ring_smem(degree), stream>>>(w, degree, g.nlat, g.nlon, g.table,
                                                                     g.lon0, acc);
  check_launch("shdd adjoint launch");
}

template <typename T>
void launch_cast(const double* src, T* dst, int64_t n, cudaStream_t stream) {
  cast_kernel<T><<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(src, dst, n);
  check_launch("shdd cast launch");
}

int64_t chunk_rows(const RingGrid& g) {
  const int64_t G = int64_t(g.nlat) * g.nlon;
  return std::max<int64_t>(1, std::min<int64_t>(65535, kChunkElems / std::max<int64_t>(G, 1)));
}

}  // namespace

// B rows mapped to out_width values each, in chunks of `rows` through a float64 scratch
// buffer (launch(in, nb, scratch)), then cast to the storage type.
template <typename In, typename T, typename Launch>
void map_rows(const In* in, int64_t batch, int64_t in_width, int64_t out_width, int64_t rows, T* out,
              cudaStream_t stream, Launch launch) {
  DeviceScratch buf(out_width * std::min(rows, batch), stream);
  for (int64_t b0 = 0; b0 < batch; b0 += rows) {
    const int64_t nb = std::min(rows, batch - b0);
    launch(in + in_width * b0, nb, buf.get());
    launch_cast(buf.get(), out + out_width * b0, nb * out_width, stream);
  }
}

template <typename T>
void shdd_synth_cuda(const T* coeffs, int64_t batch, int degree, const RingGrid& grid, T* out,
                     void* stream_ptr) {
  if (batch <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t G = int64_t(grid.nlat) * grid.nlon, K = int64_t(degree + 1) * (degree + 1);
  map_rows(coeffs, batch, K, G, chunk_rows(grid), out, stream, [&](const T* c, int64_t nb, double* buf) {
    launch_synth(c, nb, degree, grid, buf, stream);
  });
}

template <typename T>
void shdd_adjoint_cuda(const T* weights, int64_t batch, int degree, const RingGrid& grid,
                       T* out_coeffs, void* stream_ptr) {
  if (batch <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t G = int64_t(grid.nlat) * grid.nlon, K = int64_t(degree + 1) * (degree + 1);
  // Rows per chunk: the grid's y dimension, and a float64 accumulator of kChunkElems.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(65535, kChunkElems / K));
  map_rows(weights, batch, G, K, rows, out_coeffs, stream, [&](const T* w, int64_t nb, double* acc) {
    launch_adjoint(w, nb, degree, grid, acc, stream);
  });
}

template <typename T>
void shdd_kl_fwd_cuda(const T* pred, const T* target, int64_t batch, int degree,
                      const RingGrid& grid, double inv_temperature, T* kl, void* stream_ptr) {
  if (batch <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t G = int64_t(grid.nlat) * grid.nlon, K = int64_t(degree + 1) * (degree + 1);
  const int64_t rows = chunk_rows(grid);
  DeviceScratch fp(G * std::min(rows, batch), stream), ft(G * std::min(rows, batch), stream);
  for (int64_t b0 = 0; b0 < batch; b0 += rows) {
    const int64_t nb = std::min(rows, batch - b0);
    launch_synth(pred + K * b0, nb, degree, grid, fp.get(), stream);
    launch_synth(target + K * b0, nb, degree, grid, ft.get(), stream);
    kl_kernel<T><<<unsigned(nb), kThreads, 0, stream>>>(fp.get(), ft.get(), grid.nlat, grid.nlon, grid.log_area,
                                                        inv_temperature, kl + b0, nullptr, false, false);
    check_launch("shdd kl launch");
  }
}

template <typename T>
void shdd_kl_bwd_cuda(const T* pred, const T* target, const T* grad_kl, int64_t batch,
                      int degree, const RingGrid& grid, double inv_temperature, T* grad_pred,
                      T* grad_target, void* stream_ptr) {
  if (batch <= 0 || (!grad_pred && !grad_target)) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t G = int64_t(grid.nlat) * grid.nlon, K = int64_t(degree + 1) * (degree + 1);
  const int64_t rows = chunk_rows(grid);
  const int64_t cap = std::min(rows, batch);
  DeviceScratch fp(G * cap, stream), ft(G * cap, stream), acc(K * cap, stream);
  for (int64_t b0 = 0; b0 < batch; b0 += rows) {
    const int64_t nb = std::min(rows, batch - b0);
    launch_synth(pred + K * b0, nb, degree, grid, fp.get(), stream);
    launch_synth(target + K * b0, nb, degree, grid, ft.get(), stream);
    kl_kernel<T><<<unsigned(nb), kThreads, 0, stream>>>(fp.get(), ft.get(), grid.nlat, grid.nlon, grid.log_area,
                                                        inv_temperature, nullptr, grad_kl + b0,
                                                        grad_pred != nullptr, grad_target != nullptr);
    check_launch("shdd kl backward launch");
    for (int which = 0; which < 2; ++which) {
      T* dst = which == 0 ? grad_pred : grad_target;
      if (!dst) continue;
      launch_adjoint<double>(which == 0 ? fp.get() : ft.get(), nb, degree, grid, acc.get(), stream);
      launch_cast(acc.get(), dst + K * b0, nb * K, stream);
    }
  }
}

#define LOCDIFF_INSTANTIATE(T)                                                                  \
  template void shdd_synth_cuda<T>(const T*, int64_t, int, const RingGrid&, T*, void*);        \
  template void shdd_adjoint_cuda<T>(const T*, int64_t, int, const RingGrid&, T*, void*);      \
  template void shdd_kl_fwd_cuda<T>(const T*, const T*, int64_t, int, const RingGrid&, double, \
                                    T*, void*);                                                \
  template void shdd_kl_bwd_cuda<T>(const T*, const T*, const T*, int64_t, int, const RingGrid&, \
                                    double, T*, T*, void*);
LOCDIFF_INSTANTIATE(float)
LOCDIFF_INSTANTIATE(double)
#undef LOCDIFF_INSTANTIATE

}  // namespace locdiff
