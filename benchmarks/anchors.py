"""The implementations measured side by side in the pytest benchmarks, in one module.

Spherical harmonics (test_sh_bench.py): locdiff (native kernels or Triton) and the anchors
(sphericart, e3nn, the naive torch path). Each entry builds, for one device, degree and
dtype, a forward function and a forward+backward function, and a way to read its output in
locdiff's convention for the correctness check.

Decode and SHDD-KL (test_decode_bench.py, test_kl_bench.py): torch-harmonics' inverse real
SHT on an equiangular grid of the size locdiff decodes on, its grid, and locdiff's real
coefficients in its complex layout. ``missing(name)`` says why an anchor cannot run here,
so that its rows skip instead of failing.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import torch

import locdiff
from locdiff import grids
from locdiff.ops import spherical_harmonics_reference


def missing(module: str) -> str | None:
    """None if ``module`` imports, else the reason (for pytest.skip)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install skips as well as a missing one
        return f"{module} not available ({type(exc).__name__}: {exc})"
    return None


def _locdiff(backend):
    def make(xyz, degree, grad):
        x = xyz.detach().clone().requires_grad_(True)

        def fwd():
            return locdiff.spherical_harmonics(xyz, degree, backend=backend)

        def fwd_bwd():
            x.grad = None
            y = locdiff.spherical_harmonics(x, degree, backend=backend)
            y.backward(grad)
            return x.grad

        return fwd, fwd_bwd, lambda out: out

    return make


def _locdiff_out(xyz, degree, grad):
    # locdiff writing into one buffer reused across calls (out=): the kernels without the
    # fresh output's page faults. Forward only (out= is not differentiable).
    out = torch.empty((xyz.shape[0], (degree + 1) ** 2), dtype=xyz.dtype, device=xyz.device)
    return (lambda: locdiff.spherical_harmonics(xyz, degree, out=out)), None, (lambda o: o)


def _naive_torch(xyz, degree, grad):
    # What a user without locdiff writes: the plain recurrence in torch ops, with autograd.
    x = xyz.detach().clone().requires_grad_(True)

    def fwd_bwd():
        x.grad = None
        spherical_harmonics_reference(x, degree).backward(grad)
        return x.grad

    return (lambda: spherical_harmonics_reference(xyz, degree)), fwd_bwd, (lambda out: out)


def _sphericart(xyz, degree, grad):
    if xyz.is_cuda:
        import sphericart.torch as sct

        sh = sct.SphericalHarmonics(degree)
        x = xyz.detach().clone().requires_grad_(True)

        def fwd_bwd():
            x.grad = None
            sh(x).backward(grad)
            return x.grad

        return (lambda: sh(xyz)), fwd_bwd, (lambda out: out)
    import sphericart

    sh = sphericart.SphericalHarmonics(degree)
    xn, gn = xyz.numpy(), grad.numpy()

    def fwd_bwd():
        y, dy = sh.compute_with_gradients(xn)  # dy: (n, 3, K); contract to the VJP
        return np.einsum("nck,nk->nc", dy, gn)

    return (lambda: sh.compute(xn)), fwd_bwd, (lambda out: torch.from_numpy(np.asarray(out)))


def _e3nn(xyz, degree, grad):
    from e3nn import o3

    ls = list(range(degree + 1))
    x = xyz.detach().clone().requires_grad_(True)

    def fwd_bwd():
        x.grad = None
        o3.spherical_harmonics(ls, x, normalize=True, normalization="integral").backward(grad)
        return x.grad

    # e3nn orders axes and signs differently: compare what is convention-free, the per-degree
    # power sum_m Y_lm^2 = (2l+1)/(4 pi).
    return (lambda: o3.spherical_harmonics(ls, xyz, normalize=True, normalization="integral")), fwd_bwd, None


IMPLS = {
    "locdiff": _locdiff(None),
    "locdiff-out": _locdiff_out,
    "locdiff-triton": _locdiff("triton"),
    "sphericart": _sphericart,
    "e3nn": _e3nn,
    "torch-naive": _naive_torch,
}


def available(impl: str, device: str, degree: int) -> str | None:
    """None if impl can run here, else the reason to skip."""
    if device == "cuda" and not (torch.cuda.is_available() and locdiff.has_cuda()):
        return "no CUDA device or CPU-only build"
    try:
        if impl == "locdiff-triton":
            if device != "cuda":
                return "Triton runs on CUDA (the CPU interpreter is for tests only)"
            import triton  # noqa: F401
        elif impl == "sphericart":
            reason = missing("sphericart.torch" if device == "cuda" else "sphericart")
            if reason:
                return reason
        elif impl == "e3nn":
            import e3nn  # noqa: F401

            if degree > 12:
                return "e3nn hard-codes degrees up to 11-12"
        elif impl == "torch-naive" and degree > 64:
            return "the naive torch path takes minutes beyond degree 64"
    except ImportError as e:
        return f"{impl} not installed ({e})"
    return None


def power_per_degree(y: torch.Tensor, degree: int) -> torch.Tensor:
    return torch.stack([(y[:, l * l : (l + 1) ** 2].double() ** 2).sum(-1) for l in range(degree + 1)], -1)


def check(impl_out, as_locdiff, xyz, degree) -> dict:
    """Max error (per unit of sqrt((2l+1)/4pi)) against locdiff's float64 result."""
    exact = locdiff.spherical_harmonics(xyz.double().cpu(), degree)
    out = impl_out.detach().cpu() if isinstance(impl_out, torch.Tensor) else torch.from_numpy(np.asarray(impl_out))
    if as_locdiff is None:  # compare convention-free power per degree
        got, want = power_per_degree(out, degree), power_per_degree(exact, degree)
        scale = torch.tensor([(2 * l + 1) / (4 * math.pi) for l in range(degree + 1)], dtype=torch.float64)
    else:
        got, want = as_locdiff(out).double(), exact
        ls = torch.arange(degree + 1, dtype=torch.float64)
        scale = torch.sqrt((2 * ls + 1) / (4 * math.pi)).repeat_interleave(2 * torch.arange(degree + 1) + 1)
    err = ((got - want).abs() / scale).nan_to_num(float("inf"))
    worst = float(err.max()) if err.numel() else 0.0
    tol = 2e-6 if xyz.dtype == torch.float32 else 1e-11
    bad_from = None
    if worst > tol:
        per_l = err.amax(0)
        if as_locdiff is not None:
            ks = torch.nonzero(per_l > tol)[0, 0].item()
            bad_from = int(math.isqrt(int(ks)))
        else:
            bad_from = int(torch.nonzero(per_l > tol)[0, 0])
    return {"max_err": worst, "correct": worst <= tol, "wrong_from_degree": bad_from}


_MAPS = {}


# ---- torch-harmonics (decode and SHDD-KL) -----------------------------------------------------
def inverse_sht(degree, device="cpu"):
    import torch_harmonics as th

    grid = grids.for_degree(degree)
    return th.InverseRealSHT(grid.nlat, grid.nlon, lmax=degree + 1, mmax=degree + 1, grid="equiangular",
                             csphase=False).to(device)


def th_grid(degree):
    """Its grid (rings include the poles): colatitudes (nlat,), points (G, 3) and cell areas
    (G,), float64."""
    from torch_harmonics.quadrature import precompute_latitudes

    grid = grids.for_degree(degree)
    colat, w = precompute_latitudes(grid.nlat, grid="equiangular")
    lon = torch.arange(grid.nlon, dtype=torch.float64) * (2 * math.pi / grid.nlon)
    th, ph = torch.meshgrid(colat.double(), lon, indexing="ij")
    xyz = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1).reshape(-1, 3)
    area = (w.double() * (2 * math.pi / grid.nlon))[:, None].expand(-1, grid.nlon).reshape(-1)
    return colat.double(), xyz, area


def to_th(c, degree):
    """Real coefficients (B, K) -> torch-harmonics' complex (B, L+1, L+1), differentiably:
    X_l0 = c_l0, X_lm = (c_l,m - i c_l,-m) / sqrt(2) (orthonormal, no Condon-Shortley
    phase), so that f = sum_l X_l0 P_l0 + 2 Re sum_{m>0} X_lm P_lm e^{i m phi}."""
    key = (degree, c.device)
    if key not in _MAPS:
        L, K = degree, (degree + 1) ** 2
        re = torch.full((L + 1, L + 1), K, dtype=torch.int64)  # K: the zero column
        im = torch.full((L + 1, L + 1), K, dtype=torch.int64)
        scale = torch.zeros(L + 1, L + 1)
        for l in range(L + 1):
            re[l, 0], scale[l, 0] = l * l + l, 1.0
            for m in range(1, l + 1):
                re[l, m], im[l, m], scale[l, m] = l * l + l + m, l * l + l - m, 1 / math.sqrt(2)
        _MAPS[key] = (re.flatten().to(c.device), im.flatten().to(c.device), scale.to(c.device, c.dtype))
    re, im, scale = _MAPS[key]
    cp = torch.cat([c, c.new_zeros(c.shape[0], 1)], 1)
    shape = (c.shape[0], degree + 1, degree + 1)
    return torch.complex(cp[:, re].view(shape) * scale, -cp[:, im].view(shape) * scale)
