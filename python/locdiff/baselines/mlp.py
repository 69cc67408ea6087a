"""The network and training loop shared by the learned baselines: an MLP on embeddings,
trained with AdamW, linear warm-up and cosine decay, for a number of steps or minutes,
keeping the weights with the best validation score."""
from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np
import torch
from torch import nn

from locdiff.baselines.rows import float_rows
from locdiff.metrics import check_latlon
from locdiff.optim import adamw


def mlp(d_in: int, widths, d_out: int, dropout: float = 0.1) -> nn.Sequential:
    """LayerNorm, then Linear + GELU + Dropout per width, then a Linear head."""
    layers: list[nn.Module] = [nn.LayerNorm(d_in)]
    prev = d_in
    for w in widths:
        layers += [nn.Linear(prev, w), nn.GELU(), nn.Dropout(dropout)]
        prev = w
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers)


@contextlib.contextmanager
def seeded(seed: int):
    """torch's CPU generator seeded for the block and restored after it: the baselines'
    initialisation and dropout repeat from a seed without moving a caller's own stream."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def fit(net: nn.Module, loss_fn, x: np.ndarray, y, *, seed: int = 0, **train_kw) -> dict:
    """Train ``net`` on rows of ``x`` (N, D) and targets ``y`` (a tensor of N rows) with
    ``loss_fn(net(xb), yb)`` (settings: :func:`_train`), its dropout drawn from ``seed``
    (:func:`seeded`). Returns ``{"steps", "seconds", "best_score"}``."""
    with seeded(seed):
        return _train(net, loss_fn, x, y, seed=seed, **train_kw)


def _train(net: nn.Module, loss_fn, x: np.ndarray, y, *, steps: int = 3000, minutes: float | None = None,
           batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.05, warmup: int = 100,
           val_fn=None, val_every: int = 250, seed: int = 0, log=None) -> dict:
    """:func:`fit`'s loop. ``val_fn(net)`` returns a score to minimise; the best weights are
    kept."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(np.asarray(x, np.float32))
    opt = adamw(net.parameters(), lr, weight_decay)
    t0, step = time.perf_counter(), 0
    limit = minutes * 60 if minutes else math.inf
    best, best_state = math.inf, None
    n = len(xt)
    perm, pos = torch.randperm(n, generator=gen), 0
    while step < steps and time.perf_counter() - t0 < limit:
        progress = max(step / steps, (time.perf_counter() - t0) / limit)
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr * max(f, 0.01)
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        net.train()
        loss = loss_fn(net(xt[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if val_fn is not None and (step % val_every == 0 or step == steps):
            net.eval()
            with torch.no_grad():
                score = float(val_fn(net))
            if log:
                log(f"step {step}: validation {score:.4g}")
            if score < best:
                best, best_state = score, copy.deepcopy(net.state_dict())
    if val_fn is not None:
        net.eval()
        with torch.no_grad():
            score = float(val_fn(net))
        if score < best:
            best, best_state = score, None
        if best_state is not None:
            net.load_state_dict(best_state)
    net.eval()
    return {"steps": step, "seconds": time.perf_counter() - t0, "best_score": best}


@torch.no_grad()
def predict_batches(net: nn.Module | None, x, batch: int = 4096) -> torch.Tensor:
    """``net`` on rows of ``x`` (N, D) in batches (eval mode), concatenated; N may be 0.
    A ValueError names a query of the wrong shape, a RuntimeError a model not fitted."""
    if net is None:
        raise RuntimeError("the baseline is not fitted yet: call fit(emb, coords) first")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    first, last = linears[0], linears[-1]
    if np.ndim(x) != 2 or np.shape(x)[1] != first.in_features:
        raise ValueError(f"query embeddings must have shape (N, {first.in_features}) like the training ones, "
                         f"got {tuple(np.shape(x))}")
    net.eval()
    parts = [net(torch.from_numpy(float_rows(x[i:i + batch], "query embeddings", i))) for i in range(0, len(x), batch)]
    return torch.cat(parts) if parts else torch.empty((0, last.out_features))


def check_training_pair(emb, coords, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(emb (N, D) float32, coords (N, 2) float64)`` of a learned baseline's fit, N >= 1,
    or a ValueError naming what is wrong (the row counts, a NaN, latitudes out of range);
    ``name`` prefixes the names ("val": "val emb", "val coords")."""
    prefix = f"{name} " if name else ""
    if np.ndim(emb) != 2 or len(emb) == 0:
        raise ValueError(f"{prefix}emb must have shape (N, D) with N >= 1, got {tuple(np.shape(emb))}")
    x = float_rows(emb, f"{prefix}emb")
    return x, check_latlon(coords, f"{prefix}coords", rows=len(x))
