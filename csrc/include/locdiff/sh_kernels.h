// Spherical-harmonic kernels: raw pointers, sizes and a stream; no torch.
// xyz: (n, 3) contiguous, any non-zero length (normalised inside, in float64).
// out: (n, (degree+1)^2) contiguous, layout of sh_math.h. Callers validate inputs.
#pragma once

#include <cstdint>

namespace locdiff {

// Returns -1, or the index of the first row that is not finite or is zero (its output
// row is then undefined): the check rides along with the normalisation, at no extra pass.
template <typename T>
int64_t sh_cpu_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads);
// Vector-Jacobian product: grad_xyz = (dY/dxyz)^T grad_out.
template <typename T>
void sh_cpu_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                int num_threads);
// Which low-degree CPU forward runs: "x86-64-v3" (AVX2 register groups to L = 20) or
// "portable" (other CPUs, or LOCDIFF_CPU_PORTABLE=1 when the library loads).
const char* sh_cpu_forward_path();
// From how many output bytes the mid-degree CPU forward streams, for values of 4 or 8 bytes
// (sh_cpu_lanes.cpp).
int64_t sh_cpu_lanes_stream_bytes(int value_bytes);

#ifdef LOCDIFF_WITH_CUDA
template <typename T>
void sh_cuda_fwd(const T* xyz, int64_t n, int degree, T* out, void* stream);
template <typename T>
void sh_cuda_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                 void* stream);
#endif

}  // namespace locdiff
