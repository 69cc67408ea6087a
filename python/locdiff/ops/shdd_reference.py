"""Pure-torch references for the ``locdiff::shdd_*`` ops (tests only, never the fast path).

Everything is the dense product ``f = c . Y(x)`` over explicit points, with Y from the
pure-torch SH reference (``sh_fn`` may swap in ``locdiff.spherical_harmonics`` at high
degree, where the polynomial reference overflows). O(B x G x K) time, G x K memory.
"""
from __future__ import annotations

import torch

from locdiff.ops.sh_reference import spherical_harmonics_reference


def _degree(coeffs: torch.Tensor) -> int:
    return int(round(coeffs.shape[-1] ** 0.5)) - 1


def shdd_synth_reference(coeffs, xyz, sh_fn=spherical_harmonics_reference):
    """f at points: coeffs (B, K), xyz (G, 3) -> (B, G)."""
    return coeffs @ sh_fn(xyz.to(coeffs.dtype), _degree(coeffs)).T


def shdd_logz_reference(coeffs, xyz, area, temperature=1.0, sh_fn=spherical_harmonics_reference):
    """log sum_i area_i exp(f_i / t) -> (B,)."""
    f = shdd_synth_reference(coeffs, xyz, sh_fn)
    return torch.logsumexp(f / temperature + area.to(f.dtype).log(), -1)


def shdd_kl_reference(pred, target, xyz, area, temperature=1.0, sh_fn=spherical_harmonics_reference):
    """KL(softmax(f_target / t + log a) || softmax(f_pred / t + log a)) per vector -> (B,)."""
    la = area.to(pred.dtype).log()
    lp = torch.log_softmax(shdd_synth_reference(target, xyz, sh_fn) / temperature + la, -1)
    lq = torch.log_softmax(shdd_synth_reference(pred, xyz, sh_fn) / temperature + la, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def shdd_eval_reference(coeffs, xyz, row, sh_fn=spherical_harmonics_reference):
    """f and its gradient w.r.t. xyz at points owned by coefficient rows -> (N,), (N, 3)."""
    with torch.enable_grad():
        x = xyz.detach().to(coeffs.dtype).requires_grad_(True)
        f = (sh_fn(x, _degree(coeffs)) * coeffs[row]).sum(-1)
        (g,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), g


def shdd_hessian_reference(coeffs, xyz, row, sh_fn=spherical_harmonics_reference):
    """The Hessian of f on the sphere at xyz / |xyz| -> (N, 3, 3): second derivatives of
    g(a, b) = f(normalise(u + a e1 + b e2)) by double autograd, mapped back to 3-d as
    sum_ij H_ij e_i e_j^T."""
    u = (xyz / xyz.norm(dim=-1, keepdim=True)).to(coeffs.dtype)
    e1, e2 = _tangent_basis(u)
    with torch.enable_grad():
        ab = torch.zeros(u.shape[0], 2, dtype=u.dtype, device=u.device, requires_grad=True)
        v = u + ab[:, :1] * e1 + ab[:, 1:] * e2
        f = (sh_fn(v, _degree(coeffs)) * coeffs[row]).sum(-1)
        (g,) = torch.autograd.grad(f.sum(), ab, create_graph=True)
        h = torch.stack([torch.autograd.grad(g[:, i].sum(), ab, retain_graph=True)[0] for i in range(2)], 1)
    e = torch.stack([e1, e2], 1)  # (N, 2, 3)
    return torch.einsum("nij,nia,njb->nab", h.detach(), e, e)


def _tangent_basis(u):
    """e1 = normalise(a x u) with a = z unless u is near the axis (then x), e2 = u x e1."""
    a = torch.zeros_like(u)
    near_axis = u[:, 2].abs() >= 0.9
    a[:, 2] = (~near_axis).to(u.dtype)
    a[:, 0] = near_axis.to(u.dtype)
    e1 = torch.linalg.cross(a, u)
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    return e1, torch.linalg.cross(u, e1)


def refine_f_scale(coeffs, degree):
    """A bound on |f| over the sphere per coefficient row (|Y_lm| <= sqrt((2l+1)/4pi) <= (L+1)
    / (2 sqrt(pi))), the scale of the refinement's acceptance test (as the C++ f_scale)."""
    return coeffs.abs().sum(-1) * (0.5 / torch.pi ** 0.5) * (degree + 1)


def shdd_refine_reference(coeffs, degree, row, xyz, radius, max_iter=40, eval_fn=None):
    """Trust-region Newton ascent of f from each start (the algorithm of ``shdd_refine_cpu``,
    vectorised over points) -> (unit xyz (N, 3), f (N,)). ``eval_fn(xyz, row)`` gives f and
    its gradient (default: ``shdd_eval_reference``)."""
    if eval_fn is None:
        eval_fn = lambda x, rw: shdd_eval_reference(coeffs, x, rw)  # noqa: E731
    r = float(radius)
    h = 1e-5 * r
    u = xyz / xyz.norm(dim=-1, keepdim=True)
    f, g = eval_fn(u, row)
    fscale = refine_f_scale(coeffs, degree)[row]
    trust = torch.full_like(f, r)
    prev = torch.zeros_like(f)  # last accepted concave step (0: none)
    done = torch.zeros_like(f, dtype=torch.bool)
    for _ in range(max_iter):
        act = (~done).nonzero().squeeze(1)
        m = act.numel()
        if m == 0:
            break
        ua, fa, ga, ra, ta = u[act], f[act], g[act], row[act], trust[act]
        e1, e2 = _tangent_basis(ua)
        G0, G1 = (ga * e1).sum(-1), (ga * e2).sum(-1)
        gnorm = torch.sqrt(G0 * G0 + G1 * G1)
        _, gh = eval_fn(torch.cat([ua + h * e1, ua + h * e2]), torch.cat([ra, ra]))
        H11 = ((gh[:m] * e1).sum(-1) - G0) / h
        H22 = ((gh[m:] * e2).sum(-1) - G1) / h
        H12 = 0.5 * (((gh[:m] * e2).sum(-1) - G1) + ((gh[m:] * e1).sum(-1) - G0)) / h
        det = H11 * H22 - H12 * H12
        concave = (H11 + H22 < 0) & (det > 0)
        safe_det = torch.where(concave, det, torch.ones_like(det))
        n0 = -(H22 * G0 - H12 * G1) / safe_det
        n1 = -(H11 * G1 - H12 * G0) / safe_det
        gscale = torch.where(gnorm > 0, ta / gnorm.clamp_min(1e-300), torch.zeros_like(gnorm))
        d0 = torch.where(concave, n0, G0 * gscale)
        d1 = torch.where(concave, n1, G1 * gscale)
        dn = torch.sqrt(d0 * d0 + d1 * d1)
        shrink = torch.where(dn > ta, ta / dn.clamp_min(1e-300), torch.ones_like(dn))
        d0, d1, dn = d0 * shrink, d1 * shrink, dn * shrink
        un = ua + d0[:, None] * e1 + d1[:, None] * e2
        un = un / un.norm(dim=-1, keepdim=True)
        fn, gn = eval_fn(un, ra)
        tiny = dn < 1e-6 * r  # below this, f differences are rounding noise: trust Newton
        ok = ((fn >= fa - 1e-14 * fscale[act]) | (concave & tiny)) & (gnorm > 0)
        u[act] = torch.where(ok[:, None], un, ua)
        f[act] = torch.where(ok, fn, fa)
        g[act] = torch.where(ok[:, None], gn, ga)
        trust[act] = torch.where(ok, torch.clamp(torch.maximum(ta, 2 * dn), max=r), dn / 4)
        pa = prev[act]
        # Quadratic convergence: the next step would be about dn^3 / prev^2 (see the kernel).
        quadratic = (pa > dn) & (dn < 1e-4 * r) & (dn ** 3 < 1e-9 * r * pa * pa)
        prev[act] = torch.where(ok & concave, dn, torch.where(ok, torch.zeros_like(pa), pa))
        finished = (ok & concave & ((dn < 1e-9 * r) | quadratic)) | (gnorm == 0) | (~ok & (dn / 4 < 1e-14 * r))
        done[act] = finished
    return u, f
