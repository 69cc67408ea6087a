"""Evaluation of a trained run (metrics of EVAL.md) and the nearest-neighbour baselines.

>>> from locdiff.predict import Predictor
>>> m = evaluate(Predictor.from_run("runs/demo"), test_emb, test_coords)  # doctest: +SKIP
>>> sorted(m)[:3]                                                         # doctest: +SKIP
['acc_1km', 'acc_200km', 'acc_2500km']
"""
from __future__ import annotations

import numpy as np
import torch

from locdiff import metrics as M
from locdiff.geo import latlon_to_xyz, xyz_to_latlon


def density_scores(coeffs, true_latlon, temperature: float = 1.0, batch: int = 256) -> dict:
    """``nll`` and ``rva_auc`` of SHDD vectors ``coeffs`` (N, K) against the truths, on a ring
    grid of twice the default resolution for their degree."""
    from locdiff import grids, shdd

    coeffs = torch.as_tensor(np.asarray(coeffs)).double()
    degree = shdd.degree_of(coeffs.shape[-1])
    # Twice the default resolution: the smallest possible search area is one cell.
    grid = grids.for_degree(degree, oversample=2.0)
    xyz = latlon_to_xyz(np.asarray(true_latlon, np.float64))
    cells = grid.xyz.numpy()
    search, logd = [], []
    for i in range(0, len(coeffs), batch):
        c = coeffs[i:i + batch]
        prob = shdd.density(c, grid, temperature).numpy()
        cell = np.argmax(xyz[i:i + batch] @ cells.T, 1)
        search.append(M.search_area_km2(prob, grid.area.numpy(), cell))
        logd.append(np.asarray(shdd.log_density_at(c, torch.as_tensor(np.asarray(true_latlon[i:i + batch])),
                                                   grid, temperature)))
    return {"nll": M.nll(np.concatenate(logd)), "rva_auc": M.rva_auc(np.concatenate(search))}


def evaluate(predictor, emb, coords, density: bool = True, progress: bool = False, **kw) -> dict:
    """Metrics of EVAL.md for a :class:`locdiff.predict.Predictor` on ``emb`` (N, D) and true
    ``coords`` (N, 2): accuracies, median and mean km, GeoScore, and ``nll`` / ``rva_auc``
    of the aggregated densities (at the run's prediction temperature) when ``density``."""
    out = predictor.predict(emb, progress=progress, **kw)
    m = M.distance_metrics(out["latlon"], coords)
    if density:
        m.update(density_scores(out["coeffs"], coords, predictor.config.predict.temperature))
    m["n"] = int(len(coords))
    return m


def knn_baseline(train_emb, train_coords, query_emb, k: int = 10, temperature: float = 0.05,
                 batch: int = 2048) -> np.ndarray:
    """k-nearest-neighbour locations in embedding space (cosine similarity), averaged on the
    sphere with softmax(similarity / temperature) weights (k = 1: the nearest one's location).
    Returns ``(N, 2)`` (lat, lon)."""
    tr = torch.as_tensor(np.asarray(train_emb, np.float32))
    tr = tr / tr.norm(dim=1, keepdim=True).clamp_min(1e-12)
    txyz = torch.as_tensor(latlon_to_xyz(np.asarray(train_coords, np.float64)))
    out = []
    for i in range(0, len(query_emb), batch):
        q = torch.as_tensor(np.asarray(query_emb[i:i + batch], np.float32))
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim, idx = (q @ tr.T).topk(k, dim=1)
        w = torch.softmax(sim.double() / temperature, 1)
        out.append((w[..., None] * txyz[idx]).sum(1))
    return xyz_to_latlon(torch.cat(out)).numpy()


def format_table(rows: dict[str, dict]) -> str:
    """A plain-text table of metrics, one row per method."""
    cols = ["median_km", "mean_km", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
            "geoscore", "nll", "rva_auc"]
    head = f"{'method':<10}" + "".join(f"{c:>11}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append(f"{'-':>11}")
            elif c.startswith("acc"):
                cells.append(f"{100 * v:>10.1f}%")
            else:
                cells.append(f"{v:>11.{0 if c.endswith('km') or c == 'geoscore' else 3}f}")
        lines.append(f"{name:<10}" + "".join(cells))
    return "\n".join(lines)
