"""Evaluation with the field's metrics (docs/evaluation.md): accuracies within 1 / 25 / 200 /
750 / 2500 km, median and mean error, GeoScore, and for densities NLL and Recall-vs-Area,
for a trained run, LocDiff-H and the baselines alike; for a run, also how often the truth
lies in the credible regions its answers report.

>>> from locdiff.predict import Predictor
>>> m = evaluate(Predictor.from_run("runs/demo"), test_emb, test_coords)  # doctest: +SKIP
>>> sorted(m)[:3]                                                         # doctest: +SKIP
['acc_1km', 'acc_200km', 'acc_2500km']
"""
from __future__ import annotations

import numpy as np
import torch

from locdiff import metrics as M
from locdiff.data.sampler import fixed_sample
from locdiff.geo import latlon_to_xyz

# RvA of every method is measured on one grid, so the smallest search area (one cell) is the
# same for all: 94 x 256 cells of 21,000 km^2 on average, fine enough for the densities
# compared here, cheap enough for a dense k-NN mixture (docs/evaluation.md, "Metrics").
RVA_DEGREE, RVA_OVERSAMPLE = 32, 2.0
RVA_BATCH = 256  # places whose densities on that grid are held at once
# The credible regions are checked on densities on their own grid, as the answers draw them:
# from L = 128 (1.8M cells a place) that costs more than the NLL and RvA, and past this many
# cells in all a fixed sample of the places is checked (docs/evaluation.md, "Metrics").
COVERAGE_CHECK_CELLS, COVERAGE_CHECK_MIN_PLACES = 2 * 10 ** 10, 2_000


def _rva_grid():
    from locdiff import grids

    return grids.for_degree(RVA_DEGREE, oversample=RVA_OVERSAMPLE)


def _search_areas(grid_probabilities, true_latlon, log: bool = False, progress: bool = False) -> np.ndarray:
    """Search area (km^2) per sample from ``grid_probabilities(rows: slice, grid) -> (b, G)``
    (``log``: log-probabilities, which keep the order of cells whose probabilities underflow;
    ``progress``: a bar, as this takes longer than the predictions)."""
    from tqdm.auto import tqdm

    grid = _rva_grid()
    xyz = latlon_to_xyz(np.asarray(true_latlon, np.float64))
    out = np.empty(len(xyz))  # (filled in place: docs/evaluation.md, "Memory on large sets")
    for i in tqdm(range(0, len(xyz), RVA_BATCH), desc="recall vs area", unit="batch", disable=not progress):
        prob = grid_probabilities(slice(i, i + RVA_BATCH), grid)
        cell = grid.nearest(xyz[i:i + RVA_BATCH]).numpy()
        out[i:i + RVA_BATCH] = M.search_area_km2(prob, grid.area.numpy(), cell, log=log)
    return out


def density_scores(coeffs, true_latlon, temperature: float = 1.0, progress: bool = False) -> dict:
    """``nll`` and ``rva_auc`` of the densities ``softmax(f / temperature)`` that SHDD vectors
    ``coeffs`` (N, K) describe, against the truths."""
    from locdiff import shdd

    coeffs = torch.as_tensor(np.asarray(coeffs)).double()

    def log_probabilities(sl, grid):  # log softmax(f / t + log area): no cell underflows to a tie
        f = shdd.grid_values(coeffs[sl], grid)
        return torch.log_softmax(f / temperature + grid.area.to(f).log(), -1).numpy()
    search = _search_areas(log_probabilities, true_latlon, log=True, progress=progress)
    logd = shdd.log_density_at(coeffs, torch.as_tensor(np.asarray(true_latlon, np.float64)),
                               temperature=temperature)
    return {"nll": M.nll(np.asarray(logd)), "rva_auc": M.rva_auc(search)}


def method_density_scores(method, emb, true_latlon) -> dict:
    """``nll`` and ``rva_auc`` of a baseline density (``grid_probabilities(emb, grid)`` and
    ``log_density_at(emb, latlon)``, see :mod:`locdiff.baselines`)."""
    if hasattr(method, "grid_log_probabilities"):
        search = _search_areas(lambda sl, grid: method.grid_log_probabilities(emb[sl], grid), true_latlon, log=True)
    else:
        search = _search_areas(lambda sl, grid: method.grid_probabilities(emb[sl], grid), true_latlon)
    return {"nll": M.nll(method.log_density_at(emb, true_latlon)), "rva_auc": M.rva_auc(search)}


def hybrid_density_scores(hybrid, coeffs, temperature: float, emb, true_latlon, progress: bool = False) -> dict:
    """``nll`` and ``rva_auc`` of LocDiff-H's density (:class:`locdiff.hybrid.Hybrid`)."""
    search = _search_areas(lambda sl, grid: hybrid.grid_probabilities(coeffs[sl], temperature, emb[sl], grid),
                           true_latlon, progress=progress)
    return {"nll": M.nll(hybrid.log_density_at(coeffs, temperature, emb, true_latlon)), "rva_auc": M.rva_auc(search)}


def coverage_places(n_rows: int, grid_cells: int) -> np.ndarray:
    """The places (sorted row indices) whose credible regions are checked: all of them up to
    COVERAGE_CHECK_CELLS cells in all, else a fixed sample of that many cells' worth, never
    fewer than COVERAGE_CHECK_MIN_PLACES."""
    return fixed_sample(n_rows, max(COVERAGE_CHECK_MIN_PLACES, COVERAGE_CHECK_CELLS // grid_cells))


def coverage_scores(cells, degree: int, temperature: float, true_latlon, record: dict,
                    progress: bool = False) -> dict:
    """``coverage_50`` and ``coverage_90``: the share of the truths inside the 50 % and 90 %
    credible regions of the densities ``cells(rows, grid)`` (``rows``: an index array) as the
    answers draw them (masses from ``record``, :mod:`locdiff.coverage`; {}: nominal), and
    ``coverage_places``, how many places that share is of (:func:`coverage_places`)."""
    from locdiff.answers import LEVELS, credible_grid, level_label
    from locdiff.coverage import level_for, place_scores

    grid = credible_grid(degree, temperature)
    pick = coverage_places(len(true_latlon), grid.size)
    scores = place_scores(lambda rows, g: cells(pick[rows], g), grid, np.asarray(true_latlon, np.float64)[pick],
                          progress=progress)
    return {**{f"coverage_{level_label(q)}": float(np.mean(scores <= level_for(record, q))) for q in LEVELS},
            "coverage_places": int(len(pick))}


def vector_coverage(coeffs, temperature: float, true_latlon, record: dict, progress: bool = False) -> dict:
    """:func:`coverage_scores` of the densities ``softmax(f / temperature)`` of SHDD vectors
    ``coeffs`` (N, K): LocDiff's own."""
    from locdiff import shdd

    c = torch.as_tensor(np.asarray(coeffs)).double()
    return coverage_scores(lambda rows, g: shdd.density(c[rows], g, temperature), shdd.degree_of(c.shape[1]),
                           temperature, true_latlon, record, progress)


def evaluate(predictor, emb, coords, density: bool = True, hybrid=None, progress: bool = False, **kw) -> dict:
    """Metrics for a :class:`locdiff.predict.Predictor` on ``emb`` (N, D) and true ``coords``
    (N, 2): accuracies, median and mean km, GeoScore, and ``nll`` / ``rva_auc`` of the
    predicted densities (at the run's temperature, or ``temperature`` among ``kw``) and the
    share of truths in the answers' credible regions (:func:`coverage_scores`) when
    ``density``. With ``hybrid`` (a :class:`locdiff.hybrid.Hybrid`), the same keys for
    LocDiff-H. ``kw``: prediction settings (sampler, steps, samples, guidance, ...).
    ``emb=None``: an unconditional run's one prediction, scored against every place."""
    from locdiff import shdd
    from locdiff.predict import SETTINGS

    if emb is None:  # an unconditional run: one input, one prediction for every place
        coords = M.check_latlon(coords, "coords")
        if not len(coords):
            raise ValueError("coords: no places to evaluate")
        if hybrid is not None:
            raise ValueError("hybrid: LocDiff-H retrieves by embedding, and an unconditional run has none")
        out = predictor.predict(None, **kw)
        out = {"latlon": np.repeat(out["latlon"], len(coords), 0),
               "coeffs": torch.as_tensor(out["coeffs"]).double().expand(len(coords), -1)}  # (one row's memory)
    else:
        coords = M.check_latlon(coords, "coords", rows=len(emb))  # before the predictions
        out = predictor.predict(emb, progress=progress, **kw)
    tau = kw.get("temperature")
    tau = predictor.config.predict.temperature if tau is None else float(tau)
    c = out["coeffs"]
    if hybrid is None:
        m = M.distance_metrics(out["latlon"], coords)
        if density:
            m.update(density_scores(c, coords, tau, progress=progress))
            own = predictor.credible(**{k: v for k, v in kw.items() if k in SETTINGS})
            m.update(vector_coverage(c, tau, coords, own, progress))
    else:
        m = M.distance_metrics(hybrid.predict(c, tau, emb, out["latlon"], progress=progress), coords)
        if density:
            m.update(hybrid_density_scores(hybrid, c, tau, emb, coords, progress=progress))
            m.update(coverage_scores(lambda rows, g: hybrid.grid_probabilities(c[rows], tau, emb[rows], g),
                                     shdd.degree_of(np.shape(c)[1]), tau, coords, {}, progress))
    m["n"] = int(len(coords))
    return m


TABLE_COLUMNS = ("median_km", "mean_km", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
                 "geoscore", "nll", "rva_auc")
# The best-of-k table of ``locdiff demo`` (``metrics.best_of_k_metrics``).
TOP_K_COLUMNS = ("median_km", "top3_median_km", "top5_median_km", "top5_acc_25km", "top5_acc_200km",
                 "top5_acc_750km", "top5_acc_2500km")


def format_table(rows: dict[str, dict], cols=TABLE_COLUMNS) -> str:
    """A plain-text table of metrics ``cols``, one row per method ("-": not measured)."""
    width = max([10] + [len(n) + 1 for n in rows])
    wide = max([11] + [len(c) + 1 for c in cols])
    head = f"{'method':<{width}}" + "".join(f"{c:>{wide}}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append(f"{'-':>{wide}}")
            elif "acc_" in c:
                cells.append(f"{100 * v:>{wide - 1}.1f}%")
            else:
                cells.append(f"{v:>{wide}.{0 if c.endswith('km') or c.endswith('geoscore') else 3}f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
