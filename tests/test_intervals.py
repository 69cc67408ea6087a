"""Grouped, paired bootstrap intervals of median errors (locdiff.intervals)."""
import doctest

import numpy as np
import pytest

from locdiff import intervals as I


def _regions(rng, n_groups, per_group, spread):
    """Errors of places in regions that share a region effect: log-normal around a region's
    own level, as on the places task where one region's places fail together."""
    level = rng.lognormal(np.log(300), spread, n_groups)
    groups = np.repeat(np.arange(n_groups), per_group)
    return level[groups] * rng.lognormal(0, 0.2, groups.size), groups


def test_doctest():
    assert doctest.testmod(I).failed == 0


def test_resampled_medians_are_numpy_medians_of_the_resampled_errors():
    # The point median is np.median (the mean of the two middle errors for an even count);
    # each resample's median must be the same statistic, or intervals can miss the point.
    rng = np.random.default_rng(1)
    errors = rng.permutation(np.arange(1.0, 11.0))
    weights = rng.integers(0, 3, (50, errors.size))
    weights[weights.sum(1) == 0, 0] = 1
    expected = [np.median(np.repeat(errors, w)) for w in weights]
    np.testing.assert_allclose(I._weighted_medians(errors, weights), expected)
    assert I.median_intervals({"m": [1.0, 2, 3, 4]}, [0, 0, 0, 0], reps=20)["m"]["interval_km"] == [2.5, 2.5]
    assert I.median_intervals({"m": [1.0, 2, 3, 4]}, [0, 0, 0, 0], reps=np.int64(20))["m"]["interval_km"] == [2.5, 2.5]


def test_interval_covers_the_true_median_at_about_the_level():
    # The population median of the errors is known (300 km: log-normal region levels times
    # a median-one place factor); 90% intervals from independent test sets should hold it
    # about 90% of the time.
    rng = np.random.default_rng(0)
    pop, _ = _regions(rng, 200_000, 1, 0.8)
    truth = np.median(pop)
    hits = []
    for trial in range(120):
        e, g = _regions(rng, 60, 8, 0.8)
        lo, hi = I.median_intervals({"m": e}, g, reps=300, seed=trial)["m"]["interval_km"]
        hits.append(lo <= truth <= hi)
    assert 0.8 <= np.mean(hits) <= 0.98


def test_grouped_interval_is_wider_than_one_that_treats_places_as_independent():
    # Ignoring the groups would claim a precision the test set does not have.
    rng = np.random.default_rng(1)
    e, g = _regions(rng, 40, 25, 0.8)
    grouped = np.diff(I.median_intervals({"m": e}, g)["m"]["interval_km"])[0]
    places = np.diff(I.median_intervals({"m": e}, np.arange(e.size))["m"]["interval_km"])[0]
    assert grouped > 2 * places


def test_paired_ratio_keeps_the_correlation_of_methods():
    # b fails where a fails, 10% worse everywhere: the paired ratio is exactly 1 / 1.1,
    # where two independent resamples would spread it by the region effect.
    rng = np.random.default_rng(2)
    a, g = _regions(rng, 40, 25, 0.8)
    out = I.median_intervals({"a": a, "b": 1.1 * a}, g, reference="a")
    lo, hi = out["b"]["ratio_interval"]
    assert out["b"]["ratio"] == pytest.approx(1 / 1.1)
    assert lo == pytest.approx(1 / 1.1) and hi == pytest.approx(1 / 1.1)
    assert out["a"]["ratio_interval"] == [1.0, 1.0]
    assert out["b"]["interval_km"][0] < out["b"]["median_km"] < out["b"]["interval_km"][1]


def test_same_seed_same_interval():
    rng = np.random.default_rng(3)
    e, g = _regions(rng, 30, 5, 0.5)
    assert I.median_intervals({"m": e}, g, seed=4) == I.median_intervals({"m": e}, g, seed=4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(errors_km={"m": [1.0, 2.0]}, groups=[0, 1, 2]), ["errors_km['m']", "3"]),
    (dict(errors_km={"m": [1.0, np.nan]}, groups=[0, 1]), ["errors_km['m']", "finite"]),
    (dict(errors_km={"m": [1.0]}, groups=[]), ["groups", "non-empty"]),
    (dict(errors_km={"m": [1.0]}, groups=[0], reference="x"), ["reference", "'x'", "['m']"]),
    (dict(errors_km={"m": [1.0]}, groups=[0], reps=0), ["reps", "0"]),
    (dict(errors_km={"m": [1.0]}, groups=[0], reps=True), ["reps", "True"]),
    (dict(errors_km={"m": [1.0]}, groups=[0], level=1.5), ["level", "1.5"]),
])
def test_bad_input_names_the_argument(kwargs, words):
    with pytest.raises(ValueError) as err:
        I.median_intervals(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_table_lists_every_method_with_its_interval():
    out = I.median_intervals({"LocDiff": [100.0, 200, 300], "kNN": [200.0, 400, 600]}, [0, 1, 2],
                             reference="LocDiff", reps=50)
    text = I.format_intervals(out)
    assert "90%" in text and "LocDiff" in text.splitlines()[2] and "kNN" in text.splitlines()[3]
    assert "0.50" in text.splitlines()[3] and "ratio: LocDiff's median" in text.splitlines()[0]
    alone = I.format_intervals(I.median_intervals({"kNN": [1.0, 2, 3]}, [0, 1, 2], reps=50))
    assert "ratio" not in alone.splitlines()[0]


def test_the_bootstrap_draws_every_group():
    # Two groups of errors 1 and 100: resamples of both groups reach both ends.
    out = I.median_intervals({"m": [1.0, 1.0, 100.0, 100.0]}, [0, 0, 1, 1], reps=200)["m"]
    assert out["interval_km"] == [1.0, 100.0]
