// Complex FFT for the ring grids (csrc/cpu/shdd_cpu.cpp, ring_lanes.h): iterative radix-2
// on split re/im arrays for power-of-two sizes; other sizes take a direct O(n^2) DFT
// (correct, slow: grids from locdiff.grids use powers of two). The element type E is a
// scalar or a vector of lanes (one coefficient vector per lane, ring_lanes.h); S is its
// scalar type, the precision of the twiddles. Internal to csrc/cpu.
#pragma once

#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "legendre_tables.h"

namespace locdiff {
namespace cpu {

struct FftPlan {
  int n = 0;
  bool pow2 = false;
  std::vector<int> rev;
  std::vector<double> c, s;  // cos, sin(2 pi k / n), k < n
};

// One plan per size, built once and kept.
inline std::shared_ptr<const FftPlan> fft_plan(int n) {
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

// In place: x_k <- sum_j x_j exp(sign * 2 pi i j k / n). tmp: 2n elements of scratch (used
// by the direct DFT only). Inlined into its LOCDIFF_CLONES callers.
template <typename S, typename E>
LOCDIFF_INLINE void fft(const FftPlan& p, E* re, E* im, int sign, E* tmp) {
  const int n = p.n;
  if (!p.pow2) {
    E* tr = tmp;
    E* ti = tmp + n;
    for (int k = 0; k < n; ++k) {
      E ar{}, ai{};
      int64_t idx = 0;
      for (int j = 0; j < n; ++j) {
        const S c = S(p.c[idx]), s = S(sign * p.s[idx]);
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
      E* __restrict ar = re + start;
      E* __restrict ai = im + start;
      E* __restrict br = re + start + half;
      E* __restrict bi = im + start + half;
      for (int j = 0; j < half; ++j) {
        const S wr = S(p.c[j * stride]), wi = S(sign * p.s[j * stride]);
        const E xr = br[j] * wr - bi[j] * wi, xi = br[j] * wi + bi[j] * wr;
        br[j] = ar[j] - xr;
        bi[j] = ai[j] - xi;
        ar[j] += xr;
        ai[j] += xi;
      }
    }
  }
}

}  // namespace cpu
}  // namespace locdiff
