"""A training step of the demo's LocDiff model (CS-UNet with the density head, x0 prediction,
regression + SHDD-KL, AdamW) on random data, timed; shared by the loader and training
benchmarks so both measure the same step."""
from __future__ import annotations

import time

import torch

BATCH = 256


def make_step(device: torch.device, degree: int = 24, emb_dim: int = 768, compiled: bool = False,
              bf16: bool = False, batch: int = BATCH, plain_adamw: bool = False):
    """``(step, net)``: ``step()`` runs one forward + backward + AdamW update of batch ``batch``,
    with training's optimiser (``locdiff.optim.adamw``) or, ``plain_adamw``, torch's default."""
    from locdiff import shdd
    from locdiff.demo import demo_config
    from locdiff.diffusion import diffusion_loss
    from locdiff.models import CSUNet
    from locdiff.optim import adamw

    cfg = demo_config(1.0)
    mc = type(cfg.model).from_dict({**cfg.model.to_dict(), "degree": degree, "emb_dim": emb_dim})
    dc = cfg.diffusion
    net = CSUNet(mc).to(device)
    model = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4) if plain_adamw else adamw(net.parameters(), 1e-4, 0.01)
    schedule = dc.make_schedule().to(device)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, emb_dim, generator=g).to(device)
    latlon = torch.stack([torch.rand(batch, generator=g, dtype=torch.float64) * 180 - 90,
                          torch.rand(batch, generator=g, dtype=torch.float64) * 360 - 180], 1)

    def step():
        x0 = shdd.encode(latlon, degree).float().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = diffusion_loss(model, x0, emb, schedule, dc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, net


def samples_per_s(step, device: torch.device, steps: int = 3, rounds: int = 4, batch: int = BATCH) -> float:
    """The best of ``rounds`` timings of ``steps`` steps, after a warm-up (on a shared machine
    a slow round is another process's doing)."""
    cuda = device.type == "cuda"

    def timed(n):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        return n * batch / (time.perf_counter() - t0)

    timed(3)
    return max(timed(steps if not cuda else 10 * steps) for _ in range(rounds))
