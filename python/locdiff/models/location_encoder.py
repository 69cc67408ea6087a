"""SH + SirenNet location encoder (Russwurm et al., ICLR 2024), exact at any degree.

>>> enc = LocationEncoder(degree=10, d_out=256)
>>> enc(torch.tensor([[48.85, 2.35], [-33.9, 151.2]])).shape
torch.Size([2, 256])
"""
from __future__ import annotations

from torch import nn

from locdiff.models.siren import SirenNet
from locdiff.sh import SphericalHarmonics


class LocationEncoder(nn.Module):
    """``(..., 2)`` (lat, lon) degrees -> ``(..., d_out)`` features: spherical harmonics up to
    ``degree`` followed by a SirenNet. The SH features need no high first-layer frequency,
    hence ``w0_first=1`` by default."""

    def __init__(self, degree: int = 10, d_out: int = 256, d_hidden: int = 256, depth: int = 2,
                 w0: float = 1.0, w0_first: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.sh = SphericalHarmonics(degree)
        self.net = SirenNet(self.sh.embedding_dim, d_hidden, d_out, depth=depth, w0=w0,
                            w0_first=w0_first, dropout=dropout)

    def forward(self, latlon):
        feats = self.sh(latlon.float() if not latlon.is_floating_point() else latlon)
        return self.net(feats.to(self.net.out.weight.dtype))
