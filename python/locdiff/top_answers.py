"""Top-k answers of any method (the baselines', LocDiff-H's, LocDiff's answer before its
modes), comparable with LocDiff's top-k modes (``shdd.top_k``): candidate locations taken
best first, each kept only if it lies at least ``min_separation_km`` from every one kept
before it, so that k answers are k different places rather than k neighbours of one.

>>> import torch
>>> xyz = torch.tensor([[[1.0, 0, 0], [1.0, 0.001, 0], [0, 1.0, 0]]], dtype=torch.float64)
>>> separated_top_k(xyz, torch.tensor([[3.0, 2.0, 1.0]]), 2, 100.0).round(3).tolist()
[[[0.0, 0.0], [0.0, 90.0]]]
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from locdiff.geo import cos_of_km, latlon_to_xyz, xyz_to_latlon
from locdiff.ops.validation import check_int


def check_top_k_args(k, min_separation_km) -> tuple[int, float]:
    check_int(k, "k")
    if isinstance(min_separation_km, bool) or not (isinstance(min_separation_km, numbers.Real)
                                                   and math.isfinite(min_separation_km) and min_separation_km >= 0):
        raise ValueError(f"min_separation_km must be a finite number >= 0, got {min_separation_km!r}")
    return int(k), float(min_separation_km)


def separated_top_k(xyz: torch.Tensor, scores: torch.Tensor, k: int, min_separation_km: float) -> np.ndarray:
    """The ``k`` best of candidates ``xyz`` (N, M, 3) unit vectors under ``scores`` (N, M)
    (higher first, -inf or NaN: not a candidate) that lie ``min_separation_km`` apart ->
    latlon (N, k, 2), NaN where fewer than k remain."""
    k, sep = check_top_k_args(k, min_separation_km)
    xyz = xyz.double()
    scores = scores.double()
    # NaN -> -inf, keeping +-inf as they are (nan_to_num would make them finite candidates)
    scores = torch.where(torch.isnan(scores), -math.inf, scores)
    order = scores.argsort(dim=1, descending=True, stable=True)
    xyz = torch.gather(xyz, 1, order[..., None].expand_as(xyz))
    scores = torch.gather(scores, 1, order)
    n = len(xyz)
    kept = torch.full((n, k, 3), math.nan, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.long)
    rows = torch.arange(n)
    cos_sep = cos_of_km(sep)
    for m in range(xyz.shape[1]):
        c = xyz[:, m]
        close = ((kept @ c[:, :, None])[..., 0] > cos_sep) & (torch.arange(k) < count[:, None])
        take = (count < k) & (scores[:, m] > -math.inf) & ~close.any(1)
        kept[rows[take], count[take]] = c[take]
        count += take.long()
        if bool((count == k).all()):
            break
    found = torch.isfinite(kept[..., :1])
    out = xyz_to_latlon(torch.where(found, kept, kept.new_tensor([0.0, 0.0, 1.0])))
    return torch.where(found, out, torch.nan).numpy()


def answer_first_top_k(answer, xyz: torch.Tensor, scores: torch.Tensor, k: int,
                       min_separation_km: float) -> np.ndarray:
    """A method's ``answer`` (N, 2) latlon first, then the best of further candidates ``xyz``
    (N, M, 3) under ``scores`` (N, M) (-inf or NaN: none), as :func:`separated_top_k`."""
    first = torch.as_tensor(latlon_to_xyz(np.asarray(answer, np.float64)))[:, None]
    top = torch.full((len(first), 1), math.inf, dtype=torch.float64)
    return separated_top_k(torch.cat([first, xyz.double()], 1), torch.cat([top, scores.double()], 1),
                           k, min_separation_km)
