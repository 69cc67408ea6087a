"""SHDD-KL measures what it claims: the distance between the distributions two SHDD vectors
describe, without grid aliasing, at every degree; and the loss's parts combine as set."""
import math

import numpy as np
import pytest
import torch

from locdiff import shdd
from locdiff.diffusion import DiffusionConfig, diffusion_loss
from locdiff.diffusion.losses import kl_grid, kl_temperature, shdd_kl
from locdiff.models import CSUNet, CSUNetConfig


def moved(p, bearing_deg, radians):
    lat, lon = np.radians(p)
    b = np.radians(bearing_deg)
    lat2 = np.arcsin(np.sin(lat) * np.cos(radians) + np.cos(lat) * np.sin(radians) * np.cos(b))
    lon2 = lon + np.arctan2(np.sin(b) * np.sin(radians) * np.cos(lat), np.cos(radians) - np.sin(lat) * np.sin(lat2))
    return np.degrees([lat2, lon2])


def _kl_along(degree, x, bearing, d, kl):
    target = shdd.encode(torch.tensor(np.tile(x, (len(d), 1))), degree)
    pred = shdd.encode(torch.tensor(np.array([moved(x, bearing, r) for r in d])), degree)
    return np.asarray(kl(pred, target))


def _starts(grid):
    ll = grid.latlon.numpy()
    j = grid.nlon * (grid.nlat // 3)
    # a node, the middle of a cell, the north pole, next to the south pole, the antimeridian
    return [ll[j], (ll[j] + ll[j + grid.nlon + 1]) / 2, np.array([90.0, 0.0]), np.array([-89.99, 33.0]),
            np.array([10.0, 180.0])]


@pytest.mark.parametrize("degree", [32, 64, 128])
def test_kl_grows_with_distance_wherever_the_points_lie(degree):
    # KL(SHDD at x || SHDD at x moved by d) is 0 at d = 0, grows monotonically over one lobe
    # width and, the sphere being the same everywhere, does not depend on where x lies
    # relative to the grid (on a node, between nodes, at a pole) or on the direction.
    cfg = DiffusionConfig(kl_weight=1.0)
    grid = kl_grid(degree, cfg.kl_sharpness, cfg.kl_grid_oversample)
    d = np.linspace(0, 2.4 / degree, 16)  # up to about the first zero of the kernel
    ends = []
    for x in _starts(grid):
        for bearing in (0.0, 45.0, 90.0):
            kl = _kl_along(degree, x, bearing, d, lambda p, t: shdd_kl(p, t, degree, cfg, reduction="none"))
            assert abs(kl[0]) < 1e-8
            assert (np.diff(kl) > 0).all(), (x, bearing, kl)
            ends.append(kl[-1])
    assert min(ends) > 5.0  # one lobe away is far apart, not lost in a uniform background
    assert max(ends) / min(ends) < 1.02, ends


def test_kl_on_a_coarse_grid_aliases():
    # Negative control: on a fixed 32 x 64 grid at L = 64 the same distance gives KLs that
    # differ 30-fold with the direction, as the lobe falls between nodes.
    from locdiff import grids

    g, degree = grids.equiangular(32, 64), 64
    d = np.linspace(0, 2.4 / degree, 16)
    tau = kl_temperature(degree, DiffusionConfig().kl_sharpness)
    ends = [_kl_along(degree, _starts(g)[1], b, d,
                      lambda p, t: shdd.kl_divergence(p, t, grid=g, temperature=tau, reduction="none"))[-1]
            for b in (0.0, 45.0)]
    assert max(ends) / min(ends) > 10


def _batch(degree=4):
    x0 = shdd.encode(torch.tensor([[10.0, 20.0], [-40.0, 100.0], [60.0, -3.0]]), degree).float()
    return x0, torch.randn(3, 6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weights,parts", [((1.0, 0.0), {"mse"}), ((0.0, 1.0), {"kl"}), ((1.0, 0.5), {"mse", "kl"})])
def test_loss_parts_combine_as_set(prediction, weights, parts):
    # Without a density head both parts train the denoiser's output.
    net = CSUNet(CSUNetConfig(degree=4, emb_dim=6, widths=(32, 16), cond_dim=16, density_head=False))
    cfg = DiffusionConfig(prediction=prediction, mse_weight=weights[0], kl_weight=weights[1], timesteps=100)
    x0, emb = _batch()
    loss, got = diffusion_loss(net, x0, emb, cfg.make_schedule(), cfg, generator=torch.Generator().manual_seed(0))
    assert set(got) == parts
    total = weights[0] * got.get("mse", 0.0) + weights[1] * got.get("kl", 0.0)
    assert loss.item() == pytest.approx(total, rel=1e-5, abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in net.out.parameters())


def test_density_head_is_trained_by_kl_and_denoiser_by_mse():
    net = CSUNet(CSUNetConfig(degree=4, emb_dim=6, widths=(32, 16), cond_dim=16, density_head=True))
    cfg = DiffusionConfig(prediction="x0", kl_weight=1.0, timesteps=100)
    x0, emb = _batch()
    loss, parts = diffusion_loss(net, x0, emb, cfg.make_schedule(), cfg)
    assert set(parts) == {"mse", "kl"}
    # The head starts at 0: the uniform distribution, whose KL to an exact SHDD is large.
    assert parts["kl"] > 1.0
    loss.backward()
    assert net.density_out.weight.grad.abs().sum() > 0 and net.out.weight.grad.abs().sum() > 0


def test_config_errors():
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="score")
    with pytest.raises(ValueError, match="both 0"):
        DiffusionConfig(mse_weight=0.0, kl_weight=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        DiffusionConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_sharpness"):
        DiffusionConfig(kl_sharpness=math.inf)
