"""The decode's grid stage in one Triton kernel: SHDD vectors -> their best grid local maxima
on a ring grid, without the batch x grid matrix.

What it replaces on CUDA (locdiff.shdd._ring_candidates_torch): the synthesis kernel writes
f for a chunk of vectors over the whole grid, then a dozen elementwise torch ops over that
matrix find the local maxima (ring_local_maxima) and topk picks the best. Here a program
owns one vector and a band of rings; it synthesises f on the band and on one ring either
side of it, finds the band's local maxima with the same rule, and keeps its C best as
packed (value, index) keys. Memory traffic: the coefficients, the Legendre table, and
C keys per band, instead of several passes over B x nlat x nlon values.

Per band (BAND rings + 2 halo rings = ROWS): for each order m, the Legendre sums
A_m, B_m of every row (ring sums over l, table rows for the northern rings with the parity
sign (-1)^(l-m) for their southern mirrors), then f += A_m cos(m phi) + B_m sin(m phi) over
the ring's longitudes. A halo ring beyond a pole is the polar ring half a turn away, which
is (-1)^m on A_m and B_m. cos and sin of m phi come from exactly reduced angles every 16
orders and from rotations by phi in between (float32 rounding grows by ~16 ulp at most).
Neighbours along a ring come from a program-private scratch slot (the programs loop over
the work items, so scratch is one slot per program, not per item).

float32 arithmetic: the grid stage only picks starting points for the float64 refinement,
as on the CPU (locdiff.shdd._candidates). Runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (tests, small sizes).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from locdiff.ops import launch
from locdiff.ops.candidates import one_mode_per_polar_ring
from locdiff.ops.triton.sh_triton import on_device

_TWO_PI = 2 * math.pi


@triton.jit
def _pack(value, index):
    # float32 value and int32 index -> one int64 whose signed order is the value's, then the
    # index's: the value's bits with the magnitude flipped for negatives, above the index.
    bits = value.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def _ring_scan_kernel(coeffs_ptr, table_ptr, phase_ptr, scratch_ptr, keys_ptr, n_items, n_bands, L, nlat,
                      nlon, nhalf, polar_one, BAND: tl.constexpr, ROWS: tl.constexpr, NLON: tl.constexpr,
                      BLOCK_I: tl.constexpr, C: tl.constexpr, C_RING: tl.constexpr, ANCHOR: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    K = (L + 1) * (L + 1)
    r = tl.arange(0, ROWS)
    k = tl.arange(0, NLON)
    ii = tl.arange(0, BLOCK_I)
    in_lon = k < nlon
    slot = scratch_ptr + pid * (ROWS * NLON)
    t1 = k.to(tl.float32) * (6.283185307179586 / nlon) + tl.load(phase_ptr + 1)
    c1 = tl.cos(t1)  # the rotation by phi_k
    s1 = tl.sin(t1)
    for item in range(pid, n_items, nprog):
        b = item // n_bands
        band = item % n_bands
        # Row r is ring g = band * BAND + r - 1 (rows 0 and ROWS - 1 are the halo).
        g = band * BAND + r - 1
        rot = (g < 0) | (g >= nlat)  # beyond a pole: the polar ring, half a turn away
        gc = tl.minimum(tl.maximum(g, 0), nlat - 1)
        south = gc >= nhalf
        j = tl.where(south, nlat - 1 - gc, gc)  # the northern table row
        c_row = coeffs_ptr + tl.cast(b, tl.int64) * K
        f = tl.zeros((ROWS, NLON), dtype=tl.float32)
        for m0 in range(0, L + 1, ANCHOR):
            # cos, sin of m phi_k exactly at every ANCHOR-th order, by rotation through
            # phi_k in between: m phi_k = (m lon0 mod 2 pi) + 2 pi ((m k) mod nlon) / nlon,
            # both reduced exactly (the first in float64 on the host) before the cosine.
            t = ((m0 * k) % nlon).to(tl.float32) * (6.283185307179586 / nlon) + tl.load(phase_ptr + m0)
            cm = tl.cos(t)
            sm = tl.sin(t)
            for m in range(m0, tl.minimum(m0 + ANCHOR, L + 1)):
                n_m = L + 1 - m
                off = tl.cast(nhalf, tl.int64) * (m * (L + 1) - m * (m - 1) // 2)
                a = tl.zeros((ROWS,), dtype=tl.float32)
                s = tl.zeros((ROWS,), dtype=tl.float32)
                for i0 in range(0, n_m, BLOCK_I):
                    i = i0 + ii
                    ok = i < n_m
                    l = m + i
                    p = tl.load(table_ptr + off + j[:, None] * n_m + i[None, :], mask=ok[None, :], other=0.0)
                    p = p.to(tl.float32)
                    p = tl.where(south[:, None] & ((i[None, :] % 2) == 1), -p, p)
                    ca = tl.load(c_row + l * l + l + m, mask=ok, other=0.0).to(tl.float32)
                    cb = tl.load(c_row + l * l + l - m, mask=ok & (m > 0), other=0.0).to(tl.float32)
                    a += tl.sum(p * ca[None, :], axis=1)
                    s += tl.sum(p * cb[None, :], axis=1)
                flip = rot & ((m % 2) == 1)
                a = tl.where(flip, -a, a)
                s = tl.where(flip, -s, s)
                f += a[:, None] * cm[None, :] + s[:, None] * sm[None, :]
                cm, sm = cm * c1 - sm * s1, sm * c1 + cm * s1
        tl.store(slot + r[:, None] * NLON + k[None, :], f, mask=in_lon[None, :])
        tl.debug_barrier()  # the slot is shared by the program's threads: neighbours below
        kl = (k + nlon - 1) % nlon
        kr = (k + 1) % nlon
        inner = (r >= 1) & (r <= ROWS - 2) & (g < nlat)
        ok2 = inner[:, None] & in_lon[None, :]
        peak = ok2
        peak &= f >= tl.load(slot + r[:, None] * NLON + kl[None, :], mask=ok2, other=0.0)
        peak &= f >= tl.load(slot + r[:, None] * NLON + kr[None, :], mask=ok2, other=0.0)
        # No higher value among the three neighbours on each adjacent ring.
        up = slot + (r - 1)[:, None] * NLON
        down = slot + (r + 1)[:, None] * NLON
        peak &= ~(tl.load(up + kl[None, :], mask=ok2, other=0.0) > f)
        peak &= ~(tl.load(up + k[None, :], mask=ok2, other=0.0) > f)
        peak &= ~(tl.load(up + kr[None, :], mask=ok2, other=0.0) > f)
        peak &= ~(tl.load(down + kl[None, :], mask=ok2, other=0.0) > f)
        peak &= ~(tl.load(down + k[None, :], mask=ok2, other=0.0) > f)
        peak &= ~(tl.load(down + kr[None, :], mask=ok2, other=0.0) > f)
        index = gc[:, None] * nlon + k[None, :]
        keys = _pack(tl.where(peak, f, float("-inf")), index)
        # Per ring, then over the band's rings: sorts of NLON and ROWS * C keys, not one of
        # ROWS * NLON (fewer registers).
        ring_keys = tl.topk(keys, C_RING)
        # A polar ring close to its pole keeps only its best maximum, the last of equals (the
        # largest key; as the C++ scan; polar_one: candidates.one_mode_per_polar_ring). On the
        # ring's few kept keys, not the whole ring: a reduction over NLON spilled registers.
        polar = ((g == 0) | (g == nlat - 1)) & (polar_one != 0)
        ring_best = tl.max(ring_keys, axis=1)
        none = _pack(tl.full((ROWS, C_RING), float("-inf"), tl.float32), tl.zeros((ROWS, C_RING), tl.int32))
        ring_keys = tl.where(polar[:, None] & (ring_keys != ring_best[:, None]), none, ring_keys)
        best = tl.topk(tl.reshape(ring_keys, (ROWS * C_RING,)), C)
        tl.store(keys_ptr + tl.cast(item, tl.int64) * C + tl.arange(0, C), best)
        tl.debug_barrier()  # before the next item overwrites the slot


def _unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (keys >> 32).to(torch.int32)
    bits = torch.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _num_warps(nlon_block: int) -> int:
    # A band's f is ROWS x NLON float32 and the neighbour test reads six more such tiles:
    # ptxas (sm_90) fits them in registers up to NLON = 1024 at 4 / 8 / 16 warps for 256 /
    # 512 / 1024 longitudes, and spills from 2048 (L >= 512) at 16 warps.
    return 4 if nlon_block <= 256 else 8 if nlon_block <= 512 else 16


def _num_programs(device: torch.device, n_items: int) -> int:
    if device.type == "cuda":
        return min(n_items, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_items, 4)  # the interpreter runs programs one after the other


def ring_candidates_triton(coeffs: torch.Tensor, table: torch.Tensor, degree: int, nlat: int, nlon: int,
                           lon0: float, ncand: int,
                           one_per_polar_ring: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """coeffs (B, (degree+1)^2) float32/float64 on a ring grid -> (value (B, ncand) float64,
    flat grid index (B, ncand) int64) of the best local maxima, best first; value -inf where
    a vector has fewer maxima. The same local maxima as locdiff.ops.shdd_torch.ring_local_maxima."""
    return _ring_candidates(coeffs.contiguous(), table, degree, nlat, nlon, lon0, ncand, one_per_polar_ring)


def _ring_candidates(coeffs, table, degree, nlat, nlon, lon0, ncand, one_per_polar_ring=False):
    b = coeffs.shape[0]
    band = 6
    rows = band + 2
    n_bands = triton.cdiv(nlat, band)
    n_items = b * n_bands
    nlon_block = triton.next_power_of_2(nlon)
    c = min(triton.next_power_of_2(max(ncand, 1)), rows * nlon_block)  # keys kept per band
    c_ring = min(c, nlon_block)  # per ring, before the band's choice
    keys = torch.empty((n_items, c), dtype=torch.int64, device=coeffs.device)
    if n_items:
        nprog = _num_programs(coeffs.device, n_items)
        scratch = torch.empty((nprog, rows, nlon_block), dtype=torch.float32, device=coeffs.device)
        m = torch.arange(degree + 2, dtype=torch.float64, device=coeffs.device)
        phase = torch.remainder(m * lon0, _TWO_PI).to(torch.float32)
        with on_device(coeffs):
            wrap_triton(_ring_scan_kernel)[(nprog,)](
                coeffs, table, phase, scratch, keys, n_items, n_bands, degree, nlat, nlon, (nlat + 1) // 2,
                int(one_per_polar_ring),
                BAND=band, ROWS=rows, NLON=nlon_block, BLOCK_I=min(32, triton.next_power_of_2(degree + 1)),
                C=c, C_RING=c_ring, ANCHOR=16, num_warps=_num_warps(nlon_block))
    top = keys.view(b, n_bands * c).topk(min(ncand, n_bands * c), dim=-1).values
    value, index = _unpack(top)
    value = value.double()
    # A ring's padding lanes (past nlon) carry -inf keys whose indices can lie past the grid;
    # slots with no maximum take the first candidate's index, as on the other routes.
    index = torch.where(torch.isfinite(value), index, index[:, :1].clamp(max=nlat * nlon - 1))
    if value.shape[1] < ncand:
        pad = ncand - value.shape[1]
        value = torch.cat([value, value.new_full((b, pad), -torch.inf)], 1)
        index = torch.cat([index, index[:, :1].expand(-1, pad)], 1)
    return value, index


@triton_op("locdiff::shdd_candidates_triton", mutates_args=())
@launch.contiguous_inputs
def shdd_candidates_triton_op(coeffs: torch.Tensor, table: torch.Tensor, theta: torch.Tensor, log_area: torch.Tensor,
                              degree: int, nlat: int, nlon: int, lon0: float,
                              ncand: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """locdiff::shdd_candidates as one fused Triton kernel: (index, value, start) with start
    the grid point's (colatitude, longitude) (no sub-cell step)."""
    value, index = _ring_candidates(coeffs, table, degree, nlat, nlon, lon0, ncand,
                                    one_mode_per_polar_ring(theta, degree))
    colat = theta[index // nlon]
    lon = lon0 + _TWO_PI * (index % nlon).to(torch.float64) / nlon  # as the grid's own points
    return index, value, torch.stack([colat, lon], -1)
