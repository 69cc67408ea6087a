"""``locdiff::spherical_harmonics_triton``: spherical harmonics in Triton, forward and VJP.

The same algorithm and numerics as the CUDA kernel (csrc/cuda/sh_column.h, sh_cuda.cu):
float64 arithmetic whatever the output dtype, the plain recurrence away from the poles and
Reinsch's form near them (|z| >= 1/2), columns whose seed underflows carried as a
(mantissa, power of 2^256) pair until they reach 2^-960, coefficients from one reciprocal
square root per step.

Work layout: a program owns a tile of BLOCK_P points x BLOCK_M orders m (one "pass" of
columns); it walks the degrees l and at each writes Y[l^2+l+m] and Y[l^2+l-m], contiguous
along m. Seeds R_mm (a prefix product over m, in scaled arithmetic) and exp(i m phi) come
from a short sequential loop over m, as on the CPU. Forward passes are separate programs
(grid axis 1); the backward walks its passes in one program and reduces without atomics.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests, small sizes).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from locdiff.ops import launch
from locdiff.ops.sh import register_sh_autograd


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (eager; torch.compile emits
    its own device guard)."""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


# Constants as jit functions: compiled kernels may not read plain module globals (the CPU
# interpreter can, so only an ahead-of-time build shows it: tests/test_triton_compile.py),
# and the interpreter cannot multiply a tensor by a tl.constexpr global. Typed float64: a
# bare literal returned from a jit function becomes an fp32 tensor.
@triton.jit
def _inv_sqrt_4pi():
    return tl.full([], 0.28209479177387814347, tl.float64)


@triton.jit
def _sqrt2():
    return tl.full([], 1.41421356237309504880, tl.float64)


@triton.jit
def _pow2(n):
    # Exact 2^n as float64 for integer n in [-1022, 1023], from its bits.
    return ((n + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _ldexp(x, n):
    # x * 2^n for n in [-2044, 2046]: two exact factors, one rounding at the end.
    h = n // 2
    return x * _pow2(h) * _pow2(n - h)


@triton.jit
def _frexp(x):
    # (m, e) with x = m 2^e, m in [0.5, 1), for x > 0 normal; (0, 0) for x == 0.
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF).to(tl.int32) - 1022
    m = ((bits & 0xFFFFFFFFFFFFF) | (1022 << 52)).to(tl.float64, bitcast=True)
    zero = x == 0.0
    return tl.where(zero, 0.0, m), tl.where(zero, 0, e)


@triton.jit
def _inject(x, y, ec, rho, reinsch, sigma):
    # A scaled column whose value x 2^(256 ec) reached 2^-960 continues unscaled from here.
    can = (ec < 0) & (ec >= -4)
    sh = tl.where(can, ec * 256, 0)
    v = _ldexp(x, sh)
    pv = _ldexp(y, sh)
    inj = can & (tl.abs(v) >= 8.289046668512328e-290)  # 2^-960
    x = tl.where(inj, v, x)
    y = tl.where(inj, tl.where(reinsch, v - sigma * rho * pv, pv), y)
    ec = tl.where(inj, 0, ec)
    return x, y, ec, inj


@triton.jit
def _pass_setup(px, py, pz, L, first, ms, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
                SHIFT: tl.constexpr):
    """Unit point, seeds and azimuths of columns first + ms for a block of points.

    Returns the column states (x, y, k, ec), (cos, sin) of (m - SHIFT) phi, and the point
    constants (ux, uy, uz, s, inv_norm, reinsch, sigma, t)."""
    # Unit vector as the CPU's unit_point(): scale by the largest component first.
    big = tl.maximum(tl.abs(px), tl.maximum(tl.abs(py), tl.abs(pz)))
    xs = px / big
    ys = py / big
    zs = pz / big
    norm = tl.sqrt(xs * xs + ys * ys + zs * zs)
    ux = xs / norm
    uy = ys / norm
    uz = zs / norm
    # hypot without overflow worries: |ux|, |uy| <= 1.
    hx = tl.maximum(tl.abs(ux), tl.abs(uy))
    hy = tl.minimum(tl.abs(ux), tl.abs(uy))
    hq = tl.where(hx > 0, hy / tl.where(hx > 0, hx, 1.0), 0.0)
    s = hx * tl.sqrt(1.0 + hq * hq)
    inv_norm = 1.0 / (norm * big)
    reinsch = tl.abs(uz) >= 0.5
    sigma = tl.where(uz < 0, tl.full([], -1.0, tl.float64), tl.full([], 1.0, tl.float64))
    t = s * s / (1.0 + tl.abs(uz))
    # s = s_m 2^s_e, pre-scaled when tiny so that every product stays normal.
    tiny = s < 1.1754943508222875e-271  # 2^-900
    s_m, s_e = _frexp(tl.where(tiny, s * 4.149515568880993e180, s))  # 2^600
    s_e = tl.where(tiny, s_e - 600, s_e)
    pos = s > 0
    c1 = tl.where(pos, ux / tl.where(pos, s, 1.0), 1.0)
    s1 = tl.where(pos, uy / tl.where(pos, s, 1.0), 0.0)
    # Sequential over m, as the CPU: seed prefix product R_mm (scaled) and exp(i m phi).
    mant = tl.full([BLOCK_P], 0.5, tl.float64)
    expo = tl.full([BLOCK_P], 1, tl.int32)
    cr = tl.full([BLOCK_P], 1.0, tl.float64)  # exp(i m phi)
    ci = tl.zeros([BLOCK_P], tl.float64)
    pr = c1  # exp(i (m-1) phi) (conjugate at m = 0, unused)
    pi = -s1
    seed_m = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    seed_e = tl.zeros([BLOCK_P, BLOCK_M], tl.int32)
    cm = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    sm = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    for m in range(0, first + BLOCK_M):
        mf = tl.zeros([], tl.float64) + m  # (loop indices are Python ints when interpreted)
        ratio = tl.sqrt((2.0 * mf + 1.0) / tl.maximum(2.0 * mf, 1.0))
        f = tl.where(m == 0, _inv_sqrt_4pi(), tl.where(m == 1, ratio, ratio * s_m))
        fe = tl.where(m >= 2, s_e, 0)
        pm, pe = _frexp(mant * f)
        mant = pm
        expo = tl.where(pm == 0.0, 0, expo + fe + pe)
        here = (ms[None, :] + first) == m
        seed_m = tl.where(here, mant[:, None], seed_m)
        seed_e = tl.where(here, expo[:, None], seed_e)
        if SHIFT == 0:
            cm = tl.where(here, cr[:, None], cm)
            sm = tl.where(here, ci[:, None], sm)
        else:
            cm = tl.where(here, pr[:, None], cm)
            sm = tl.where(here, pi[:, None], sm)
        pr = cr
        pi = ci
        cr = pr * c1 - pi * s1
        ci = pi * c1 + pr * s1
    # Column states at their first degree l = m (sh_column.h, column_start).
    zero = seed_m == 0.0
    plain = seed_e >= 1 - 900
    neg = tl.where(plain | zero, 0, -seed_e)
    q = neg // 256
    rem = neg - q * 256
    x = tl.where(zero, 0.0, tl.where(plain, _ldexp(seed_m, tl.where(plain, seed_e, 0)),
                                     _ldexp(seed_m, -rem)))
    ec = tl.where(plain | zero, 0, -q)
    re2 = reinsch[:, None] & (ms[None, :] >= 0)
    y = tl.where(re2 & plain & ~zero, x, 0.0)
    k = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    x, y, ec, _ = _inject(x, y, ec, tl.zeros([], tl.float64), re2, sigma[:, None])
    return x, y, k, ec, cm, sm, ux, uy, uz, s, inv_norm, re2, sigma, t


@triton.jit
def _step(x, y, k, ec, l, mf, act, uz, re2, sigma, t):
    """Advances the columns where `act` from degree l-1 to l (sh_column.h, column_step)."""
    lf = tl.zeros([], tl.float64) + l
    n1 = 2.0 * lf + 1.0
    n2 = 2.0 * lf - 1.0
    lp = lf + mf
    lm = lf - mf
    plm = tl.where(act, lp * lm, 1.0)
    r = tl.rsqrt(tl.where(act, n1 * n2 * plm, 1.0))  # (inactive lanes: l = 0 or m >= l)
    a = n1 * n2 * r
    inv_a = plm * r
    rho = n1 * lp * r
    k_re = inv_a * (n2 * lm * r)
    # Plain form (always, while a column is scaled).
    nxt = a * uz[:, None] * x - (a * k) * y
    xp = nxt
    yp = x
    kp = inv_a
    big = (ec < 0) & (tl.abs(xp) > 1.157920892373162e77)  # 2^256
    xp = tl.where(big, xp * 8.636168555094445e-78, xp)
    yp = tl.where(big, yp * 8.636168555094445e-78, yp)
    ecp = tl.where(big, ec + 1, ec)
    xp, yp, ecp, inj = _inject(xp, yp, ecp, rho, re2, sigma[:, None])
    kp = tl.where(inj & re2, k_re, kp)
    # Reinsch's form near the poles.
    sg = sigma[:, None]
    yr = (sg * (a * k)) * y - a * (sg * t[:, None]) * x
    xr = (sg * rho) * x + yr
    use_plain = (ec < 0) | ~re2
    x_new = tl.where(use_plain, xp, xr)
    y_new = tl.where(use_plain, yp, yr)
    k_new = tl.where(use_plain, kp, k_re)
    ec_new = tl.where(use_plain, ecp, ec)
    return (tl.where(act, x_new, x), tl.where(act, y_new, y), tl.where(act, k_new, k),
            tl.where(act, ec_new, ec))


@triton.jit
def _sh_fwd_kernel(xyz_ptr, out_ptr, n, L, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    first = tl.program_id(1) * BLOCK_M
    ps64, pmask, px, py, pz = _load_points(xyz_ptr, n, BLOCK_P)
    ms = tl.arange(0, BLOCK_M)
    x, y, k, ec, cm, sm, ux, uy, uz, s, inv_norm, re2, sigma, t = _pass_setup(
        px, py, pz, L, first, ms, BLOCK_P, BLOCK_M, 0)
    f = (_sqrt2() * s)[:, None]
    cs = cm * f
    sn = sm * f
    m = first + ms
    mf = m.to(tl.float64)[None, :] + tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    K = (tl.zeros([], tl.int64) + L + 1) * (L + 1)
    base = ps64[:, None] * K
    for l in range(first, L + 1):
        act = (m[None, :] < l) & pmask[:, None]
        x, y, k, ec = _step(x, y, k, ec, l, mf, act, uz, re2, sigma, t)
        v = tl.where(ec == 0, x, 0.0)
        live = (m[None, :] <= l) & pmask[:, None]
        centre = base + (tl.zeros([], tl.int64) + l) * l + l
        vp = tl.where(m[None, :] == 0, v, v * cs)
        tl.store(out_ptr + centre + m[None, :], vp.to(out_ptr.dtype.element_ty), mask=live)
        tl.store(out_ptr + centre - m[None, :], (v * sn).to(out_ptr.dtype.element_ty),
                 mask=live & (m[None, :] >= 1))


@triton.jit
def _gradient_walk(px, py, pz, g_ptr, base, pmask, L, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
                   WITH_F: tl.constexpr):
    """sum_k g_k dY_k/dp at the points p = (px, py, pz) (any length), w.r.t. p as given
    ((I - u u^T) grad / |p|), g the row at offset `base` (BLOCK_P, 1) of g_ptr; WITH_F: also
    f = g . Y, from the same column values. Returns (f or 0, gx, gy, gz)."""
    ms = tl.arange(0, BLOCK_M)
    af = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    ax = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    ay = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    az = tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
    ux = px
    uy = py
    uz = pz
    inv_norm = px
    for first in range(0, L + 1, BLOCK_M):
        x, y, k, ec, c, sn, ux, uy, uz, s, inv_norm, re2, sigma, t = _pass_setup(
            px, py, pz, L, first, ms, BLOCK_P, BLOCK_M, 1)  # c, sn: cos, sin of (m-1) phi
        m = first + ms
        mf = m.to(tl.float64)[None, :] + tl.zeros([BLOCK_P, BLOCK_M], tl.float64)
        wx = _sqrt2() * mf * c
        wy = _sqrt2() * mf * sn
        cs = wx
        ss = wy
        if WITH_F:
            # cos, sin of m phi: one rotation by phi (1, 0 on the axis, where only m = 0 is
            # non-zero), times sqrt2 s as in the forward.
            pos = s > 0
            c1 = tl.where(pos, ux / tl.where(pos, s, 1.0), 1.0)[:, None]
            s1 = tl.where(pos, uy / tl.where(pos, s, 1.0), 0.0)[:, None]
            scale = (_sqrt2() * s)[:, None]
            cs = (c * c1 - sn * s1) * scale
            ss = (sn * c1 + c * s1) * scale
        for l in range(first, L + 1):
            act = (m[None, :] < l) & pmask[:, None]
            x, y, k, ec = _step(x, y, k, ec, l, mf, act, uz, re2, sigma, t)
            # Column m >= 1: its x/y terms, and the z term of order m-1 (needs R_lm); m = 0
            # enters f only.
            live = (m[None, :] <= l) & pmask[:, None]
            pos_m = live & (m[None, :] >= 1)
            v = tl.where(live & (ec == 0), x, 0.0)
            centre = base + (tl.zeros([], tl.int64) + l) * l + l
            gp_mask = pos_m
            if WITH_F:
                gp_mask = live
            gp = tl.load(g_ptr + centre + m[None, :], mask=gp_mask, other=0.0).to(tl.float64)
            gm = tl.load(g_ptr + centre - m[None, :], mask=pos_m, other=0.0).to(tl.float64)
            gp1 = tl.load(g_ptr + centre + m[None, :] - 1, mask=pos_m, other=0.0).to(tl.float64)
            gm1 = tl.load(g_ptr + centre - m[None, :] + 1, mask=pos_m & (m[None, :] >= 2),
                          other=0.0).to(tl.float64)
            if WITH_F:
                af += tl.where(m[None, :] == 0, v * gp, v * (cs * gp + ss * gm))
            ax += v * (gp * wx + gm * wy)
            ay += v * (gm * wx - gp * wy)
            lf = tl.zeros([], tl.float64) + l
            dzq = tl.where(m[None, :] == 1, lf * (lf + 1.0), 2.0 * (lf - mf + 1.0) * (lf + mf))
            dzf = tl.sqrt(tl.where(pos_m, dzq, 0.0))
            az += dzf * v * (gp1 * c + gm1 * sn)
    gx = tl.sum(ax, axis=1)
    gy = tl.sum(ay, axis=1)
    gz = tl.sum(az, axis=1)
    radial = gx * ux + gy * uy + gz * uz
    return (tl.sum(af, axis=1), (gx - radial * ux) * inv_norm, (gy - radial * uy) * inv_norm,
            (gz - radial * uz) * inv_norm)


@triton.jit
def _load_points(xyz_ptr, n, BLOCK_P: tl.constexpr):
    # This program's BLOCK_P points as float64 (masked lanes: (1, 0, 0)).
    ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = ps < n
    ps64 = tl.where(pmask, ps, 0).to(tl.int64)
    px = tl.load(xyz_ptr + 3 * ps64 + 0, mask=pmask, other=1.0).to(tl.float64)
    py = tl.load(xyz_ptr + 3 * ps64 + 1, mask=pmask, other=0.0).to(tl.float64)
    pz = tl.load(xyz_ptr + 3 * ps64 + 2, mask=pmask, other=0.0).to(tl.float64)
    return ps64, pmask, px, py, pz


@triton.jit
def _store_points(ptr, ps64, pmask, gx, gy, gz):
    dt = ptr.dtype.element_ty
    tl.store(ptr + 3 * ps64 + 0, gx.to(dt), mask=pmask)
    tl.store(ptr + 3 * ps64 + 1, gy.to(dt), mask=pmask)
    tl.store(ptr + 3 * ps64 + 2, gz.to(dt), mask=pmask)


@triton.jit
def _sh_bwd_kernel(xyz_ptr, grad_ptr, gxyz_ptr, n, L, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    ps64, pmask, px, py, pz = _load_points(xyz_ptr, n, BLOCK_P)
    K = (tl.zeros([], tl.int64) + L + 1) * (L + 1)
    _, gx, gy, gz = _gradient_walk(px, py, pz, grad_ptr, ps64[:, None] * K, pmask, L, BLOCK_P, BLOCK_M, False)
    _store_points(gxyz_ptr, ps64, pmask, gx, gy, gz)


@triton.jit
def _dot_gradient_kernel(xyz_ptr, coeffs_ptr, row_ptr, f_ptr, gxyz_ptr, n, L, BLOCK_P: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    # f = c . Y and its gradient at point p, c = row row_ptr[p] of coeffs_ptr.
    ps64, pmask, px, py, pz = _load_points(xyz_ptr, n, BLOCK_P)
    K = (tl.zeros([], tl.int64) + L + 1) * (L + 1)
    base = tl.load(row_ptr + ps64, mask=pmask, other=0).to(tl.int64)[:, None] * K
    f, gx, gy, gz = _gradient_walk(px, py, pz, coeffs_ptr, base, pmask, L, BLOCK_P, BLOCK_M, True)
    tl.store(f_ptr + ps64, f.to(f_ptr.dtype.element_ty), mask=pmask)
    _store_points(gxyz_ptr, ps64, pmask, gx, gy, gz)


# Most orders per tile (more columns per program only add registers); tests lower it to
# exercise several passes at small degree.
_MAX_BLOCK_M = 64


def _blocks(degree: int) -> tuple[int, int]:
    # Orders per tile: the next power of two above the degree, at most _MAX_BLOCK_M; points
    # per tile so that a tile has ~256 columns.
    block_m = min(_MAX_BLOCK_M, triton.next_power_of_2(degree + 1))
    block_p = max(1, 256 // block_m)
    return block_p, block_m


def _check(xyz: torch.Tensor, degree: int) -> None:
    if xyz.dim() != 2 or xyz.shape[1] != 3 or not xyz.is_contiguous():
        raise ValueError(f"xyz must be a contiguous (N, 3) tensor, got shape {tuple(xyz.shape)}"
                         f" (contiguous={xyz.is_contiguous()})")
    if xyz.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"xyz must be float32 or float64, got {xyz.dtype}")
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}")


@triton_op("locdiff::spherical_harmonics_triton", mutates_args=())
@launch.contiguous_inputs
def spherical_harmonics_triton_op(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    n = xyz.shape[0]
    out = torch.empty((n, (degree + 1) ** 2), dtype=xyz.dtype, device=xyz.device)
    if n:
        block_p, block_m = _blocks(degree)
        grid = (triton.cdiv(n, block_p), triton.cdiv(degree + 1, block_m))
        with on_device(xyz):
            wrap_triton(_sh_fwd_kernel)[grid](xyz, out, n, degree, BLOCK_P=block_p, BLOCK_M=block_m)
    return out


@triton_op("locdiff::spherical_harmonics_triton_backward", mutates_args=())
@launch.contiguous_inputs
def spherical_harmonics_triton_backward_op(xyz: torch.Tensor, grad_out: torch.Tensor,
                                           degree: int) -> torch.Tensor:
    n = xyz.shape[0]
    grad_xyz = torch.empty_like(xyz)
    if n:
        block_p, block_m = _blocks(degree)
        grid = (triton.cdiv(n, block_p),)
        with on_device(xyz):
            wrap_triton(_sh_bwd_kernel)[grid](xyz, grad_out, grad_xyz, n, degree, BLOCK_P=block_p,
                                              BLOCK_M=block_m)
    return grad_xyz


register_sh_autograd(spherical_harmonics_triton_op, spherical_harmonics_triton_backward_op)


def spherical_harmonics_triton(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    """``(N, 3)`` contiguous float32/float64 -> ``(N, (degree+1)**2)`` with Triton kernels.

    Differentiable w.r.t. ``xyz``. Inputs are assumed validated (finite, non-zero rows) by
    the caller, ``locdiff.spherical_harmonics(..., backend="triton")``.
    """
    _check(xyz, degree)
    return spherical_harmonics_triton_op(xyz, degree)


@triton_op("locdiff::shdd_eval_triton", mutates_args=())
@launch.contiguous_inputs
def shdd_eval_triton_op(coeffs: torch.Tensor, xyz: torch.Tensor, row: torch.Tensor,
                        degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """locdiff::shdd_eval in one Triton kernel: f = coeffs[row] . Y(xyz) and its gradient
    w.r.t. xyz (N, 3), in xyz's dtype, without forming Y or coeffs[row]."""
    n = xyz.shape[0]
    grad = torch.empty_like(xyz)
    f = xyz.new_empty((n,))
    if n:
        block_p, block_m = _blocks(degree)
        with on_device(xyz):
            wrap_triton(_dot_gradient_kernel)[(triton.cdiv(n, block_p),)](
                xyz, coeffs, row, f, grad, n, degree, BLOCK_P=block_p, BLOCK_M=block_m)
    return f, grad


def sh_dot_and_gradient_triton(coeffs: torch.Tensor, xyz: torch.Tensor, row: torch.Tensor,
                               degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f = coeffs[row] . Y(xyz) and its gradient w.r.t. xyz, per point: coeffs (B, (degree+1)^2),
    xyz (N, 3) and row (N,) int64, contiguous, one device -> (f (N,), grad (N, 3)) in xyz's
    dtype (the walk that refine_triton runs at each Newton iteration)."""
    _check(xyz, degree)
    return shdd_eval_triton_op(coeffs, xyz, row, degree)
