"""The optimiser of locdiff's training loops: AdamW with PyTorch's fused kernel where the
device has one. torch's default AdamW on a CPU runs several small kernels per tensor; the
fused one makes one pass (compare the eager-plain-adamw rows of benchmarks/test_train_bench.py)."""
from __future__ import annotations

import math

import torch

# Devices whose fused AdamW kernel this torch build is known to carry.
FUSED_DEVICES = ("cpu", "cuda")


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the tensors ``params``: fused where all are floating point
    on one CPU or CUDA device, torch's default implementation elsewhere."""
    params = list(params)
    fused = bool(params) and len({p.device for p in params}) == 1 and all(
        p.dtype.is_floating_point and p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lr_factor(step: int, progress: float, cfg) -> float:
    """Warm-up then cosine from 1 to ``min_lr_ratio`` over ``progress`` in [0, 1]."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    c = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * c
