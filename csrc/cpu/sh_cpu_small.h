// Low-degree CPU path (lanes across points); internal to csrc/cpu.
#pragma once

#include <cstdint>

namespace locdiff {

// Below this degree sh_cpu_fwd / sh_cpu_bwd hand over to the small-degree path
// (measured on AVX2: the lanes-across-points path is faster up to about L = 32).
constexpr int kSmallDegreeMax = 32;

// Same contract as sh_cpu_fwd: returns -1 or the first non-finite / zero row.
template <typename T>
int64_t sh_cpu_small_fwd(const T* xyz, int64_t n, int degree, T* out, int num_threads);
template <typename T>
void sh_cpu_small_bwd(const T* xyz, const T* grad_out, int64_t n, int degree, T* grad_xyz,
                      int num_threads);

}  // namespace locdiff
