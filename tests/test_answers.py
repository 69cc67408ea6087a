"""Answers from SHDD vectors: basin probabilities (checked against a plain loop over the grid),
credible areas (against the uniform density and a sort in numpy), reverse geocoding, and the
JSON Lines, CSV and HTML files."""
from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from locdiff import grids, shdd
from locdiff.answers import (basin_mass, basin_of, basin_owner, cap_radius_km, credible_area, grid_peaks,
                             neighbours, reverse_geocode_modes, summarize)
from locdiff.geo import EARTH_RADIUS_KM

SPHERE_KM2 = 4 * math.pi * EARTH_RADIUS_KM ** 2


def _loop_peaks(v: np.ndarray, nlat: int, nlon: int) -> np.ndarray:
    """Hill climbing one cell at a time, neighbours written out by hand."""
    def nbrs(j, k):
        for dj in (-1, 0, 1):
            for dk in (-1, 0, 1):
                if dj or dk:
                    jj, kk = j + dj, k + dk
                    if jj < 0 or jj >= nlat:
                        jj, kk = min(max(jj, 0), nlat - 1), kk + nlon // 2
                    yield jj * nlon + kk % nlon

    out = np.empty(v.size, np.int64)
    for start in range(v.size):
        c = start
        while True:
            best = max(nbrs(c // nlon, c % nlon), key=lambda n: v[n])
            if v[best] <= v[c]:
                break
            c = best
        out[start] = c
    return out


def test_neighbours_cross_the_poles():
    nb = neighbours(4, 8)
    assert nb.shape == (32, 8)
    assert set(nb[0].tolist()) == {1, 7, 4, 5, 3, 8, 9, 15}  # row 0, lon 0: across the pole are 3, 4, 5


def test_grid_peaks_match_a_loop(rng):
    grid = grids.equiangular(10, 16)
    v = torch.from_numpy(rng.normal(size=(3, grid.size)))
    peaks = grid_peaks(v, grid.nlat, grid.nlon).numpy()
    for b in range(3):
        np.testing.assert_array_equal(peaks[b], _loop_peaks(v[b].numpy(), grid.nlat, grid.nlon))


def test_two_equal_lobes_share_the_probability():
    L = 16
    pts = np.array([[10.0, -60.0], [10.0, 60.0]])
    c = shdd.encode(pts, L).sum(0)[None]
    modes, _ = shdd.top_k(c, 2)
    grid = grids.for_degree(L, oversample=2)
    p = torch.as_tensor(shdd.density(c, grid, 0.3))
    prob = basin_mass(p, grid, torch.as_tensor(modes), shdd.default_separation_km(L)).numpy()[0]
    assert prob.sum() > 0.99 and abs(prob[0] - prob[1]) < 1e-3
    # Weighting one lobe moves the probability to it.
    c2 = (0.55 * shdd.encode(pts[0], L) + 0.45 * shdd.encode(pts[1], L))[None]
    m2, _ = shdd.top_k(c2, 2)
    p2 = basin_mass(torch.as_tensor(shdd.density(c2, grid, 0.3)), grid, torch.as_tensor(m2), 500.0).numpy()[0]
    assert p2[0] > 0.9 and np.allclose(m2[0, 0], pts[0], atol=1)


@pytest.mark.parametrize("degree, sharpness, pts", [
    (16, 46, [[90.0, 0.0], [0.0, 50.0]]),         # a pole's lobe falls inside the first ring
    (16, 46, [[-3.7, -64.0], [5.5, 90.5]]),       # off the grid's symmetry, unlike the test above
    (32, 100, [[12.0, 30.0], [-40.0, 150.0]]),
    (8, 30, [[-90.0, 0.0], [20.0, -120.0]]),
])
def test_equal_modes_get_equal_probabilities_wherever_they_fall(degree, sharpness, pts):
    # Summed on the 2x grid, a sharp lobe's mass depended on where it fell between the
    # nodes: 0.62 / 0.38, 0.44 / 0.56, 0.37 / 0.63, 0.56 / 0.44 for these equal pairs.
    c = 0.5 * shdd.encode(np.array(pts), degree).sum(0)
    modes, _ = shdd.top_k(c, 2)
    t = shdd.exact_peak(degree) / sharpness
    prob = summarize(c[None], modes[None], t, geocode=False).probability[0]
    assert prob.sum() > 0.99 and abs(prob[0] - prob[1]) < 0.005, prob


def test_missing_modes_get_nan_and_far_peaks_count_as_other():
    L = 8
    c = shdd.encode(np.array([[0.0, 0.0], [0.0, 180.0]]), L).sum(0)[None]
    grid = grids.for_degree(L, oversample=2)
    p = torch.as_tensor(shdd.density(c, grid, 0.2))
    modes = torch.tensor([[[0.0, 0.0], [math.nan, math.nan]]], dtype=torch.float64)
    prob = basin_mass(p, grid, modes, 1000.0).numpy()[0]
    assert np.isnan(prob[1]) and 0.45 < prob[0] < 0.55  # the lobe at 180 is nobody's


def test_basin_of_names_the_mode_whose_basin_holds_a_point():
    # Two lobes at +-60 degrees longitude: points near each lobe belong to its mode; with only
    # one mode listed, a point near the other lobe belongs to none.
    L = 16
    pts = np.array([[10.0, -60.0], [10.0, 60.0]])
    c = shdd.encode(pts, L).sum(0)[None].repeat(4, 0)
    modes = torch.as_tensor(np.repeat(pts[None], 4, 0))
    grid = grids.for_degree(L, oversample=2)
    p = torch.as_tensor(shdd.density(c, grid, 0.3))
    where = np.array([[12.0, -58.0], [5.0, 63.0], [10.0, 61.0], [8.0, 57.0]])
    assert basin_of(p, grid, modes[:, [1, 0]], 500.0, where).tolist() == [1, 0, 0, 0]
    assert basin_of(p, grid, modes[:, :1], 500.0, where).tolist() == [0, -1, -1, -1]
    # One climb shared by both questions gives the same answers as each climbing alone.
    owner = basin_owner(p, grid, modes, 500.0)
    assert torch.equal(basin_of(p, grid, modes, 500.0, where, owner), basin_of(p, grid, modes, 500.0, where))
    assert torch.equal(basin_mass(p, grid, modes, 500.0, owner), basin_mass(p, grid, modes, 500.0))


def test_credible_area_of_the_uniform_density():
    c = np.zeros((1, 25))
    c[0, 0] = 1.0  # f constant: every cell equally likely per unit area
    grid = grids.for_degree(4, oversample=2)
    p = torch.as_tensor(shdd.density(c, grid, 1.0))
    area = credible_area(p, grid, (0.5, 0.9)).numpy()[0]
    np.testing.assert_allclose(area, [0.5 * SPHERE_KM2, 0.9 * SPHERE_KM2], rtol=1e-9)
    np.testing.assert_allclose(cap_radius_km(area[0]), math.pi / 2 * EARTH_RADIUS_KM, rtol=1e-9)


def test_credible_area_matches_a_numpy_sort(rng):
    L = 12
    c = shdd.encode(np.stack([rng.uniform(-60, 60, 3), rng.uniform(-180, 180, 3)], 1), L) * rng.uniform(0.2, 1, (3, 1))
    grid = grids.for_degree(L, oversample=2)
    p = np.asarray(shdd.density(c, grid, 0.5))
    got = credible_area(torch.as_tensor(p), grid, (0.5, 0.9)).numpy()
    area = grid.area.numpy()
    for b in range(3):
        order = np.argsort(-p[b] / area)
        cum = np.cumsum(p[b][order])
        for i, q in enumerate((0.5, 0.9)):
            n = np.searchsorted(cum, q)  # cells wholly inside, then a part of the next one
            whole = area[order[:n]].sum()
            part = (q - (cum[n - 1] if n else 0)) / p[b][order[n]] * area[order[n]]
            assert got[b, i] == pytest.approx((whole + part) * EARTH_RADIUS_KM ** 2, rel=1e-9)
    assert np.all(got[:, 1] > got[:, 0])


def test_cap_radius():
    assert cap_radius_km(SPHERE_KM2) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert cap_radius_km(math.pi * 10.0 ** 2) == pytest.approx(10.0, rel=1e-6)  # small caps are flat discs


def test_reverse_geocoding():
    pytest.importorskip("reverse_geocode")
    out = reverse_geocode_modes(np.array([[[48.8566, 2.3522], [np.nan, np.nan]], [[-33.87, 151.21], [35.68, 139.69]]]))
    assert out[0][0]["country"] == "France" and out[0][0]["place_km"] < 10 and out[0][1] is None
    assert [out[1][0]["country_code"], out[1][1]["country_code"]] == ["AU", "JP"]


@pytest.mark.parametrize("L, sharpness", [(16, 4.0), (16, 16.0), (16, 46.0), (16, 150.0), (16, 1000.0), (8, 2000.0)])
def test_credible_radii_of_exact_shdds_match_a_1d_integral(L, sharpness):
    # An exact SHDD's density depends on the angle to its point alone, so its credible
    # regions are caps whose radii a 1-D integral gives, the same at every point, poles too.
    # Cells of 2x the decode resolution had put them up to 90 % off; a 16x cap, 68 % at 1000.
    from scipy.integrate import cumulative_trapezoid
    from scipy.special import eval_legendre

    t = (L + 1) ** 2 / (4 * math.pi) / sharpness
    theta = np.linspace(0, math.pi, 400_001)
    f = sum((2 * l + 1) * eval_legendre(l, np.cos(theta)) for l in range(L + 1)) / (4 * math.pi)
    mass = cumulative_trapezoid(np.exp(f / t - f.max() / t) * np.sin(theta), theta, initial=0)
    reference = [EARTH_RADIUS_KM * np.interp(q * mass[-1], mass, theta) for q in (0.5, 0.9)]
    pts = np.array([[90.0, 0.0], [-90.0, 0.0], [89.5, 3.0], [-88.0, 170.0], [0.0, 10.0], [37.4, -122.1]])
    c = shdd.encode(pts, L)
    modes, _ = shdd.top_k(c, 1)
    got = summarize(c, modes, t, geocode=False).radius_km
    np.testing.assert_allclose(got, np.broadcast_to(reference, got.shape), rtol=0.05)
    # An exact SHDD's side lobes hold almost nothing once sharpened: one basin has it all.
    if sharpness >= 16:
        np.testing.assert_allclose(summarize(c, modes, t, geocode=False).probability[:, 0], 1.0, atol=2e-3)


def test_credible_grid_follows_its_rule_wherever_calibration_can_go():
    # Calibration stops at the normaliser's sharpest (shdd.normalizer_max_sharpness); the
    # credible regions stay resolved up to there, and never take more than MAX_CELLS cells.
    from locdiff.answers import MAX_CELLS, credible_max_sharpness

    for L in (1, 4, 16, 32, 64, 128):
        sharpest = credible_max_sharpness(L)
        assert sharpest >= shdd.normalizer_max_sharpness(L), L
        assert math.prod(grids.ring_shape(L, 1.2 * math.sqrt(sharpest))) <= MAX_CELLS


def test_density_rows_kept_on_request():
    c = shdd.encode(np.array([[10.0, 20.0], [-40.0, 60.0], [70.0, -10.0]]), 8)
    modes, _ = shdd.top_k(c, 2)
    grid = grids.for_degree(8, oversample=2)
    assert summarize(c, modes, 1.0, geocode=False).density is None
    assert summarize(c, modes, 1.0, geocode=False, density=True, grid=grid).density.shape == (3, grid.size)
    assert summarize(c, modes, 1.0, geocode=False, density=2, grid=grid).density.shape == (2, grid.size)
    for bad in (-1, 1.5, "all"):
        with pytest.raises(ValueError, match="density must be"):
            summarize(c, modes, 1.0, geocode=False, density=bad)
    with pytest.raises(ValueError, match="temperature must be"):
        summarize(c, modes, 0.0, geocode=False)


@pytest.fixture(scope="module")
def answers():
    pytest.importorskip("reverse_geocode")
    L = 16
    pts = np.array([[48.85, 2.35], [-33.9, 151.2], [40.7, -74.0]])
    c = np.stack([0.6 * shdd.encode(pts[0], L) + 0.4 * shdd.encode(pts[1], L), shdd.encode(pts[2], L)])
    modes, _ = shdd.top_k(c, 3)
    return summarize(c, modes, 2.0, names=["a <b> & c", "b.jpg"], density=True)


def test_summarize(answers):
    assert answers.probability.shape == (2, 3) and answers.area_km2.shape == (2, 2)
    total = np.nansum(answers.probability, 1) + answers.other
    np.testing.assert_allclose(total, 1.0, atol=1e-9)
    assert answers.probability[0, 0] > answers.probability[0, 1] > 0.01
    assert np.all(answers.radius_km[:, 1] > answers.radius_km[:, 0])
    rec = answers.record(0)
    assert rec["modes"][0]["country"] == "France" and rec["modes"][1]["country"] == "Australia"
    assert set(rec["credible"]) == {"50%", "90%"}
    # A higher temperature spreads the density: larger regions.
    hot = summarize(np.array([np.asarray(shdd.encode(np.array([40.7, -74.0]), 16))]), answers.modes[1:], 4.0,
                    geocode=False)
    assert hot.area_km2[0, 0] > answers.area_km2[1, 0]


def test_jsonl_and_csv(answers, tmp_path):
    from locdiff.answer_files import write_csv, write_jsonl

    write_jsonl(tmp_path / "a.jsonl", answers)
    recs = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["input"] for r in recs] == ["a <b> & c", "b.jpg"] and len(recs[0]["modes"]) == 3
    write_csv(tmp_path / "a.csv", answers)
    with open(tmp_path / "a.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["country"] == "France" and float(rows[0]["area_km2_90"]) > 0
    assert float(rows[0]["probability"]) == recs[0]["modes"][0]["probability"]


def test_close_credible_levels_keep_their_own_columns(tmp_path):
    # Levels are keys and CSV columns by their percentage: 99 % and 99.4 % once shared "99".
    from locdiff.answer_files import write_csv

    c = shdd.encode(np.array([[48.85, 2.35]]), 8)
    modes, _ = shdd.top_k(c, 1)
    a = summarize(c, modes, 2.0, levels=(0.9, 0.99, 0.994))
    assert list(a.records()[0]["credible"]) == ["90%", "99%", "99.4%"]
    assert a.radius_km[0, 1] < a.radius_km[0, 2]
    write_csv(tmp_path / "a.csv", a)
    with open(tmp_path / "a.csv", newline="") as fh:
        header, row = list(csv.reader(fh))
    assert header[-6:] == ["area_km2_90", "radius_km_90", "area_km2_99", "radius_km_99", "area_km2_99.4",
                           "radius_km_99.4"] and len(row) == len(header)
    with pytest.raises(ValueError, match="levels must differ in percent"):
        summarize(c, modes, 2.0, levels=(0.9, 0.9))


class _Checker(HTMLParser):
    """Well-nested tags (void elements aside) and every external script or stylesheet."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "area", "base", "col", "embed", "source", "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.external, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        src = a.get("src") or (a.get("href") if tag == "link" else None)
        if src and not src.startswith("data:"):
            self.external.append(src)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # <x ... />: nothing left open
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
        self.stack.pop()


def test_html_map_is_valid_and_offline(answers, tmp_path):
    pytest.importorskip("folium")
    pytest.importorskip("xstatic.pkg.leaflet")
    from locdiff.answer_files import write_html_map

    write_html_map(tmp_path / "m.html", answers)
    text = (tmp_path / "m.html").read_text(encoding="utf-8")
    assert text.lstrip().lower().startswith("<!doctype html>")
    chk = _Checker()
    chk.feed(text)
    chk.close()
    assert not chk.stack and {"html", "head", "body", "script"} <= set(chk.tags)
    assert chk.external == []  # Leaflet and the heat plugin are in the page; only tiles are fetched
    assert "tile.openstreetmap.org" in text and "L.heatLayer" in text
    assert text.count("L.circleMarker") == 6 and "a &lt;b&gt; &amp; c" in text and "a <b> & c" not in text


def test_names_stay_text_in_the_csv_and_the_map(tmp_path):
    # A photo's name is the user's data: no spreadsheet formula in the CSV, and no script in
    # the map, whose popups folium puts in JavaScript template literals (`${...}` runs there).
    from locdiff.answer_files import write_csv, write_html_map

    c = shdd.encode(np.array([[48.85, 2.35], [40.7, -74.0]]), 8)
    modes, _ = shdd.top_k(c, 1)
    names = ["=HYPERLINK(\"http://x\").jpg", "${alert(document.domain)}`\\`.jpg"]
    answers = summarize(c, modes, 1.0, names=names, geocode=False, density=True)
    write_csv(tmp_path / "a.csv", answers)
    with open(tmp_path / "a.csv", newline="", encoding="utf-8") as fh:
        assert [r["input"] for r in csv.DictReader(fh)] == ["'" + names[0], names[1]]
    pytest.importorskip("folium")
    pytest.importorskip("xstatic.pkg.leaflet")
    write_html_map(tmp_path / "m.html", answers)
    text = (tmp_path / "m.html").read_text(encoding="utf-8")
    assert "${alert" not in text and "&#36;{alert(document.domain)}&#96;&#92;&#96;.jpg" in text
