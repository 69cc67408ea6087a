"""Geolocation metrics (docs/evaluation.md): accuracies within 1 / 25 / 200 / 750 / 2500
km, median and mean great-circle error, GeoScore, and for densities the negative
log-likelihood of the truth and Recall vs Area (RvA).

>>> import numpy as np
>>> m = distance_metrics(np.array([[0.0, 0.0]]), np.array([[0.0, 1.0]]))
>>> round(m["median_km"], 1), m["acc_200km"], m["acc_25km"]
(111.2, 1.0, 0.0)
"""
from __future__ import annotations

import math

import numpy as np

from locdiff.geo import EARTH_RADIUS_KM, great_circle_km, latlon_to_xyz

THRESHOLDS_KM = (1, 25, 200, 750, 2500)
GEOSCORE_SCALE_KM = 1492.7
# Densities within this relative difference count as equal (search areas, credible regions).
TIE = 1e-9
EARTH_AREA_KM2 = 4 * math.pi * EARTH_RADIUS_KM ** 2
# Area budgets of the RvA curve: from 1 km^2 to the whole Earth, log-spaced.
RVA_MIN_KM2 = 1.0


def _np(a, name: str) -> np.ndarray:
    """``a`` (an array, list or torch tensor) as float64 numpy, None as NaN (a missing answer);
    a TypeError naming ``name`` for complex, bool or non-numeric values, which a cast would
    drop or invent."""
    try:
        import torch

        if isinstance(a, torch.Tensor):
            if a.is_complex() or a.dtype == torch.bool:
                raise TypeError(f"{name} must be real numbers, got {a.dtype}")
            return a.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiuO":
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    try:
        return np.asarray(arr, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be real numbers (or None for a missing answer), got {arr.reshape(-1)[:3]}") \
            from None


def _some(a, name: str) -> np.ndarray:
    """``a`` as float64, refused when empty: a mean over nothing is no score."""
    a = _np(a, name)
    if a.size == 0:
        raise ValueError(f"{name} is empty: a score needs at least one sample")
    return a


def _check_distances(d: np.ndarray, name: str) -> None:
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(d) & (d >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(f"{name} must be finite and >= 0 km, got {d.reshape(-1)[i]} at index {i}")


def geoscore(distance_km) -> float:
    """Mean of ``5000 exp(-d / 1492.7 km)`` (the GeoGuessr score)."""
    d = _some(distance_km, "distance_km")
    _check_distances(d, "distance_km")
    return float(np.mean(5000.0 * np.exp(-d / GEOSCORE_SCALE_KM)))


def _off_the_sphere(a: np.ndarray) -> np.ndarray:
    """Mask over the (lat, lon) pairs of ``a`` (..., 2): not finite, or latitude beyond +-90."""
    with np.errstate(invalid="ignore"):
        return ~(np.isfinite(a).all(-1) & (np.abs(a[..., 0]) <= 90))


def check_latlon(x, name: str, rows: int | None = None) -> np.ndarray:
    """``x`` as a float64 ``(N, 2)`` array of finite (lat, lon) degrees with lat in [-90, 90]
    (``rows``: N expected); a ValueError naming ``name`` and the first bad row otherwise.
    Swapped (lon, lat) columns show up as latitudes out of range."""
    a = _np(x, name)
    if a.ndim != 2 or a.shape[1] != 2 or (rows is not None and a.shape[0] != rows):
        want = f"({rows}, 2)" if rows is not None else "(N, 2)"
        raise ValueError(f"{name} must have shape {want} (lat, lon), got {a.shape}")
    bad = _off_the_sphere(a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} row {i} is {a[i].tolist()}: expected finite (lat, lon) degrees with lat in "
                         "[-90, 90]")
    return a


def distance_metrics(pred_latlon, true_latlon) -> dict[str, float]:
    """``acc_<t>km`` (fractions) for t in 1, 25, 200, 750, 2500, ``median_km``, ``mean_km``
    and ``geoscore`` of predictions against truths, both ``(N, 2)`` (lat, lon) degrees (every
    row an answer: best-of-k with missing answers is :func:`best_of_k_metrics`)."""
    t = check_latlon(true_latlon, "true_latlon")
    p = check_latlon(pred_latlon, "pred_latlon", rows=len(t))
    return metrics_from_distances(great_circle_km(p, t))


def metrics_from_distances(d) -> dict[str, float]:
    """The point metrics of :func:`distance_metrics` from distances in km."""
    d = _np(d, "distances")
    if d.size == 0:
        raise ValueError("metrics need at least one prediction")
    _check_distances(d, "distances")
    out = {f"acc_{t}km": float(np.mean(d <= t)) for t in THRESHOLDS_KM}
    out.update(median_km=float(np.median(d)), mean_km=float(np.mean(d)), geoscore=geoscore(d))
    return out


def best_of_k_metrics(candidates, true_latlon, ks=(3, 5)) -> dict[str, float]:
    """Metrics of the best of each query's first k answers, for k in ``ks``, as
    ``top<k>_<key>`` for every key of :func:`distance_metrics`. ``candidates`` (N, K, 2)
    holds each query's answers best first (a method's top-k modes); NaN rows are missing
    answers, but every query needs its first one."""
    c, t = _np(candidates, "candidates"), _np(true_latlon, "true_latlon")
    if c.ndim != 3 or c.shape[2] != 2 or t.shape != (c.shape[0], 2):
        raise ValueError(f"candidates must be (N, K, 2) for true_latlon (N, 2), got {c.shape} and {t.shape}")
    t = check_latlon(t, "true_latlon")
    found = ~np.isnan(c).any(2)
    if not found[:, 0].all():
        raise ValueError(f"candidates: every query needs a first answer, {int((~found[:, 0]).sum())} have none")
    bad = found & _off_the_sphere(c)  # among the answers given (NaN: none)
    if bad.any():
        q, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"candidates query {q}, answer {j} is {c[q, j].tolist()}: expected finite (lat, lon) "
                         "degrees with lat in [-90, 90]")
    d = np.asarray(great_circle_km(np.where(found[..., None], c, 0.0), t[:, None, :]))
    best = np.minimum.accumulate(np.where(found, d, np.inf), axis=1)
    out = {}
    for k in ks:
        if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 1 <= k <= c.shape[1]):
            raise ValueError(f"ks must hold ints in [1, {c.shape[1]}] (candidates per query), got {k!r}")
        out.update({f"top{k}_{key}": v for key, v in metrics_from_distances(best[:, int(k) - 1]).items()})
    return out


def nll(log_density) -> float:
    """Mean negative log-likelihood (nats) of the truths from their log densities per
    steradian (e.g. ``locdiff.shdd.log_density_at``). Uniform on the sphere is log(4 pi) = 2.531."""
    d = _some(log_density, "log_density")
    if d.ndim != 1 or np.isnan(d).any() or (d == np.inf).any():
        raise ValueError(f"log_density must be one finite value (or -inf) per truth, (N,), got shape {d.shape}"
                         + (" with NaN or +inf values" if d.ndim == 1 else ""))
    return float(-np.mean(d))


def search_area_km2(prob, cell_area_sr, true_cell, log: bool = False) -> np.ndarray:
    """Search area (km^2) needed per sample: grid cells sorted by predicted density
    (probability / area) from high to low, areas accumulated up to and including the cell
    that holds the truth (cells tied with it count half). ``prob`` (B, G) cell probabilities
    (``log``: their logarithms, which keep the order where probabilities underflow),
    ``cell_area_sr`` (G,) in steradians, ``true_cell`` (B,) index of the truth's cell."""
    prob, area = _np(prob, "prob"), _np(cell_area_sr, "cell_area_sr")
    true_cell = np.asarray(true_cell, np.int64)
    bad = (np.isnan(prob) | (prob == np.inf)).any(1) if log and prob.ndim == 2 else \
        ~np.isfinite(prob).all(1) if prob.ndim == 2 else None
    if bad is not None and bad.any():  # a NaN row would rank no cell ahead of the truth's: the best score
        raise ValueError(f"prob row {int(np.flatnonzero(bad)[0])} holds NaN or infinite cell probabilities")
    rows = np.arange(len(prob))
    if log:
        dens = prob - np.log(area)[None]
        true_d = dens[rows, true_cell][:, None]
        tie = np.abs(dens - true_d) <= TIE * np.maximum(1.0, np.abs(true_d))
        tie |= (dens == -np.inf) & (true_d == -np.inf)
    else:
        dens = prob / area[None]
        true_d = dens[rows, true_cell][:, None]
        tie = np.abs(dens - true_d) <= TIE * np.abs(true_d)
    # Cells denser than the truth's come first; cells of equal density (within rounding)
    # count half, the expected cost of searching them in random order.
    ahead = ((dens > true_d) & ~tie) * area[None] + 0.5 * tie * area[None]
    ahead[rows, true_cell] = 0.0
    return (ahead.sum(1) + area[true_cell]) * EARTH_RADIUS_KM ** 2


def recall_vs_area(search_km2, budgets_km2=None):
    """``(budgets, recall)``: the fraction of samples whose search area fits each budget;
    budgets default to 200 log-spaced values from 1 km^2 to the Earth's area."""
    s = _some(search_km2, "search_km2")
    if budgets_km2 is None:
        budgets_km2 = np.logspace(math.log10(RVA_MIN_KM2), math.log10(EARTH_AREA_KM2), 200)
    budgets_km2 = _np(budgets_km2, "budgets_km2")
    return budgets_km2, (s[None, :] <= budgets_km2[:, None] * (1 + 1e-12)).mean(1)


def rva_auc(search_km2) -> float:
    """Area under the Recall-vs-Area curve on a log10-area axis from 1 km^2 to the Earth's
    area, normalised to [0, 1] (1: every truth found in 1 km^2; a uniform density on the RvA
    grid of locdiff.evaluate scores about 0.035, its equal cells counted at half their
    area). Computed exactly: the mean over samples of the fraction of the log-area range
    after the sample's search area."""
    s = _some(search_km2, "search_km2")
    if np.isnan(s).any() or (s <= 0).any():
        raise ValueError("search_km2 must hold positive areas (km^2), got "
                         f"{s[np.isnan(s) | (s <= 0)][0]!r} among them")
    s = np.clip(s, RVA_MIN_KM2, EARTH_AREA_KM2)
    lo, hi = math.log10(RVA_MIN_KM2), math.log10(EARTH_AREA_KM2)
    return float(np.mean((hi - np.log10(s)) / (hi - lo)))


def density_metrics(prob, cell_area_sr, cell_xyz, true_latlon, log_density=None) -> dict[str, float]:
    """``rva_auc`` (and ``nll`` when ``log_density`` of the truths is given) for densities on a
    grid: ``prob`` (B, G), ``cell_area_sr`` (G,), ``cell_xyz`` (G, 3) cell centres."""
    xyz = latlon_to_xyz(_np(true_latlon, "true_latlon"))
    cells = _np(cell_xyz, "cell_xyz")
    # The truth's cell is the nearest centre (largest dot product), in chunks to bound memory.
    true_cell = np.concatenate([np.argmax(xyz[i:i + 4096] @ cells.T, 1) for i in range(0, len(xyz), 4096)])
    out = {"rva_auc": rva_auc(search_area_km2(prob, cell_area_sr, true_cell))}
    if log_density is not None:
        out["nll"] = nll(log_density)
    return out
