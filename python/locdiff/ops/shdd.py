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
  shdd_eval(coeffs, xyz (N,3) float64, row (N,)) -> f (N,), grad (N,3) float64   [CPU]
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
@torch.library.custom_op("locdiff::shdd_candidates", mutates_args=(), device_types="cpu")
def shdd_candidates_op(coeffs: Tensor, table: Tensor, theta: Tensor, log_area: Tensor, degree: int,
                       nlat: int, nlon: int, lon0: float, ncand: int) -> tuple[Tensor, Tensor, Tensor]:
    b = coeffs.shape[0]
    index = torch.empty((b, ncand), dtype=torch.int64)
    value = torch.empty((b, ncand), dtype=torch.float64)
    start = torch.empty((b, ncand, 2), dtype=torch.float64)
    if b:
        _C.shdd_candidates_cpu(coeffs.data_ptr(), b, degree,
                               *_grid_args(table, theta, log_area, nlat, nlon, lon0), ncand,
                               index.data_ptr(), value.data_ptr(), start.data_ptr(), _tag(coeffs),
                               _threads())
    return index, value, start


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

__all__ = ["shdd_adjoint_op", "shdd_candidates_op", "shdd_eval_op", "shdd_kl_backward_op", "shdd_kl_op",
           "shdd_logz_op", "shdd_synth_op"]
