"""Training end to end on tiny synthetic data: it learns, checkpoints round-trip, and a
killed run resumes to exactly the weights of an uninterrupted one."""
import json

import numpy as np
import pytest
import torch

from locdiff.data import DataError
from locdiff.diffusion import DiffusionConfig
from locdiff.metrics import distance_metrics
from locdiff.models import CSUNetConfig
from locdiff.predict import Predictor
from locdiff.run import (CHECKPOINT_FILE, CONFIG_FILE, PredictConfig, RunConfig, TrainConfig, load_checkpoint,
                         load_model)
from locdiff.train import lr_factor, train

CENTRES = np.array([[48.8, 2.3], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7]])


def synthetic(n=512, seed=0, spread_deg=0.5):
    """Four clusters of places; the embedding says which cluster (plus distractor noise)."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 4, n)
    coords = CENTRES[lab] + rng.normal(0, spread_deg, (n, 2))
    emb = np.concatenate([np.eye(4)[lab] + 0.1 * rng.normal(size=(n, 4)), rng.normal(size=(n, 4))], 1)
    return emb.astype(np.float32), coords


def tiny_config(steps=150, **train_kw):
    tc = dict(steps=steps, batch_size=64, lr=3e-3, warmup_steps=10, val_every=0, val_size=0,
              checkpoint_every=0, ema_decay=0.9)
    tc.update(train_kw)
    return RunConfig(model=CSUNetConfig(degree=6, widths=(64, 32), cond_dim=32, dropout=0.0, emb_widths=(64,),
                                        emb_dropout=0.0, density_head=True),
                     diffusion=DiffusionConfig(timesteps=100, kl_weight=1.0),
                     train=TrainConfig(**tc), predict=PredictConfig())


def test_lr_schedule():
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, cfg) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, cfg) == pytest.approx(0.1)


def test_training_learns_where_and_how_sure(tmp_path):
    # Beyond the point (which any regression gets on separable clusters), the run reports a
    # density: the truth's log-density is far above uniform's -2.53 and the tightest 50 %
    # region holds the truth about half the time (calibrated on held-out data). Clusters of
    # 6 degrees, so that degree 12 resolves them.
    from locdiff import shdd

    emb, coords = synthetic(1024, spread_deg=6.0)
    val = synthetic(256, seed=2, spread_deg=6.0)
    cfg = tiny_config(steps=300)
    cfg.model.degree = 12
    res = train(emb, coords, tmp_path / "run", cfg, val=val, progress=False)
    assert res.steps == 300 and res.samples_per_s > 0
    pred = Predictor.from_run(tmp_path / "run")
    test_emb, test_coords = synthetic(512, seed=1, spread_deg=6.0)
    out = pred.predict(test_emb)
    # As good as knowing the cluster: the cluster centre's median error, within 25 %.
    lab = np.argmax(test_emb[:, :4], 1)
    oracle = distance_metrics(CENTRES[lab], test_coords)["median_km"]
    assert distance_metrics(out["latlon"], test_coords)["median_km"] < 1.25 * oracle
    logd = shdd.log_density_at(out["coeffs"], test_coords, temperature=pred.config.predict.temperature)
    assert np.mean(logd) > -2.53 + 2.5
    # Density at the truth against the density's median over the grid cells holding half
    # the probability: the truth lies inside the 50 % region 30-70 % of the time.
    from locdiff import grids

    g = grids.for_degree(12, oversample=4)
    p = shdd.density(out["coeffs"], g, pred.config.predict.temperature)
    dens = p / g.area.numpy()
    order = np.argsort(-dens, 1)
    cum = np.take_along_axis(p, order, 1).cumsum(1)
    cut = np.take_along_axis(dens, order, 1)[np.arange(len(p)), (cum < 0.5).sum(1)]
    inside = np.exp(np.asarray(logd)) >= cut
    assert 0.3 <= inside.mean() <= 0.7, inside.mean()


def test_checkpoint_round_trip(tmp_path):
    emb, coords = synthetic(200)
    train(emb, coords, tmp_path / "run", tiny_config(steps=5), progress=False)
    cfg = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert cfg["model"]["degree"] == 6 and cfg["embedding_dim"] == 8
    tensors, meta = load_checkpoint(tmp_path / "run")
    assert json.loads(meta["state"])["step"] == 5
    assert any(k.startswith("optim.") for k in tensors) and any(k.startswith("ema.") for k in tensors)
    net, config, _ = load_model(tmp_path / "run", ema=False)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, tensors["model." + k])
    assert config.model.widths == (64, 32)
    # An existing run is not overwritten without resume.
    with pytest.raises(DataError, match="--resume"):
        train(emb, coords, tmp_path / "run", tiny_config(steps=5), progress=False)


def test_a_checkpoint_holds_its_noise_schedule(tmp_path):
    # The network learned each timestep's noise level: a config edited to another schedule,
    # or a checkpoint from before the record with other than 1,000 steps, is refused.
    from safetensors.torch import save as st_save

    from locdiff.run import SCHEDULE_KEY, tensors_digest

    emb, coords = synthetic(200)
    run = tmp_path / "run"
    train(emb, coords, run, tiny_config(steps=2), progress=False)
    tensors, meta = load_checkpoint(run)
    torch.testing.assert_close(tensors[SCHEDULE_KEY], DiffusionConfig(timesteps=100).make_schedule().alphas_cumprod)
    raw = json.loads((run / CONFIG_FILE).read_text())

    def set_timesteps(n):
        raw["diffusion"]["timesteps"] = n
        (run / CONFIG_FILE).write_text(json.dumps(raw))
    set_timesteps(200)
    with pytest.raises(DataError, match="trained under another noise schedule \\(100 steps\\) than config.json's "
                                        "diffusion.schedule = 'cosine', timesteps = 200 gives"):
        load_model(run)
    set_timesteps(100)
    old = {k: v for k, v in tensors.items() if k != SCHEDULE_KEY}
    (run / CHECKPOINT_FILE).write_bytes(st_save(old, metadata={**meta, "sha256": tensors_digest(old)}))
    with pytest.raises(DataError, match="trained under the 100-step cosine schedule of an earlier locdiff"):
        load_model(run)
    set_timesteps(1000)  # 1000-step schedules are the same as before the record
    load_model(run)


def test_a_resume_keeps_its_data_and_says_how_the_run_was_made(tmp_path):
    # The held-out rows and the data order follow from the data: a resume on reordered,
    # edited or fewer rows would validate on rows it had trained on.
    emb, coords = synthetic(300)
    run = tmp_path / "run"
    train(emb, coords, run, tiny_config(steps=4, val_size=50, val_every=2, warmup_steps=1), progress=False)
    for e, c, what in ((emb[::-1].copy(), coords[::-1].copy(), "as many rows, with other values or in another order"),
                       (emb, coords + [1.0, 0.0], "as many rows, with other values"),
                       (emb[:250], coords[:250], "300 rows then, 250 now")):
        with pytest.raises(DataError, match=f"--resume on other training data than the run's \\({what}"):
            train(e, c, run, tiny_config(steps=8, val_size=50, val_every=2, warmup_steps=1), resume=True,
                  progress=False)
    notes = []
    train(emb, coords, run, tiny_config(steps=8, val_size=50, val_every=2, warmup_steps=1), resume=True,
          progress=False, log=notes.append)
    assert any("train.steps 4 -> 8: the learning-rate schedule now spans 8 steps, and at step 4 the rate goes "
               "from" in n for n in notes), notes
    raw = json.loads((run / CONFIG_FILE).read_text())
    assert raw["resumes"] == [{"step": 4, "steps": 8, "processes": 1}]
    assert raw["software"]["torch"] == torch.__version__ and raw["software"]["device"] == "cpu"
    assert raw["training_data"]["rows"] == 300
    # train.toml holds the prediction settings the run started with, not the calibrated ones,
    # so that a run from it validates as this one did.
    toml = (run / "train.toml").read_text()
    assert raw["predict"]["temperature"] != 1.0 and "temperature = 1.0" in toml


def test_damaged_checkpoint_metadata_is_named_on_resume(tmp_path):
    # The SHA-256 covers the tensors only: edited metadata raised KeyError or ValueError.
    from safetensors.torch import save as st_save

    emb, coords = synthetic(200)
    run = tmp_path / "run"
    train(emb, coords, run, tiny_config(steps=2), progress=False)
    tensors, meta = load_checkpoint(run)
    for damage in ({"ema_updates": "many"}, {"state": "[1, 2]"}, {"state": '{"step": "x"}'}):
        (run / CHECKPOINT_FILE).write_bytes(st_save(tensors, metadata={**meta, **damage}))
        with pytest.raises(DataError, match="the checkpoint's metadata is damaged"):
            train(emb, coords, run, tiny_config(steps=4), resume=True, progress=False)


class CrashingRows:
    """Embeddings that raise on the n-th batch read, like a process killed mid-run."""

    def __init__(self, arr, crash_at):
        self.arr, self.reads, self.crash_at = arr, 0, crash_at
        self.shape = arr.shape

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, idx):
        self.reads += 1
        if self.reads == self.crash_at:
            raise KeyboardInterrupt("killed")
        return self.arr[idx]


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    emb, coords = synthetic(200)
    cfg = tiny_config(steps=20, checkpoint_every=5)
    train(emb, coords, tmp_path / "full", cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(CrashingRows(emb, crash_at=14), coords, tmp_path / "cut", tiny_config(steps=20, checkpoint_every=5),
              progress=False)
    _, meta = load_checkpoint(tmp_path / "cut")
    assert json.loads(meta["state"])["step"] == 10  # the last checkpoint before the kill
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")]
    train(emb, coords, tmp_path / "cut", tiny_config(steps=20, checkpoint_every=5), resume=True, progress=False)
    full, _ = load_checkpoint(tmp_path / "full")
    cut, meta = load_checkpoint(tmp_path / "cut")
    assert json.loads(meta["state"])["step"] == 20
    assert full.keys() == cut.keys()
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=0, msg=k)


def test_max_minutes_stops_and_saves(tmp_path):
    emb, coords = synthetic(200)
    res = train(emb, coords, tmp_path / "run", tiny_config(steps=10_000, max_minutes=1e-3), progress=False)
    assert 0 < res.steps < 10_000
    assert (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_validation_median_falls_as_training_proceeds(tmp_path):
    # A learnable task: four clusters, the embedding names the cluster. Validation errors
    # fall steadily, from hundreds of km after five steps towards the clusters' spread (a
    # model that does not learn stays flat: ratios near 1).
    emb, coords = synthetic(800)
    val = synthetic(200, seed=5)
    res = train(emb, coords, tmp_path / "run", tiny_config(steps=60, val_every=5), val=val, progress=False)
    medians = [h["median_km"] for h in res.history]
    assert [h["step"] for h in res.history] == list(range(5, 61, 5))
    assert medians[0] > 250 and medians[-1] < 200 and medians[-1] < 0.7 * medians[0], medians
    assert np.mean(medians[-4:]) < 0.75 * np.mean(medians[:4]), medians
    cfg = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    # Calibration wrote the density temperature and the point rule it chose.
    assert cfg["predict"]["temperature"] > 0 and cfg["predict"]["mode_of"] in ("density", "function")
    # and the masses of the credible regions that held 50 % and 90 % of the validation
    # places, which the answers use (tests/test_coverage.py: they hold that share of new places).
    from locdiff.answers import LEVELS
    from locdiff.coverage import level_for
    from locdiff.geolocator import Geolocator

    record = cfg["predict"]["credible"]["locdiff"]
    assert record["places"] == 200
    geo = Geolocator.from_run(tmp_path / "run")
    emb = synthetic(40, seed=9)[0]
    assert geo.predict(emb, geocode=False, progress=False).masses == tuple(level_for(record, q) for q in LEVELS)
    # Other settings than calibration saw: the nominal masses; settings the sampler ignores
    # change nothing.
    assert geo.predict(emb, geocode=False, progress=False, temperature=1.0).masses == LEVELS
    assert geo.predict(emb, geocode=False, progress=False, samples=4).masses == tuple(level_for(record, q)
                                                                                       for q in LEVELS)
    # evaluate() takes predict()'s other arguments too (the seed) beside the coverage.
    from locdiff.evaluate import evaluate

    m = evaluate(geo.predictor, emb, synthetic(40, seed=9)[1], seed=1)
    assert 0 <= m["coverage_50"] <= m["coverage_90"] <= 1
    # A new run from this run's settings (locdiff config --run) does not inherit its record.
    from locdiff.run import read_config

    other = read_config(tmp_path / "run")[0]
    assert other.predict.credible
    train(*synthetic(300), tmp_path / "other", other, progress=False)
    assert json.loads((tmp_path / "other" / CONFIG_FILE).read_text())["predict"]["credible"] == {}


def test_calibration_reads_a_fixed_sample_of_a_large_validation_set(monkeypatch):
    # 20,000 validation rows took minutes after the time budget; a fixed sample decides.
    from locdiff import calibration
    from locdiff.models import CSUNet

    config = RunConfig(CSUNetConfig(degree=4, emb_dim=3, widths=(8,), cond_dim=8, emb_widths=(),
                                    density_head=True))
    torch.manual_seed(0)
    net = CSUNet(config.model)
    with torch.no_grad():  # an untrained network outputs zeros by construction: no modes
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    pred = Predictor(net, config)
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(300, 3)).astype(np.float32)
    coords = np.stack([rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)], 1)
    monkeypatch.setattr(calibration, "CALIBRATION_ROWS", 100)
    logged = []
    got = calibration.calibrate(pred, (emb, coords), log=logged.append)
    assert logged[0] == "calibration: on 100 of the 300 validation rows"
    rows = np.sort(np.random.default_rng(0).choice(300, 100, replace=False))
    want = calibration.calibrate(pred, (emb[rows], coords[rows]))
    assert got["temperature"] == want["temperature"] and got["val_median_km"] == want["val_median_km"]


@pytest.mark.parametrize("spread_km, side", [(150.0, "sharper"), (None, "broader")])
def test_calibrated_temperature_goes_past_the_ends_of_its_table(spread_km, side):
    # Vectors that are exact SHDDs 150 km from the truth want a density far sharper than the
    # table's sharpest (sharpness 46 at L = 8); vectors unrelated to the truth want a broader
    # one than its broadest. The search goes on past the ends while the NLL falls, and stops
    # at a minimum (or at the sharpness range's end).
    from locdiff import shdd
    from locdiff.calibration import SHARPNESS_RANGE, TEMPERATURE_FACTORS, nll_temperature
    from locdiff.diffusion.losses import kl_temperature
    from locdiff.geo import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon

    rng = np.random.default_rng(3)
    truth = np.c_[rng.uniform(-60, 60, 400), rng.uniform(-180, 180, 400)]
    if spread_km is None:
        points = np.c_[rng.uniform(-60, 60, 400), rng.uniform(-180, 180, 400)]
    else:
        p = latlon_to_xyz(truth)
        e = np.cross(p, rng.normal(size=(400, 3)))
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        a = spread_km / EARTH_RADIUS_KM
        points = xyz_to_latlon(np.cos(a) * p + np.sin(a) * e)
    coeffs = shdd.encode(torch.as_tensor(points), 8)
    t, nll = nll_temperature(coeffs, truth, 8)
    table = [kl_temperature(8, 16.0) * f for f in TEMPERATURE_FACTORS]

    def nll_at(x):
        return -float(shdd.log_density_at(coeffs, torch.as_tensor(truth), temperature=x).mean())
    assert nll == pytest.approx(nll_at(t))
    if side == "sharper":
        assert t < table[0] / 2 and nll < nll_at(table[0]) - 0.3
    else:
        assert t > table[-1] * 1.4 and nll < nll_at(table[-1])
    lo, hi = (shdd.exact_peak(8) / s for s in reversed(SHARPNESS_RANGE))
    for x in (t / 2 ** 0.5, t * 2 ** 0.5):  # a minimum of the steps, or the range's end
        assert nll_at(x) >= nll or not lo <= x <= hi


def test_calibration_stops_where_the_normaliser_stops_following():
    # Exact SHDDs at the truths want an ever sharper density. At L = 64 the normaliser's
    # grid reaches its cell cap at sharpness 237 and then comes out too small (NLLs too
    # low), which would pull the search on: it stops there.
    from locdiff import shdd
    from locdiff.calibration import nll_temperature

    rng = np.random.default_rng(4)
    truth = np.c_[rng.uniform(-60, 60, 20), rng.uniform(-180, 180, 20)]
    t, _ = nll_temperature(shdd.encode(torch.as_tensor(truth), 64), truth, 64)
    sharpness = shdd.exact_peak(64) / t
    assert shdd.normalizer_max_sharpness(64) / 2 ** 0.5 < sharpness <= shdd.normalizer_max_sharpness(64)
    # Training says so: its densities are wider than such data.
    from locdiff.calibration import TEMPERATURE_FACTORS, sharpest_limit
    from locdiff.diffusion.losses import kl_temperature

    assert sharpest_limit(t, 64)
    assert not any(sharpest_limit(kl_temperature(64, 16.0) * f, 64) for f in TEMPERATURE_FACTORS)
    # From L = 256 the normaliser's limit lies below the table's sharpest entry: only a choice
    # at the table's sharp end says so, not one the NLL preferred over a sharper entry.
    table = [kl_temperature(256, 16.0) * f for f in TEMPERATURE_FACTORS]
    assert sharpest_limit(table[0], 256) and not sharpest_limit(table[1], 256)


def test_predict_without_the_vectors_gives_the_same_answers(tmp_path):
    # The CLI and validation ask for the answers alone; the (N, K) vectors are then not kept.
    emb, coords = synthetic(128)
    train(emb, coords, tmp_path / "run", tiny_config(steps=10), progress=False)
    pred = Predictor.from_run(tmp_path / "run")
    emb = emb[:40]
    full, lean = pred.predict(emb, top_k=2), pred.predict(emb, top_k=2, coeffs=False)
    assert "coeffs" not in lean and full["coeffs"].shape == (40, pred.config.model.dim)
    np.testing.assert_array_equal(lean["latlon"], full["latlon"])
    np.testing.assert_array_equal(lean["topk_latlon"], full["topk_latlon"])


def test_clearly_better_needs_the_gain():
    from locdiff.selection import clearly_better

    assert not clearly_better(0.98, 1.0) and not clearly_better(1.01, 1.0) and clearly_better(0.96, 1.0)


@pytest.mark.parametrize("other_km, expected", [(99.0, "density"), (50.0, "function")])
def test_calibration_keeps_the_runs_rule_unless_another_is_clearly_better(other_km, expected):
    # Validation medians move a few percent between seeds: only a clear gain changes the rule.
    from types import SimpleNamespace

    from locdiff import calibration, shdd
    from locdiff.geo import EARTH_RADIUS_KM

    rng = np.random.default_rng(0)
    coords = np.stack([rng.uniform(-50, 50, 40), rng.uniform(-170, 170, 40)], 1)

    def north(km):
        return coords + [np.degrees(km / EARTH_RADIUS_KM), 0.0]

    class Fixed:
        degree = 8
        config = SimpleNamespace(predict=SimpleNamespace(mode_of="density"))

        def coefficients(self, emb):
            return torch.as_tensor(shdd.encode(coords, 8))

        def locate(self, coeffs, cd, mode_of, temperature):
            return north(500.0) if cd is not None else north(100.0 if mode_of == "density" else other_km)

    out = calibration.calibrate(Fixed(), (np.zeros((40, 2)), coords))
    assert out["mode_of"] == expected and out["coarse_degree"] is None


def test_a_loss_spike_is_skipped_and_gradients_are_clipped(tmp_path, monkeypatch):
    # One batch whose loss jumps 1000x above the recent median is skipped (after the 200
    # steps the median needs); every other step clips its gradients at train.grad_clip.
    import locdiff.train as T

    real, calls, clips = T.diffusion_loss, [0], []

    def spiking(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls[0] += 1
        return (loss * 1000, parts) if calls[0] == 205 else (loss, parts)

    def clip(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return torch.tensor(0.0)
    monkeypatch.setattr(T, "diffusion_loss", spiking)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    emb, coords = synthetic(200)
    res = train(emb, coords, tmp_path / "run", tiny_config(steps=210, batch_size=16, spike_factor=3.0, grad_clip=0.5),
                progress=False)
    assert res.skipped_steps == 1 and clips == [0.5] * 209


def test_a_time_bounded_run_decays_its_learning_rate_over_its_time(tmp_path):
    # Under train.max_minutes the schedule follows the clock as well as the steps: a run
    # stopped by time ends near min_lr_ratio, not at the peak rate of a far-off step count.
    emb, coords = synthetic(200)
    cfg = tiny_config(steps=1_000_000, batch_size=16, max_minutes=0.1, log_every=1, min_lr_ratio=0.0, warmup_steps=1)
    res = train(emb, coords, tmp_path / "run", cfg, progress=False)
    assert res.time_up
    from locdiff.trainlog import read_metrics

    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert len(lrs) > 5 and lrs[1] > 0.5 * cfg.train.lr and lrs[-1] < 0.05 * cfg.train.lr


def test_empty_data_and_a_val_that_is_not_a_pair_are_named_before_any_file(tmp_path):
    emb, coords = synthetic(40)
    not_a_pair = "val: expected a pair \\(embeddings, coordinates\\), got ndarray"
    for args, kw, match in (((emb[:0], coords[:0]), {}, "embeddings: no rows to train on"),
                            ((emb, coords), {"val": emb}, not_a_pair)):
        with pytest.raises(DataError, match=match):
            train(*args, tmp_path / "run", tiny_config(steps=2), progress=False, **kw)
        assert not (tmp_path / "run").exists()
