"""The decode's refinement in one Triton kernel: trust-region Newton ascent of f = c . Y on
the sphere, every iteration of every point inside the kernel.

What it replaces on CUDA (locdiff.ops.shdd_reference.shdd_refine_reference with a fused f
and gradient per evaluation): each iteration there is three kernel evaluations and some
forty small torch ops over the active points, plus a device-to-host sync to see whether any
is left, so a decode's refinement costs tens of launches per iteration whatever the batch.
Here a program owns BLOCK_P points and runs their iterations to the end; the only launch is
this one.

The algorithm is the reference's, step for step (and so the CPU kernel's, shdd_refine_cpu):
f and its gradient at the point; the Hessian in the tangent plane from gradients at
u + h e1 and u + h e2 (h = 1e-5 of the kernel radius); a Newton step where f is concave,
else a gradient step of the trust radius; the step clipped to the trust radius, accepted
when f does not drop (to 1e-14 of a bound on |f|), the radius doubled or quartered; stop
at a step below 1e-9 radius or once convergence is quadratic. Evaluation is the SH
backward's column walk (sh_triton._gradient_walk) with f summed from the same values, in
float64, never forming Y.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests, small sizes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from locdiff.ops import launch
from locdiff.ops.shdd_reference import refine_f_scale
from locdiff.ops.triton.sh_triton import _blocks, _gradient_walk, _load_points, _store_points, on_device


@triton.jit
def _f_and_gradient(px, py, pz, coeffs_ptr, base, pmask, L, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    # f = c . Y and its gradient w.r.t. the point as given, c the row at `base` of coeffs.
    return _gradient_walk(px, py, pz, coeffs_ptr, base, pmask, L, BLOCK_P, BLOCK_M, True)


@triton.jit
def _tangent_basis(ux, uy, uz):
    # e1 = normalise(a x u), a = z unless u is near the axis (then x); e2 = u x e1 (as the
    # reference's _tangent_basis).
    near = tl.abs(uz) >= 0.9
    ax = near.to(tl.float64)
    az = 1.0 - ax
    e1x = -az * uy
    e1y = az * ux - ax * uz
    e1z = ax * uy
    n1 = tl.sqrt(e1x * e1x + e1y * e1y + e1z * e1z)
    e1x = e1x / n1
    e1y = e1y / n1
    e1z = e1z / n1
    return e1x, e1y, e1z, uy * e1z - uz * e1y, uz * e1x - ux * e1z, ux * e1y - uy * e1x


@triton.jit
def _refine_kernel(coeffs_ptr, row_ptr, xyz_ptr, fscale_ptr, radius_ptr, out_xyz_ptr, out_f_ptr, n, L, max_iter,
                   BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    # The radius arrives through memory: a Python float argument would be fp32 in the kernel.
    ps64, pmask, px, py, pz = _load_points(xyz_ptr, n, BLOCK_P)
    K = (tl.zeros([], tl.int64) + L + 1) * (L + 1)
    base = tl.load(row_ptr + ps64, mask=pmask, other=0).to(tl.int64)[:, None] * K
    fscale = tl.load(fscale_ptr + ps64, mask=pmask, other=1.0)
    norm = tl.sqrt(px * px + py * py + pz * pz)
    ux = px / norm
    uy = py / norm
    uz = pz / norm
    r = tl.load(radius_ptr).to(tl.float64)
    h = 1e-5 * r
    f, gx, gy, gz = _f_and_gradient(ux, uy, uz, coeffs_ptr, base, pmask, L, BLOCK_P, BLOCK_M)
    trust = tl.zeros([BLOCK_P], tl.float64) + r
    prev = tl.zeros([BLOCK_P], tl.float64)  # last accepted concave step (0: none)
    done = ~pmask
    it = 0
    while (it < max_iter) & (tl.sum(tl.where(done, 0, 1)) > 0):
        e1x, e1y, e1z, e2x, e2y, e2z = _tangent_basis(ux, uy, uz)
        G0 = gx * e1x + gy * e1y + gz * e1z
        G1 = gx * e2x + gy * e2y + gz * e2z
        gnorm = tl.sqrt(G0 * G0 + G1 * G1)
        _, ax, ay, az = _f_and_gradient(ux + h * e1x, uy + h * e1y, uz + h * e1z, coeffs_ptr, base, pmask, L,
                                        BLOCK_P, BLOCK_M)
        _, bx, by, bz = _f_and_gradient(ux + h * e2x, uy + h * e2y, uz + h * e2z, coeffs_ptr, base, pmask, L,
                                        BLOCK_P, BLOCK_M)
        H11 = ((ax * e1x + ay * e1y + az * e1z) - G0) / h
        H22 = ((bx * e2x + by * e2y + bz * e2z) - G1) / h
        H12 = 0.5 * (((ax * e2x + ay * e2y + az * e2z) - G1) + ((bx * e1x + by * e1y + bz * e1z) - G0)) / h
        det = H11 * H22 - H12 * H12
        concave = (H11 + H22 < 0) & (det > 0)
        safe_det = tl.where(concave, det, 1.0)
        n0 = -(H22 * G0 - H12 * G1) / safe_det
        n1 = -(H11 * G1 - H12 * G0) / safe_det
        gscale = tl.where(gnorm > 0, trust / tl.maximum(gnorm, 1e-300), 0.0)
        d0 = tl.where(concave, n0, G0 * gscale)
        d1 = tl.where(concave, n1, G1 * gscale)
        dn = tl.sqrt(d0 * d0 + d1 * d1)
        shrink = tl.where(dn > trust, trust / tl.maximum(dn, 1e-300), 1.0)
        d0 = d0 * shrink
        d1 = d1 * shrink
        dn = dn * shrink
        vx = ux + d0 * e1x + d1 * e2x
        vy = uy + d0 * e1y + d1 * e2y
        vz = uz + d0 * e1z + d1 * e2z
        vn = tl.sqrt(vx * vx + vy * vy + vz * vz)
        vx = vx / vn
        vy = vy / vn
        vz = vz / vn
        fn, hx, hy, hz = _f_and_gradient(vx, vy, vz, coeffs_ptr, base, pmask, L, BLOCK_P, BLOCK_M)
        tiny = dn < 1e-6 * r  # below this, f differences are rounding noise: trust Newton
        ok = ((fn >= f - 1e-14 * fscale) | (concave & tiny)) & (gnorm > 0) & ~done
        ux = tl.where(ok, vx, ux)
        uy = tl.where(ok, vy, uy)
        uz = tl.where(ok, vz, uz)
        f = tl.where(ok, fn, f)
        gx = tl.where(ok, hx, gx)
        gy = tl.where(ok, hy, gy)
        gz = tl.where(ok, hz, gz)
        trust = tl.where(done, trust, tl.where(ok, tl.minimum(tl.maximum(trust, 2 * dn), r), dn / 4))
        # Quadratic convergence: the next step would be about dn^3 / prev^2 (see the CPU kernel).
        quadratic = (prev > dn) & (dn < 1e-4 * r) & (dn * dn * dn < 1e-9 * r * prev * prev)
        finished = (ok & concave & ((dn < 1e-9 * r) | quadratic)) | (gnorm == 0) | (~ok & (dn / 4 < 1e-14 * r))
        prev = tl.where(done, prev, tl.where(ok & concave, dn, tl.where(ok, 0.0, prev)))
        done = done | finished
        it += 1
    _store_points(out_xyz_ptr, ps64, pmask, ux, uy, uz)
    tl.store(out_f_ptr + ps64, f, mask=pmask)


@triton_op("locdiff::shdd_refine_triton", mutates_args=())
@launch.contiguous_inputs
def shdd_refine_triton_op(coeffs: torch.Tensor, xyz: torch.Tensor, row: torch.Tensor, degree: int, radius: float,
                          max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """locdiff::shdd_refine in one Triton kernel (float64 coeffs and xyz)."""
    n = xyz.shape[0]
    out_xyz = torch.empty_like(xyz)
    out_f = xyz.new_empty((n,))
    if n:
        fscale = refine_f_scale(coeffs, degree)[row].contiguous()
        r = torch.full((1,), radius, dtype=torch.float64, device=xyz.device)
        block_p, block_m = _blocks(degree)
        with on_device(xyz):
            wrap_triton(_refine_kernel)[(triton.cdiv(n, block_p),)](
                coeffs, row, xyz, fscale, r, out_xyz, out_f, n, degree, max_iter, BLOCK_P=block_p,
                BLOCK_M=block_m)
    return out_xyz, out_f


def refine_triton(coeffs: torch.Tensor, degree: int, row: torch.Tensor, xyz: torch.Tensor, radius: float,
                  max_iter: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Trust-region Newton ascent of f = coeffs[row] . Y from each start, in one kernel:
    coeffs (B, (degree+1)^2) float64, row (N,) int64, xyz (N, 3) float64 starts, one device
    -> (unit xyz (N, 3), f (N,)) float64 (shdd_refine_reference's algorithm and results)."""
    if coeffs.dtype != torch.float64 or xyz.dtype != torch.float64:
        raise TypeError(f"refine_triton works in float64, got coeffs {coeffs.dtype} and xyz {xyz.dtype}")
    if coeffs.shape[-1] != (degree + 1) ** 2:
        raise ValueError(f"coeffs must have (degree+1)^2 = {(degree + 1) ** 2} columns, got {coeffs.shape[-1]}")
    return shdd_refine_triton_op(coeffs.contiguous(), xyz.contiguous(), row.contiguous().to(torch.int64), degree,
                                 float(radius), int(max_iter))
