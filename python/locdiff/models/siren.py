"""SirenNet: multilayer perceptrons with sine activations (Sitzmann et al., NeurIPS 2020).

A Siren layer computes ``sin(w0 * (W x + b))``. The initialisation keeps pre-activations
distributed like the input whatever the depth: first layer ``W ~ U(-1/n, 1/n)``, hidden
layers ``W ~ U(-sqrt(6/n)/w0, sqrt(6/n)/w0)`` for fan-in ``n`` (paper, Sec. 3.2).

>>> net = SirenNet(3, 64, 8, depth=3)
>>> net(torch.randn(5, 3)).shape
torch.Size([5, 8])
"""
from __future__ import annotations

import math

import torch
from torch import nn


def siren_init_(linear: nn.Linear, w0: float, first: bool) -> nn.Linear:
    """In-place Siren initialisation of ``linear`` (weights and bias)."""
    n = linear.in_features
    bound = 1.0 / n if first else math.sqrt(6.0 / n) / w0
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound)
        if linear.bias is not None:
            linear.bias.uniform_(-bound, bound)
    return linear


class Sine(nn.Module):
    """``sin(w0 * x)``."""

    def __init__(self, w0: float = 1.0):
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x):
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


class SirenLayer(nn.Module):
    """``dropout(sin(w0 * (W x + b)))`` with Siren initialisation."""

    def __init__(self, d_in: int, d_out: int, w0: float = 1.0, first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.linear = siren_init_(nn.Linear(d_in, d_out), w0, first)
        self.act = Sine(w0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.act(self.linear(x)))


class SirenNet(nn.Module):
    """``depth`` Siren layers of width ``d_hidden`` and a linear output layer.

    ``w0_first`` is the frequency of the first layer (30 in the paper for coordinates; the
    SH features of a location encoder are already oscillatory, so 1 works there too).
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, depth: int = 2, w0: float = 1.0,
                 w0_first: float = 30.0, dropout: float = 0.0):
        super().__init__()
        layers = [SirenLayer(d_in, d_hidden, w0_first, first=True, dropout=dropout)]
        layers += [SirenLayer(d_hidden, d_hidden, w0, dropout=dropout) for _ in range(depth - 1)]
        self.layers = nn.Sequential(*layers)
        self.out = siren_init_(nn.Linear(d_hidden, d_out), w0, first=False)

    def forward(self, x):
        return self.out(self.layers(x))
