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
