"""evaluate() on tasks whose answers are known exactly."""
import math

import numpy as np
import pytest

from locdiff import shdd
from locdiff.evaluate import density_scores, evaluate, format_table, method_density_scores
from locdiff.geo import EARTH_RADIUS_KM


class ShiftedPredictor:
    """Predicts each truth moved north by a known distance, with the exact SHDD vector of
    the truth as its density."""

    class config:  # noqa: N801 - mimics Predictor.config
        class predict:  # noqa: N801
            temperature = 1.0

    def __init__(self, truths, shifts_km):
        self.truths, self.shifts = truths, shifts_km

    def credible(self, **kw):
        return {}  # (no calibrated record: regions of nominal mass)

    def predict(self, emb, progress=False, **kw):
        lat = self.truths[:, 0] + np.degrees(self.shifts / EARTH_RADIUS_KM)
        return {"latlon": np.stack([lat, self.truths[:, 1]], 1), "coeffs": shdd.encode(self.truths, 16)}


def rva_of_cells(n: int) -> float:
    """The RvA score of a search that always takes ``n`` of the largest cells of the RvA grid."""
    from locdiff import grids
    from locdiff.evaluate import RVA_DEGREE, RVA_OVERSAMPLE
    from locdiff.geo import EARTH_RADIUS_KM
    from locdiff.metrics import rva_auc

    cell_km2 = float(grids.for_degree(RVA_DEGREE, oversample=RVA_OVERSAMPLE).area.max()) * EARTH_RADIUS_KM ** 2
    return rva_auc([n * cell_km2])


def test_accuracies_median_and_geoscore_are_exact():
    rng = np.random.default_rng(0)
    truths = np.stack([rng.uniform(-60, 60, 10), rng.uniform(-180, 180, 10)], 1)
    shifts = np.array([0.5, 10, 20, 100, 150, 500, 700, 1000, 2000, 3000], float)
    m = evaluate(ShiftedPredictor(truths, shifts), np.zeros((10, 2)), truths)
    assert m["acc_1km"] == 0.1 and m["acc_25km"] == 0.3 and m["acc_200km"] == 0.5
    assert m["acc_750km"] == 0.7 and m["acc_2500km"] == 0.9
    assert m["median_km"] == pytest.approx(np.median(shifts), rel=1e-9)
    assert m["mean_km"] == pytest.approx(shifts.mean(), rel=1e-9)
    assert m["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-shifts / 1492.7)), rel=1e-9)
    assert m["n"] == 10
    # The density is the exact SHDD of the truth: its log-density at the truth is the known
    # value f0 / t - log Z, and the truth is in the densest cells.
    logz = shdd.log_normalizer(shdd.encode(truths, 16), temperature=1.0)
    assert m["nll"] == pytest.approx(float(np.mean(logz - 289 / (4 * math.pi))), rel=1e-6)
    assert m["rva_auc"] > rva_of_cells(3)  # the truth's cell or one beside it
    assert m["coverage_50"] == 1.0 and m["coverage_90"] == 1.0  # in the densest cell
    assert "median_km" in format_table({"x": m})


def test_coverage_is_the_share_of_truths_in_the_regions_the_answers_draw():
    # Densities up to 2,500 km north of their truths: the nominal regions hold too few
    # truths; a record fitted to these places' own scores holds the share it claims.
    from locdiff.answers import credible_grid
    from locdiff.coverage import fit_levels, place_scores

    rng = np.random.default_rng(1)
    truths = np.stack([rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)], 1)
    off = truths + np.c_[np.degrees(rng.uniform(0, 2500, 300) / EARTH_RADIUS_KM), np.zeros(300)]
    coeffs = shdd.encode(off, 8)
    t = shdd.exact_peak(8) / 8

    class Off:
        record = {}

        def predict(self, emb, progress=False, **kw):
            return {"latlon": off, "coeffs": coeffs}

        def credible(self, **kw):
            return self.record

    nominal = evaluate(Off(), np.zeros((300, 2)), truths, temperature=t)
    assert nominal["coverage_50"] < 0.4 and nominal["coverage_90"] < 0.8, nominal
    p = Off()
    p.record = fit_levels(place_scores(lambda rows, g: shdd.density(coeffs[rows], g, t), credible_grid(8, t), truths))
    calibrated = evaluate(p, np.zeros((300, 2)), truths, temperature=t)
    assert 0.5 <= calibrated["coverage_50"] < 0.53 and 0.9 <= calibrated["coverage_90"] < 0.93, calibrated


def test_coverage_is_checked_on_a_fixed_sample_of_places_past_its_budget(monkeypatch):
    # Places in order, the first half on their densities, the second 2,500 km off: a sample
    # of the first rows would report full coverage; a fixed random sample reports the mix,
    # and the same share as the regions of exactly those places.
    import locdiff.evaluate as E
    from locdiff.answers import credible_grid
    from locdiff.coverage import place_scores

    rng = np.random.default_rng(2)
    truths = np.stack([rng.uniform(-60, 60, 400), rng.uniform(-180, 180, 400)], 1)
    off = truths.copy()
    off[200:, 0] += np.degrees(2500 / EARTH_RADIUS_KM)
    coeffs, t = shdd.encode(off, 8), shdd.exact_peak(8) / 8
    grid = credible_grid(8, t)
    assert len(E.coverage_places(400, grid.size)) == 400  # within the budget: every place
    monkeypatch.setattr(E, "COVERAGE_CHECK_CELLS", 100 * grid.size)
    monkeypatch.setattr(E, "COVERAGE_CHECK_MIN_PLACES", 50)
    pick = E.coverage_places(400, grid.size)
    assert len(pick) == 100 and np.all(np.diff(pick) > 0) and 30 < (pick < 200).sum() < 70
    assert np.array_equal(pick, E.coverage_places(400, grid.size))  # the same sample every time
    m = E.vector_coverage(coeffs, t, truths, {})
    assert m["coverage_places"] == 100
    scores = place_scores(lambda rows, g: shdd.density(coeffs[pick][rows], g, t), grid, truths[pick])
    assert m["coverage_90"] == np.mean(scores <= 0.9) and 0.3 < m["coverage_90"] < 0.75
    monkeypatch.setattr(E, "COVERAGE_CHECK_MIN_PLACES", 300)
    assert len(E.coverage_places(400, grid.size)) == 300  # never fewer than the floor


def test_density_scores_rank_a_better_density_higher():
    truths = np.array([[48.85, 2.35], [-33.87, 151.21]])
    right = shdd.encode(truths, 16)
    wrong = shdd.encode(truths[::-1], 16)
    good, bad = density_scores(right, truths, 4.0), density_scores(wrong, truths, 4.0)
    assert good["nll"] < math.log(4 * math.pi) < bad["nll"]
    assert good["rva_auc"] > rva_of_cells(3) and bad["rva_auc"] < 0.1


def test_uniform_baseline_density_scores_as_uniform():
    class Uniform:
        def log_density_at(self, emb, latlon):
            return np.full(len(latlon), -math.log(4 * math.pi))

        def grid_probabilities(self, emb, grid):
            a = grid.area.numpy()
            return np.tile(a / a.sum(), (len(emb), 1))

    truths = np.array([[10.0, 20.0], [-5.0, 100.0], [60.0, -30.0]])
    s = method_density_scores(Uniform(), np.zeros((3, 1)), truths)
    assert s["nll"] == pytest.approx(math.log(4 * math.pi))
    # Searching the Earth at random: every truth needs about half its area (log scale: ~0.05).
    assert 0.0 < s["rva_auc"] < 0.1


def test_density_scores_rank_cells_by_their_probabilities():
    # RvA ranks cells by probability (density x area), as density_metrics does on the grid.
    import torch

    from locdiff import metrics as M
    from locdiff.evaluate import _rva_grid

    truths = np.array([[70.0, 20.0], [-75.0, 100.0], [5.0, -60.0], [85.0, 10.0]])
    c = shdd.encode(truths + [[3.0, 4.0]], 16)
    got = density_scores(c, truths, 4.0)["rva_auc"]
    g = _rva_grid()
    p = shdd.density(torch.as_tensor(c), g, 4.0).numpy()
    assert got == pytest.approx(M.density_metrics(p, g.area.numpy(), g.xyz.numpy(), truths)["rva_auc"], abs=1e-6)


def test_evaluate_uses_the_temperature_it_is_given():
    from types import SimpleNamespace

    truths = np.array([[48.85, 2.35], [-33.87, 151.21]])

    class Fixed:
        config = SimpleNamespace(predict=SimpleNamespace(temperature=1.0))

        def predict(self, emb, progress=False, **kw):
            return {"latlon": truths, "coeffs": shdd.encode(truths, 16)}

        def credible(self, **kw):
            return {}

    m = evaluate(Fixed(), np.zeros((2, 2)), truths, temperature=4.0)
    assert m["nll"] == pytest.approx(density_scores(shdd.encode(truths, 16), truths, 4.0)["nll"])
