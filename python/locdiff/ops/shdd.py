"""``locdiff::shdd_*``: torch ops over the SHDD kernels (csrc/cpu/shdd_cpu.cpp,
csrc/cuda/shdd_cuda.cu), each with a fake kernel and, where differentiable, autograd.

A ring grid enters every op as ``table, theta, log_area`` (float64 tensors on the
coefficients' device, from ``locdiff.grids.Grid``) and ``degree, nlat, nlon, lon0``:
  shdd_synth(coeffs (B,K)) -> f (B, nlat*nlon)                 [autograd: shdd_adjoint]
  shdd_adjoint(weights (B, nlat*nlon)) -> (B,K) = w . Y         [autograd: shdd_synth]
  shdd_candidates(coeffs, ncand) -> index (B,n), value (B,n), start (B,n,2)   [CPU]
  shdd_logz(coeffs, inv_t) -> log sum_i area_i exp(f_i / t) (B,) float64      [CPU]
  shdd_kl(pred, target, inv_t) -> KL(softmax(f_target/t) || softmax(f_pred/t)) (B,)
  shdd_kl_backward(pred, target, grad, inv_t, need_pred, need_target) -> (gp, gt)
  shdd_kl_grad(pred, target, inv_t, need_pred, need_target) -> (kl, gp, gt) at grad 1 [autograd]
  shdd_eval(coeffs, xyz (N,3) float64, row (N,)) -> f (N,), grad (N,3) float64   [CPU]
  shdd_hessian(coeffs, xyz, row) -> Hessian on the sphere (N,3,3) float64        [CPU]
  shdd_refine(coeffs, xyz (N,3) float64, row (N,), radius, max_iter) -> xyz, f    [CPU]
  shdd_decode_refine(coeffs, value, start, ...) -> refined candidates             [CPU]
  shdd_decode(coeffs, ncand, radius, nrefine, max_iter) -> the two above in one op [CPU]
Inputs are validated and contiguous (see locdiff.shdd); grids are ring grids.
"""
from __future__ import annotations

import torch
from torch import Tensor

from locdiff import _C


def _tag(t: Tensor) -> str:
    return "float32" if t.dtype == torch.float32 else "float64"


def _threads() -> int:
    return torch.get_num_threads()


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _grid_args(table, theta, log_area, nlat, nlon, lon0):
    return (nlat, nlon, table.data_ptr(), theta.data_ptr(), log_area.data_ptr(), float(lon0))


# ---- synthesis and its adjoint --------------------------------------------------------------
@torch.library.custom_op("locdiff::shdd_synth", mutates_args=(), device_types="cpu")
def shdd_synth_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                  nlat: int, nlon: int, lon0: float) -> Tensor:
    out = coeffs.new_empty((coeffs.shape[0], nlat * nlon))
    if coeffs.shape[0]:
        _C.shdd_synth_cpu(coeffs.data_ptr(), coeffs.shape[0], degree,
                          *_grid_args(table, theta, log_area, nlat, nlon, lon0), out.data_ptr(),
                          _tag(coeffs), _threads())
    return out


@shdd_synth_op.register_kernel("cuda")
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0):
    out = coeffs.new_empty((coeffs.shape[0], nlat * nlon))
    if coeffs.shape[0]:
        with torch.cuda.device(coeffs.device):
            _C.shdd_synth_cuda(coeffs.data_ptr(), coeffs.shape[0], degree,
                               *_grid_args(table, theta, log_area, nlat, nlon, lon0),
                               out.data_ptr(), _tag(coeffs), _stream(coeffs))
    return out


@shdd_synth_op.register_fake
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0):
    return coeffs.new_empty((coeffs.shape[0], nlat * nlon))


@torch.library.custom_op("locdiff::shdd_adjoint", mutates_args=(), device_types="cpu")
def shdd_adjoint_op(weights: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                    nlat: int, nlon: int, lon0: float) -> Tensor:
    out = weights.new_empty((weights.shape[0], (degree + 1) ** 2))
    if weights.shape[0]:
        _C.shdd_adjoint_cpu(weights.data_ptr(), weights.shape[0], degree,
                            *_grid_args(table, theta, log_area, nlat, nlon, lon0), out.data_ptr(),
                            _tag(weights), _threads())
    return out


@shdd_adjoint_op.register_fake
def _(weights, table, theta, log_area, degree, nlat, nlon, lon0):
    return weights.new_empty((weights.shape[0], (degree + 1) ** 2))


def _setup_linear(ctx, inputs, output):
    ctx.grid = inputs[1:]


def _synth_backward(ctx, grad):
    return (shdd_adjoint_op(grad.contiguous(), *ctx.grid),) + (None,) * 7


def _adjoint_backward(ctx, grad):
    return (shdd_synth_op(grad.contiguous(), *ctx.grid),) + (None,) * 7


shdd_synth_op.register_autograd(_synth_backward, setup_context=_setup_linear)
shdd_adjoint_op.register_autograd(_adjoint_backward, setup_context=_setup_linear)


# ---- candidates, log-partition, point evaluation ------------------------------------------
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
# The fused C++ kernel (shdd_candidates_cpu) runs the synthesis with one vector per SIMD
# lane (csrc/cpu/ring_lanes.h) in blocks of 8, then the same scan. Two threads, float32,
# candidates ms, lanes vs GEMM route (this project's 2-core Xeon, ad hoc timing of
# _candidates_cpu): L = 16: 0.019 vs 0.093 (B = 1), 0.067 vs 0.205 (B = 32); L = 32: 0.09 vs
# 0.12 (B = 1), 0.53 vs 0.73 to 1.75 (B = 64); L = 64: 0.34 vs 0.18 (B = 1), 0.75 vs 0.47
# (B = 8, one block for one thread), 2.2 vs 4.1 (B = 32), 3.8 vs 4.4 (B = 64), 26 vs 32
# (B = 512); L = 128: 28 vs 27 (B = 64), 219 vs 223 (B = 512); L = 256: 249 vs 190 (B = 64).
# So the fused kernel takes L <= 32, and L <= 64 from 32 vectors; GEMMs the rest.
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
    ext = torch.cat([table, table.new_zeros(1)])
    groups = []
    bounds = sorted({round(g * (L + 1) / _M_GROUPS) for g in range(_M_GROUPS + 1)})
    for m0, m1 in zip(bounds[:-1], bounds[1:]):
        n = (L + 2 - m0) // 2
        m = torch.arange(m0, m1)[:, None, None]
        l = m + torch.arange(2)[None, :, None] + 2 * torch.arange(n)[None, None, :]  # (m, parity, i)
        valid = l <= L
        # Block m of the table starts at nhalf * offset(m) and is (nhalf, L+1-m), entry (j, l-m).
        off = nhalf * (m * (L + 1) - m * (m - 1) // 2)
        j = torch.arange(nhalf)[:, None]
        tidx = torch.where(valid[:, :, None, :], off[:, :, None, :] + j * (L + 1 - m[:, :, None, :])
                           + (l - m)[:, :, None, :], table.numel())  # (m, parity, ring, i)
        w = torch.where(m == 0, float(nlon), nlon / 2.0)[:, :, None, :]
        t = (ext[tidx] * w).reshape(2 * (m1 - m0), nhalf, n).to(dtype)
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


def _candidates_cpu(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                    nlat: int, nlon: int, lon0: float, ncand: int) -> tuple[Tensor, Tensor, Tensor]:
    """The body of shdd_candidates (also called inside shdd_decode)."""
    b = coeffs.shape[0]
    index = torch.empty((b, ncand), dtype=torch.int64)
    value = torch.empty((b, ncand), dtype=torch.float64)
    start = torch.empty((b, ncand, 2), dtype=torch.float64)
    if not b:
        return index, value, start
    grid = _grid_args(table, theta, log_area, nlat, nlon, lon0)
    if (2 * degree >= nlon or degree <= _FUSED_MAX_DEGREE
            or (degree <= _FUSED_WIDE_DEGREE and b >= _FUSED_WIDE_BATCH)):
        _C.shdd_candidates_cpu(coeffs.data_ptr(), b, degree, *grid, ncand, index.data_ptr(),
                               value.data_ptr(), start.data_ptr(), _tag(coeffs), _threads())
        return index, value, start
    layout = _gemm_layout(table, degree, nlat, lon0, nlon, coeffs.dtype)
    chunk = max(1, min(b, _CHUNK_VALUES // (nlat * nlon)))
    cdtype = torch.complex64 if coeffs.dtype == torch.float32 else torch.complex128
    spec = torch.empty((chunk, 2, (nlat + 1) // 2, nlon // 2 + 1), dtype=cdtype)
    spec[..., degree + 1:] = 0  # columns m <= L are written per chunk
    for b0 in range(0, b, chunk):
        f = _grid_values_gemm(coeffs[b0:b0 + chunk], layout, nlat, nlon, spec)
        _C.shdd_scan_cpu(f.data_ptr(), f.shape[0], *grid, True, ncand, index[b0:].data_ptr(),
                         value[b0:].data_ptr(), start[b0:].data_ptr(), _tag(coeffs), _threads())
    return index, value, start


@torch.library.custom_op("locdiff::shdd_candidates", mutates_args=(), device_types="cpu")
def shdd_candidates_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                       nlat: int, nlon: int, lon0: float, ncand: int) -> tuple[Tensor, Tensor, Tensor]:
    return _candidates_cpu(coeffs, table, theta, log_area, degree, nlat, nlon, lon0, ncand)


@shdd_candidates_op.register_fake
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0, ncand):
    b = coeffs.shape[0]
    f64 = dict(dtype=torch.float64, device=coeffs.device)
    return (torch.empty((b, ncand), dtype=torch.int64, device=coeffs.device),
            torch.empty((b, ncand), **f64), torch.empty((b, ncand, 2), **f64))


@torch.library.custom_op("locdiff::shdd_logz", mutates_args=(), device_types="cpu")
def shdd_logz_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                 nlat: int, nlon: int, lon0: float, inv_temperature: float) -> Tensor:
    out = torch.empty((coeffs.shape[0],), dtype=torch.float64)
    if coeffs.shape[0]:
        _C.shdd_logz_cpu(coeffs.data_ptr(), coeffs.shape[0], degree,
                         *_grid_args(table, theta, log_area, nlat, nlon, lon0), inv_temperature,
                         out.data_ptr(), _tag(coeffs), _threads())
    return out


@shdd_logz_op.register_fake
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature):
    return torch.empty((coeffs.shape[0],), dtype=torch.float64, device=coeffs.device)


def _setup_logz(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)
    ctx.grid = inputs[1:8]
    ctx.inv_t = inputs[8]


def _logz_backward(ctx, grad):
    # d logZ / dc = sum_i softmax_i Y_i / t: the one place a (B, G) matrix is formed (backward of
    # a metric helper, not of the training loss).
    coeffs, logz = ctx.saved_tensors
    table, theta, log_area, degree, nlat, nlon, lon0 = ctx.grid
    f = shdd_synth_op(coeffs, *ctx.grid).double()
    la = log_area.repeat_interleave(nlon)
    w = torch.exp(f * ctx.inv_t + la - logz[:, None]) * (grad[:, None] * ctx.inv_t)
    return (shdd_adjoint_op(w.to(coeffs.dtype).contiguous(), *ctx.grid),) + (None,) * 8


shdd_logz_op.register_autograd(_logz_backward, setup_context=_setup_logz)


@torch.library.custom_op("locdiff::shdd_eval", mutates_args=(), device_types="cpu")
def shdd_eval_op(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int) -> tuple[Tensor, Tensor]:
    n = xyz.shape[0]
    value = torch.empty((n,), dtype=torch.float64)
    grad = torch.empty((n, 3), dtype=torch.float64)
    if n:
        _C.shdd_eval_cpu(coeffs.data_ptr(), degree, xyz.data_ptr(), row.data_ptr(), n,
                         value.data_ptr(), grad.data_ptr(), _tag(coeffs), _threads())
    return value, grad


@shdd_eval_op.register_fake
def _(coeffs, xyz, row, degree):
    n = xyz.shape[0]
    return (torch.empty((n,), dtype=torch.float64, device=xyz.device),
            torch.empty((n, 3), dtype=torch.float64, device=xyz.device))


@torch.library.custom_op("locdiff::shdd_hessian", mutates_args=(), device_types="cpu")
def shdd_hessian_op(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int) -> Tensor:
    """The Hessian of f on the sphere at xyz / |xyz| (N, 3) for coefficient rows ``row`` ->
    (N, 3, 3) float64: the tangent-plane map (zero along the point) whose quadratic form is
    f's second derivative along great circles."""
    n = xyz.shape[0]
    hess = torch.empty((n, 3, 3), dtype=torch.float64)
    if n:
        _C.shdd_hessian_cpu(coeffs.data_ptr(), degree, xyz.data_ptr(), row.data_ptr(), n,
                            hess.data_ptr(), _tag(coeffs), _threads())
    return hess


@shdd_hessian_op.register_fake
def _(coeffs, xyz, row, degree):
    return torch.empty((xyz.shape[0], 3, 3), dtype=torch.float64, device=xyz.device)


@torch.library.custom_op("locdiff::shdd_refine", mutates_args=(), device_types="cpu")
def shdd_refine_op(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int, radius: float,
                   max_iter: int) -> tuple[Tensor, Tensor]:
    """Trust-region Newton ascent of f from xyz (N, 3) float64 for coefficient rows ``row``
    (N,) -> (unit xyz (N, 3), f (N,)) float64; tolerances scale with ``radius`` (radians)."""
    n = xyz.shape[0]
    out = xyz.to(torch.float64, copy=True).contiguous()
    value = torch.empty((n,), dtype=torch.float64)
    if n:
        _C.shdd_refine_cpu(coeffs.data_ptr(), degree, float(radius), row.data_ptr(), n, max_iter,
                           out.data_ptr(), value.data_ptr(), _tag(coeffs), _threads())
    return out, value


@shdd_refine_op.register_fake
def _(coeffs, xyz, row, degree, radius, max_iter):
    n = xyz.shape[0]
    return (torch.empty((n, 3), dtype=torch.float64, device=xyz.device),
            torch.empty((n,), dtype=torch.float64, device=xyz.device))


def _decode_refine_cpu(coeffs: Tensor, value: Tensor, start: Tensor, degree: int, radius: float,
                       nrefine: int, max_iter: int) -> tuple[Tensor, Tensor]:
    """The body of shdd_decode_refine (also called inside shdd_decode)."""
    b, n = value.shape
    xyz = torch.empty((b, n, 3), dtype=torch.float64)
    out = torch.empty((b, n), dtype=torch.float64)
    if b:
        _C.shdd_decode_refine_cpu(coeffs.data_ptr(), b, degree, float(radius), n, value.data_ptr(),
                                  start.data_ptr(), nrefine, max_iter, xyz.data_ptr(), out.data_ptr(),
                                  _tag(coeffs), _threads())
    return xyz, out


@torch.library.custom_op("locdiff::shdd_decode_refine", mutates_args=(), device_types="cpu")
def shdd_decode_refine_op(coeffs: Tensor, value: Tensor, start: Tensor, degree: int, radius: float,
                          nrefine: int, max_iter: int) -> tuple[Tensor, Tensor]:
    """The decode's choice and refinement of grid candidates, one C++ call (see
    shdd_decode_refine_cpu in locdiff/shdd_kernels.h): value (B, n) and start (B, n, 2)
    (colatitude, longitude) from shdd_candidates -> (xyz (B, n, 3), refined f (B, n)), best
    first; f -inf and xyz zero where not refined."""
    return _decode_refine_cpu(coeffs, value, start, degree, radius, nrefine, max_iter)


@shdd_decode_refine_op.register_fake
def _(coeffs, value, start, degree, radius, nrefine, max_iter):
    b, n = value.shape
    return (torch.empty((b, n, 3), dtype=torch.float64, device=value.device),
            torch.empty((b, n), dtype=torch.float64, device=value.device))


# One dispatch for the whole decode: each custom-op call costs ~50 us of Python, as much as
# the kernels themselves for a single vector at L <= 32.
@torch.library.custom_op("locdiff::shdd_decode", mutates_args=(), device_types="cpu")
def shdd_decode_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int, nlat: int,
                   nlon: int, lon0: float, ncand: int, radius: float, nrefine: int,
                   max_iter: int) -> tuple[Tensor, Tensor]:
    """shdd_candidates (float32 grid) then shdd_decode_refine (float64): coeffs (B, K) ->
    (xyz (B, ncand, 3), refined f (B, ncand)), best first; f -inf, xyz zero where not refined."""
    # float32 grid whatever the input: it only picks starting points (see locdiff.shdd).
    _, value, start = _candidates_cpu(coeffs.float(), table, theta, log_area, degree, nlat, nlon, lon0, ncand)
    return _decode_refine_cpu(coeffs.double().contiguous(), value, start, degree, radius, nrefine, max_iter)


@shdd_decode_op.register_fake
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0, ncand, radius, nrefine, max_iter):
    b = coeffs.shape[0]
    return (torch.empty((b, ncand, 3), dtype=torch.float64, device=coeffs.device),
            torch.empty((b, ncand), dtype=torch.float64, device=coeffs.device))


# ---- SHDD-KL ----------------------------------------------------------------------------------
@torch.library.custom_op("locdiff::shdd_kl", mutates_args=(), device_types="cpu")
def shdd_kl_op(pred: Tensor, target: Tensor, table: Tensor, theta: Tensor, log_area: Tensor,
               degree: int, nlat: int, nlon: int, lon0: float, inv_temperature: float) -> Tensor:
    kl = pred.new_empty((pred.shape[0],))
    if pred.shape[0]:
        _C.shdd_kl_fwd_cpu(pred.data_ptr(), target.data_ptr(), pred.shape[0], degree,
                           *_grid_args(table, theta, log_area, nlat, nlon, lon0), inv_temperature,
                           kl.data_ptr(), _tag(pred), _threads())
    return kl


@shdd_kl_op.register_kernel("cuda")
def _(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature):
    kl = pred.new_empty((pred.shape[0],))
    if pred.shape[0]:
        with torch.cuda.device(pred.device):
            _C.shdd_kl_fwd_cuda(pred.data_ptr(), target.data_ptr(), pred.shape[0], degree,
                                *_grid_args(table, theta, log_area, nlat, nlon, lon0),
                                inv_temperature, kl.data_ptr(), _tag(pred), _stream(pred))
    return kl


@shdd_kl_op.register_fake
def _(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature):
    return pred.new_empty((pred.shape[0],))


@torch.library.custom_op("locdiff::shdd_kl_backward", mutates_args=(), device_types="cpu")
def shdd_kl_backward_op(pred: Tensor, target: Tensor, grad: Tensor, table: Tensor, theta: Tensor,
                        log_area: Tensor, degree: int, nlat: int, nlon: int, lon0: float,
                        inv_temperature: float, need_pred: bool, need_target: bool) -> tuple[Tensor, Tensor]:
    gp = torch.empty_like(pred) if need_pred else pred.new_empty((0,))
    gt = torch.empty_like(target) if need_target else target.new_empty((0,))
    if pred.shape[0] and (need_pred or need_target):
        _C.shdd_kl_bwd_cpu(pred.data_ptr(), target.data_ptr(), grad.data_ptr(), pred.shape[0], degree,
                           *_grid_args(table, theta, log_area, nlat, nlon, lon0), inv_temperature,
                           gp.data_ptr() if need_pred else 0, gt.data_ptr() if need_target else 0,
                           _tag(pred), _threads())
    elif need_pred or need_target:
        gp.zero_()
        gt.zero_()
    return gp, gt


@shdd_kl_backward_op.register_kernel("cuda")
def _(pred, target, grad, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature,
      need_pred, need_target):
    gp = torch.empty_like(pred) if need_pred else pred.new_empty((0,))
    gt = torch.empty_like(target) if need_target else target.new_empty((0,))
    if pred.shape[0] and (need_pred or need_target):
        with torch.cuda.device(pred.device):
            _C.shdd_kl_bwd_cuda(pred.data_ptr(), target.data_ptr(), grad.data_ptr(), pred.shape[0],
                                degree, *_grid_args(table, theta, log_area, nlat, nlon, lon0),
                                inv_temperature, gp.data_ptr() if need_pred else 0,
                                gt.data_ptr() if need_target else 0, _tag(pred), _stream(pred))
    return gp, gt


@shdd_kl_backward_op.register_fake
def _(pred, target, grad, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature,
      need_pred, need_target):
    return (torch.empty_like(pred) if need_pred else pred.new_empty((0,)),
            torch.empty_like(target) if need_target else target.new_empty((0,)))


# Training wants the KL and its gradient together: one pass gives both (the gradient at
# grad_kl = 1, the size of pred), and the backward only scales it, instead of synthesising
# both vectors of every pair a second time (1.7 to 2 times less work per step).
@torch.library.custom_op("locdiff::shdd_kl_grad", mutates_args=(), device_types="cpu")
def shdd_kl_grad_op(pred: Tensor, target: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                    nlat: int, nlon: int, lon0: float, inv_temperature: float, need_pred: bool,
                    need_target: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (kl (B,), dkl/dpred (B, K) or empty, dkl/dtarget (B, K) or empty), per pair."""
    kl = pred.new_empty((pred.shape[0],))
    gp = torch.empty_like(pred) if need_pred else pred.new_empty((0,))
    gt = torch.empty_like(target) if need_target else target.new_empty((0,))
    if pred.shape[0]:
        _C.shdd_kl_grad_cpu(pred.data_ptr(), target.data_ptr(), pred.shape[0], degree,
                            *_grid_args(table, theta, log_area, nlat, nlon, lon0), inv_temperature,
                            kl.data_ptr(), gp.data_ptr() if need_pred else 0, gt.data_ptr() if need_target else 0,
                            _tag(pred), _threads())
    return kl, gp, gt


@shdd_kl_grad_op.register_kernel("cuda")
def _(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature, need_pred, need_target):
    args = (table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature)
    kl = shdd_kl_op(pred, target, *args)
    gp, gt = shdd_kl_backward_op(pred, target, torch.ones_like(kl), *args, need_pred, need_target)
    return kl, gp, gt


@shdd_kl_grad_op.register_fake
def _(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature, need_pred, need_target):
    return (pred.new_empty((pred.shape[0],)), torch.empty_like(pred) if need_pred else pred.new_empty((0,)),
            torch.empty_like(target) if need_target else target.new_empty((0,)))


def _setup_kl_grad(ctx, inputs, output):
    _, gp, gt = output
    ctx.save_for_backward(gp, gt)
    ctx.mark_non_differentiable(gp, gt)
    ctx.need = inputs[-2:]


def _kl_grad_backward(ctx, grad, _grad_gp, _grad_gt):
    gp, gt = ctx.saved_tensors
    need_pred, need_target = ctx.need
    return ((grad[:, None] * gp if need_pred else None, grad[:, None] * gt if need_target else None)
            + (None,) * 10)


shdd_kl_grad_op.register_autograd(_kl_grad_backward, setup_context=_setup_kl_grad)


def _setup_kl(ctx, inputs, output):
    pred, target = inputs[:2]
    ctx.save_for_backward(pred, target)
    ctx.rest = inputs[2:]


def _kl_backward(ctx, grad):
    pred, target = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gp, gt = shdd_kl_backward_op(pred, target, grad.contiguous(), *ctx.rest, need_pred, need_target)
    return (gp if need_pred else None, gt if need_target else None) + (None,) * 8


shdd_kl_op.register_autograd(_kl_backward, setup_context=_setup_kl)

__all__ = ["shdd_adjoint_op", "shdd_candidates_op", "shdd_decode_op", "shdd_decode_refine_op", "shdd_eval_op", "shdd_hessian_op",
           "shdd_kl_backward_op", "shdd_kl_grad_op", "shdd_kl_op", "shdd_logz_op", "shdd_refine_op", "shdd_synth_op"]
