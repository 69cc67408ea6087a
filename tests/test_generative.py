"""The diffusion is generative: on a synthetic conditional task whose answer is known, the
samplers reproduce the distribution they were trained on, and the density head reports
its modes. A model that regressed the mean would put every sample at one place."""
import numpy as np
import pytest

from locdiff.diffusion import DiffusionConfig
from locdiff.geo import great_circle_km
from locdiff.models import CSUNetConfig
from locdiff.predict import Predictor
from locdiff.run import PredictConfig, RunConfig, TrainConfig
from locdiff.train import train

PARIS = np.array([48.85, 2.35])
SYDNEY = np.array([-33.87, 151.21])


def destination(p, bearing_deg, km, radius=6371.0088):
    lat, lon = np.radians(p)
    b, d = np.radians(bearing_deg), km / radius
    lat2 = np.arcsin(np.sin(lat) * np.cos(d) + np.cos(lat) * np.sin(d) * np.cos(b))
    lon2 = lon + np.arctan2(np.sin(b) * np.sin(d) * np.cos(lat), np.cos(d) - np.sin(lat) * np.sin(lat2))
    return np.degrees([lat2, lon2])


SECOND = destination(PARIS, 120.0, 3000.0)  # 3,000 km from Paris


def bimodal(n=4000, seed=0):
    """Embedding A: Paris (70 %) or SECOND (30 %); embedding B: Sydney."""
    rng = np.random.default_rng(seed)
    is_a = rng.random(n) < 0.5
    emb = np.where(is_a[:, None], np.eye(8)[0], np.eye(8)[1]) + 0.05 * rng.normal(size=(n, 8))
    first = rng.random(n) < 0.7
    coords = np.where(is_a[:, None], np.where(first[:, None], PARIS, SECOND), SYDNEY)
    return emb.astype(np.float32), coords


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    run = tmp_path_factory.mktemp("bimodal") / "run"
    cfg = RunConfig(model=CSUNetConfig(degree=12, widths=(256, 128), cond_dim=64, dropout=0.0, density_head=True),
                    diffusion=DiffusionConfig(prediction="x0", kl_weight=1.0, timesteps=250),
                    train=TrainConfig(steps=1500, batch_size=128, lr=2e-3, warmup_steps=100, val_every=0,
                                      val_size=0, checkpoint_every=0, ema_decay=0.99),
                    predict=PredictConfig())
    train(*bimodal(), run, cfg, progress=False)
    return Predictor.from_run(run)


def _shares(latlon, modes, within_km=300.0):
    dist = np.stack([great_circle_km(latlon, m[None]) for m in modes], 1)
    near = dist.min(1) < within_km
    return near.mean(), [float(((dist.argmin(1) == j) & near).mean()) for j in range(len(modes))]


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10), ("ddim", 50)])
def test_samples_reproduce_the_trained_distribution(predictor, sampler, steps):
    from locdiff import shdd

    emb = np.eye(8, dtype=np.float32)[:2]
    samples = predictor.sample(emb, sampler=sampler, steps=steps or 1, samples=150, seed=1)
    a = shdd.decode(samples[0].double()).numpy()
    near, (paris, second) = _shares(a, [PARIS, SECOND])
    assert near >= 0.95
    assert abs(paris - 0.7) <= 0.1 and abs(second - 0.3) <= 0.1
    b = shdd.decode(samples[1].double()).numpy()
    assert _shares(b, [SYDNEY])[0] >= 0.95


def test_density_reports_the_modes(predictor):
    from locdiff import shdd

    c = predictor.coefficients(np.eye(8, dtype=np.float32)[:2]).double()
    modes, values = shdd.top_k(c, 2)
    top2 = modes[0].numpy()
    d = np.array([[great_circle_km(m, p) for p in (PARIS, SECOND)] for m in top2])
    assert d[0, 0] < 300 and d[1, 1] < 300, d  # Paris first, the 30 % place second
    # One place, one mode: the second-highest local maximum is far below the first.
    assert great_circle_km(modes[1, 0].numpy(), SYDNEY) < 300
    assert values[1, 1] < 0.5 * values[1, 0]


# Unconditional: a model of where locations lie, trained on coordinates alone.
PLACES, SHARES = np.array([PARIS, SECOND, SYDNEY]), np.array([0.5, 0.3, 0.2])


def three_places(n, seed):
    return PLACES[np.random.default_rng(seed).choice(3, n, p=SHARES)]


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    run = tmp_path_factory.mktemp("unconditional") / "run"
    cfg = RunConfig(model=CSUNetConfig(degree=12, widths=(256, 128), cond_dim=64, dropout=0.0, emb_widths=(64,)),
                    diffusion=DiffusionConfig(prediction="x0", kl_weight=1.0, timesteps=250),
                    train=TrainConfig(steps=1000, batch_size=128, lr=2e-3, warmup_steps=100, val_every=500,
                                      checkpoint_every=0, ema_decay=0.99))
    result = train(None, three_places(3000, 0), run, cfg, val=(None, three_places(400, 1)), progress=False)
    return Predictor.from_run(run), result


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 20)])
def test_unconditional_draws_reproduce_the_trained_distribution(unconditional, sampler, steps):
    pred = unconditional[0]
    drawn = pred.draw(None, 400, sampler=sampler, steps=steps, seed=2)
    assert drawn.shape == (1, 400, 2)
    near, shares = _shares(drawn[0], PLACES)
    assert near >= 0.95
    assert np.abs(np.array(shares) - SHARES).max() <= 0.1, shares


def test_unconditional_density_ranks_the_places_by_their_share(unconditional):
    from locdiff import shdd
    from locdiff.evaluate import evaluate

    pred, result = unconditional
    assert not pred.conditional and pred.embedding_dim == 1
    modes, _ = shdd.top_k(pred.coefficients(None).double(), 3)
    d = np.array([[great_circle_km(m, p) for p in PLACES] for m in modes[0].numpy()])
    assert (d.argmin(1) == [0, 1, 2]).all() and d.min(1).max() < 300, d
    # Validation tracked the density (its NLL fell below the uniform density's, log 4 pi),
    # and the best checkpoint is the one with the lowest.
    nll = [h["nll"] for h in result.history]
    assert max(nll) < np.log(4 * np.pi) and result.best["nll"] == min(nll)
    test = three_places(300, 3)
    m = evaluate(pred, None, test)
    assert m["n"] == 300 and m["nll"] < np.log(4 * np.pi) - 2
    assert abs(m["acc_200km"] - np.mean((test == PARIS).all(1))) < 1e-9  # one answer, Paris, for every place


def test_each_kind_of_run_refuses_the_other_kinds_input(predictor, unconditional):
    with pytest.raises(ValueError, match="embeddings are needed: this run was trained on embeddings"):
        predictor.coefficients(None)
    with pytest.raises(ValueError, match="trained without embeddings .* give emb=None"):
        unconditional[0].coefficients(np.full((2, 1), 0.5, np.float32))
    assert unconditional[0].predict(np.ones((2, 1), np.float32))["latlon"].shape == (2, 2)  # the constant rows
    with pytest.raises(ValueError, match="n must be"):
        unconditional[0].draw(None, 0)


def test_train_refuses_embeddings_for_an_unconditional_config(tmp_path):
    from locdiff.data.files import DataError

    cfg = RunConfig(model=CSUNetConfig(degree=4, conditional=False))
    with pytest.raises(DataError, match="model.conditional = False trains a model without them"):
        train(np.zeros((50, 3), np.float32), three_places(50, 0), tmp_path / "r", cfg, progress=False)
    with pytest.raises(DataError, match=r"val: embeddings given, but the training rows have none"):
        train(None, three_places(50, 0), tmp_path / "r", RunConfig(),
              val=(np.zeros((5, 3), np.float32), three_places(5, 1)), progress=False)
    assert not (tmp_path / "r").exists()


def test_draw_checks_every_row_before_drawing_and_empty_places_are_refused(predictor, unconditional, tmp_path):
    from locdiff.data.files import DataError
    from locdiff.evaluate import evaluate

    emb = np.tile(np.eye(8, dtype=np.float32)[:1], (40, 1))
    emb[30, 2] = np.nan
    with pytest.raises(ValueError, match="embeddings row 30 is NaN"):  # the row in the input, not in a batch
        predictor.draw(emb, 20)
    with pytest.raises(MemoryError, match="n=10000000000000 draws"):
        unconditional[0].draw(None, 10 ** 13)
    with pytest.raises(ValueError, match="coords: no places to evaluate"):
        evaluate(unconditional[0], None, np.zeros((0, 2)))
    with pytest.raises(DataError, match="coordinates: no rows to train on"):
        train(None, np.zeros((0, 2)), tmp_path / "r", RunConfig(), progress=False)
    with pytest.raises(DataError, match="val: no coordinates to validate on"):
        train(None, three_places(50, 0), tmp_path / "r", RunConfig(), val=(None, np.zeros((0, 2))), progress=False)
