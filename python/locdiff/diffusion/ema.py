"""Exponential moving average of model weights (used for sampling, as in DDPM and PLONK).

>>> net = torch.nn.Linear(2, 2)
>>> ema = EMA(net, decay=0.999)
>>> ema.update(net)        # after each optimizer step
>>> ema.copy_to(net)       # e.g. before evaluation (keep a copy of the raw weights first)
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of a module's floating-point parameters and buffers, updated as
    ``shadow = d * shadow + (1 - d) * param`` with ``d = min(decay, (1 + n) / (10 + n))``
    after ``n`` updates (the warm-up of TensorFlow's ExponentialMovingAverage), so early
    averages are not dominated by the random initialisation. Shadows are float32 at least
    (a bfloat16 average would stop moving) and float64 for float64 weights."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().to(torch.promote_types(v.dtype, torch.float32), copy=True)
                       for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().to(self.shadow[k].dtype), 1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, shadow: dict[str, torch.Tensor], num_updates: int) -> None:
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(num_updates)
