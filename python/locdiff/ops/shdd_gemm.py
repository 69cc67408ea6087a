"""The decode's grid stage on the CPU: which of the two synthesis routes runs (fused C++
lanes or GEMM + FFT), then the C++ local-maximum scan. The body of ``locdiff::shdd_candidates``
and of ``locdiff::shdd_decode`` on the CPU."""
from __future__ import annotations

import torch
from torch import Tensor

from locdiff.ops import launch, validation
from locdiff.ops.candidates import one_mode_per_polar_ring

# Decoding synthesises f on the grid in chunks of vectors (at most _CHUNK_VALUES grid values,
# so no batch x grid matrix), then the C++ scan keeps each vector's local maxima:
#   Legendre stage, batched GEMMs (MKL through torch.bmm): per order m and parity of l - m,
#     table (northern rings, l of that parity) x coefficients (l, cos and sin columns of the
#     chunk). Even and odd sums E, O give both mirror rings: north E + O, south E - O, since
#     P_lm(-z) = (-1)^(l-m) P_lm(z). Orders go in _M_GROUPS groups, each padded to its
#     longest block only (one group would pad the triangle to a square: twice the flops).
#   Fourier stage, torch.fft.irfft per ring: f = sum_m A_m cos(m phi) + B_m sin(m phi) on
#     phi = lon0 + 2 pi k / N is the inverse real FFT of X_m = w_m (A'_m - i B'_m), w_0 = N,
#     w_m = N/2, where A', B' are the sums of the coefficients rotated by m lon0 (done on
#     the coefficients, B x K work, instead of on the spectra). Valid while L < N/2 (else
#     the fused C++ kernel, shdd_candidates_cpu, takes the grid). The spectra hold the
#     northern rings first, then their mirrors in the same order: the scan reads that
#     folded layout, so nothing is flipped.
# The fused C++ kernel (shdd_candidates_cpu) synthesises one vector per SIMD lane
# (csrc/cpu/ring_lanes.h) in blocks of 8, then the same scan. It wins at low degree, and at
# mid degree from a batch of a few blocks; GEMMs win the rest (figures: docs/kernels.md,
# "Decode grid stage on the CPU").
_FUSED_MAX_DEGREE = 32
_FUSED_WIDE_DEGREE, _FUSED_WIDE_BATCH = 64, 32
_CHUNK_VALUES = 1 << 21
_M_GROUPS = 3
_GEMM_LAYOUTS: dict = {}


def _gemm_layout(table: Tensor, degree: int, nlat: int, lon0: float, nlon: int, dtype):
    """Cached per table tensor: (groups [(m0, m1, table (2(m1-m0), nhalf, n) scaled by w_m,
    coefficient rows (2(m1-m0) * n * 2,))], rotation (a (K,), partner (K,), b (K,)) with
    c'_k = a_k c_k + b_k c_partner(k), b = None when lon0 is a multiple of pi)."""
    key = (id(table), degree, nlat, nlon, float(lon0), dtype)
    hit = _GEMM_LAYOUTS.get(key)
    if hit is not None and hit[0] is table:
        return hit[1]
    L, nhalf, K = degree, (nlat + 1) // 2, (degree + 1) ** 2
    bounds = sorted({round(g * (L + 1) / _M_GROUPS) for g in range(_M_GROUPS + 1)})
    spans = list(zip(bounds[:-1], bounds[1:]))
    validation.check_allocation((sum(2 * (m1 - m0) * nhalf * ((L + 2 - m0) // 2) for m0, m1 in spans),), dtype,
                                torch.device("cpu"), f"the decode's GEMM tables at degree {L}",
                                "decode at a lower degree")
    groups = []
    for m0, m1 in spans:
        n = (L + 2 - m0) // 2
        # Block m of the table starts at nhalf * offset(m) and is (nhalf, L+1-m), entry (j, l-m);
        # its even and odd l - m columns, scaled by w_m, fill slices 2(m - m0) and 2(m - m0) + 1.
        t = torch.zeros((2 * (m1 - m0), nhalf, n), dtype=dtype)
        for m in range(m0, m1):
            off = nhalf * (m * (L + 1) - m * (m - 1) // 2)
            block = table[off:off + nhalf * (L + 1 - m)].view(nhalf, L + 1 - m)
            w = float(nlon) if m == 0 else nlon / 2.0
            for parity in (0, 1):
                cols = block[:, parity::2]
                t[2 * (m - m0) + parity, :, :cols.shape[1]] = cols * w
        m = torch.arange(m0, m1)[:, None, None]
        l = m + torch.arange(2)[None, :, None] + 2 * torch.arange(n)[None, None, :]  # (m, parity, i)
        valid = l <= L
        # Coefficient rows (cos: l*l+l+m, sin: l*l+l-m) per (m, parity, i); K: the zero row.
        rows = torch.stack([torch.where(valid, l * l + l + m, K),
                            torch.where(valid & (m > 0), l * l + l - m, K)], -1)
        groups.append((m0, m1, t, rows.flatten()))
    # Rotation by m lon0 (cos part a c_+m + b c_-m, sin part negated for A' - i B').
    l = torch.arange(L + 1).repeat_interleave(2 * torch.arange(L + 1) + 1)
    m = torch.arange(K) - l * l - l
    cos, sin = torch.cos(m.abs().double() * lon0), torch.sin(m.abs().double() * lon0)
    a = torch.where(m >= 0, cos, -cos).to(dtype)
    partner = l * l + l - m
    b = torch.where(m > 0, sin, torch.where(m < 0, sin, 0.0)).to(dtype)
    rot = (a, partner, b if bool(b.abs().max() > 1e-12) else None)
    layout = (groups, rot)
    if len(_GEMM_LAYOUTS) >= 8:
        _GEMM_LAYOUTS.pop(next(iter(_GEMM_LAYOUTS)))
    _GEMM_LAYOUTS[key] = (table, layout)  # holding the table keeps its id from being reused
    return layout


def _grid_values_gemm(c: Tensor, layout, nlat: int, nlon: int, spec: Tensor) -> Tensor:
    """f of a chunk of vectors c (b, K), folded: (b, 2, nhalf, nlon), northern rings then
    their mirrors. spec: (>= b, 2, nhalf, nlon//2+1) complex scratch, zero beyond m = L."""
    groups, (a, partner, bs) = layout
    b, K = c.shape
    nhalf = spec.shape[2]
    cols = torch.empty((K + 1, b), dtype=c.dtype)  # rotated coefficients, transposed, + a zero row
    torch.mul(c.T, a[:, None], out=cols[:K])
    if bs is not None:
        cols[:K] += c.T[partner] * bs[:, None]
    cols[K] = 0
    M = groups[-1][1]
    sums = torch.empty((M, 2, nhalf, 2, b), dtype=c.dtype)  # (m, parity, ring, cos/sin, vector)
    for m0, m1, t, rows in groups:
        x = cols.index_select(0, rows).view(t.shape[0], t.shape[2], 2 * b)
        torch.bmm(t, x, out=sums[m0:m1].view(t.shape[0], nhalf, 2 * b))
    even, odd = sums[:, 0], sums[:, 1]
    spec = spec[:b]
    out = torch.view_as_real(spec)  # (b, north/south, ring, m, re/im)
    # (m, ring, cos/sin, vector) -> (vector, ring, m, re/im): a transposing copy (faster than
    # writing the sums through a permuted out=, whose stores scatter).
    out[:, 0, :, :M] = (even + odd).permute(3, 1, 0, 2)
    out[:, 1, :, :M] = (even - odd).permute(3, 1, 0, 2)
    return torch.fft.irfft(spec, n=nlon, dim=-1)


def candidates_cpu(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                   nlat: int, nlon: int, lon0: float, ncand: int) -> tuple[Tensor, Tensor, Tensor]:
    """(index (B, n) int64, value (B, n) float64, start (B, n, 2) (colatitude, longitude))."""
    b = coeffs.shape[0]
    index = torch.empty((b, ncand), dtype=torch.int64)
    value = torch.empty((b, ncand), dtype=torch.float64)
    start = torch.empty((b, ncand, 2), dtype=torch.float64)
    if not b:
        return index, value, start
    grid = launch.grid_args(table, theta, log_area, nlat, nlon, lon0, one_mode_per_polar_ring(theta, degree))
    if (2 * degree >= nlon or degree <= _FUSED_MAX_DEGREE
            or (degree <= _FUSED_WIDE_DEGREE and b >= _FUSED_WIDE_BATCH)):
        launch.run("shdd_candidates", coeffs, coeffs.data_ptr(), b, degree, grid, ncand, index.data_ptr(),
                   value.data_ptr(), start.data_ptr())
        return index, value, start
    layout = _gemm_layout(table, degree, nlat, lon0, nlon, coeffs.dtype)
    chunk = max(1, min(b, _CHUNK_VALUES // (nlat * nlon)))
    cdtype = torch.complex64 if coeffs.dtype == torch.float32 else torch.complex128
    spec = torch.empty((chunk, 2, (nlat + 1) // 2, nlon // 2 + 1), dtype=cdtype)
    spec[..., degree + 1:] = 0  # columns m <= L are written per chunk
    for b0 in range(0, b, chunk):
        f = _grid_values_gemm(coeffs[b0:b0 + chunk], layout, nlat, nlon, spec)
        launch.run("shdd_scan", f, f.data_ptr(), f.shape[0], grid, True, ncand, index[b0:].data_ptr(),
                   value[b0:].data_ptr(), start[b0:].data_ptr())
    return index, value, start
