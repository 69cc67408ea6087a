"""The network and training loop shared by the learned baselines: an MLP on embeddings,
trained with AdamW, linear warm-up and cosine decay, for a number of steps or minutes,
keeping the weights with the best validation score."""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from torch import nn

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


def fit(net: nn.Module, loss_fn, x: np.ndarray, y, *, steps: int = 3000, minutes: float | None = None,
        batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.05, warmup: int = 100,
        val_fn=None, val_every: int = 250, seed: int = 0, log=None) -> dict:
    """Train ``net`` on rows of ``x`` (N, D) and targets ``y`` (a tensor of N rows) with
    ``loss_fn(net(xb), yb)``. ``val_fn(net)`` returns a score to minimise; the best weights
    are kept. Returns ``{"steps", "seconds", "best_score"}``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
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
def predict_batches(net: nn.Module, x, batch: int = 4096) -> torch.Tensor:
    """``net`` on rows of ``x`` in batches (eval mode), concatenated."""
    net.eval()
    return torch.cat([net(torch.as_tensor(np.asarray(x[i:i + batch], np.float32)))
                      for i in range(0, len(x), batch)])
