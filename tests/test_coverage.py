"""Credible regions calibrated on validation places hold the truth as often as they claim
on new places, where the density's own regions do not; the scores are the regions' masses."""
import numpy as np
import pytest
import torch

from locdiff import grids, shdd
from locdiff.coverage import check_record, check_records, fit_levels, hpd_scores, level_for
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon


def displaced(truth, rng, most_km):
    """Points up to ``most_km`` from each truth, in random directions."""
    p = latlon_to_xyz(truth)
    e = np.cross(p, rng.normal(size=p.shape))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    a = rng.uniform(0, most_km, (len(p), 1)) / EARTH_RADIUS_KM
    return xyz_to_latlon(np.cos(a) * p + np.sin(a) * e)


def places(n, seed):
    """Truths, and exact SHDDs (L = 8) up to 2,500 km off them: densities sharper than the
    truths' spread around their peaks."""
    rng = np.random.default_rng(seed)
    truth = np.c_[np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)]
    return truth, torch.as_tensor(shdd.encode(displaced(truth, rng, 2500.0), 8))


def test_hpd_scores_are_the_mass_at_least_as_dense_as_the_points_cell():
    rng = np.random.default_rng(0)
    grid = grids.gauss_legendre(12, 24)
    p = torch.as_tensor(rng.dirichlet(np.ones(grid.size), 5))
    where = np.c_[rng.uniform(-80, 80, 5), rng.uniform(-180, 180, 5)]
    got = hpd_scores(p, grid, where).numpy()
    dens = (p / grid.area).numpy()
    cell = np.argmax(latlon_to_xyz(where) @ grid.xyz.numpy().T, 1)
    want = [p[i].numpy()[dens[i] >= dens[i, c]].sum() for i, c in enumerate(cell)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # A flat density: every cell ties with the point's, so only the whole sphere holds it
    # for sure (p / area rounds differently from cell to cell: ties are found all the same).
    flat = grid.area[None] / grid.area.sum()
    assert hpd_scores(flat, grid, where[:1]).item() == pytest.approx(1.0)


def test_calibrated_regions_hold_the_truth_as_often_as_they_claim():
    t = shdd.exact_peak(8) / 8  # sharper than the spread: its own regions hold the truth 28-70 % of the time
    grid = grids.for_degree(8, "gauss_legendre", oversample=6)

    def scores(truth, c):
        return hpd_scores(torch.as_tensor(shdd.density(c, grid, t)), grid, truth).numpy()
    record = fit_levels(scores(*places(1500, 1)))
    fresh = scores(*places(1500, 2))
    for q in (0.5, 0.8, 0.9):
        assert np.mean(fresh <= q) < q - 0.15  # the density's own regions: far too small
        mass = level_for(record, q)
        assert mass > q and abs(np.mean(fresh <= mass) - q) < 0.035, (q, mass, np.mean(fresh <= mass))


def test_level_for_follows_split_conformal_rule():
    scores = np.arange(1, 201) / 201.0  # 200 distinct places
    rec = fit_levels(scores)
    assert rec["places"] == 200 and len(rec["quantiles"]) == 101
    # ceil(201 q) of them: q = 0.5 -> the 101st smallest score, or the next kept one up (the
    # quantiles are kept every 0.01, 2 places here): never a mass that held fewer.
    for q, k in ((0.5, 101), (0.9, 181)):
        assert scores[k - 1] <= level_for(rec, q) <= scores[k + 1] + 1e-5
        assert np.mean(scores <= level_for(rec, q)) >= q
    assert level_for(rec, 0.999) == 1.0  # more than the places can vouch for: the sphere
    assert level_for({}, 0.9) == 0.9  # no record: the nominal mass
    assert fit_levels(scores[:99]) == {}  # too few places to calibrate
    assert check_record(rec) is rec and check_records({"locdiff": rec}) and check_records({}) == {}
    for bad in ({"places": 3}, {"places": 3, "quantiles": [0.5, 0.2]}, {"places": 3, "quantiles": [0, 2]}, [1],
                {"places": True, "quantiles": [0.1, 0.2]}):
        with pytest.raises(ValueError, match="predict.credible must be"):
            check_record(bad)
    with pytest.raises(ValueError, match="keys among"):
        check_records({"photos": rec})


def test_calibration_takes_fewer_places_where_each_costs_more():
    from locdiff.answers import credible_grid
    from locdiff.calibration import COVERAGE_MIN_ROWS, COVERAGE_ROWS, coverage_rows

    cells = {L: credible_grid(L, shdd.exact_peak(L) / 16).size for L in (16, 64, 128, 512)}
    assert coverage_rows(cells[16]) == coverage_rows(cells[64]) == COVERAGE_ROWS
    assert COVERAGE_MIN_ROWS < coverage_rows(cells[128]) < COVERAGE_ROWS
    assert coverage_rows(cells[512]) == COVERAGE_MIN_ROWS


def test_scores_of_the_first_rows_are_those_rows_whatever_the_chunking():
    # Rows cut short of the densities' rows: the last chunk's densities once outnumbered its
    # places (a crash, or another place's truth scored where the shapes broadcast).
    from locdiff.answers import credible_grid
    from locdiff.coverage import place_scores

    x = np.c_[np.zeros(2500), np.linspace(-170, 170, 2500)]
    c = torch.as_tensor(shdd.encode(x, 8))
    grid = credible_grid(8, 1.0)
    got = place_scores(lambda r, g: shdd.density(c[r], g, 1.0), grid, x, rows=2000)
    assert got.shape == (2000,) and (2500 % ((1 << 22) // grid.size)) != 0
    want = hpd_scores(torch.as_tensor(shdd.density(c[:2000], grid, 1.0)), grid, x[:2000]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_model_that_fits_exactly_gets_the_peak_cell_not_an_empty_region():
    # Densities peaked on their truths: each score is the peak cell's mass, and the region of
    # that mass is the whole peak cell, which holds the truth.
    from locdiff.answers import credible_area, credible_grid

    rng = np.random.default_rng(3)
    truth = np.c_[rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300)]
    grid = credible_grid(8, 1.0)
    p = torch.as_tensor(shdd.density(shdd.encode(truth, 8), grid, 1.0))
    scores = hpd_scores(p, grid, truth).numpy()
    record = fit_levels(scores)
    masses = [level_for(record, q) for q in (0.5, 0.9)]
    assert min(masses) > 0 and all(np.mean(scores <= m) >= q for m, q in zip(masses, (0.5, 0.9)))
    assert (credible_area(p, grid, masses).numpy() > 0).all()
