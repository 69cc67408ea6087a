"""Top-k answers of the baselines and the best-of-k metrics: k different places, ranked as
each method ranks them, and a best-of-k that rewards covering the places one text can mean."""
import numpy as np
import pytest
import torch

from locdiff.baselines import GeocellClassifier, KnnDensity, knn_predict, knn_top_k
from locdiff.top_answers import separated_top_k
from locdiff.geo import great_circle_km, latlon_to_xyz
from locdiff.metrics import best_of_k_metrics, distance_metrics

# One embedding means two places 3,000+ km apart (70 % / 30 %), another means one place.
TWO = np.array([[40.0, -90.0], [51.5, -0.1]])
ONE = np.array([-33.9, 151.2])


def ambiguous(n=900, seed=0):
    rng = np.random.default_rng(seed)
    which = rng.random(n)
    single = which < 0.3
    far = (which >= 0.3) & (which < 0.51)
    coords = np.where(single[:, None], ONE, np.where(far[:, None], TWO[1], TWO[0])) + rng.normal(0, 0.3, (n, 2))
    emb = np.concatenate([np.stack([single, ~single], 1), 0.2 * rng.normal(size=(n, 6))], 1).astype(np.float32)
    return emb, coords


def test_separated_top_k_keeps_the_best_places_apart():
    rng = np.random.default_rng(0)
    ll = np.stack([rng.uniform(-89, 89, (50, 40)), rng.uniform(-180, 180, (50, 40))], -1)
    scores = torch.as_tensor(rng.normal(size=(50, 40)))
    scores[:, 7] = -np.inf
    out = separated_top_k(torch.as_tensor(latlon_to_xyz(ll)), scores, 6, 2000.0)
    for row, lrow, srow in zip(out, ll, scores.numpy()):
        found = row[np.isfinite(row).all(1)]
        assert len(found) >= 1 and np.isfinite(row[:len(found)]).all()  # NaN only at the end
        d = np.asarray(great_circle_km(found[:, None], found[None]))
        assert (d[~np.eye(len(found), dtype=bool)] >= 2000).all()
        # Greedy by score: every candidate better than the last kept is kept or too close.
        idx = [int(np.argmin(np.asarray(great_circle_km(lrow, f)))) for f in found]
        assert 7 not in idx and list(srow[idx]) == sorted(srow[idx], reverse=True)
        for j in np.flatnonzero(srow > srow[idx[-1]]):
            if j not in idx:
                assert np.asarray(great_circle_km(lrow[j], found)).min() < 2000
        if len(found) < 6:  # fewer only when every other candidate is too close
            assert all(np.asarray(great_circle_km(lrow[j], found)).min() < 2000
                       for j in range(40) if j != 7)
    # A separation of zero keeps the k best in order; bad arguments name themselves.
    best = separated_top_k(torch.as_tensor(latlon_to_xyz(ll)), scores, 3, 0.0)
    top = np.argsort(-scores.numpy(), 1)[:, :3]
    np.testing.assert_allclose(best, np.take_along_axis(ll, top[..., None], 1), atol=1e-9)
    with pytest.raises(ValueError, match="k must be"):
        separated_top_k(torch.zeros(1, 2, 3), torch.zeros(1, 2), 0, 10.0)
    with pytest.raises(ValueError, match="min_separation_km"):
        separated_top_k(torch.zeros(1, 2, 3), torch.zeros(1, 2), 1, -1.0)


def test_missing_candidates_stay_missing():
    # Fewer real candidates than k: -inf and NaN scores are no candidates, the slots stay
    # NaN (not the point the padding's coordinates happen to decode to), and +inf comes first.
    from locdiff.answers import answer_first_modes

    ll = np.array([[[10.0, 20.0], [-40.0, 100.0], [0.0, 0.0], [0.0, 0.0], [60.0, -30.0]]])
    scores = torch.tensor([[1.0, 2.0, -np.inf, np.nan, np.inf]])
    out = separated_top_k(torch.as_tensor(latlon_to_xyz(ll)), scores, 5, 1000.0)
    np.testing.assert_allclose(out[0, :3], ll[0, [4, 1, 0]], atol=1e-9)
    assert np.isnan(out[0, 3:]).all()
    modes = np.array([[[10.0, 20.0], [np.nan, np.nan], [np.nan, np.nan]]])
    out = answer_first_modes([[10.2, 20.0]], modes, 1000.0)
    np.testing.assert_allclose(out[0, 0], [10.2, 20.0], atol=1e-9)
    assert np.isnan(out[0, 1:]).all()


def test_baselines_top_k_cover_the_places_an_embedding_means():
    emb, coords = ambiguous()
    q = np.eye(8, dtype=np.float32)[[1, 0]]
    near = lambda ans, pts: np.asarray(great_circle_km(ans[:, None], pts[None])).min(1)  # noqa: E731
    # Nearest places: the most similar first (1-NN's answer), then places 1,000 km away.
    fresh = ambiguous(20, seed=5)[0]
    top = knn_top_k(emb, coords, fresh, k=3, min_separation_km=1000.0)
    np.testing.assert_allclose(top[:, 0], knn_predict(emb, coords, fresh, k=1), atol=1e-9)
    d = np.asarray(great_circle_km(top[:, 0], top[:, 1]))
    amb = fresh[:, 1] > 0.5
    assert (d[amb] > 5000).all() and np.isnan(top[~amb, 1]).all()  # the other place, or none
    # The k-NN density's peaks: for the ambiguous text both places, the likelier first;
    # for the other one place, and NaN for the peaks it does not have.
    kd = KnnDensity(emb, coords, k=200, temperature=1.0, kappa=3000.0)
    peaks = kd.top_k(q, k=3, min_separation_km=1000.0)
    assert (near(peaks[0, :2], TWO) < 150).all() and near(peaks[0, :1], TWO[:1])[0] < 150
    assert near(peaks[1, :1], ONE[None])[0] < 150 and np.isnan(peaks[1, 1:]).all()
    # Geocells: the argmax cell first, the other place's cell second.
    geo = GeocellClassifier(cells=6, widths=(32,), dropout=0.0, smoothing_km=100.0)
    geo.fit(emb, coords, steps=300, batch_size=128, lr=3e-3)
    cells = geo.top_k(q, k=2, min_separation_km=1000.0)
    np.testing.assert_allclose(cells[:, 0], geo.predict(q), atol=1e-9)
    assert (near(cells[0], TWO) < 300).all()


def test_best_of_k_rewards_covering_both_places():
    emb, coords = ambiguous(600, seed=1)
    amb = emb[:, 1] > 0.5
    truth = coords[amb]
    # Always answering the likelier place, then the other: best of 1 is right 70 % of the
    # time, best of 2 always; an answer between them is never right at 750 km.
    both = np.broadcast_to(np.array([TWO[0], TWO[1], [np.nan, np.nan]]), (len(truth), 3, 2))
    m = best_of_k_metrics(both, truth, ks=(1, 2, 3))
    assert 0.6 < m["top1_acc_200km"] < 0.8 and m["top2_acc_200km"] == 1.0 == m["top3_acc_200km"]
    assert m["top1_median_km"] == pytest.approx(distance_metrics(both[:, 0], truth)["median_km"])
    assert m["top2_median_km"] < 100
    middle = best_of_k_metrics(np.broadcast_to(np.array([[47.0, -45.0]] * 3), (len(truth), 3, 2)), truth, ks=(3,))
    assert middle["top3_acc_750km"] == 0.0
    with pytest.raises(ValueError, match="first answer"):
        best_of_k_metrics(np.full((2, 3, 2), np.nan), truth[:2])
    with pytest.raises(ValueError, match="ks must"):
        best_of_k_metrics(both, truth, ks=(4,))
    with pytest.raises(ValueError, match="candidates must be"):
        best_of_k_metrics(both[:, 0], truth)
