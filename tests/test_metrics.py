"""Metrics (docs/evaluation.md) against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from locdiff import metrics as M
from locdiff.geo import EARTH_RADIUS_KM


def test_distance_metrics_known_values():
    truth = np.zeros((5, 2))
    # Points due north of (0, 0) at known distances.
    d_km = np.array([0.5, 20.0, 150.0, 700.0, 3000.0])
    pred = np.stack([np.degrees(d_km / EARTH_RADIUS_KM), np.zeros(5)], 1)
    m = M.distance_metrics(pred, truth)
    assert [m[f"acc_{t}km"] for t in (1, 25, 200, 750, 2500)] == [0.2, 0.4, 0.6, 0.8, 0.8]
    assert m["median_km"] == pytest.approx(150.0, rel=1e-9)
    assert m["mean_km"] == pytest.approx(d_km.mean(), rel=1e-9)
    assert m["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-d_km / 1492.7)), rel=1e-9)
    assert set(m) == {"acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km",
                      "mean_km", "geoscore"}


def test_distance_metrics_torch_and_errors():
    m = M.distance_metrics(torch.zeros(3, 2), torch.zeros(3, 2))
    assert m["acc_1km"] == 1.0 and m["geoscore"] == 5000.0
    with pytest.raises(ValueError):
        M.metrics_from_distances(np.array([]))


def test_nll_uniform():
    assert M.nll(np.full(4, -math.log(4 * math.pi))) == pytest.approx(2.531, abs=1e-3)


def test_search_area_and_rva():
    area = np.full(4, math.pi)  # four cells of one steradian-pi each
    prob = np.array([[0.7, 0.1, 0.1, 0.1],    # truth in the top cell
                     [0.1, 0.2, 0.3, 0.4]])   # truth in the least likely cell
    s = M.search_area_km2(prob, area, np.array([0, 0]))
    r2 = EARTH_RADIUS_KM ** 2
    np.testing.assert_allclose(s, [math.pi * r2, 4 * math.pi * r2])
    budgets, recall = M.recall_vs_area(s, [1.0, 2 * math.pi * r2, 4 * math.pi * r2])
    np.testing.assert_allclose(recall, [0.0, 0.5, 1.0])
    # AUC: fraction of the log-area range left after each search area.
    hi = math.log10(4 * math.pi * r2)
    assert M.rva_auc(s) == pytest.approx(np.mean([(hi - math.log10(math.pi * r2)) / hi, 0.0]))
    assert M.rva_auc(np.array([0.5])) == 1.0
    # The same ranking from log-probabilities, which keep the order of underflowed cells.
    np.testing.assert_allclose(M.search_area_km2(np.log(prob), area, np.array([0, 0]), log=True), s)
    tiny = np.array([[0.0, -1000.0, -2000.0, -3000.0]])  # exp() of these is 1, 0, 0, 0
    np.testing.assert_allclose(M.search_area_km2(tiny, area, np.array([3]), log=True), [4 * math.pi * r2])
    np.testing.assert_allclose(M.search_area_km2(np.exp(tiny), area, np.array([3])), [3 * math.pi * r2])  # ties


def test_scores_refuse_what_they_cannot_mean():
    for bad in ([np.nan, 1e6], [-5.0]):
        with pytest.raises(ValueError, match="search_km2 must hold positive areas"):
            M.rva_auc(bad)
    with pytest.raises(ValueError, match=r"log_density must be one finite value .* with NaN"):
        M.nll([np.nan, 1.0])
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)"):
        M.nll(np.zeros((2, 2)))
    truth = np.array([[10.0, 20.0], [30.0, 40.0]])
    cands = np.array([[[10.0, 20.0], [np.nan, np.nan]], [[31.0, 40.0], [30.0, 40.0]]])
    assert M.best_of_k_metrics(cands, truth, ks=(np.int64(2),))["top2_median_km"] == 0.0
    with pytest.raises(ValueError, match=r"true_latlon row 1 is \[200.0, 40.0\]"):
        M.best_of_k_metrics(cands, np.array([[10.0, 20.0], [200.0, 40.0]]))
    with pytest.raises(ValueError, match=r"candidates query 1, answer 1 is \[500.0, 40.0\]"):
        M.best_of_k_metrics(np.where(cands == 30.0, 500.0, cands), truth, ks=(2,))


def test_density_metrics_uniform_vs_peaked():
    from locdiff import grids, shdd

    grid = grids.for_degree(16)
    truth = np.array([[10.0, 20.0], [-30.0, -60.0]])
    c = shdd.encode(torch.tensor(truth), 16)
    prob = shdd.density(c, grid, 0.5).numpy()
    peaked = M.density_metrics(prob, grid.area.numpy(), grid.xyz.numpy(), truth,
                               shdd.log_density_at(c, torch.tensor(truth), grid, 0.5).numpy())
    flat = np.full_like(prob, 1 / prob.shape[1])
    uniform = M.density_metrics(flat * grid.area.numpy() / grid.area.numpy().mean(), grid.area.numpy(),
                                grid.xyz.numpy(), truth)
    # Uniform: about half the Earth searched on average.
    assert uniform["rva_auc"] == pytest.approx(math.log10(2) / math.log10(4 * math.pi * EARTH_RADIUS_KM ** 2),
                                               abs=0.01)
    assert peaked["rva_auc"] > uniform["rva_auc"] + 0.25
    assert peaked["nll"] < 0


@pytest.mark.parametrize("pred, true, match", [
    ([[100.0, 0.0]], [[80.0, 180.0]], r"pred_latlon row 0 is \[100.0, 0.0\]: expected finite \(lat, lon\)"),
    ([[0.0, 0.0], [np.nan, 0.0]], [[0.0, 0.0], [0.0, 0.0]], "pred_latlon row 1 is"),
    ([[0.0, 0.0]] * 5, [[0.0, 1.0]], r"pred_latlon must have shape \(1, 2\)"),
    ([[0.0, 0.0]] * 5, [[0.0, 1.0]] * 8, r"pred_latlon must have shape \(8, 2\)"),
    ([[0.0, 0.0]], [[0.0, 0.0, 0.0]], r"true_latlon must have shape \(N, 2\)"),
])
def test_distance_metrics_refuse_what_would_be_plausible_garbage(pred, true, match):
    # Swapped (lon, lat) columns, missing answers and broadcasting shapes gave numbers that
    # looked like results (a latitude of 100 scored 100 % within 1 km of its antipode).
    with pytest.raises(ValueError, match=match):
        M.distance_metrics(np.array(pred), np.array(true))


def test_metrics_from_distances_refuse_negative_and_nan():
    for d in ([1.0, -2.0], [1.0, np.nan]):
        with pytest.raises(ValueError, match="distances must be finite and >= 0 km"):
            M.metrics_from_distances(np.array(d))
        # GeoScore alone too: a negative distance scored past its maximum of 5000.
        with pytest.raises(ValueError, match=r"distance_km must be finite and >= 0 km, got (-2.0|nan) at index 1"):
            M.geoscore(np.array(d))


@pytest.mark.parametrize("score, name", [(M.geoscore, "distance_km"), (M.nll, "log_density"),
                                         (M.rva_auc, "search_km2"), (M.recall_vs_area, "search_km2")])
def test_scores_of_nothing_are_refused(score, name):
    # A mean over no samples was NaN with numpy's RuntimeWarning, easily taken for a score.
    with pytest.raises(ValueError, match=f"{name} is empty"):
        score(np.array([]))


def test_search_area_refuses_non_finite_probabilities():
    prob = np.full((2, 4), 0.25)
    prob[1, 2] = np.nan
    with pytest.raises(ValueError, match="prob row 1 holds NaN"):
        M.search_area_km2(prob, np.full(4, math.pi), np.array([0, 1]))


def test_accuracy_counts_a_distance_equal_to_the_threshold():
    # "Within d km" includes d itself.
    m = M.metrics_from_distances(np.array([1.0, 25.0, 200.0, 750.0, 2500.0]))
    assert [m[f"acc_{t}km"] for t in (1, 25, 200, 750, 2500)] == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_none_marks_a_missing_answer_and_non_numbers_are_named():
    got = M.best_of_k_metrics([[[1, 2], [None, None]], [[3, 4], [5, 6]]], [[1, 2], [3, 4]], ks=(2,))
    assert got["top2_median_km"] == 0.0
    with pytest.raises(TypeError, match="candidates must be real numbers"):
        M.best_of_k_metrics(np.array([[[1, 2], ["a", None]]], dtype=object), [[1, 2]], ks=(2,))
