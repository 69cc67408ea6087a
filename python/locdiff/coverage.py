"""Credible regions that hold what they claim: split-conformal levels from validation places.

A density's q credible region is its highest-density region holding mass q. Calibrating the
temperature by NLL does not make that region hold the truth q of the time: where the density
is too sharp in places, or a condition's modes get the wrong masses, it holds it less often.
:func:`hpd_scores` gives, for each validation place, the mass of the cells at least as dense
as the one it lies in (the smallest region holding its cell); :func:`fit_levels` keeps their
quantiles, and :func:`level_for` returns the mass whose region held a fraction q of those
places, which then holds at least q of new places like them (split conformal prediction:
Vovk et al. 2005; Romano et al. 2020). Figures: docs/model.md, "Calibration".

>>> rec = fit_levels(np.linspace(0, 1, 1001) ** 2)      # a density too sharp: truths fall far out
>>> round(level_for(rec, 0.5), 2), round(level_for(rec, 0.9), 2)
(0.26, 0.83)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from locdiff.geo import latlon_to_xyz
from locdiff.metrics import TIE

# The quantiles kept, every 0.01 of the validation places (a run's config holds them).
QUANTILE_STEP = 0.01
# Fewer validation places than this leave the regions at their nominal mass.
MIN_PLACES = 100


def hpd_scores(p: torch.Tensor, grid, latlon) -> torch.Tensor:
    """(B,) mass of the cells of ``p`` (B, G) at least as dense as the cell holding each point
    of ``latlon`` (B, 2), that cell included: the mass of the smallest highest-density region
    that holds the point's whole cell. A region of mass m (:func:`locdiff.answers.credible_area`)
    holds every point whose score is at most m."""
    area = grid.area.to(p)
    dens = p / area
    cell = grid.nearest(latlon_to_xyz(np.asarray(latlon, np.float64)))
    at = dens.gather(1, cell.to(p.device)[:, None])
    # (p / area rounds: cells of one density differ in the last bits)
    return (p * (dens >= at * (1 - TIE))).sum(1).clamp(0.0, 1.0)


def fit_levels(scores) -> dict:
    """The record :func:`level_for` reads: the number of places and their scores' order
    statistics every QUANTILE_STEP of the way (each rounded up: a mass never below the one
    that held its share); {} for fewer than MIN_PLACES places."""
    s = np.sort(np.asarray(scores, np.float64))
    s = s[np.isfinite(s)]
    if len(s) < MIN_PLACES:
        return {}
    qs = np.linspace(0.0, 1.0, round(1 / QUANTILE_STEP) + 1)
    return {"places": int(len(s)),
            "quantiles": [min(1.0, math.ceil(float(v) * 1e5) / 1e5) for v in np.quantile(s, qs, method="higher")]}


def level_for(record: dict, q: float) -> float:
    """The mass of the region that held a fraction ``q`` of the validation places (the
    ceil((n + 1) q)-th smallest of their scores, split conformal's rule, taken at the next
    kept quantile up), or ``q`` itself where ``record`` is empty. 1.0: no region short of the
    whole sphere did."""
    if not record:
        return float(q)
    n = record["places"]
    rank = math.ceil((n + 1) * q) / n
    if rank > 1:
        return 1.0
    quantiles = record["quantiles"]
    step = 1 / (len(quantiles) - 1)
    return float(quantiles[min(len(quantiles) - 1, math.ceil(rank / step - 1e-9))])


def place_scores(cells, grid, coords, rows: int | None = None, progress: bool = False) -> np.ndarray:
    """:func:`hpd_scores` of places ``coords`` (N, 2) under the densities ``cells(rows, grid)``
    -> (n, G), the cell probabilities of the rows of a slice (the densities the answers
    report), for at most ``rows`` places (the first); ``progress``: a bar."""
    from tqdm.auto import tqdm

    coords = np.asarray(coords, np.float64)[:rows]
    n, chunk = len(coords), max(1, (1 << 22) // grid.size)
    scores = np.empty(n)  # (filled in place: docs/evaluation.md, "Memory on large sets")
    for i in tqdm(range(0, n, chunk), desc="credible regions", unit="batch", disable=not progress):
        p = torch.as_tensor(cells(slice(i, min(i + chunk, n)), grid))
        scores[i:i + chunk] = hpd_scores(p, grid, coords[i:i + chunk]).numpy()
    return scores


def validation_levels(cells, grid, coords, rows: int | None = None) -> dict:
    """:func:`fit_levels` of the :func:`place_scores` of validation places."""
    return fit_levels(place_scores(cells, grid, coords, rows))


# The densities a run's record covers: LocDiff's. LocDiff-H's puts retrieval's mass on the
# gallery places' cells, whose regions cover by other rules (docs/model.md, "Calibration").
KINDS = ("locdiff",)


def check_record(record, name: str = "predict.credible") -> dict:
    """``record`` if it is {} or a record of :func:`fit_levels`, else a ValueError naming it."""
    if record == {}:
        return record
    ok = (isinstance(record, dict) and set(record) == {"places", "quantiles"}
          and isinstance(record["places"], int) and not isinstance(record["places"], bool) and record["places"] >= 1
          and isinstance(record["quantiles"], list) and len(record["quantiles"]) >= 2
          and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in record["quantiles"])
          and all(a <= b for a, b in zip(record["quantiles"], record["quantiles"][1:])))
    if not ok:
        raise ValueError(f"{name} must be {{}} or {{places = n, quantiles = [increasing numbers in [0, 1]]}} as "
                         f"calibration writes it, got {str(record)[:120]}")
    return record


def check_records(records, name: str = "predict.credible") -> dict:
    """A run's ``predict.credible``: {} or a record per density of KINDS, checked."""
    if not isinstance(records, dict) or not set(records) <= set(KINDS):
        raise ValueError(f"{name} must be a table with keys among {KINDS}, got {str(records)[:120]}")
    for kind, record in records.items():
        check_record(record, f"{name}.{kind}")
    return records
