"""The geocell classifier (PlaNet, Weyand et al. 2016; PIGEON's cells): spherical k-means
of the training locations into cells, an MLP with cross-entropy over the cells (labels
smoothed by distance, as PIGEON does), and the argmax cell's centre as the prediction. Its
softmax over cells, spread evenly over each cell's area, is a density.

>>> import numpy as np
>>> xyz = spherical_kmeans(np.array([[0.0, 0.0], [0.0, 1.0], [50.0, 50.0]]), 2, seed=0)
>>> xyz.shape
(2, 3)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from locdiff.baselines.mlp import check_training_pair, fit, mlp, predict_batches, seeded
from locdiff.geo import EARTH_RADIUS_KM, great_circle_km, latlon_to_xyz, xyz_to_latlon
from locdiff.metrics import check_latlon
from locdiff.ops.validation import check_int
from locdiff.top_answers import check_top_k_args, separated_top_k


def spherical_kmeans(latlon, k: int, iters: int = 30, seed: int = 0) -> np.ndarray:
    """``k`` unit-vector centres ``(k, 3)`` of the points (k-means++ seeding, cosine
    assignment, centres renormalised means)."""
    latlon = check_latlon(latlon, "latlon")
    check_int(k, "k")
    if len(latlon) == 0:
        raise ValueError("latlon must hold at least one point")
    x = torch.as_tensor(latlon_to_xyz(latlon))
    k = min(int(k), len(x))
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    d2 = torch.full((len(x),), math.inf, dtype=x.dtype)
    for _ in range(1, k):
        d2 = torch.minimum(d2, 2 - 2 * (x @ centres[-1]))
        centres.append(x[torch.multinomial(d2.clamp_min(0) + 1e-18, 1, generator=gen)].squeeze(0))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        c = torch.where(empty[:, None], c, sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-300))
    return c.numpy()


class GeocellClassifier:
    """Cells from :func:`spherical_kmeans` and an MLP classifier over them; see the module
    docstring. ``smoothing_km``: targets ``softmax(-(d(x, c_j) - d(x, c_true)) / s)`` over
    cell centres c_j (0: one-hot, with ``label_smoothing``)."""

    def __init__(self, cells: int = 512, widths=(1024, 1024), dropout: float = 0.2,
                 smoothing_km: float = 100.0, label_smoothing: float = 0.0, seed: int = 0):
        check_int(cells, "cells")
        self.cells, self.widths, self.dropout = int(cells), tuple(widths), float(dropout)
        self.smoothing_km, self.label_smoothing, self.seed = float(smoothing_km), float(label_smoothing), seed
        self.net = None
        self.centres = None
        self.cell_area = None

    def _targets(self, xyz: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(self.centres)
        ang = torch.acos((xyz @ c.T).clamp(-1, 1)) * EARTH_RADIUS_KM  # (N, C) km
        if self.smoothing_km > 0:
            return torch.softmax(-(ang - ang.min(1, keepdim=True).values) / self.smoothing_km, 1).float()
        return F.one_hot(ang.argmin(1), len(c)).float()

    def fit(self, emb, coords, val=None, select: str = "median", **train_kw) -> dict:
        """Cells, then the classifier; ``val`` = (emb, coords) picks the best weights by
        validation ``select``: "median" (error of the argmax cell's centre, km) or "nll".
        ``train_kw`` go to :func:`locdiff.baselines.mlp.fit`."""
        if select not in ("median", "nll"):
            raise ValueError(f"select must be 'median' or 'nll', got {select!r}")
        emb, coords = check_training_pair(emb, coords)
        self.centres = spherical_kmeans(coords, self.cells, seed=self.seed)
        self.cell_area = _voronoi_areas(self.centres)
        xyz = torch.as_tensor(latlon_to_xyz(coords))
        y = self._targets(xyz)
        with seeded(self.seed):
            self.net = mlp(emb.shape[1], self.widths, len(self.centres), self.dropout)
        ls = self.label_smoothing

        def loss(logits, target):
            return F.cross_entropy(logits, target if ls == 0 else target * (1 - ls) + ls / target.shape[1])

        val_fn = None
        if val is not None:
            vx, vll = check_training_pair(*val, name="val")
            vx = torch.from_numpy(vx)
            if select == "nll":
                val_fn = lambda net: -float(np.mean(self._log_density(net(vx), vll)))  # noqa: E731
            else:
                val_fn = lambda net: float(np.median(great_circle_km(  # noqa: E731
                    xyz_to_latlon(self.centres[net(vx).argmax(1).numpy()]), vll)))
        return fit(self.net, loss, emb, y, val_fn=val_fn, seed=self.seed, **train_kw)

    def _cell_of(self, latlon) -> np.ndarray:
        if self.centres is None:
            raise RuntimeError("the baseline is not fitted yet: call fit(emb, coords) first")
        x = latlon_to_xyz(np.asarray(latlon, np.float64))
        return np.argmax(x @ self.centres.T, 1)

    def _log_density(self, logits: torch.Tensor, latlon) -> np.ndarray:
        logp = torch.log_softmax(logits.double(), 1).numpy()
        cell = self._cell_of(latlon)
        return logp[np.arange(len(cell)), cell] - np.log(self.cell_area[cell])

    def predict(self, emb) -> np.ndarray:
        """The argmax cell's centre ``(N, 2)``."""
        logits = predict_batches(self.net, emb)
        return xyz_to_latlon(self.centres[logits.argmax(1).numpy()])

    def top_k(self, emb, k: int = 5, min_separation_km: float = 1000.0) -> np.ndarray:
        """The centres of the k most probable cells ``min_separation_km`` apart (the
        prediction first) -> ``(N, k, 2)``, NaN where fewer."""
        k, sep = check_top_k_args(k, min_separation_km)
        logits = predict_batches(self.net, emb)
        centres = torch.as_tensor(self.centres).double().expand(len(logits), -1, -1)
        return separated_top_k(centres, logits, k, sep)

    def log_density_at(self, emb, latlon) -> np.ndarray:
        """log density per steradian: cell probability / cell area at the point's cell."""
        logits = predict_batches(self.net, emb)
        return self._log_density(logits, check_latlon(latlon, "latlon", rows=len(logits)))

    def grid_probabilities(self, emb, grid) -> np.ndarray:
        """Cell probabilities on ``grid``: each geocell's probability spread by area over the
        grid cells whose centres it holds."""
        owner = self._cell_of(grid.latlon.numpy())
        share = grid.area.numpy() / self.cell_area[owner]
        prob = torch.softmax(predict_batches(self.net, emb).double(), 1).numpy()
        p = prob[:, owner] * share[None]
        return p / p.sum(1, keepdims=True)


def _voronoi_areas(centres: np.ndarray, n: int = 2_000_000) -> np.ndarray:
    """Area (steradians) of each centre's Voronoi cell, by counting the points of a fine
    Fibonacci lattice nearest to it (at least one point's area each)."""
    from locdiff.grids import fibonacci

    pts = fibonacci(n).xyz.numpy()
    c = np.asarray(centres)
    owner = np.concatenate([np.argmax(pts[i:i + 65536] @ c.T, 1) for i in range(0, n, 65536)])
    counts = np.bincount(owner, minlength=len(c)).astype(np.float64)
    return np.maximum(counts, 1.0) * (4 * math.pi / n)
