"""Predictor's sampling settings against the calls they stand for, on a randomised CS-UNet:
guidance, DDIM with guidance, and the coarse degree (each once did nothing or the wrong thing
under a mutation that left every other test passing)."""
import numpy as np
import pytest
import torch

from locdiff import shdd
from locdiff.diffusion import DiffusionConfig, guided, sample_ddim
from locdiff.models import CSUNet, CSUNetConfig
from locdiff.predict import Predictor
from locdiff.run import PredictConfig, RunConfig


def _predictor(density_head: bool) -> Predictor:
    mc = CSUNetConfig(degree=4, emb_dim=8, widths=(48, 32, 16), cond_dim=24, dropout=0.0, density_head=density_head)
    net = CSUNet(mc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the zero-output start, so that every input matters
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    cfg = RunConfig(model=mc, diffusion=DiffusionConfig(prediction="x0", timesteps=50),
                    predict=PredictConfig(sampler="ddim", steps=5, samples=1))
    return Predictor(net.eval(), cfg)


def test_density_guidance_is_the_guided_combination_of_the_head():
    p = _predictor(True)
    emb = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    c0 = p.coefficients(emb, sampler="density", guidance=0.0)
    c2 = p.coefficients(emb, sampler="density", guidance=2.0)
    x = torch.randn(3, p.config.model.dim, generator=torch.Generator().manual_seed(0))  # the seed's noise
    t = torch.full((3,), 49, dtype=torch.long)
    e = torch.as_tensor(emb)
    with torch.no_grad():
        cond = p.net(x, t, e, drop=None, density_rows=3)[1]
        uncond = p.net(x, t, e, drop=torch.ones(3, dtype=torch.bool), density_rows=3)[1]
    scale = p.config.diffusion.scale
    torch.testing.assert_close(c0, cond / scale)
    torch.testing.assert_close(c2, (3 * cond - 2 * uncond) / scale)


def test_sampling_applies_guidance():
    p = _predictor(False)
    emb = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    got = p.sample(emb, guidance=2.0, seed=3)[:, 0]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, p.config.model.dim, generator=gen)
    want = sample_ddim(guided(p.net, torch.as_tensor(emb), 2.0), x, p.schedule, steps=5, prediction="x0",
                       generator=gen)
    torch.testing.assert_close(got, want / p.config.diffusion.scale)


@pytest.mark.parametrize("cd", [1, 2])
def test_the_coarse_degree_decodes_that_degree_then_climbs_on_all(cd):
    p = _predictor(False)
    pts = np.array([[10.0, 20.0], [-40.0, 100.0]])
    c = torch.as_tensor(shdd.encode(pts, 4) + 0.3 * shdd.encode(pts[::-1] + 30, 4))
    want = shdd.ascend(c, shdd.decode(c[:, :(cd + 1) ** 2]))[0]
    np.testing.assert_allclose(p.locate(c, coarse_degree=cd, mode_of="function"), want)


def test_a_seed_gives_an_independent_repeatable_draw():
    p = _predictor(False)
    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    draw = {s: p.predict(emb, sampler="ddpm", samples=1, seed=s)["coeffs"] for s in (0, 0, 7)}
    np.testing.assert_array_equal(p.predict(emb, sampler="ddpm", samples=1)["coeffs"], draw[0])
    np.testing.assert_array_equal(p.predict(emb, sampler="ddpm", samples=1, seed=7)["coeffs"], draw[7])
    assert not np.allclose(draw[0], draw[7])
    for bad in (-1, 2**31, 1.5, True):
        with pytest.raises(ValueError, match=f"seed must be an int in \\[0, 2147483647\\], got {bad!r}"):
            p.predict(emb, seed=bad)
    # sample() and coefficients() take a batch's seed (predict's come from batch_seed)
    for bad in (-1, 2**70, 1.5, True):
        for call in (lambda: p.sample(emb, seed=bad), lambda: p.coefficients(emb, sampler="density", seed=bad)):
            with pytest.raises(ValueError, match=f"seed must be an int in \\[0, 2\\^63 - 1\\], got {bad!r}"):
                call()
    np.testing.assert_array_equal(p.sample(emb, seed=np.int64(3)), p.sample(emb, seed=3))


def test_a_part_of_the_rows_is_predicted_as_in_the_whole():
    # (torchrun's ranks each predict their part: cli_predict.sharded_predict)
    from dataclasses import replace

    p = _predictor(False)
    p.config = replace(p.config, predict=replace(p.config.predict, batch_size=4))
    emb = np.random.default_rng(1).normal(size=(11, 8)).astype(np.float32)
    whole = p.predict(emb, top_k=2, sampler="ddpm", seed=5)
    for part in (slice(4, 11), slice(0, 4), slice(8, 20), slice(12, 16)):
        got = p.predict(emb, top_k=2, sampler="ddpm", seed=5, part=part)
        for key, v in whole.items():
            np.testing.assert_array_equal(got[key], v[part], err_msg=f"{key} {part}")
    with pytest.raises(ValueError, match=r"part must start at a multiple of predict.batch_size \(4\)"):
        p.predict(emb, part=slice(2, 6))
    with pytest.raises(ValueError, match=r"part must be a slice of consecutive rows \(step 1\)"):
        p.predict(emb, part=slice(0, 8, 2))


def test_one_predictor_serves_several_threads_with_their_sequential_answers():
    # docs/conventions.md, "Threads": one object, samplers and seeds per call.
    from concurrent.futures import ThreadPoolExecutor

    p = _predictor(True)
    emb = np.random.default_rng(2).normal(size=(12, 8)).astype(np.float32)
    calls = [dict(sampler=s, seed=i, temperature=t) for i, (s, t) in
             enumerate([("density", 1.0), ("ddpm", 0.5), ("ddim", 2.0), ("density", 3.0)] * 2)]

    def run(kw):
        return p.predict(emb, top_k=2, **kw)

    alone = [run(kw) for kw in calls]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, calls))
    for a, b in zip(alone, together):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
