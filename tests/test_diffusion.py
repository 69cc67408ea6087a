"""Schedules and samplers against closed forms; the loss, guidance and EMA."""
import math

import pytest
import torch

from locdiff.diffusion import (EMA, DiffusionConfig, diffusion_loss, get_cosine_schedule,
                               get_linear_schedule, guided, sample_ddim, sample_ddpm, split_prediction)
from locdiff.diffusion.samplers import PREDICTIONS, ddim_timesteps
from locdiff.diffusion.schedules import get_schedule


def test_linear_schedule_closed_form():
    s = get_linear_schedule(1000)
    torch.testing.assert_close(s.betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(s.alphas_cumprod, expected)
    # Fewer steps are points of the same curve: its first and last abar, and between them
    # the original's at the same fraction of the way (log-interpolated between its steps).
    for n in (10, 100, 2000):  # (below 6 steps the beta clip binds at the last step)
        ab = get_linear_schedule(n).alphas_cumprod
        torch.testing.assert_close(ab[[0, -1]], expected[[0, -1]], rtol=1e-9, atol=0)
        i = n // 3
        pos = 999 * i / (n - 1)
        lo, frac = int(pos), pos - int(pos)
        want = math.exp((1 - frac) * math.log(expected[lo]) + frac * math.log(expected[lo + 1]))
        assert float(ab[i]) == pytest.approx(want, rel=1e-9), n


@pytest.mark.parametrize("n", [200, 1000])
def test_cosine_schedule_closed_form(n):
    # Eq. 17 at u = t / 1000 for the 1000 steps; n steps from the first to the last of them.
    s_ = 0.008
    s = get_cosine_schedule(n, s=s_)
    u = (1 + 999 * torch.arange(n, dtype=torch.float64) / (n - 1)) / 1000
    f = lambda u: torch.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    expected = f(u) / f(torch.zeros(1, dtype=torch.float64))
    # Equal until the beta clip at the very end.
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=1e-12)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])


def test_get_schedule_errors():
    assert len(get_schedule("linear", 10)) == 10
    with pytest.raises(ValueError, match="schedule"):
        get_schedule("quadratic", 10)


def test_q_sample_and_split_round_trip():
    s = get_cosine_schedule(100)
    x0, eps = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 80, 98, 99])
    xt = s.q_sample(x0, t, eps)
    ab = s.abar(t, torch.float64)
    a = ab.reshape(-1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        x0h, epsh = split_prediction(out, xt, ab, pred)
        torch.testing.assert_close(x0h, x0)
        torch.testing.assert_close(epsh, eps)
    with pytest.raises(ValueError, match="prediction"):
        split_prediction(eps, xt, ab, "score")


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    for n in (7, 50, 100, 1000):
        assert ddim_timesteps(n, n) == list(range(n - 1, -1, -1))  # every timestep once
        for steps in range(1, n + 1, max(1, n // 37)):
            ts = ddim_timesteps(n, steps)
            assert len(ts) == steps and ts[0] == n - 1 and all(a > b >= 0 for a, b in zip(ts, ts[1:]))
    for bad in (11, 0, 2.5):
        with pytest.raises(ValueError, match=f"steps must be an int in \\[1, 10\\], got {bad}"):
            ddim_timesteps(10, bad)
    import numpy as np  # numpy integers are integers (Predictor.settings takes them)

    assert ddim_timesteps(np.int64(10), np.int64(4)) == ddim_timesteps(10, 4)
    assert len(get_schedule("linear", np.int64(10))) == len(get_schedule("cosine", np.int32(10))) == 10


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddim_with_every_timestep_at_eta_1_is_ddpm(schedule):
    # The same draws in the same order: DDIM's sigma at eta = 1 is DDPM's posterior std.
    s = get_schedule(schedule, 100)
    model = lambda x, t: torch.tanh(x) * (t[:, None] / 100.0) + 0.3  # noqa: E731  (smooth, t-dependent)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = sample_ddpm(model, x, s, prediction="x0", generator=torch.Generator().manual_seed(1))
    b = sample_ddim(model, x, s, steps=100, eta=1.0, prediction="x0", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("n", [2, 10])
def test_few_steps_span_the_whole_noise_range(name, n):
    # Rescaled betas drove the linear schedule's last abar to 1e-17 at n = 10: a float32 eps
    # prediction then gave 0 for the clean vector. A 2-step cosine schedule started at 0.49.
    s = get_schedule(name, n)
    assert float(s.alphas_cumprod[0]) > 0.9998 and float(s.alphas_cumprod[-1]) < 2e-3
    target = torch.full((3, 4), 0.2)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))

    def exact_eps(x, t):  # data = the point ``target``: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        a = s.abar(t, x.dtype)[:, None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()
    out = sample_ddim(exact_eps, x, s, steps=1, prediction="eps")
    torch.testing.assert_close(out, target, atol=2e-3, rtol=0)


def test_ddim_refuses_eta_past_one():
    # Past 1 sigma^2 exceeds 1 - abar_prev: the step adds more noise than the marginal holds.
    s = get_cosine_schedule(10)
    x = torch.zeros(2, 3)
    for bad in (1.01, 5.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match=f"eta must be a number in \\[0, 1\\], got {bad!r}"):
            sample_ddim(lambda x, t: x, x, s, steps=3, eta=bad, prediction="x0")
    from locdiff.ranges import SettingError, check_section
    from locdiff.run import PredictConfig

    with pytest.raises(SettingError, match="predict.eta = 2.0: expected a number in \\[0, 1\\]"):
        check_section("predict", PredictConfig(eta=2.0))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 19, 20, 50, 1000])
def test_schedules_are_valid_at_any_length(n):
    # Below 20 steps the rescaled linear betas passed 1: abar went negative, samples NaN.
    for name in ("linear", "cosine"):
        s = get_schedule(name, n)
        assert len(s) == n and bool((s.betas > 0).all()) and bool((s.betas < 1).all()), name
        ab = s.alphas_cumprod
        assert bool((ab > 0).all()) and bool((ab[1:] < ab[:-1]).all()), name
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"n \\(the number of timesteps\\) must be an int >= 1, got {bad}"):
            get_schedule("linear", bad)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_samplers_with_oracle_for_a_point_mass(prediction):
    # Data = one point: the exact denoiser returns it (or the matching noise), and every
    # sampler must end there exactly.
    s = get_cosine_schedule(50)
    target = torch.randn(1, 5, dtype=torch.float64)

    def oracle(x, t):
        if prediction == "x0":
            return target.expand_as(x)
        a = s.abar(t, x.dtype)[:, None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    x = torch.randn(7, 5, dtype=torch.float64)
    seen = []
    out = sample_ddim(oracle, x, s, steps=5, prediction=prediction, callback=lambda *a: seen.append(a[1]))
    torch.testing.assert_close(out, target.expand_as(out))
    assert seen == ddim_timesteps(50, 5)
    out = sample_ddpm(oracle, x, s, prediction=prediction)
    torch.testing.assert_close(out, target.expand_as(out))


def _gaussian_oracle(s, mu, sd):
    # Data x0 ~ N(mu, sd^2 I): E[x0 | x_t] = mu + sqrt(a) sd^2 / (a sd^2 + 1 - a) (x_t - sqrt(a) mu).
    def model(x, t):
        a = s.abar(t, x.dtype)[:, None]
        return mu + a.sqrt() * sd ** 2 / (a * sd ** 2 + 1 - a) * (x - a.sqrt() * mu)
    return model


def test_ddpm_samples_gaussian_data():
    # With posterior variance beta~_t the reverse chain is exact only as steps -> infinity
    # (Ho et al. 2020, Sec. 3.2); 1000 steps are within 1%.
    s = get_linear_schedule(1000)
    mu, sd = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6_000, 2, dtype=torch.float64, generator=g)
    out = sample_ddpm(_gaussian_oracle(s, mu, sd), x, s, prediction="x0", generator=g)
    torch.testing.assert_close(out.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(out.std(0), torch.full((2,), sd, dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_gaussian_data(eta):
    s = get_cosine_schedule(1000)
    mu, sd = torch.tensor([0.5, 3.0], dtype=torch.float64), 2.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20_000, 2, dtype=torch.float64, generator=g)
    out = sample_ddim(_gaussian_oracle(s, mu, sd), x, s, steps=250, eta=eta, prediction="x0", generator=g)
    torch.testing.assert_close(out.mean(0), mu, atol=0.06, rtol=0)
    torch.testing.assert_close(out.std(0), torch.full((2,), sd, dtype=torch.float64), atol=0.06, rtol=0)


def test_guidance_formula():
    calls = []

    def net(x, t, emb, drop=None):
        calls.append(len(x))
        c = torch.ones_like(x) if emb is None else emb.sum(-1, keepdim=True).expand_as(x)
        if drop is not None:
            c = torch.where(drop[:, None], torch.ones_like(x), c)
        return c

    x, t, emb = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.full((3, 2), 2.0)
    torch.testing.assert_close(guided(net, emb, 0.0)(x, t), torch.full((3, 4), 4.0))
    assert calls == [3]
    # (1 + w) cond - w uncond = 3 * 4 - 2 * 1
    torch.testing.assert_close(guided(net, emb, 2.0)(x, t), torch.full((3, 4), 10.0))
    assert calls[-1] == 6


def test_ema():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # warm-up decay min(0.5, 2/11) = 2/11
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 9 / 11))
    for _ in range(50):
        ema.update(net)
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, torch.ones(1, 2))


def test_ema_keeps_float64_weights_and_averages_bfloat16_in_float32():
    net = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(1 + 1e-12)
    ema = EMA(net)
    ema.update(net)
    back = torch.nn.Linear(2, 1, bias=False).double()
    ema.copy_to(back)
    assert ema.shadow["weight"].dtype == torch.float64 and bool((back.weight == 1 + 1e-12).all())
    low = torch.nn.Linear(2, 1, bias=False).bfloat16()
    assert EMA(low).shadow["weight"].dtype == torch.float32


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_diffusion_loss_parts_and_gradient(prediction):
    from locdiff import shdd
    from locdiff.models import CSUNet, CSUNetConfig

    net = CSUNet(CSUNetConfig(degree=4, emb_dim=6, widths=(32, 16), cond_dim=16))
    x0 = shdd.encode(torch.tensor([[10.0, 20.0], [-40.0, 100.0], [60.0, -3.0]]), 4).float()
    cfg = DiffusionConfig(prediction=prediction, kl_weight=0.5, timesteps=100)
    loss, parts = diffusion_loss(net, x0, torch.randn(3, 6), cfg.make_schedule(), cfg,
                                 generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"mse", "kl"} and parts["kl"] >= 0
    torch.testing.assert_close(float(loss.detach()), parts["mse"] + 0.5 * parts["kl"], rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in net.out.parameters())
    cfg.kl_weight = 0.0
    _, parts = diffusion_loss(net, x0, None, cfg.make_schedule(), cfg)
    assert set(parts) == {"mse"}


def test_diffusion_config_round_trip():
    cfg = DiffusionConfig(schedule="linear", prediction="eps", smoothing=0.01)
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.scale == pytest.approx(math.sqrt(4 * math.pi))


# The loss's parts, each pinned by a network whose answer is known (a mutation audit found
# that flipping any of them left every other test passing).
_PTS = torch.tensor([[10.0, 20.0], [-40.0, 100.0], [60.0, -3.0], [0.0, 0.0]])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_network_returning_the_exact_target_has_zero_regression_loss(prediction):
    from locdiff import shdd

    cfg = DiffusionConfig(prediction=prediction, kl_weight=0.0, p_uncond=0.0, timesteps=100)
    s = cfg.make_schedule()
    x0 = shdd.encode(_PTS, 4).double()
    xs = x0 * cfg.scale

    def oracle(x_t, t, emb, drop=None):
        a = s.abar(t, x_t.dtype)[:, None]
        eps = (x_t - a.sqrt() * xs) / (1 - a).sqrt()
        return {"eps": eps, "x0": xs, "v": a.sqrt() * eps - (1 - a).sqrt() * xs}[prediction]

    _, parts = diffusion_loss(oracle, x0, None, s, cfg, generator=torch.Generator().manual_seed(0))
    assert parts["mse"] < 1e-10


def test_timestep_power_below_one_favours_high_noise():
    from locdiff.diffusion.losses import sample_timesteps

    t = sample_timesteps(200_000, 1000, 0.5, "cpu", torch.Generator().manual_seed(0))
    assert abs(t.double().mean().item() / 1000 - 2 / 3) < 0.01  # E[u^0.5] = 2/3


class _Spy(torch.nn.Module):
    """A density-head network that records its timesteps and drop mask; the head returns
    ``target``'s first rows."""

    def __init__(self, target, density_head=True):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(density_head=density_head, density_from="trunk")
        self.target = target

    def forward(self, x, t, emb, drop=None, density_rows=0):
        self.t, self.drop = t.clone(), drop
        out = torch.zeros_like(x)
        return (out, self.target[:density_rows]) if self.config.density_head else out


def test_density_rows_are_drawn_at_the_last_step_and_scored_against_their_own_targets():
    # The head is read from pure noise at prediction: it must learn there, on its own rows.
    from locdiff import shdd

    cfg = DiffusionConfig(prediction="x0", kl_weight=1.0, timesteps=100, density_fraction=0.5)
    x0 = shdd.encode(_PTS, 4).float()
    net = _Spy(x0 * cfg.scale)  # the head returns each row's own target: KL 0
    _, parts = diffusion_loss(net, x0, torch.zeros(4, 3), cfg.make_schedule(), cfg,
                              generator=torch.Generator().manual_seed(0))
    assert (net.t[:2] == 99).all()
    assert parts["kl"] < 1e-4


def test_the_condition_is_dropped_at_p_uncond():
    from locdiff import shdd

    cfg = DiffusionConfig(prediction="x0", kl_weight=0.0, timesteps=100, p_uncond=0.1)
    x0 = shdd.encode(torch.zeros(20_000, 2), 2).float()
    net = _Spy(x0, density_head=False)
    diffusion_loss(net, x0, torch.zeros(20_000, 3), cfg.make_schedule(), cfg, generator=torch.Generator().manual_seed(0))
    assert abs(net.drop.float().mean().item() - 0.1) < 0.01


def test_the_kl_of_an_eps_prediction_is_weighted_by_abar(monkeypatch):
    # The clean vector recovered from eps blows up at high noise: abar weights it down there.
    from locdiff import shdd
    from locdiff.diffusion import losses

    cfg = DiffusionConfig(prediction="eps", kl_weight=1.0, mse_weight=0.0, timesteps=100, p_uncond=0.0)
    s = cfg.make_schedule()
    net = _Spy(None, density_head=False)
    monkeypatch.setattr(losses, "shdd_kl", lambda p, t, d, c, reduction="mean": torch.ones(p.shape[0]))
    x0 = shdd.encode(torch.zeros(64, 2), 2).float()
    _, parts = diffusion_loss(net, x0, None, s, cfg, generator=torch.Generator().manual_seed(0))
    assert parts["kl"] == pytest.approx(float(s.abar(net.t).mean()), rel=1e-5)


def test_every_split_recombines_into_its_noisy_vector():
    s = get_cosine_schedule(100)
    t = torch.tensor([10, 50, 90])
    x_t = 3 * torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = s.abar(t, torch.float64)
    for prediction in PREDICTIONS:
        x0, eps = split_prediction(torch.randn(3, 9, dtype=torch.float64), x_t, a, prediction)
        torch.testing.assert_close(a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * eps, x_t)
    with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'x0', 'v'\), got 'y'"):
        split_prediction(x_t, x_t, a, "y")
