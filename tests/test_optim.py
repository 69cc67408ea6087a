"""Training's AdamW (locdiff.optim): the fused kernel where the device has one, with the
updates of torch's default implementation."""
import torch

from locdiff.optim import adamw


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_default_one():
    a, b = _net(0), _net(0)
    fused, plain = adamw(a.parameters(), 1e-2, 0.05), torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.randn(64, 3)
    for _ in range(50):
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), _net(0).parameters()))
        gap = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert moved > 0.1 and gap < 1e-5 * moved


def test_adamw_falls_back_where_there_is_no_fused_kernel():
    meta = [torch.nn.Parameter(torch.empty(4, device="meta"))]
    assert not adamw(meta, 1e-3, 0.0).defaults["fused"]
    mixed = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4, device="meta"))]
    assert not adamw(mixed, 1e-3, 0.0).defaults["fused"]
