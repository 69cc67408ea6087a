"""``locdiff::shdd_*``: torch ops over the SHDD kernels (csrc/cpu/shdd_cpu.cpp,
csrc/cuda/shdd_cuda.cu), each with a fake kernel and, where differentiable, autograd.

A ring grid enters every op as ``table, theta, log_area`` (float64 tensors on the
coefficients' device, from ``locdiff.grids.Grid``) and ``degree, nlat, nlon, lon0``:
  shdd_synth(coeffs (B,K)) -> f (B, nlat*nlon)                 [autograd: shdd_adjoint]
  shdd_adjoint(weights (B, nlat*nlon)) -> (B,K) = w . Y         [autograd: shdd_synth]
  shdd_candidates(coeffs, ncand) -> index (B,n), value (B,n), start (B,n,2)
  shdd_logz(coeffs, inv_t) -> log sum_i area_i exp(f_i / t) (B,) float64     [autograd]
  shdd_kl(pred, target, inv_t) -> KL(softmax(f_target/t) || softmax(f_pred/t)) (B,)
  shdd_kl_backward(pred, target, grad, inv_t, need_pred, need_target) -> (gp, gt)
  shdd_kl_grad(pred, target, inv_t, need_pred, need_target) -> (kl, gp, gt) at grad 1 [autograd]
  shdd_eval(coeffs, xyz (N,3) float64, row (N,)) -> f (N,), grad (N,3) float64
  shdd_hessian(coeffs, xyz, row) -> Hessian on the sphere (N,3,3) float64
  shdd_refine(coeffs, xyz (N,3) float64, row (N,), radius, max_iter) -> xyz, f
  shdd_decode_refine(coeffs, value, start, ...) -> refined candidates
  shdd_decode(coeffs, ncand, radius, nrefine, max_iter) -> the two above in one op
Which device and backend runs each is in locdiff.ops.registry (CPU-only ops here have torch
or Triton routes elsewhere). Inputs are validated (see locdiff.shdd) and made contiguous (launch.contiguous_inputs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from locdiff import _C
from locdiff.ops import launch
from locdiff.ops.shdd_gemm import candidates_cpu

BOTH = ("cpu", "cuda")


def _ring(op: str, first: str, t: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, nlat: int, nlon: int,
          lon0: float, **more: Tensor) -> tuple:
    """The grid arguments of a kernel, after checking that every tensor is on t's device."""
    launch.one_device(op, **{first: t}, **more, table=table, theta=theta, log_area=log_area)
    return launch.grid_args(table, theta, log_area, nlat, nlon, lon0)


# ---- synthesis and its adjoint --------------------------------------------------------------
@torch.library.custom_op("locdiff::shdd_synth", mutates_args=(), device_types=BOTH)
@launch.contiguous_inputs
def shdd_synth_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                  nlat: int, nlon: int, lon0: float) -> Tensor:
    out = coeffs.new_empty((coeffs.shape[0], nlat * nlon))
    grid = _ring("shdd_synth", "coeffs", coeffs, table, theta, log_area, nlat, nlon, lon0)
    if coeffs.shape[0]:
        launch.run("shdd_synth", coeffs, coeffs.data_ptr(), coeffs.shape[0], degree, grid, out.data_ptr())
    return out


@shdd_synth_op.register_fake
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0):
    return coeffs.new_empty((coeffs.shape[0], nlat * nlon))


@torch.library.custom_op("locdiff::shdd_adjoint", mutates_args=(), device_types=BOTH)
@launch.contiguous_inputs
def shdd_adjoint_op(weights: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                    nlat: int, nlon: int, lon0: float) -> Tensor:
    out = weights.new_empty((weights.shape[0], (degree + 1) ** 2))
    grid = _ring("shdd_adjoint", "weights", weights, table, theta, log_area, nlat, nlon, lon0)
    if weights.shape[0]:
        launch.run("shdd_adjoint", weights, weights.data_ptr(), weights.shape[0], degree, grid, out.data_ptr())
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


# ---- candidates, log-partition -----------------------------------------------------------------
@torch.library.custom_op("locdiff::shdd_candidates", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_candidates_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                       nlat: int, nlon: int, lon0: float, ncand: int) -> tuple[Tensor, Tensor, Tensor]:
    return candidates_cpu(coeffs, table, theta, log_area, degree, nlat, nlon, lon0, ncand)


@shdd_candidates_op.register_fake
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0, ncand):
    b = coeffs.shape[0]
    f64 = dict(dtype=torch.float64, device=coeffs.device)
    return (torch.empty((b, ncand), dtype=torch.int64, device=coeffs.device),
            torch.empty((b, ncand), **f64), torch.empty((b, ncand, 2), **f64))


@torch.library.custom_op("locdiff::shdd_logz", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_logz_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                 nlat: int, nlon: int, lon0: float, inv_temperature: float) -> Tensor:
    out = torch.empty((coeffs.shape[0],), dtype=torch.float64)
    grid = launch.grid_args(table, theta, log_area, nlat, nlon, lon0)
    if coeffs.shape[0]:
        launch.run("shdd_logz", coeffs, coeffs.data_ptr(), coeffs.shape[0], degree, grid, inv_temperature,
                   out.data_ptr())
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


# ---- points: evaluation, Hessian, refinement ---------------------------------------------------
@torch.library.custom_op("locdiff::shdd_eval", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_eval_op(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int) -> tuple[Tensor, Tensor]:
    n = xyz.shape[0]
    value = torch.empty((n,), dtype=torch.float64)
    grad = torch.empty((n, 3), dtype=torch.float64)
    if n:
        launch.run("shdd_eval", coeffs, coeffs.data_ptr(), degree, xyz.data_ptr(), row.data_ptr(), n,
                   value.data_ptr(), grad.data_ptr())
    return value, grad


@shdd_eval_op.register_fake
def _(coeffs, xyz, row, degree):
    n = xyz.shape[0]
    return (torch.empty((n,), dtype=torch.float64, device=xyz.device),
            torch.empty((n, 3), dtype=torch.float64, device=xyz.device))


@torch.library.custom_op("locdiff::shdd_hessian", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_hessian_op(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int) -> Tensor:
    """The Hessian of f on the sphere at xyz / |xyz| (N, 3) for coefficient rows ``row`` ->
    (N, 3, 3) float64: the tangent-plane map (zero along the point) whose quadratic form is
    f's second derivative along great circles."""
    n = xyz.shape[0]
    hess = torch.empty((n, 3, 3), dtype=torch.float64)
    if n:
        launch.run("shdd_hessian", coeffs, coeffs.data_ptr(), degree, xyz.data_ptr(), row.data_ptr(), n,
                   hess.data_ptr())
    return hess


@shdd_hessian_op.register_fake
def _(coeffs, xyz, row, degree):
    return torch.empty((xyz.shape[0], 3, 3), dtype=torch.float64, device=xyz.device)


@torch.library.custom_op("locdiff::shdd_refine", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_refine_op(coeffs: Tensor, xyz: Tensor, row: Tensor, degree: int, radius: float,
                   max_iter: int) -> tuple[Tensor, Tensor]:
    """Trust-region Newton ascent of f from xyz (N, 3) float64 for coefficient rows ``row``
    (N,) -> (unit xyz (N, 3), f (N,)) float64; tolerances scale with ``radius`` (radians)."""
    n = xyz.shape[0]
    out = xyz.to(torch.float64, copy=True).contiguous()
    value = torch.empty((n,), dtype=torch.float64)
    if n:
        launch.run("shdd_refine", coeffs, coeffs.data_ptr(), degree, float(radius), row.data_ptr(), n, max_iter,
                   out.data_ptr(), value.data_ptr())
    return out, value


@shdd_refine_op.register_fake
def _(coeffs, xyz, row, degree, radius, max_iter):
    n = xyz.shape[0]
    return (torch.empty((n, 3), dtype=torch.float64, device=xyz.device),
            torch.empty((n,), dtype=torch.float64, device=xyz.device))


def _decode_refine_cpu(coeffs: Tensor, value: Tensor, start: Tensor, degree: int, radius: float,
                       nrefine: int, max_iter: int) -> tuple[Tensor, Tensor]:
    b, n = value.shape
    xyz = torch.empty((b, n, 3), dtype=torch.float64)
    out = torch.empty((b, n), dtype=torch.float64)
    if b:
        launch.run("shdd_decode_refine", coeffs, coeffs.data_ptr(), b, degree, float(radius), n, value.data_ptr(),
                   start.data_ptr(), nrefine, max_iter, xyz.data_ptr(), out.data_ptr())
    return xyz, out


@torch.library.custom_op("locdiff::shdd_decode_refine", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_decode_refine_op(coeffs: Tensor, value: Tensor, start: Tensor, degree: int, radius: float,
                          nrefine: int, max_iter: int) -> tuple[Tensor, Tensor]:
    """The decode's choice and refinement of grid candidates, one C++ call: the CPU form of
    locdiff.ops.candidates.refine_candidates (k = 1). value (B, n) and start (B, n, 2)
    (colatitude, longitude) from shdd_candidates -> (xyz (B, n, 3), refined f (B, n)), best
    first; f -inf and xyz zero where not refined."""
    return _decode_refine_cpu(coeffs, value, start, degree, radius, nrefine, max_iter)


@shdd_decode_refine_op.register_fake
def _(coeffs, value, start, degree, radius, nrefine, max_iter):
    b, n = value.shape
    return (torch.empty((b, n, 3), dtype=torch.float64, device=value.device),
            torch.empty((b, n), dtype=torch.float64, device=value.device))


# One dispatch for the whole decode: at a single vector and low degree the custom op's Python
# dispatch costs as much as the kernels (docs/kernels.md, "Per-call costs").
@torch.library.custom_op("locdiff::shdd_decode", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_decode_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int, nlat: int,
                   nlon: int, lon0: float, ncand: int, radius: float, nrefine: int,
                   max_iter: int) -> tuple[Tensor, Tensor]:
    """shdd_candidates (float32 grid) then shdd_decode_refine (float64): coeffs (B, K) ->
    (xyz (B, ncand, 3), refined f (B, ncand)), best first; f -inf, xyz zero where not refined."""
    # float32 grid whatever the input: it only picks starting points (docs/kernels.md).
    _, value, start = candidates_cpu(coeffs.float(), table, theta, log_area, degree, nlat, nlon, lon0, ncand)
    return _decode_refine_cpu(coeffs.double().contiguous(), value, start, degree, radius, nrefine, max_iter)


@shdd_decode_op.register_fake
def _(coeffs, table, theta, log_area, degree, nlat, nlon, lon0, ncand, radius, nrefine, max_iter):
    b = coeffs.shape[0]
    return (torch.empty((b, ncand, 3), dtype=torch.float64, device=coeffs.device),
            torch.empty((b, ncand), dtype=torch.float64, device=coeffs.device))


# ---- SHDD-KL ----------------------------------------------------------------------------------
@torch.library.custom_op("locdiff::shdd_kl", mutates_args=(), device_types=BOTH)
@launch.contiguous_inputs
def shdd_kl_op(pred: Tensor, target: Tensor, table: Tensor, theta: Tensor, log_area: Tensor,
               degree: int, nlat: int, nlon: int, lon0: float, inv_temperature: float) -> Tensor:
    kl = pred.new_empty((pred.shape[0],))
    grid = _ring("shdd_kl", "pred", pred, table, theta, log_area, nlat, nlon, lon0, target=target)
    if pred.shape[0]:
        launch.run("shdd_kl", pred, pred.data_ptr(), target.data_ptr(), pred.shape[0], degree, grid,
                   inv_temperature, kl.data_ptr())
    return kl


@shdd_kl_op.register_fake
def _(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature):
    return pred.new_empty((pred.shape[0],))


def _grad_outputs(pred: Tensor, target: Tensor, need_pred: bool, need_target: bool) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(pred) if need_pred else pred.new_empty((0,)),
            torch.empty_like(target) if need_target else target.new_empty((0,)))


@torch.library.custom_op("locdiff::shdd_kl_backward", mutates_args=(), device_types=BOTH)
@launch.contiguous_inputs
def shdd_kl_backward_op(pred: Tensor, target: Tensor, grad: Tensor, table: Tensor, theta: Tensor,
                        log_area: Tensor, degree: int, nlat: int, nlon: int, lon0: float,
                        inv_temperature: float, need_pred: bool, need_target: bool) -> tuple[Tensor, Tensor]:
    gp, gt = _grad_outputs(pred, target, need_pred, need_target)
    grid = _ring("shdd_kl_backward", "pred", pred, table, theta, log_area, nlat, nlon, lon0, target=target,
                 grad=grad)
    if pred.shape[0] and (need_pred or need_target):
        launch.run("shdd_kl", pred, pred.data_ptr(), target.data_ptr(), grad.data_ptr(), pred.shape[0], degree,
                   grid, inv_temperature, gp.data_ptr() if need_pred else 0,
                   gt.data_ptr() if need_target else 0, bwd=True)
    return gp, gt


@shdd_kl_backward_op.register_fake
def _(pred, target, grad, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature,
      need_pred, need_target):
    return _grad_outputs(pred, target, need_pred, need_target)


# Training wants the KL and its gradient together: one pass gives both (the gradient at
# grad_kl = 1, the size of pred), and the backward only scales it, instead of synthesising
# both vectors of every pair a second time (docs/kernels.md, "SHDD-KL").
@torch.library.custom_op("locdiff::shdd_kl_grad", mutates_args=(), device_types="cpu")
@launch.contiguous_inputs
def shdd_kl_grad_op(pred: Tensor, target: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                    nlat: int, nlon: int, lon0: float, inv_temperature: float, need_pred: bool,
                    need_target: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (kl (B,), dkl/dpred (B, K) or empty, dkl/dtarget (B, K) or empty), per pair."""
    kl = pred.new_empty((pred.shape[0],))
    gp, gt = _grad_outputs(pred, target, need_pred, need_target)
    grid = launch.grid_args(table, theta, log_area, nlat, nlon, lon0)
    if pred.shape[0]:
        launch.run("shdd_kl_grad", pred, pred.data_ptr(), target.data_ptr(), pred.shape[0], degree, grid,
                   inv_temperature, kl.data_ptr(), gp.data_ptr() if need_pred else 0,
                   gt.data_ptr() if need_target else 0)
    return kl, gp, gt


@shdd_kl_grad_op.register_kernel("cuda")
@launch.contiguous_inputs
def _(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature, need_pred, need_target):
    # No fused CUDA kernel: the forward, then the backward at grad 1.
    args = (table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature)
    kl = shdd_kl_op(pred, target, *args)
    gp, gt = shdd_kl_backward_op(pred, target, torch.ones_like(kl), *args, need_pred, need_target)
    return kl, gp, gt


@shdd_kl_grad_op.register_fake
def _(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature, need_pred, need_target):
    return (pred.new_empty((pred.shape[0],)), *_grad_outputs(pred, target, need_pred, need_target))


def _kl_graph(pred, target, table, theta, log_area, degree, nlat, nlon, lon0, inv_temperature):
    """The SHDD-KL per pair through ops with derivatives of every order (synthesis and its
    adjoint are linear): a (B, G) matrix per input, so only for higher derivatives."""
    ring = (table, theta, log_area, degree, nlat, nlon, lon0)
    la = log_area.repeat_interleave(nlon)
    log_p = torch.log_softmax(shdd_synth_op(pred.contiguous(), *ring).double() * inv_temperature + la, -1)
    log_q = torch.log_softmax(shdd_synth_op(target.contiguous(), *ring).double() * inv_temperature + la, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _kl_grads_with_graph(pred, target, grad, rest, need_pred, need_target):
    # create_graph=True (a Hessian, a gradient penalty): the fused kernels' gradients are
    # constants, so the gradient is taken again through _kl_graph, which keeps its graph.
    with torch.enable_grad():
        kl = _kl_graph(pred, target, *rest)
        wanted = [x for x, need in ((pred, need_pred), (target, need_target)) if need]
        got = iter(torch.autograd.grad(kl, wanted, grad.to(kl.dtype), create_graph=True))
    return next(got) if need_pred else None, next(got) if need_target else None


def _setup_kl_grad(ctx, inputs, output):
    _, gp, gt = output
    ctx.save_for_backward(gp, gt, *inputs[:2])
    ctx.mark_non_differentiable(gp, gt)
    ctx.rest, ctx.need = inputs[2:10], inputs[-2:]


def _kl_grad_backward(ctx, grad, _grad_gp, _grad_gt):
    gp, gt, pred, target = ctx.saved_tensors
    need_pred, need_target = ctx.need
    if torch.is_grad_enabled():
        return _kl_grads_with_graph(pred, target, grad, ctx.rest, need_pred, need_target) + (None,) * 10
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
    if torch.is_grad_enabled():
        return _kl_grads_with_graph(pred, target, grad, ctx.rest, need_pred, need_target) + (None,) * 8
    gp, gt = shdd_kl_backward_op(pred, target, grad.contiguous(), *ctx.rest, need_pred, need_target)
    return (gp if need_pred else None, gt if need_target else None) + (None,) * 8


shdd_kl_op.register_autograd(_kl_backward, setup_context=_setup_kl)


def legendre_table(theta: Tensor, nhalf: int, degree: int) -> Tensor:
    """The Legendre table of a ring grid's northern rings (layout in
    csrc/include/locdiff/shdd_kernels.h): theta (>= nhalf,) colatitudes, CPU float64."""
    th = theta[:nhalf].to(torch.float64).contiguous()
    table = torch.empty(nhalf * ((degree + 1) * (degree + 2) // 2), dtype=torch.float64)
    _C.shdd_legendre_table_cpu(th.data_ptr(), nhalf, degree, table.data_ptr(), torch.get_num_threads())
    return table


__all__ = ["legendre_table", "shdd_adjoint_op", "shdd_candidates_op", "shdd_decode_op", "shdd_decode_refine_op",
           "shdd_eval_op", "shdd_hessian_op", "shdd_kl_backward_op", "shdd_kl_grad_op", "shdd_kl_op", "shdd_logz_op",
           "shdd_refine_op", "shdd_synth_op"]
