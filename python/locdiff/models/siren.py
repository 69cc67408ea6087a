"""SirenNet: multilayer perceptrons with sine activations (Sitzmann et al., NeurIPS 2020).

A Siren layer computes ``sin(w0 * (W x + b))``. The initialisation keeps pre-activations
distributed like the input whatever the depth: first layer ``W ~ U(-1/n, 1/n)`` for
coordinates in [-1, 1] with ``w0 = 30``, hidden layers ``W ~ U(-sqrt(6/n)/w0, sqrt(6/n)/w0)``
for fan-in ``n`` (paper, Sec. 3.2), so that ``w0 W x`` has unit variance when the inputs
(sines) have variance 1/2. Here every layer scales its weights to the variance its inputs
really have: ``W ~ U(-a, a)``, ``a = sqrt(3 / (n var(x))) / w0``, with var(x) = (1 - e^-2) / 2
= 0.432 for the output of a Siren layer (sin of a unit normal), which keeps ``w0 W x`` at
unit variance at every depth, and 1 for a first layer over unit-variance inputs (noisy SHDD
vectors). The coordinate rule would give such a layer ``w0 / sqrt(3 n)``: 0.02 at n = 1089
with w0 = 1, a nearly linear layer.

>>> net = SirenNet(3, 64, 8, depth=3)
>>> net(torch.randn(5, 3)).shape
torch.Size([5, 8])
"""
from __future__ import annotations

import math

import torch
from torch import nn


# Variance of sin(z) for z ~ N(0, 1): the output of a Siren layer at initialisation.
SIREN_OUTPUT_VAR = (1 - math.exp(-2)) / 2


def siren_init_(linear: nn.Linear, w0: float, first: bool, input_var: float | None = None) -> nn.Linear:
    """In-place Siren initialisation of ``linear`` (weights and bias): ``first`` layers of
    coordinates ``U(-1/n, 1/n)``; otherwise weights that give ``w0 W x`` unit variance for
    inputs of variance ``input_var`` (default: a Siren layer's output, SIREN_OUTPUT_VAR)."""
    n = linear.in_features
    if first and input_var is None:
        bound = 1.0 / n
    else:
        bound = math.sqrt(3.0 / (n * (SIREN_OUTPUT_VAR if input_var is None else input_var))) / w0
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
