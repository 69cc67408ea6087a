"""The baselines do what their names say, on data whose answer is known."""
import math

import numpy as np
import torch
import pytest

from locdiff import grids
from locdiff.baselines import GeocellClassifier, KnnDensity, Regressor, knn_predict, spherical_kmeans
from locdiff.baselines.knn import NeighbourIndex
from locdiff.geo import great_circle_km
from locdiff.metrics import distance_metrics

CENTRES = np.array([[48.8, 2.3], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7], [-23.5, -46.6], [30.0, 31.2]])


def clusters(n=1200, spread_deg=1.0, seed=0, noise=0.3):
    """Places around six cities; the embedding says which city (plus noise dimensions)."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, len(CENTRES), n)
    coords = CENTRES[lab] + rng.normal(0, spread_deg, (n, 2))
    emb = np.concatenate([np.eye(len(CENTRES))[lab] + noise * rng.normal(size=(n, len(CENTRES))),
                          rng.normal(size=(n, 4))], 1)
    return emb.astype(np.float32), coords


def test_knn_finds_the_neighbour_and_averages_on_the_sphere():
    emb = np.eye(3, dtype=np.float32)
    coords = np.array([[0.0, 179.0], [0.0, -179.0], [50.0, 0.0]])
    q = np.array([[1.0, 1.0, 0.0]], np.float32)
    # Equal similarity to two places either side of the antimeridian: the spherical mean
    # is on the antimeridian, not at longitude 0 as a naive average of degrees would say.
    mean = knn_predict(emb, coords, q, k=2, temperature=1.0)
    assert abs(mean[0, 0]) < 1e-9 and abs(abs(mean[0, 1]) - 180.0) < 1e-9
    assert knn_predict(emb, coords, emb[2:], k=1).tolist() == [[50.0, 0.0]]


def test_a_memory_mapped_gallery_is_searched_without_warnings(tmp_path):
    # torch warns once per process about read-only arrays, so the check runs in its own.
    import subprocess
    import sys

    np.save(tmp_path / "g.npy", np.eye(4, dtype=np.float32) * 3)
    code = ("import numpy as np; from locdiff.baselines.knn import NeighbourIndex\n"
            f"g = np.load({str(tmp_path / 'g.npy')!r}, mmap_mode='r')\n"
            "sim, idx = NeighbourIndex(g, np.zeros((4, 2))).search(g[1:2], 1)\n"
            "assert idx.item() == 1 and abs(sim.item() - 1) < 1e-6, (sim, idx)\n"
            "assert (g == np.eye(4) * 3).all()  # the gallery is left as it was")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kmeans_centres_are_the_cities():
    _, coords = clusters(spread_deg=0.2)
    centres = spherical_kmeans(coords, len(CENTRES), seed=0)
    from locdiff.geo import xyz_to_latlon

    d = great_circle_km(xyz_to_latlon(centres)[:, None], CENTRES[None])
    assert (d.min(0) < 50).all()


def test_knn_density_bandwidth_matches_the_spread():
    # Neighbours in embedding space are the same city's places, scattered ~111 km x spread:
    # the validation NLL picks a bandwidth of that order, and the density integrates to 1.
    emb, coords = clusters(2000, spread_deg=1.0, noise=0.05)
    vemb, vcoords = clusters(300, spread_deg=1.0, seed=1, noise=0.05)
    kd = KnnDensity(emb, coords).fit(vemb, vcoords)
    bw = 6371.0088 / math.sqrt(kd.kappa)
    assert 50 <= bw <= 200, bw
    g = grids.fibonacci(200_000)
    p = kd.grid_probabilities(vemb[:5], g)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    logd = kd.log_density_at(vemb[:50], vcoords[:50])
    assert np.mean(logd) > math.log(1 / (4 * math.pi)) + 5  # far better than uniform


def test_geocell_classifier_learns_the_cells():
    emb, coords = clusters()
    temb, tcoords = clusters(300, seed=2)
    geo = GeocellClassifier(cells=12, widths=(64,), dropout=0.0, smoothing_km=100.0)
    info = geo.fit(emb, coords, val=(temb, tcoords), steps=300, batch_size=128, lr=3e-3, val_every=100)
    assert info["steps"] == 300
    m = distance_metrics(geo.predict(temb), tcoords)
    assert m["acc_750km"] > 0.9
    # Its density: cell probabilities spread over cell areas, normalised on any grid.
    g = grids.for_degree(16)
    np.testing.assert_allclose(geo.grid_probabilities(temb[:4], g).sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(geo.cell_area.sum(), 4 * math.pi, rtol=1e-9)
    # Cells of a few steradians: far from sharp, but better than uniform.
    assert np.mean(geo.log_density_at(temb, tcoords)) > math.log(1 / (4 * math.pi)) + 1
    with pytest.raises(ValueError, match="select"):
        geo.fit(emb, coords, select="accuracy")


def test_regression_learns_the_direction():
    # Clean labels: a regression averages ambiguous cities into the sea between them.
    emb, coords = clusters(noise=0.1)
    temb, tcoords = clusters(300, seed=3, noise=0.1)
    reg = Regressor(widths=(64, 32), dropout=0.0)
    reg.fit(emb, coords, steps=800, batch_size=128, lr=1e-2)
    assert distance_metrics(reg.predict(temb), tcoords)["acc_750km"] > 0.95


def test_search_in_gallery_blocks_and_repeated_queries_agree(monkeypatch):
    # A large gallery is searched in blocks (a 2M-place gallery had held a 256 x 2M matrix),
    # and a query searched again comes from the cache: both must give the one-matrix answer.
    from locdiff.baselines import knn

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(3000, 12)).astype(np.float32)
    coords = np.stack([rng.uniform(-80, 80, 3000), rng.uniform(-180, 180, 3000)], 1)
    query = rng.normal(size=(70, 12)).astype(np.float32)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    want = np.argsort(-(q @ unit.T), axis=1, kind="stable")[:, :20]
    monkeypatch.setattr(knn, "MAX_BLOCK", 500)  # blocks of 7 gallery rows for 70 queries
    index = knn.NeighbourIndex(emb, coords, batch=32)
    sim, idx = index.search(query, 20)
    np.testing.assert_array_equal(idx.numpy(), want)
    np.testing.assert_allclose(sim.numpy(), np.take_along_axis(q @ unit.T, want, 1), rtol=0, atol=1e-5)
    again, idx5 = index.search(query, 5)
    np.testing.assert_array_equal(idx5.numpy(), want[:, :5])
    np.testing.assert_array_equal(index.search(query[:40] + 1.0, 3)[1].numpy(),
                                  np.argsort(-((query[:40] + 1) / np.linalg.norm(query[:40] + 1, axis=1,
                                                                                 keepdims=True)) @ unit.T,
                                             axis=1, kind="stable")[:, :3])


def test_knn_density_narrower_than_the_cells_has_no_nan_rows():
    # exp(kappa (mu.x - 1)) underflowed in every cell at a 1-5 km bandwidth: 0 / 0 rows,
    # which RvA scored as the best possible search.
    from locdiff.geo import latlon_to_xyz

    grid = grids.for_degree(32, oversample=2)
    coords = np.array([[12.345, 67.89], [89.99, 10.0], [-45.5, 179.99], [0.1, -0.1]])
    emb = np.eye(4, dtype=np.float32)
    d = KnnDensity(emb, coords, k=1, temperature=0.05, kappa=(6371.0088 / 1.0) ** 2)
    p = d.grid_probabilities(emb, grid)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=0, atol=1e-12)
    # The mass sits in a cell nearest the place.
    cos = latlon_to_xyz(coords) @ grid.xyz.numpy().T
    near_km = 6371.0088 * np.arccos(np.clip(cos.max(1), -1, 1))
    got_km = 6371.0088 * np.arccos(np.clip(cos[np.arange(4), p.argmax(1)], -1, 1))
    assert np.all(got_km <= near_km + 5.0), (got_km, near_km)


def test_knn_density_ranks_every_cell_at_small_bandwidths():
    # Far from every neighbour the exponents span thousands of nats: in exp form those cells
    # tied at 0, and the RvA counted them all at half their area. Ranked by log density, the
    # search areas equal a brute-force float64 ranking of the cells' log densities.
    from locdiff.baselines.knn import log_vmf_mixture
    from locdiff.evaluate import _rva_grid, _search_areas
    from locdiff.geo import latlon_to_xyz

    rng = np.random.default_rng(0)
    coords = np.stack([rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)], 1)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    truth = coords[:40] + rng.normal(scale=2.5, size=(40, 2))  # about 300 km from their neighbours
    d = KnnDensity(emb, coords, k=5, temperature=0.1, kappa=(6371.0088 / 10.0) ** 2)  # 10 km
    got = _search_areas(lambda sl, g: d.grid_log_probabilities(emb[:40][sl], g), truth, log=True)
    grid = _rva_grid()
    centres, log_w = d._mixture(emb[:40])
    cells = torch.as_tensor(grid.xyz.numpy())[None].expand(40, -1, -1)
    logd = log_vmf_mixture(cells, centres, log_w, d.kappa).numpy()  # (40, G) per steradian
    area = grid.area.numpy()
    true_cell = np.argmax(latlon_to_xyz(truth) @ grid.xyz.numpy().T, 1)
    want = np.array([(area[logd[i] > logd[i, c]].sum() + area[c]) * 6371.0088 ** 2 for i, c in enumerate(true_cell)])
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(d.grid_probabilities(emb[:3], grid).sum(1), 1.0, atol=1e-12)


def test_vmf_normaliser_holds_down_to_the_uniform_density():
    # The mixture integrates to one for any kappa >= 0: kappa = 0 is 1 / (4 pi) everywhere,
    # and tiny kappa (where 1 - exp(-2 kappa) loses its digits) tends to it.
    from locdiff.baselines.knn import log_vmf_mixture
    grid = grids.gauss_legendre(64)
    cells = grid.xyz.double()[None]
    centre = torch.tensor([[[0.6, 0.0, 0.8]]], dtype=torch.float64)
    for kappa in (0.0, 1e-300, 1e-12, 1.0, 300.0):
        logd = log_vmf_mixture(cells, centre, torch.zeros(1, 1, dtype=torch.float64), kappa)[0]
        assert abs(float((logd.exp() * grid.area.double()).sum()) - 1) < 1e-9, kappa
    assert float(log_vmf_mixture(cells, centre, torch.zeros(1, 1, dtype=torch.float64), 0.0)[0, 0]) == \
        pytest.approx(-np.log(4 * np.pi))


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be an int >= 1, got 0"), (dict(k=2.5), "k must be an int >= 1, got 2.5"),
    (dict(temperature=0.0), "temperature must be a positive finite number, got 0.0"),
    (dict(temperature=-0.1), "temperature must be a positive finite number, got -0.1"),
    (dict(kappa=-1.0), "kappa must be a finite number >= 0, got -1.0"),
    (dict(kappa=float("nan")), "kappa must be a finite number >= 0, got nan")])
def test_knn_settings_out_of_range_are_named(kwargs, match):
    rng = np.random.default_rng(0)
    emb, coords = rng.normal(size=(20, 8)).astype(np.float32), rng.uniform(-60, 60, (20, 2))
    settings = {**dict(k=5, temperature=0.1, kappa=100.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        KnnDensity(emb, coords, **settings)
    if "kappa" not in kwargs:
        settings.pop("kappa")
        with pytest.raises(ValueError, match=match):
            knn_predict(emb, coords, emb[:2], **settings)


def test_learned_baselines_name_bad_input():
    rng = np.random.default_rng(0)
    emb, coords = rng.normal(size=(40, 6)).astype(np.float32), rng.uniform(-60, 60, (40, 2))
    for model in (GeocellClassifier(cells=4, widths=(8,)), Regressor(widths=(8,))):
        with pytest.raises(RuntimeError, match="not fitted yet: call fit"):
            model.predict(emb[:2])
        with pytest.raises(ValueError, match=r"coords must have shape \(40, 2\)"):
            model.fit(emb, coords[:39], steps=2)
        bad = emb.copy()
        bad[7, 1] = np.nan
        with pytest.raises(ValueError, match="emb row 7 is NaN or infinite"):
            model.fit(bad, coords, steps=2)
        model.fit(emb, coords, steps=2)
        assert model.predict(emb[:0]).shape == (0, 2)  # no queries, no answers
        with pytest.raises(ValueError, match=r"query embeddings must have shape \(N, 6\)"):
            model.predict(emb[:, :5])
    for cells in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"cells must be an int >= 1, got {cells}"):
            GeocellClassifier(cells=cells)
        with pytest.raises(ValueError, match=f"k must be an int >= 1, got {cells}"):
            spherical_kmeans(coords, cells)
    geo = GeocellClassifier(cells=4, widths=(8,))
    geo.fit(emb, coords, steps=2)
    with pytest.raises(ValueError, match=r"latlon must have shape \(3, 2\)"):
        geo.log_density_at(emb[:3], coords[:2])
    assert geo.top_k(emb[:2], 2, np.float32(100.0)).shape == (2, 2, 2)  # numpy scalars are numbers
    kd = KnnDensity(emb, coords, k=3, temperature=0.1, kappa=100.0)
    with pytest.raises(ValueError, match=r"latlon must have shape \(3, 2\)"):
        kd.log_density_at(emb[:3], coords[:2])
    assert knn_predict(emb, coords, emb[:0], k=3).shape == (0, 2)


def test_gallery_rows_are_read_in_chunks_and_named(monkeypatch, tmp_path):
    # A memory-mapped float16 gallery is converted, checked and normalised a chunk at a
    # time; a bad row is named by its place in the whole file.
    from locdiff.baselines import knn

    monkeypatch.setattr(knn, "UNIT_ROWS_CHUNK", 7)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 5)).astype(np.float16)
    np.save(tmp_path / "g.npy", emb)
    index = knn.NeighbourIndex(np.load(tmp_path / "g.npy", mmap_mode="r"), rng.uniform(-60, 60, (30, 2)))
    want = emb.astype(np.float32) / np.linalg.norm(emb.astype(np.float32), axis=1, keepdims=True)
    np.testing.assert_allclose(index.emb.numpy(), want, rtol=1e-6)
    emb[23, 2] = np.inf
    with pytest.raises(ValueError, match="gallery embeddings row 23 is NaN or infinite"):
        knn.NeighbourIndex(emb, rng.uniform(-60, 60, (30, 2)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_gallery_device_this_torch_lacks_is_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="device='cuda': this torch sees no CUDA device"):
        NeighbourIndex(rng.normal(size=(5, 3)), rng.uniform(-60, 60, (5, 2)), device="cuda")


def _three_cell_classifier():
    """Cells of very different areas, class probabilities 0.6 / 0.3 / 0.1 everywhere."""
    from locdiff.baselines.geocell import _voronoi_areas
    from locdiff.geo import latlon_to_xyz

    m = GeocellClassifier(cells=3)
    m.centres = latlon_to_xyz(np.array([[70.0, 0.0], [0.0, 0.0], [-30.0, 120.0]]))
    m.cell_area = _voronoi_areas(m.centres, n=200_000)
    m.net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with torch.no_grad():
        m.net[0].weight.zero_()
        m.net[0].bias.copy_(torch.log(torch.tensor([0.6, 0.3, 0.1])))
    return m


def test_geocell_density_integrates_to_one_and_keeps_each_cells_mass():
    m = _three_cell_classifier()
    g = grids.for_degree(32, oversample=2)
    logd = m.log_density_at(np.zeros((g.size, 2), np.float32), g.latlon.numpy())
    assert float((np.exp(logd) * g.area.numpy()).sum()) == pytest.approx(1.0, abs=0.01)
    p = m.grid_probabilities(np.zeros((1, 2), np.float32), g)[0]
    owner = m._cell_of(g.latlon.numpy())
    np.testing.assert_allclose([p[owner == j].sum() for j in range(3)], [0.6, 0.3, 0.1], atol=0.01)


def test_knn_density_fit_takes_the_lowest_validation_nll_of_its_grid():
    # Each setting scored independently through log_density_at: the fit's choice is the
    # minimum, the grid's ends (k = 50, the widest bandwidth) included.
    # (noisy embeddings: the best is the grid's far corner, k = 50, T 0.2, 400 km)
    emb, coords = clusters(600, spread_deg=3.0, noise=1.0)
    vemb, vcoords = clusters(100, spread_deg=3.0, seed=1, noise=1.0)
    ks, temps, bws = (5, 50), (0.05, 0.2), (25, 400)
    kd = KnnDensity(emb, coords).fit(vemb, vcoords, ks=ks, temperatures=temps, bandwidths_km=bws)
    nll = {(k, t, bw): -KnnDensity(emb, coords, k=k, temperature=t, kappa=(6371.0088 / bw) ** 2)
           .log_density_at(vemb, vcoords).mean() for k in ks for t in temps for bw in bws}
    k, t, bw = min(nll, key=nll.get)
    assert (kd.k, kd.temperature) == (k, t) and kd.kappa == pytest.approx((6371.0088 / bw) ** 2)


def test_learned_baselines_repeat_from_their_seed_and_leave_the_callers_stream_alone():
    emb, coords = clusters(200)
    fits = []
    for _ in range(2):
        torch.manual_seed(1234)
        expected = torch.rand(3)
        torch.manual_seed(1234)
        reg = Regressor(widths=(16,), dropout=0.2, seed=5)
        reg.fit(emb, coords, steps=20, batch_size=32)
        geo = GeocellClassifier(cells=4, widths=(16,), dropout=0.2, seed=5)
        geo.fit(emb, coords, steps=20, batch_size=32)
        assert torch.equal(torch.rand(3), expected)  # as if neither had run
        fits.append((reg.predict(emb[:5]), geo.predict(emb[:5])))
    for a, b in zip(*fits):
        np.testing.assert_array_equal(a, b)


def test_queries_of_any_dtype_or_grad_are_read_and_bad_rows_named():
    emb, coords = clusters(200)
    geo = GeocellClassifier(cells=4, widths=(16,))
    geo.fit(emb, coords, steps=20, batch_size=32)
    reg = Regressor(widths=(16,))
    reg.fit(emb, coords, steps=20, batch_size=32)
    q = emb[:5].copy()
    for model in (geo, reg):
        want = model.predict(q)
        np.testing.assert_array_equal(model.predict(torch.from_numpy(q).requires_grad_()), want)
        assert model.predict(torch.from_numpy(q).bfloat16()).shape == want.shape
        nan = q.copy()
        nan[2, 3] = np.nan
        with pytest.raises(ValueError, match="query embeddings row 2 is NaN or infinite"):
            model.predict(nan)
        with pytest.raises(TypeError, match="query embeddings must be real numbers"):
            model.predict(q.astype(np.complex64))
    gallery = np.eye(3, dtype=np.float32)
    places = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    with pytest.raises(ValueError, match="query embeddings row 1 is a zero vector"):
        knn_predict(gallery, places, np.array([[1.0, 0, 0], [0, 0, 0]], np.float32), k=1)
    zeroed = gallery.copy()  # a zero gallery entry resembles no query, and stops nothing
    zeroed[1] = 0
    np.testing.assert_array_equal(knn_predict(zeroed, places, gallery[2:3], k=1), [[0.0, 10.0]])
    tiny = np.array([[0.0, 1e-30, 0.0]], np.float32)  # its float32 norm underflows: not zero
    np.testing.assert_array_equal(knn_predict(gallery, places, tiny, k=1), [[10.0, 0.0]])
    with pytest.raises(TypeError, match="must be real numbers, got torch.bool"):
        knn_predict(gallery, places, torch.ones(1, 3, dtype=torch.bool), k=1)
    np.testing.assert_array_equal(knn_predict(gallery, places, torch.eye(3)[1:2].requires_grad_(), k=1), [[10.0, 0.0]])
