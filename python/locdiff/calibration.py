"""Prediction settings of a trained run chosen on validation data (:func:`calibrate`): the
density temperature by NLL, the point rule (mode of the density or of the function, coarse
decoding degree; the run's own rule unless another is clearly better), the LocDiff-H
settings by NLL, used where they clearly beat the model's median, and the masses of the
credible regions that hold what they claim (:mod:`locdiff.coverage`). The training loop
calls it at the end of a run; it reads nothing but a predictor and arrays.
"""
from __future__ import annotations

import numpy as np
import torch

from locdiff.data.sampler import fixed_sample
from locdiff.diffusion.losses import kl_temperature
from locdiff.selection import clearly_better

# Density temperatures tried by calibration, in units of the SHDD-KL temperature f0 / 16
# at the run's degree (the density head learns densities near that scale).
TEMPERATURE_FACTORS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.0, 16.0, 23.0, 32.0)
# Where the best lies at an end of the table, the search goes on in steps of sqrt(2) while
# the NLL falls, between these sharpnesses (f0 / t), and no sharper than the normaliser
# follows (shdd.normalizer_max_sharpness: past it NLLs come out too low, which would pull
# the search on; docs/model.md, "Densities").
SHARPNESS_RANGE = (0.05, 1000.0)
COARSE_DEGREES = (4, 8, 16)


# LocDiff-H is calibrated against at most this many training rows as gallery (the search
# runs over all of them for every validation row).
HYBRID_GALLERY_ROWS = 200_000
# Calibration reads at most this many validation rows (a fixed sample): it runs after the
# time budget, and a few thousand rows fix the settings it chooses.
CALIBRATION_ROWS = 10_000
# Credible regions are calibrated on at most this many of those rows: each needs its density
# on the credible grid, as an answer does; the quantiles kept are 0.01 apart. Past
# COVERAGE_CELLS rows x cells (from L = 128) fewer rows, never under 400 (costs:
# docs/model.md, "Calibration").
COVERAGE_ROWS, COVERAGE_CELLS, COVERAGE_MIN_ROWS = 2_000, 10 ** 9, 400


def coverage_rows(grid_cells: int) -> int:
    """How many validation rows calibrate the credible regions on a grid of that many cells."""
    return min(COVERAGE_ROWS, max(COVERAGE_MIN_ROWS, COVERAGE_CELLS // grid_cells))


def coverage_sample(n_rows: int, grid_cells: int) -> np.ndarray:
    """The validation rows (sorted indices) that calibrate the credible regions."""
    return fixed_sample(n_rows, coverage_rows(grid_cells))


def unconditional_nll(coeffs, coords, temperature: float) -> float:
    """The mean NLL of ``coords`` (M, 2) under the density ``softmax(f / temperature)`` of one
    SHDD vector ``coeffs`` (1, K): its normaliser taken once, not once a place."""
    from locdiff import shdd

    c = torch.as_tensor(np.asarray(coeffs, np.float64)).reshape(1, -1)
    f = shdd.values_at(c, torch.as_tensor(np.asarray(coords, np.float64)))
    return float(shdd.log_normalizer(c, temperature=temperature)[0] - (f / temperature).mean())


def one_vector(coeffs: torch.Tensor) -> bool:
    """Whether every row of ``coeffs`` is the same vector, as in an unconditional run."""
    return bool((coeffs == coeffs[:1]).all())


def nll_temperature(coeffs, coords, degree: int) -> tuple[float, float]:
    """The density temperature with the lowest NLL of ``coords`` under the SHDD vectors
    ``coeffs`` -> (temperature, that NLL): the best of ``TEMPERATURE_FACTORS``, then, where
    that is an end of the table, further steps outwards while the NLL falls (within
    SHARPNESS_RANGE, and where the normaliser holds)."""
    from locdiff import shdd

    truth = torch.as_tensor(np.asarray(coords, np.float64))
    coeffs = torch.as_tensor(coeffs)
    one = one_vector(coeffs)  # an unconditional run: one normaliser for every place

    def nll_at(t):
        if one:
            return unconditional_nll(coeffs[:1], truth, t)
        return -float(shdd.log_density_at(coeffs, truth, temperature=t).mean())

    temps = [kl_temperature(degree, 16.0) * f for f in TEMPERATURE_FACTORS]
    nll = [nll_at(t) for t in temps]
    best = int(np.argmin(nll))
    t, value = temps[best], nll[best]
    if best in (0, len(temps) - 1):
        step = 2 ** -0.5 if best == 0 else 2 ** 0.5
        sharpest = min(SHARPNESS_RANGE[1], shdd.normalizer_max_sharpness(degree))
        lo, hi = shdd.exact_peak(degree) / sharpest, shdd.exact_peak(degree) / SHARPNESS_RANGE[0]
        while lo <= t * step <= hi:
            v = nll_at(t * step)
            if not v < value:
                break
            t, value = t * step, v
    return t, value


def sharpest_limit(temperature: float, degree: int) -> bool:
    """Whether :func:`nll_temperature`'s choice ``temperature`` lies at the sharp end of its
    search (the table's sharpest or past it) and a step sharper is out of its range: the NLL
    may have wanted sharper."""
    from locdiff import shdd

    sharpest = min(SHARPNESS_RANGE[1], shdd.normalizer_max_sharpness(degree))
    at_end = temperature <= kl_temperature(degree, 16.0) * TEMPERATURE_FACTORS[0] * (1 + 1e-9)
    return at_end and shdd.exact_peak(degree) / temperature * 2 ** 0.5 > sharpest


# The prediction settings calibrate chooses (the training loop writes them into the run's).
CALIBRATED = ("temperature", "mode_of", "coarse_degree", "hybrid", "credible")


def uncalibrated(predict_config):
    """``predict_config`` (a :class:`locdiff.run.PredictConfig`) with the settings that
    calibration chooses at their defaults."""
    import dataclasses

    defaults = type(predict_config)()
    return dataclasses.replace(predict_config, **{k: getattr(defaults, k) for k in CALIBRATED})


def calibrate(predictor, val, gallery=None, log=None) -> dict:
    """Prediction settings chosen on validation data ``(emb, coords)`` with the run's
    sampler: the density temperature with the lowest NLL, the point rule (mode of the
    density or of the function, coarse decoding degree or none) with the lowest median error
    and, with a ``gallery`` ``(emb, coords)``, the LocDiff-H settings (:meth:`Hybrid.fit`);
    then the masses of the density's credible regions (:func:`coverage.validation_levels`).
    At most CALIBRATION_ROWS validation rows are used. Returns ``{"temperature", "mode_of",
    "coarse_degree", "hybrid", "credible", "val_nll", "val_median_km"}``."""
    from locdiff import shdd
    from locdiff.answers import credible_grid
    from locdiff.coverage import MIN_PLACES, level_for, validation_levels
    from locdiff.metrics import distance_metrics

    if len(val[1]) > CALIBRATION_ROWS:
        rows = fixed_sample(len(val[1]), CALIBRATION_ROWS)
        if log:
            log(f"calibration: on {CALIBRATION_ROWS:,} of the {len(val[1]):,} validation rows")
        val = (np.asarray(val[0][rows]), np.asarray(val[1])[rows])
    coeffs = predictor.coefficients(val[0]).double()
    temperature, val_nll = nll_temperature(coeffs, val[1], predictor.degree)
    # An unconditional run has one vector for every place: one answer to find, not one a place.
    distinct = coeffs[:1] if one_vector(coeffs) else coeffs
    medians = {}
    for mode_of in ("density", "function"):
        for cd in (None, *(d for d in COARSE_DEGREES if d < predictor.degree)):
            latlon = predictor.locate(distinct, cd, mode_of, temperature)
            medians[mode_of, cd] = distance_metrics(np.broadcast_to(latlon, (len(coeffs), 2)), val[1])["median_km"]
    # The run's own rule stands unless another beats it clearly: validation medians move by
    # a few percent between seeds (docs/model.md, "Point predictions").
    default = (predictor.config.predict.mode_of, None)
    mode_of, coarse = min(medians, key=medians.get)
    if default in medians and not clearly_better(medians[mode_of, coarse], medians[default]):
        mode_of, coarse = default
    out = {"temperature": temperature, "mode_of": mode_of, "coarse_degree": coarse, "hybrid": {}, "credible": {},
           "val_nll": val_nll, "val_median_km": medians[mode_of, coarse]}
    if log:
        log(f"calibration: density temperature {out['temperature']:.3g} (validation NLL {out['val_nll']:.3f}), "
            f"mode of the {mode_of}, coarse degree {coarse} (validation median {out['val_median_km']:.0f} km)")
        if sharpest_limit(temperature, predictor.degree):
            log(f"calibration: note: that temperature is the sharpest degree {predictor.degree} allows: the validation "
                "places lie closer together than its densities resolve, so densities are wider than the data (the "
                "credible regions below are calibrated to them; a higher --degree resolves finer)")
    grid = credible_grid(predictor.degree, temperature)
    pick = coverage_sample(len(val[1]), grid.size)
    own = validation_levels(lambda rows, g: shdd.density(coeffs[pick[rows]], g, temperature), grid,
                            np.asarray(val[1])[pick])
    if own:
        out["credible"]["locdiff"] = own
        if log:
            log(f"calibration: the credible regions holding 50 % and 90 % of the validation places hold "
                f"{level_for(own, 0.5):.3g} and {level_for(own, 0.9):.3g} of the density")
    elif log:
        log(f"calibration: note: {len(val[1])} validation places are too few to calibrate the "
            f"credible regions (at least {MIN_PLACES}): they hold their nominal mass")
    if gallery is not None:
        from locdiff.hybrid import Hybrid

        fit = Hybrid(*gallery).fit(coeffs, temperature, val[0], predictor.locate(coeffs, coarse, mode_of, temperature),
                                   val[1])
        out["hybrid"] = {k: v for k, v in fit.items() if k not in ("score", "val_median_km")}
        if log:
            log(f"calibration: LocDiff-H weight {fit['weight']:g}, bandwidth {fit['bandwidth_km']:g} km, "
                f"temperature {fit['temperature']:g} (validation median {fit['val_median_km']:.0f} km)")
    return out
