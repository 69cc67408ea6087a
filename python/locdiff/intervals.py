"""How sure a comparison of median errors from one test set is
(docs/evaluation.md, "How sure the comparison is"): a bootstrap that resamples whole groups
(regions) of test places, because places of one region share most of their error, and that
is paired, so every method is scored on the same resample and ratios between methods keep
their correlation.

>>> import numpy as np
>>> e = {"a": np.array([1.0, 2, 3, 4]), "b": np.array([2.0, 4, 6, 8])}
>>> out = median_intervals(e, groups=[0, 0, 1, 1], reference="a", reps=200)
>>> out["b"]["ratio"], out["b"]["ratio_interval"]
(0.5, [0.5, 0.5])
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from locdiff.ops.validation import check_int


def _weighted_medians(errors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Median of ``errors`` (N,) under each row of integer ``weights`` (R, N) -> (R,): as
    ``np.median`` of the errors repeated by weight, the mean of the two middle ones where
    the total weight is even, so that intervals and point medians agree."""
    order = np.argsort(errors, kind="stable")
    cum = np.cumsum(weights[:, order], axis=1)
    half = 0.5 * cum[:, -1:]
    lower = (cum < half).sum(1)
    upper = np.minimum((cum <= half).sum(1), errors.size - 1)
    return 0.5 * (errors[order][lower] + errors[order][upper])


def median_intervals(errors_km: Mapping[str, object], groups, reference: str | None = None,
                     reps: int = 1000, level: float = 0.9, seed: int = 0) -> dict[str, dict]:
    """Bootstrap intervals of each method's median error, resampling the groups of
    ``groups`` (N,) with replacement ``reps`` times. ``errors_km`` maps a method's name to
    its errors (N,) on the same N places. Returns per name ``{"median_km", "interval_km":
    [lo, hi], "level"}``, and with ``reference`` also ``"ratio"``, the reference's
    median over this method's, its paired ``"ratio_interval"`` and the ``"reference"``."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise ValueError(f"groups must be a non-empty 1-d array, got shape {groups.shape}")
    errors = {}
    for name, e in errors_km.items():
        e = np.asarray(e, np.float64)
        if e.shape != groups.shape or not np.isfinite(e).all():
            raise ValueError(f"errors_km[{name!r}] must be {groups.size} finite distances like groups, "
                             f"got shape {e.shape}")
        errors[name] = e
    if reference is not None and reference not in errors:
        raise ValueError(f"reference must be one of {sorted(errors)}, got {reference!r}")
    reps = check_int(reps, "reps")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")

    _, place_group = np.unique(groups, return_inverse=True)
    n_groups = int(place_group.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, (reps, n_groups))
    counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws])
    weights = counts[:, place_group]                                  # (reps, N) copies of each place
    boot = {name: _weighted_medians(e, weights) for name, e in errors.items()}
    tails = [50 * (1 - level), 50 * (1 + level)]
    out = {}
    for name, e in errors.items():
        row = {"median_km": float(np.median(e)), "interval_km": np.percentile(boot[name], tails).tolist(),
               "level": level}
        if reference is not None:
            ratio = boot[reference] / np.maximum(boot[name], 1e-12)
            row["ratio"] = float(np.median(errors[reference]) / max(np.median(e), 1e-12))
            row["ratio_interval"] = np.percentile(ratio, tails).tolist()
            row["reference"] = reference
        out[name] = row
    return out


def format_intervals(intervals: dict[str, dict]) -> str:
    """A plain-text table of :func:`median_intervals`."""
    width = max([10] + [len(n) + 1 for n in intervals])
    first = next(iter(intervals.values()), {})
    head = f"median error, {100 * first.get('level', 0.9):.0f}% intervals from resampled test regions"
    if "reference" in first:
        head += f"; ratio: {first['reference']}'s median / the method's"
    lines = [head,
             f"{'method':<{width}}{'median km':>11}{'interval':>16}{'ratio':>8}{'interval':>16}"]
    for name, row in intervals.items():
        lo, hi = row["interval_km"]
        line = f"{name:<{width}}{row['median_km']:>11.0f}{f'[{lo:.0f}, {hi:.0f}]':>16}"
        if "ratio" in row:
            rlo, rhi = row["ratio_interval"]
            line += f"{row['ratio']:>8.2f}{f'[{rlo:.2f}, {rhi:.2f}]':>16}"
        lines.append(line)
    return "\n".join(lines)
