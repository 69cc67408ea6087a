"""LocDiff-H: the model's density times retrieval over a gallery."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from locdiff import grids, shdd
from locdiff.geo import great_circle_km
from locdiff.hybrid import Hybrid, HybridConfig

PARIS, LYON = np.array([48.8566, 2.3522]), np.array([45.764, 4.8357])


@pytest.mark.parametrize("field,value,fragment", [
    ("neighbours", True, "neighbours must be an int >= 1, got True"),
    ("neighbours", 0, "neighbours must be an int >= 1, got 0"),
    ("neighbours", 2.5, "neighbours must be an int >= 1, got 2.5"),
    ("temperature", "0.05", "temperature must be a positive finite number, got '0.05'"),
    ("temperature", 0.0, "temperature must be a positive finite number, got 0.0"),
    ("bandwidth_km", float("nan"), "bandwidth_km must be a positive finite number, got nan"),
    ("weight", 1.5, "weight must be a number in [0, 1], got 1.5"),
    ("weight", float("nan"), "weight must be a number in [0, 1], got nan"),
    ("weight", None, "weight must be a number in [0, 1], got None"),
    ("snap_km", float("inf"), "snap_km must be a finite number >= 0, got inf"),
])
def test_hybrid_settings_out_of_range_name_the_setting(field, value, fragment):
    with pytest.raises(ValueError) as err:
        HybridConfig(**{field: value})
    assert fragment in str(err.value)


def test_hybrid_settings_take_numpy_numbers_as_plain_ones():
    import json

    cfg = HybridConfig(neighbours=np.int64(4), weight=np.float32(0.5), bandwidth_km=np.int64(25))
    assert type(cfg.neighbours) is int and type(cfg.weight) is float and type(cfg.bandwidth_km) is float
    json.dumps(cfg.to_dict())


def _model(points, degree=16):
    """A model density: the mean SHDD of some points (a smooth bump around them)."""
    return shdd.encode(np.asarray(points, np.float64), degree).mean(0)[None]


def test_snaps_to_a_similar_gallery_place_inside_the_model_region():
    # Model: somewhere around Paris-Lyon (its mode between them). Gallery: Paris with the
    # query's own embedding, Lyon with an unrelated one. The hybrid answers Paris exactly.
    coeffs = _model([PARIS, LYON])
    model_mode = shdd.decode(coeffs)
    g_emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    h = Hybrid(g_emb, np.stack([PARIS, LYON]), HybridConfig(neighbours=2, weight=0.5, temperature=0.05))
    out = h.predict(coeffs, 5.0, np.array([[1.0, 0.05]], np.float32), model_mode)
    np.testing.assert_allclose(out[0], PARIS, atol=1e-9)
    # weight 0: no retrieval, the model's own mode.
    out0 = h.predict(coeffs, 5.0, np.array([[1.0, 0.05]], np.float32), model_mode,
                     HybridConfig(neighbours=2, weight=0.0))
    np.testing.assert_allclose(out0, model_mode)


def test_weight_zero_is_the_model_even_off_its_highest_point():
    # The model's answer need not be q's highest point (LocDiff answers with the mode of the
    # smoothed density): without retrieval LocDiff-H keeps that answer rather than moving
    # to a gallery place where q is higher, and the fit's validation median is the model's.
    coeffs = np.repeat(_model([PARIS]), 3, 0)
    answer = np.repeat((PARIS + [1.5, 1.5])[None], 3, 0)
    h = Hybrid(np.eye(2, dtype=np.float32), np.stack([PARIS, LYON]), HybridConfig(neighbours=2, weight=0.0))
    q_emb = np.array([[1.0, 0.0]] * 3, np.float32)
    np.testing.assert_array_equal(h.predict(coeffs, 1.0, q_emb, answer), answer)
    truth = answer + 0.1
    fit = h.fit(coeffs, 1.0, q_emb, answer, truth, weights=(0.05,))
    assert fit["weight"] == 0.0
    assert fit["val_median_km"] == pytest.approx(np.median(great_circle_km(answer, truth)))


def test_top_k_starts_with_the_answer_and_ranks_places_by_the_hybrid_density():
    # Model: lobes at Paris (higher) and Sydney; the gallery's most similar entries are Lyon
    # and Sydney. The answer (Paris, snapped to nothing) first, then Sydney; Lyon lies too
    # close to Paris to count as another answer.
    sydney = np.array([-33.87, 151.21])
    coeffs = (np.array([[0.7], [0.3]]) * shdd.encode(np.stack([PARIS, sydney]), 16)).sum(0)[None]
    mode = shdd.decode(coeffs)
    modes, _ = shdd.top_k(coeffs, 3)
    h = Hybrid(np.eye(3, dtype=np.float32), np.stack([LYON, sydney, [0.0, 0.0]]),
               HybridConfig(neighbours=3, weight=0.5, temperature=0.5, bandwidth_km=75.0))
    emb = np.array([[1.0, 1.0, 0.0]], np.float32)
    top = h.top_k(coeffs, 5.0, emb, mode, np.asarray(modes), k=3, min_separation_km=1000.0)
    np.testing.assert_allclose(top[0, 0], h.predict(coeffs, 5.0, emb, mode)[0])
    assert great_circle_km(top[0, 1], sydney) < 1
    assert np.isnan(top[0, 2]).all() or great_circle_km(top[0, 2], top[0, 1]) >= 1000
    assert h.top_k(coeffs[:0], 5.0, emb[:0], mode[:0], np.asarray(modes)[:0], k=2).shape == (0, 2, 2)
    with pytest.raises(ValueError, match=r"modes must have shape \(1, m, 2\), one row per query, got \(2, 3, 2\)"):
        h.top_k(coeffs, 5.0, emb, mode, np.repeat(np.asarray(modes), 2, 0), k=2)


def test_does_not_snap_to_a_gallery_place_the_model_rules_out():
    coeffs = _model([PARIS])
    model_mode = shdd.decode(coeffs)
    sydney = np.array([[-33.87, 151.21]])
    h = Hybrid(np.ones((1, 2), np.float32), sydney, HybridConfig(neighbours=1, weight=0.5))
    out = h.predict(coeffs, 1.0, np.ones((1, 2), np.float32), model_mode)
    assert great_circle_km(out[0], PARIS) < 50


def test_hybrid_density_is_normalised():
    # log p_H on a fine grid integrates to 1 (the closed-form normaliser is right).
    coeffs = _model([PARIS, LYON], degree=16)
    g_emb = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    g_ll = np.random.default_rng(1).uniform([40, -5], [55, 15], (40, 2))
    cfg = HybridConfig(neighbours=4, weight=0.6, bandwidth_km=300.0, temperature=0.5)
    h = Hybrid(g_emb, g_ll, cfg)
    grid = grids.fibonacci(40_000)
    q = np.repeat(g_emb[:1], grid.size, 0)
    logp = h.log_density_at(np.repeat(coeffs, grid.size, 0), 3.0, q, grid.latlon.numpy())
    total = float(np.sum(np.exp(logp) * grid.area.numpy()))
    assert total == pytest.approx(1.0, abs=0.02)


def test_fit_picks_settings_on_validation():
    coeffs = np.repeat(_model([PARIS, LYON]), 4, 0)
    model_mode = shdd.decode(coeffs)
    g_emb = np.eye(4, dtype=np.float32)
    h = Hybrid(g_emb, np.stack([PARIS, LYON, PARIS + 0.1, LYON + 0.1]), HybridConfig(neighbours=2))
    fit = h.fit(coeffs, 5.0, g_emb, model_mode, np.stack([PARIS, LYON, PARIS + 0.1, LYON + 0.1]))
    assert fit["val_median_km"] < 1.0 and h.config.weight > 0
    with pytest.raises(ValueError, match="objective"):
        h.fit(coeffs, 5.0, g_emb, model_mode, model_mode, objective="mean")


def test_config_errors():
    with pytest.raises(ValueError, match="weight"):
        HybridConfig(weight=1.5)
    with pytest.raises(ValueError, match="bandwidth_km"):
        HybridConfig(bandwidth_km=0.0)


def test_grid_probabilities_sum_to_one_and_favour_the_gallery():
    coeffs = _model([PARIS, LYON])
    g_emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    h = Hybrid(g_emb, np.stack([PARIS, LYON]), HybridConfig(neighbours=2, weight=0.5, temperature=0.05))
    grid = grids.for_degree(32, oversample=2)
    p = h.grid_probabilities(coeffs, 5.0, np.array([[1.0, 0.05]], np.float32), grid)
    assert p.shape == (1, grid.size) and abs(p.sum() - 1) < 1e-9
    paris_cell = int(np.argmax(grid.xyz.numpy() @ np.array(latlon_to_xyz_np(PARIS))))
    assert p[0].argmax() == paris_cell


def latlon_to_xyz_np(ll):
    from locdiff.geo import latlon_to_xyz

    return latlon_to_xyz(np.asarray(ll, np.float64))


def test_answer_moves_to_the_most_similar_entry_of_a_cluster():
    # Three gallery entries within a few km of each other around Paris; the query matches
    # the farthest one from the cluster's centre best. The product picks the cluster, the
    # snap picks that entry; with snap_km=0 the answer stays on the product's choice.
    cluster = PARIS + np.array([[0.0, 0.0], [0.01, 0.01], [0.05, -0.04]])
    g_emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.99, 0.01]], np.float32)
    g_emb /= np.linalg.norm(g_emb, axis=1, keepdims=True)
    coeffs = _model([PARIS])
    model_mode = shdd.decode(coeffs)
    query = np.array([[0.99, 0.01]], np.float32)
    cfg = HybridConfig(neighbours=3, weight=0.5, temperature=1.0, bandwidth_km=25.0, snap_km=10.0)
    h = Hybrid(g_emb, cluster, cfg)
    np.testing.assert_allclose(h.predict(coeffs, 5.0, query, model_mode)[0], cluster[2], atol=1e-9)
    plain = h.predict(coeffs, 5.0, query, model_mode, replace(cfg, snap_km=0.0))[0]
    assert great_circle_km(plain, cluster[2]) > 1.0
    with pytest.raises(ValueError, match="snap_km"):
        HybridConfig(snap_km=-1.0)


def test_fit_leaves_retrieval_off_where_it_does_not_beat_the_model():
    # The gallery's embeddings say nothing about location: whatever the NLL fit finds, the
    # median guard turns retrieval off and LocDiff-H is the model.
    rng = np.random.default_rng(0)
    truth = rng.uniform([40, -5], [55, 15], (60, 2))
    coeffs = np.repeat(_model([PARIS, LYON]), 60, 0)
    model_mode = shdd.decode(coeffs)
    h = Hybrid(rng.normal(size=(200, 8)).astype(np.float32), rng.uniform([-60, -180], [60, 180], (200, 2)),
               HybridConfig(neighbours=8))
    fit = h.fit(coeffs, 5.0, rng.normal(size=(60, 8)).astype(np.float32), model_mode, truth)
    assert fit["weight"] == 0.0 and h.config.weight == 0.0


def test_fit_leaves_retrieval_off_where_its_gain_rests_on_one_region():
    # Half the validation places form one region whose places are in the gallery, so
    # retrieval answers them exactly; the other half, 20 regions of 2, have embeddings
    # unrelated to the gallery. The median gain is large, but resampling regions leaves that
    # one region out about a third of the time: with the regions given, retrieval stays off.
    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    g_emb, g_ll = unit(rng.normal(size=(40, 16))), rng.uniform([44, 0], [50, 6], (40, 2))
    emb = np.concatenate([g_emb, unit(rng.normal(size=(40, 16)))])
    truth = np.concatenate([g_ll, rng.uniform([44, 0], [50, 6], (40, 2))])
    groups = np.concatenate([np.zeros(40, int), 1 + np.arange(40) // 2])
    coeffs = np.repeat(_model([PARIS, LYON]), 80, 0)
    model_mode = shdd.decode(coeffs)
    by_place = Hybrid(g_emb, g_ll, HybridConfig(neighbours=8)).fit(coeffs, 5.0, emb, model_mode, truth)
    assert by_place["weight"] > 0 and by_place["val_median_km"] < 0.7 * np.median(great_circle_km(model_mode, truth))
    by_region = Hybrid(g_emb, g_ll, HybridConfig(neighbours=8)).fit(coeffs, 5.0, emb, model_mode, truth,
                                                                    groups=groups)
    assert by_region["weight"] == 0.0
    with pytest.raises(ValueError, match="groups"):
        Hybrid(g_emb, g_ll).fit(coeffs, 5.0, emb, model_mode, truth, groups=groups[:10])


def test_inputs_that_disagree_are_named():
    coeffs = _model([PARIS, LYON])
    mode = shdd.decode(coeffs)
    g_emb, g_co = np.eye(2, dtype=np.float32), np.stack([PARIS, LYON])
    with pytest.raises(ValueError, match=r"gallery coordinates must have shape \(2, 2\)"):
        Hybrid(g_emb, g_co[:1])
    with pytest.raises(ValueError, match=r"gallery coordinates must have shape \(1, 2\)"):
        Hybrid(g_emb[:1], g_co)
    h = Hybrid(g_emb, g_co, HybridConfig(neighbours=2))
    q = np.array([[1.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match=r"query embeddings must have shape \(N, 2\)"):
        h.predict(coeffs, 5.0, np.ones((1, 3), np.float32), mode)
    with pytest.raises(ValueError, match="one row per query"):
        h.predict(coeffs, 5.0, np.ones((2, 2), np.float32), np.repeat(mode, 2, 0))
    with pytest.raises(ValueError, match=r"model_latlon must have shape \(1, 2\)"):
        h.predict(coeffs, 5.0, q, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="query embeddings row 0 is NaN"):
        h.predict(coeffs, 5.0, np.full((1, 2), np.nan, np.float32), mode)


def _log_vmf_integral(degree, t, point, mu, bandwidth_km):
    """Reference: log of the integral of vMF(x; mu) exp(f(x) / t) for the exact SHDD at
    ``point``, in coordinates about the point (f is a Legendre sum of the angle to it)."""
    from numpy.polynomial.legendre import leggauss
    from scipy.special import eval_legendre

    from locdiff.geo import EARTH_RADIUS_KM, latlon_to_xyz
    edges = np.concatenate([np.linspace(0, 0.2, 401), np.linspace(0.2, np.pi, 200)[1:]])
    x, w = leggauss(8)
    th = ((edges[:-1] + edges[1:])[:, None] / 2 + np.diff(edges)[:, None] / 2 * x).ravel()
    thw = (np.diff(edges)[:, None] / 2 * w).ravel()
    f = sum((2 * l + 1) / (4 * np.pi) * eval_legendre(l, np.cos(th)) for l in range(degree + 1))
    phi = np.arange(2048) * 2 * np.pi / 2048
    p, m = latlon_to_xyz(np.asarray(point, np.float64)), latlon_to_xyz(np.asarray(mu, np.float64))
    e1 = np.cross(p, [0.0, 0.0, 1.0] if abs(p[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(p, e1)
    cos_to_mu = np.cos(th)[:, None] * (p @ m) + np.sin(th)[:, None] * (np.cos(phi) * (e1 @ m) + np.sin(phi) * (e2 @ m))
    kappa = (EARTH_RADIUS_KM / bandwidth_km) ** 2
    log_vmf = kappa * (cos_to_mu - 1) + np.log(kappa / (2 * np.pi * -np.expm1(-2 * kappa)))
    peak = f.max() / t
    inner = np.exp(f[:, None] / t - peak + log_vmf).sum(1) * (2 * np.pi / 2048)
    return float(np.log((inner * np.sin(th) * thw).sum()) + peak)


@pytest.mark.parametrize("degree, sharpness, bandwidth_km", [(32, 200, 75.0), (64, 50, 25.0), (128, 50, 75.0)])
@pytest.mark.parametrize("point", [(20.0, 30.0), (89.5, 30.0), (10.0, 179.9)])
def test_normaliser_holds_where_the_model_is_sharper_than_the_vmf(degree, sharpness, bandwidth_km, point):
    # With one neighbour and weight 1, p_H = q vMF / E[q], so log p_H - log q - log vMF is
    # -log E[q]; E[q] is checked against a 2-D quadrature about the SHDD's point, with the
    # neighbour on the point and 1 and 2.5 bandwidths away (across the antimeridian and
    # near the pole too). A vMF much wider than q's lobe is where a 5 x 5 Gauss-Hermite rule
    # missed the lobe (0.3-2 nats off here).
    from locdiff.baselines.knn import log_vmf_mixture
    from locdiff.geo import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon
    t = shdd.exact_peak(degree) / sharpness
    coeffs = shdd.encode(np.asarray(point, np.float64), degree)[None]
    p = latlon_to_xyz(np.asarray(point, np.float64))
    east = np.cross([0.0, 0.0, 1.0], p)
    east /= np.linalg.norm(east)
    cfg = HybridConfig(neighbours=1, weight=1.0, bandwidth_km=bandwidth_km)
    for steps in (0.0, 1.0, 2.5):
        ang = steps * bandwidth_km / EARTH_RADIUS_KM
        mu = xyz_to_latlon(np.cos(ang) * p + np.sin(ang) * east)
        h = Hybrid(np.ones((1, 2), np.float32), mu[None], cfg)
        at = np.asarray(point, np.float64)[None]
        log_ph = h.log_density_at(coeffs, t, np.ones((1, 2), np.float32), at)[0]
        log_q = float(shdd.log_density_at(coeffs, at, temperature=t)[0])
        log_v = float(log_vmf_mixture(torch.as_tensor(latlon_to_xyz(at))[None], torch.as_tensor(latlon_to_xyz(mu))[None, None],
                                      torch.zeros(1, 1, dtype=torch.float64), cfg.kappa)[0, 0])
        log_e = log_q + log_v - log_ph                      # log E[q], q normalised by the library
        log_z = float(shdd.log_normalizer(coeffs, temperature=t)[0])
        reference = _log_vmf_integral(degree, t, point, mu, bandwidth_km) - log_z
        assert log_e == pytest.approx(reference, abs=0.005), (steps, log_e, reference)


def test_the_snap_stays_among_the_entries_near_the_answer():
    # The most similar entry overall (Sydney) is far from the answer (Paris): the snap takes
    # the best entry within snap_km of the answer, never one elsewhere.
    paris, sydney = np.array([48.8566, 2.3522]), np.array([-33.87, 151.21])
    coeffs = shdd.encode(paris[None], 16)
    g_emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2]], np.float32)
    h = Hybrid(g_emb, np.stack([sydney, paris, paris + [0.02, 0.02]]),
               HybridConfig(neighbours=3, weight=0.5, temperature=0.05))
    out = h.predict(coeffs, 1.0, np.array([[1.0, 0.0]], np.float32), shdd.decode(coeffs))
    np.testing.assert_allclose(out[0], paris, atol=1e-6)


def test_predict_and_top_k_show_bars_on_request_with_the_same_answers(capsys):
    coeffs = np.repeat(_model([PARIS, LYON]), 300, 0)  # two batches of the gallery pass
    mode = np.repeat(shdd.decode(coeffs[:1]), 300, 0)
    modes = np.repeat(np.asarray(shdd.top_k(coeffs[:1], 2)[0]), 300, 0)
    emb = np.tile(np.array([[1.0, 0.05]], np.float32), (300, 1))
    h = Hybrid(np.eye(2, dtype=np.float32), np.stack([PARIS, LYON]), HybridConfig(neighbours=2, weight=0.5))
    quiet = h.top_k(coeffs, 5.0, emb, mode, modes, k=2)
    assert capsys.readouterr().err == ""
    shown = h.top_k(coeffs, 5.0, emb, mode, modes, k=2, progress=True)
    err = capsys.readouterr().err
    assert "LocDiff-H answers" in err and "LocDiff-H top-k" in err and "2/2" in err
    np.testing.assert_array_equal(shown, quiet)


def test_inputs_of_any_dtype_or_grad_give_the_float64_answers_and_bad_rows_are_named_in_the_whole():
    coeffs = np.repeat(_model([PARIS, LYON]), 300, 0)
    mode = np.repeat(shdd.decode(coeffs[:1]), 300, 0)
    emb = np.tile(np.array([[1.0, 0.05]], np.float32), (300, 1))
    h = Hybrid(np.eye(2, dtype=np.float32), np.stack([PARIS, LYON]), HybridConfig(neighbours=2, weight=0.5))
    want = h.predict(coeffs, 5.0, emb, mode)
    c_grad = torch.from_numpy(coeffs).requires_grad_()
    np.testing.assert_array_equal(h.predict(c_grad, 5.0, torch.from_numpy(emb).requires_grad_(), mode), want)
    np.testing.assert_allclose(h.predict(torch.from_numpy(coeffs).float(), 5.0, torch.from_numpy(emb).bfloat16(),
                                         mode), want, atol=1e-4)
    bad = coeffs.copy()
    bad[290, 5] = np.nan  # in the second chunk of 256 rows
    with pytest.raises(ValueError, match="coeffs must be finite, got nan at row 290, index 5"):
        h.predict(bad, 5.0, emb, mode)
    with pytest.raises(TypeError, match="query embeddings must be real numbers"):
        h.predict(coeffs, 5.0, emb.astype(np.complex64), mode)


def test_a_single_query_row_must_keep_its_batch_dimension():
    h = Hybrid(np.eye(2, dtype=np.float32), np.stack([PARIS, LYON]))
    coeffs = _model([PARIS])
    with pytest.raises(ValueError, match=r"emb must have shape \(B, D\), one row per query, got \(2,\)"):
        h.predict(coeffs, 5.0, np.array([1.0, 0.0], np.float32), shdd.decode(coeffs))
