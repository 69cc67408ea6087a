"""CS-UNet: a conditional SirenNet arranged as a U-Net over the SHDD vector (LocDiff).

The input is a noisy SHDD vector ``x_t`` of size ``(L+1)^2``; the output has the same size
(the noise or the clean vector, as the diffusion config says). Every layer is a Siren layer
whose pre-activation is modulated by FiLM (Perez et al., AAAI 2018) from the condition:
``sin(w0 * ((W h + b) * (1 + tanh(gamma(c))) + beta(c)))``, where ``c`` = MLP(embedding) +
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
    has ``widths[-1]``. ``emb_widths`` / ``emb_dropout``: the MLP that reads the embedding
    (its features drive the FiLM condition and the density head). ``timesteps`` scales the
    timestep features (t / timesteps). ``density_head``: a second output layer beside the
    denoiser's, an SHDD vector describing the distribution of the location given the input
    (trained by SHDD-KL, see ``locdiff.diffusion.losses``). ``density_from``: the head reads
    the embedding features alone ("embedding": the distribution given the condition) or
    beside the denoiser's last hidden layer ("trunk": given the condition and x_t).
    ``conditional``: False for a model of where locations lie, given nothing (trained without
    embeddings: each row's input is the constant 1, ``emb_dim`` 1)."""

    degree: int = 32
    emb_dim: int = 384
    widths: tuple[int, ...] = (1024, 512, 256)
    cond_dim: int = 512
    dropout: float = 0.1
    emb_widths: tuple[int, ...] = (1024, 1024)
    emb_dropout: float = 0.4
    w0: float = 1.0
    w0_first: float = 1.0
    bottleneck_depth: int = 1
    # On by default: one call of the head beats the mean of the denoiser by 29 km median on
    # the places task (docs/model.md, "Samplers").
    density_head: bool = True
    density_from: str = "embedding"
    conditional: bool = True
    timesteps: int = 1000
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # The degree is checked where it is used (CSUNet; a run's, with its memory bound).
        from locdiff.ranges import check_section

        check_section("model", self)  # a SettingError (ValueError) naming the field

    @property
    def dim(self) -> int:
        return (self.degree + 1) ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["emb_widths"] = list(self.emb_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CSUNetConfig":
        d = dict(d)
        d["widths"] = tuple(d.get("widths", cls.widths))
        d["emb_widths"] = tuple(d.get("emb_widths", cls.emb_widths))
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
    """One conditioned Siren layer: ``dropout(sin(w0 * (lin(h) * (1 + tanh(g)) + b)))``."""

    def __init__(self, d_in: int, d_out: int, cond_dim: int, w0: float, dropout: float,
                 input_var: float | None = None):
        super().__init__()
        self.linear = siren_init_(nn.Linear(d_in, d_out), w0, first=False, input_var=input_var)
        self.film = nn.Linear(cond_dim, 2 * d_out)
        # Zero FiLM at start: the layer begins as a plain Siren layer, keeping its init.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.w0 = w0
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, c):
        gamma, beta = self.film(c).chunk(2, -1)
        # The gain is bounded to (0, 2): an unbounded gain multiplies the frequency of every
        # layer after it, and their product made gradients explode within a few hundred steps.
        return self.dropout(torch.sin(self.w0 * (self.linear(h) * (1 + torch.tanh(gamma)) + beta)))


class CSUNet(nn.Module):
    """Conditional Siren U-Net denoiser; see the module docstring."""

    def __init__(self, config: CSUNetConfig):
        super().__init__()
        deg = config.degree
        if isinstance(deg, bool) or not isinstance(deg, int) or deg < 0:
            raise ValueError(f"model.degree = {deg!r}: expected an integer >= 0")
        self.config = cfg = config
        w, cd, p = list(cfg.widths), cfg.cond_dim, cfg.dropout
        # LayerNorm of one feature is its bias whatever the input: a 1-wide condition passes as is.
        layers, prev = [nn.LayerNorm(cfg.emb_dim) if cfg.emb_dim > 1 else nn.Identity()], cfg.emb_dim
        for width in cfg.emb_widths:
            layers += [nn.Linear(prev, width), nn.GELU(), nn.Dropout(cfg.emb_dropout)]
            prev = width
        self.emb_net = nn.Sequential(*layers)
        self.emb_out = nn.Linear(prev, cd)
        emb_features = prev
        self.time_net = nn.Sequential(nn.Linear(128, cd), nn.SiLU(), nn.Linear(cd, cd))
        self.null_emb = nn.Parameter(torch.zeros(cfg.emb_dim))
        self.cond_act = nn.SiLU()
        self.down = nn.ModuleList(
            [FiLMSiren(cfg.dim, w[0], cd, cfg.w0_first, p, input_var=1.0)]
            + [FiLMSiren(w[i - 1], w[i], cd, cfg.w0, p) for i in range(1, len(w))])
        self.mid = nn.ModuleList([FiLMSiren(w[-1], w[-1], cd, cfg.w0, p)
                                  for _ in range(cfg.bottleneck_depth)])
        # Up block i takes the previous output and the skip of down block i.
        ups, prev = [], w[-1]
        for i in reversed(range(len(w) - 1)):
            ups.append(FiLMSiren(prev + w[i + 1], w[i], cd, cfg.w0, p))
            prev = w[i]
        self.up = nn.ModuleList(ups)
        self.out = nn.Linear(prev + w[0], cfg.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if cfg.density_from not in ("embedding", "trunk"):
            raise ValueError(f"density_from must be 'embedding' or 'trunk', got {cfg.density_from!r}")
        if cfg.density_head:
            self.density_out = nn.Linear(emb_features + (prev + w[0] if cfg.density_from == "trunk" else 0), cfg.dim)
            nn.init.zeros_(self.density_out.weight)
            nn.init.zeros_(self.density_out.bias)

    def condition(self, t: torch.Tensor, emb: torch.Tensor | None, drop: torch.Tensor | None = None):
        """``(c, e)``: the conditioning vector for timesteps ``t`` and the embedding features
        of ``emb`` (None or rows with ``drop`` True use the learned null embedding)."""
        b = t.shape[0]
        if emb is None:
            emb = self.null_emb.expand(b, -1)
        else:
            emb = emb.to(self.null_emb.dtype)
            if drop is not None:
                emb = torch.where(drop[:, None], self.null_emb.expand(b, -1), emb)
        e = self.emb_net(emb)
        c = self.emb_out(e) + self.time_net(timestep_features(t, 128, self.config.timesteps).to(self.null_emb.dtype))
        return self.cond_act(c), e

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, density_rows: int | None = None):
        """``x`` (B, (L+1)^2) noisy SHDD vectors, ``t`` (B,) integer timesteps, ``emb`` (B, D)
        condition or None (unconditional), ``drop`` optional (B,) bool mask of rows whose
        condition is replaced by the null embedding. Returns (B, (L+1)^2); with
        ``density_rows`` = n, also the density head's output for the first n rows."""
        h, e = self.features(x, t, emb, drop)
        out = self.out(h)
        if density_rows is None:
            return out
        if not self.config.density_head:
            raise ValueError("density_rows needs a CSUNet built with density_head=True")
        feats = e if self.config.density_from == "embedding" else torch.cat([h, e], -1)
        return out, self.density_out(feats[:density_rows])

    def features(self, x, t, emb=None, drop=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden layer (B, widths[0] * 2) that the output layers read, and the
        embedding features (B, emb_widths[-1]) that the density head reads beside it."""
        c, e = self.condition(t, emb, drop)
        skips, h = [], x.to(self.null_emb.dtype)  # the weights' (a float64 SHDD into a float32 net)
        for blk in self.down:
            h = blk(h, c)
            skips.append(h)
        for blk in self.mid:
            h = h + blk(h, c)
        for blk in self.up:
            h = blk(torch.cat([h, skips.pop()], -1), c)
        return torch.cat([h, skips.pop()], -1), e
