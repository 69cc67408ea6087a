"""torch-harmonics as the anchor of the decode and SHDD-KL benchmarks: its inverse real SHT
on an equiangular grid of the size locdiff decodes on, its grid, and locdiff's real
coefficients in its complex layout."""
import math

import torch

from locdiff import grids

_MAPS = {}


def inverse_sht(degree, device="cpu"):
    import torch_harmonics as th

    grid = grids.for_degree(degree)
    return th.InverseRealSHT(grid.nlat, grid.nlon, lmax=degree + 1, mmax=degree + 1, grid="equiangular",
                             csphase=False).to(device)


def th_grid(degree):
    """Its grid (rings include the poles): colatitudes (nlat,), points (G, 3) and cell areas
    (G,), float64."""
    from torch_harmonics.quadrature import precompute_latitudes

    grid = grids.for_degree(degree)
    colat, w = precompute_latitudes(grid.nlat, grid="equiangular")
    lon = torch.arange(grid.nlon, dtype=torch.float64) * (2 * math.pi / grid.nlon)
    th, ph = torch.meshgrid(colat.double(), lon, indexing="ij")
    xyz = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1).reshape(-1, 3)
    area = (w.double() * (2 * math.pi / grid.nlon))[:, None].expand(-1, grid.nlon).reshape(-1)
    return colat.double(), xyz, area


def to_th(c, degree):
    """Real coefficients (B, K) -> torch-harmonics' complex (B, L+1, L+1), differentiably:
    X_l0 = c_l0, X_lm = (c_l,m - i c_l,-m) / sqrt(2) (orthonormal, no Condon-Shortley
    phase), so that f = sum_l X_l0 P_l0 + 2 Re sum_{m>0} X_lm P_lm e^{i m phi}."""
    key = (degree, c.device)
    if key not in _MAPS:
        L, K = degree, (degree + 1) ** 2
        re = torch.full((L + 1, L + 1), K, dtype=torch.int64)  # K: the zero column
        im = torch.full((L + 1, L + 1), K, dtype=torch.int64)
        scale = torch.zeros(L + 1, L + 1)
        for l in range(L + 1):
            re[l, 0], scale[l, 0] = l * l + l, 1.0
            for m in range(1, l + 1):
                re[l, m], im[l, m], scale[l, m] = l * l + l + m, l * l + l - m, 1 / math.sqrt(2)
        _MAPS[key] = (re.flatten().to(c.device), im.flatten().to(c.device), scale.to(c.device, c.dtype))
    re, im, scale = _MAPS[key]
    cp = torch.cat([c, c.new_zeros(c.shape[0], 1)], 1)
    shape = (c.shape[0], degree + 1, degree + 1)
    return torch.complex(cp[:, re].view(shape) * scale, -cp[:, im].view(shape) * scale)
