"""SirenNet, CS-UNet and the location encoder: shapes, initialisation, conditioning."""
import math

import pytest
import torch

from locdiff.models import CSUNet, CSUNetConfig, LocationEncoder, SirenNet
from locdiff.models.cs_unet import timestep_features
from locdiff.models.siren import SirenLayer


def test_siren_init_bounds():
    first = SirenLayer(7, 64, w0=30.0, first=True)
    hidden = SirenLayer(64, 64, w0=30.0)
    assert first.linear.weight.abs().max() <= 1 / 7
    assert hidden.linear.weight.abs().max() <= math.sqrt(6 / 64) / 30
    x = torch.rand(10, 7) * 2 - 1
    y = first(x)
    assert y.shape == (10, 64) and y.abs().max() <= 1


def test_sirennet_shape_and_grad():
    net = SirenNet(3, 32, 5, depth=3)
    x = torch.randn(4, 3, requires_grad=True)
    y = net(x)
    assert y.shape == (4, 5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_location_encoder():
    enc = LocationEncoder(degree=6, d_out=16, d_hidden=32)
    ll = torch.tensor([[48.85, 2.35], [-33.9, 151.2], [90.0, 0.0]])
    out = enc(ll)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    assert enc(ll.double()).dtype == torch.float32


def _cfg(**kw):
    base = dict(degree=4, emb_dim=8, widths=(48, 32, 16), cond_dim=24, dropout=0.0)
    base.update(kw)
    return CSUNetConfig(**base)


@pytest.mark.parametrize("widths", [(32,), (48, 32), (64, 32, 16)])
def test_cs_unet_shapes(widths):
    net = CSUNet(_cfg(widths=widths))
    x = torch.randn(5, 25)
    out = net(x, torch.randint(0, 1000, (5,)), torch.randn(5, 8))
    assert out.shape == (5, 25)
    assert len(net.down) == len(widths) and len(net.up) == len(widths) - 1


def test_cs_unet_output_starts_at_zero():
    # The zero-initialised output layer makes the first prediction 0: a neutral start for
    # both the eps and the x0 parameterisation.
    net = CSUNet(_cfg())
    out = net(torch.randn(3, 25), torch.tensor([1, 2, 3]), torch.randn(3, 8))
    assert torch.equal(out, torch.zeros_like(out))


def _randomise(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return net.eval()


def test_cs_unet_conditioning():
    net = _randomise(CSUNet(_cfg()))
    x, t = torch.randn(4, 25), torch.full((4,), 500)
    e1, e2 = torch.randn(4, 8), torch.randn(4, 8)
    a, b = net(x, t, e1), net(x, t, e2)
    assert not torch.allclose(a, b)                               # the embedding matters
    assert not torch.allclose(a, net(x, t + 300, e1))              # so does the timestep
    # Dropped rows use the learned null embedding, exactly like emb=None.
    drop = torch.tensor([True, False, True, False])
    mixed = net(x, t, e1, drop=drop)
    uncond = net(x, t, None)
    torch.testing.assert_close(mixed[drop], uncond[drop])
    torch.testing.assert_close(mixed[~drop], a[~drop])


def test_cs_unet_dropout_only_in_training():
    net = _randomise(CSUNet(_cfg(dropout=0.5)))
    x, t, e = torch.randn(2, 25), torch.tensor([3, 4]), torch.randn(2, 8)
    torch.testing.assert_close(net(x, t, e), net(x, t, e))
    net.train()
    assert not torch.allclose(net(x, t, e), net(x, t, e))


def test_config_round_trip():
    cfg = _cfg(widths=(40, 20))
    assert CSUNetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.dim == 25


def test_timestep_features():
    f = timestep_features(torch.tensor([0, 500, 999]), 128, 1000)
    assert f.shape == (3, 128)
    torch.testing.assert_close(f[0, :64], torch.zeros(64))
    torch.testing.assert_close(f[0, 64:], torch.ones(64))
