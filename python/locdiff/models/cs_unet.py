"""CS-UNet: a conditional SirenNet arranged as a U-Net over the SHDD vector (LocDiff).

The input is a noisy SHDD vector ``x_t`` of size ``(L+1)^2``; the output has the same size
(the noise or the clean vector, as the diffusion config says). Every layer is a Siren layer
whose pre-activation is modulated by FiLM (Perez et al., AAAI 2018) from the condition:
``sin(w0 * ((W h + b) * (1 + gamma(c)) + beta(c)))``, where ``c`` = MLP(embedding) +
MLP(sinusoidal timestep features). Down blocks narrow the width, a residual bottleneck
follows, and up blocks widen it again, each concatenating the skip from its down block.

Classifier-free guidance: a learned "null" embedding stands for the dropped condition
(``drop`` mask in :meth:`CSUNet.forward`).

>>> cfg = CSUNetConfig(degree=4, emb_dim=16, widths=(64, 32), cond_dim=32)
>>> net = CSUNet(cfg)
>>> net(torch.randn(3, 25), torch.tensor([0, 10, 999]), torch.randn(3, 16)).shape
torch.Size([3, 25])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from locdiff.models.siren import siren_init_


@dataclass
class CSUNetConfig:
    """Architecture of :class:`CSUNet`. ``widths`` are the down-path widths; the bottleneck
    has ``widths[-1]``. ``timesteps`` scales the timestep features (t / timesteps)."""

    degree: int = 32
    emb_dim: int = 384
    widths: tuple[int, ...] = (1024, 512, 256)
    cond_dim: int = 512
    dropout: float = 0.1
    w0: float = 1.0
    w0_first: float = 1.0
    bottleneck_depth: int = 1
    timesteps: int = 1000
    extra: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return (self.degree + 1) ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CSUNetConfig":
        d = dict(d)
        d["widths"] = tuple(d.get("widths", cls.widths))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def timestep_features(t: torch.Tensor, dim: int, timesteps: int) -> torch.Tensor:
    """Sinusoidal features of ``t / timesteps`` (Vaswani et al. 2017), ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    # Scale to [0, 1000] whatever the number of training steps, so the features span the
    # same frequencies for every schedule length.
    arg = (t.float() * (1000.0 / timesteps))[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


class FiLMSiren(nn.Module):
    """One conditioned Siren layer: ``dropout(sin(w0 * (lin(h) * (1 + g) + b)))``."""

    def __init__(self, d_in: int, d_out: int, cond_dim: int, w0: float, first: bool, dropout: float):
        super().__init__()
        self.linear = siren_init_(nn.Linear(d_in, d_out), w0, first)
        self.film = nn.Linear(cond_dim, 2 * d_out)
        # Zero FiLM at start: the layer begins as a plain Siren layer, keeping its init.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.w0 = w0
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, c):
        gamma, beta = self.film(c).chunk(2, -1)
        return self.dropout(torch.sin(self.w0 * (self.linear(h) * (1 + gamma) + beta)))


class CSUNet(nn.Module):
    """Conditional Siren U-Net denoiser; see the module docstring."""

    def __init__(self, config: CSUNetConfig):
        super().__init__()
        self.config = cfg = config
        w, cd, p = list(cfg.widths), cfg.cond_dim, cfg.dropout
        self.emb_net = nn.Sequential(nn.LayerNorm(cfg.emb_dim), nn.Linear(cfg.emb_dim, cd), nn.SiLU(),
                                     nn.Linear(cd, cd))
        self.time_net = nn.Sequential(nn.Linear(128, cd), nn.SiLU(), nn.Linear(cd, cd))
        self.null_emb = nn.Parameter(torch.zeros(cfg.emb_dim))
        self.cond_act = nn.SiLU()
        self.down = nn.ModuleList(
            [FiLMSiren(cfg.dim, w[0], cd, cfg.w0_first, True, p)]
            + [FiLMSiren(w[i - 1], w[i], cd, cfg.w0, False, p) for i in range(1, len(w))])
        self.mid = nn.ModuleList([FiLMSiren(w[-1], w[-1], cd, cfg.w0, False, p)
                                  for _ in range(cfg.bottleneck_depth)])
        # Up block i takes the previous output and the skip of down block i.
        ups, prev = [], w[-1]
        for i in reversed(range(len(w) - 1)):
            ups.append(FiLMSiren(prev + w[i + 1], w[i], cd, cfg.w0, False, p))
            prev = w[i]
        self.up = nn.ModuleList(ups)
        self.out = nn.Linear(prev + w[0], cfg.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def condition(self, t: torch.Tensor, emb: torch.Tensor | None, drop: torch.Tensor | None = None):
        """The conditioning vector ``c`` for timesteps ``t`` and embeddings ``emb`` (None or
        rows with ``drop`` True use the learned null embedding)."""
        b = t.shape[0]
        if emb is None:
            emb = self.null_emb.expand(b, -1)
        else:
            emb = emb.to(self.null_emb.dtype)
            if drop is not None:
                emb = torch.where(drop[:, None], self.null_emb.expand(b, -1), emb)
        c = self.emb_net(emb) + self.time_net(timestep_features(t, 128, self.config.timesteps))
        return self.cond_act(c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, (L+1)^2) noisy SHDD vectors, ``t`` (B,) integer timesteps, ``emb`` (B, D)
        condition or None (unconditional), ``drop`` optional (B,) bool mask of rows whose
        condition is replaced by the null embedding. Returns (B, (L+1)^2)."""
        c = self.condition(t, emb, drop)
        skips, h = [], x
        for blk in self.down:
            h = blk(h, c)
            skips.append(h)
        for blk in self.mid:
            h = h + blk(h, c)
        for blk in self.up:
            h = blk(torch.cat([h, skips.pop()], -1), c)
        return self.out(torch.cat([h, skips.pop()], -1))
