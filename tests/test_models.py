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
    assert hidden.linear.weight.abs().max() <= math.sqrt(3 / (64 * 0.432)) / 30
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


def test_cs_unet_siren_layers_keep_their_variance():
    # Siren's promise (Sitzmann et al. 2020, Sec. 3.2): w0 (W h + b) has unit variance at
    # every layer, so sin of it has variance (1 - exp(-2)) / 2, neither a linear layer (tiny
    # pre-activations) nor noise. The first layer sees a unit-variance noisy SHDD vector.
    torch.manual_seed(0)
    net = CSUNet(CSUNetConfig(degree=32, emb_dim=8, widths=(1024, 512, 256), cond_dim=16, dropout=0.0))
    pre, post = [], []
    for blk in list(net.down) + list(net.mid):
        blk.register_forward_hook(lambda m, i, o: post.append(o.var().item()))
        blk.linear.register_forward_hook(lambda m, i, o: pre.append((o * m.__dict__.get("w0", 1.0)).var().item()))
    net(torch.randn(512, 1089), torch.full((512,), 999), torch.randn(512, 8))
    assert len(pre) == 4
    for v in pre:
        assert 0.9 < v < 1.1, pre
    for v in post:
        assert abs(v - (1 - math.exp(-2)) / 2) < 0.04, post


def test_film_gain_is_bounded():
    # However large the FiLM output, the pre-activation's scale stays within (0, 2) of the
    # linear part: an unbounded gain multiplies the frequency of every later layer.
    net = CSUNet(_cfg(widths=(32,)))
    with torch.no_grad():
        net.down[0].film.weight.fill_(100.0)
    blk = net.down[0]
    h, c = torch.randn(4, 25), torch.randn(4, 24).abs()
    gamma, _ = blk.film(c).chunk(2, -1)
    assert gamma.abs().min() > 50
    lin = blk.linear(h)
    pre = torch.asin(blk(h, c).clamp(-1, 1))  # only the bound matters: |sin| <= 1 anyway
    assert torch.isfinite(pre).all() and (1 + torch.tanh(gamma)).max() <= 2 and lin.abs().max() < 10


def test_density_head_reads_what_it_is_told():
    emb_cfg = _cfg(density_head=True)
    net = _randomise(CSUNet(emb_cfg))
    x, t, e = torch.randn(3, 25), torch.tensor([0, 500, 999]), torch.randn(3, 8)
    out, dens = net(x, t, e, density_rows=3)
    assert out.shape == dens.shape == (3, 25)
    # "embedding": the distribution given the condition alone, whatever x_t and t.
    _, dens2 = net(torch.randn(3, 25), torch.tensor([7, 8, 9]), e, density_rows=2)
    torch.testing.assert_close(dens2, dens[:2])
    trunk = _randomise(CSUNet(_cfg(density_head=True, density_from="trunk")))
    a = trunk(x, t, e, density_rows=3)[1]
    b = trunk(torch.randn(3, 25), t, e, density_rows=3)[1]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="density_head=True"):
        CSUNet(_cfg(density_head=False))(x, t, e, density_rows=1)
    with pytest.raises(ValueError, match="density_from"):
        CSUNet(_cfg(density_head=True, density_from="x"))


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


def test_cs_unet_one_wide_condition_is_heard():
    # LayerNorm of one feature is its bias, whatever the value: a 1-wide embedding was ignored.
    net = _randomise(CSUNet(_cfg(emb_dim=1)))
    x, t = torch.randn(2, 25), torch.full((2,), 500)
    a = net(x, t, torch.tensor([[-5.0], [-5.0]]))
    assert not torch.allclose(a, net(x, t, torch.tensor([[100.0], [100.0]])))


@pytest.mark.parametrize("weights, inputs", [(torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float64)])
def test_cs_unet_computes_in_its_weights_dtype(weights, inputs):
    net = CSUNet(_cfg()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # small steps from the initialisation (whose output layer is 0)
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    net = net.to(weights)
    x, t, e = torch.randn(3, 25, dtype=inputs), torch.tensor([0, 10, 999]), torch.randn(3, 8, dtype=inputs)
    with torch.no_grad():
        out = net(x, t, e)
        ref = net.float()(x.float(), t, e.float()) if weights == torch.float64 else None
    assert out.dtype == weights and torch.isfinite(out).all()
    if weights == torch.float64:  # the same net in float32 agrees to float32's precision
        assert float(ref.abs().max()) > 0.01
        torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-3)


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


def test_timestep_features_tell_timesteps_apart():
    # Every timestep's features are nearest to its own (the network can read t), and
    # neighbouring timesteps are closer than distant ones (it can interpolate).
    f = timestep_features(torch.arange(1000), 128, 1000)
    assert f.shape == (1000, 128)
    d = torch.cdist(f, f)
    assert torch.equal(d.argmin(1), torch.arange(1000))
    assert (d[torch.arange(999), torch.arange(1, 1000)] < d[torch.arange(999), 999 - torch.arange(999) // 2].clamp_min(1e-3) + 1e-9).float().mean() > 0.95
    # The features of a 100-step schedule at t span the same range as 1000 steps at 10 t.
    torch.testing.assert_close(timestep_features(torch.tensor([50]), 128, 100), f[500:501])


def test_float8_weights_are_checked_for_nan_in_float32():
    # torch has no isfinite for float8: the check raised NotImplementedError.
    from locdiff.data.files import DataError
    from locdiff.run import RunConfig, _load_weights

    cfg = RunConfig(model=_cfg())
    sd = {k: v.to(torch.float8_e4m3fn) if v.dtype == torch.float32 else v
          for k, v in CSUNet(cfg.model).state_dict().items()}
    _load_weights(CSUNet(cfg.model), sd, "ckpt", cfg)
    sd["out.bias"] = torch.full_like(sd["out.bias"], float("nan"))
    with pytest.raises(DataError, match="weight out.bias holds NaN"):
        _load_weights(CSUNet(cfg.model), sd, "ckpt", cfg)


def test_weights_of_a_one_wide_run_from_before_the_norm_was_dropped_are_named():
    # Such runs learned from LayerNorm(1)'s bias, a constant; their emb_net.0.* weights
    # have no module now, and loading them says so rather than list unexpected keys.
    from locdiff.data.files import DataError
    from locdiff.run import RunConfig, _load_weights

    cfg = RunConfig(model=_cfg(emb_dim=1))
    net = CSUNet(cfg.model)
    sd = {**net.state_dict(), "emb_net.0.weight": torch.ones(1), "emb_net.0.bias": torch.zeros(1)}
    with pytest.raises(DataError, match="trained when a 1-wide embedding was normalised to a constant"):
        _load_weights(CSUNet(cfg.model), sd, "ckpt", cfg)
    _load_weights(CSUNet(cfg.model), net.state_dict(), "ckpt", cfg)  # today's weights load
