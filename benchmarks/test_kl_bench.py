"""SHDD-KL training loss, forward + backward: locdiff's fused op vs the dense torch path vs
torch-harmonics' inverse SHT.

    pytest benchmarks/test_kl_bench.py --benchmark-only -k kl

impls (each checked once before timing against the float64 reference KL on its own grid):
  locdiff   shdd.kl_divergence: fused synthesis of both vectors on the ring grid, log-
            partitions, KL and its backward to the predicted coefficients (C++ / CUDA), no
            batch x grid matrix
  dense     Y table of the same grid (G x K, cached), two matmuls, log_softmax with the cell
            areas, autograd backward (what a torch user writes first)
  th-isht   torch-harmonics InverseRealSHT of both on its equiangular grid of the same size,
            log_softmax with its quadrature weights, autograd backward
Predictions need gradients, targets do not (the training case). float32, B = 128 pairs
(the demo's batch), threads from conftest.py.

Quick same-run comparison (interleaved rounds, best of each; no pytest-benchmark):
    python benchmarks/test_kl_bench.py --degrees 16,24,32,64 --rounds 9
"""
import math

import pytest
import torch

from locdiff import grids, shdd
from locdiff.ops.sh_reference import spherical_harmonics_reference
from locdiff.ops.shdd_reference import shdd_kl_reference
from anchors import inverse_sht, missing, th_grid, to_th

DEGREES = [16, 24, 32, 64]
BATCH = 128
IMPLS = ["locdiff", "dense", "th-isht"]
DEVICES = ["cpu", "cuda"]
_CACHE = {}


def _pairs(degree, batch, device, seed=0):
    """Noisy predictions of encoded points, as in training (x0 estimates), and the targets."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.asin(torch.rand(batch, dtype=torch.float64, generator=g) * 2 - 1) * 180 / math.pi
    lon = torch.rand(batch, dtype=torch.float64, generator=g) * 360 - 180
    target = shdd.encode(torch.stack([lat, lon], -1), degree).float()
    pred = target + 0.3 * target.std() * torch.randn(target.shape, generator=g)
    return pred.to(device), target.to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _dense_table(degree, device):
    key = ("dense", degree, device)
    if key not in _CACHE:
        grid = grids.for_degree(degree)
        y = spherical_harmonics_reference(grid.xyz, degree).float().to(device)
        _CACHE[key] = (y, grid.area.float().log().to(device))
    return _CACHE[key]


def _th(degree, device):
    key = ("th", degree, device)
    if key not in _CACHE:
        _CACHE[key] = (inverse_sht(degree, device), th_grid(degree)[2].log().float().to(device))
    return _CACHE[key]


def _kl_from_grid(fp, ft, log_area):
    lp = torch.log_softmax(ft + log_area, -1)
    lq = torch.log_softmax(fp + log_area, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _runner(impl, degree, pred, target):
    """A function computing the KL of (pred, target) and its gradient w.r.t. pred, synced;
    returns the KL values (B,)."""
    device = pred.device

    def run():
        p = pred.detach().requires_grad_(True)
        if impl == "locdiff":
            kl = shdd.kl_divergence(p, target, grid=grids.for_degree(degree), reduction="none")  # the others' grid
        elif impl == "dense":
            y, log_area = _dense_table(degree, device)
            kl = _kl_from_grid(p @ y.T, target @ y.T, log_area)
        else:
            isht, log_area = _th(degree, device)
            kl = _kl_from_grid(isht(to_th(p, degree)).flatten(1), isht(to_th(target, degree)).flatten(1), log_area)
        kl.sum().backward()
        _sync(device)
        return kl.detach()
    return run


@pytest.mark.parametrize("degree", DEGREES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_kl(benchmark, device, impl, degree):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl == "th-isht" and missing("torch_harmonics"):
        pytest.skip(missing("torch_harmonics"))
    pred, target = _pairs(degree, BATCH, device)
    run = _runner(impl, degree, pred, target)
    # Each impl against the float64 reference KL on its own grid, on the first 8 pairs,
    # relative to their largest KL. (The two grids' KLs differ by up to 2x on pairs this
    # close: both sample peaked softmaxes at the kernel's half-maximum spacing; th-isht's
    # rings include the poles, ours are cell centres.) dense and th-isht round in float32.
    xyz, area = th_grid(degree)[1:] if impl == "th-isht" else (grids.for_degree(degree).xyz, grids.for_degree(degree).area)
    exact = shdd_kl_reference(pred[:8].cpu().double(), target[:8].cpu().double(), xyz, area)
    got = run()[:8].cpu().double()
    rel = float((got - exact).abs().max() / exact.abs().max())
    assert rel < (1e-5 if impl == "locdiff" else 1e-3), (impl, degree, rel)  # float32 paths: 1e-3
    benchmark.extra_info.update(device=device if device == "cpu" else torch.cuda.get_device_name(), impl=impl,
                                op="kl", degree=degree, dtype="float32", items=BATCH, max_rel_diff=rel,
                                threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


def _compare(degrees, rounds):
    import time

    # Without torch-harmonics its column says so rather than stopping the table.
    impls = [i for i in IMPLS if not (i == "th-isht" and missing("torch_harmonics"))]
    if len(impls) < len(IMPLS):
        print(f"th-isht: {missing('torch_harmonics')}")
    print(f"| L | B | {' | '.join(IMPLS)} | dense / locdiff | th-isht / locdiff |")
    print("|" + "---|" * (len(IMPLS) + 4))
    for degree in degrees:
        pred, target = _pairs(degree, BATCH, "cpu")
        runs = {i: _runner(i, degree, pred, target) for i in impls}
        best = {i: math.inf for i in IMPLS}
        for run in runs.values():
            run()  # warm-up: tables, plans
        for _ in range(rounds):
            for i, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[i] = min(best[i], time.perf_counter() - t0)
        cells = " | ".join(f"{best[i] * 1e3:.2f}" if math.isfinite(best[i]) else "n/a" for i in IMPLS)
        th = f"{best['th-isht'] / best['locdiff']:.2f}x" if math.isfinite(best["th-isht"]) else "n/a"
        print(f"| {degree} | {BATCH} | {cells} | {best['dense'] / best['locdiff']:.2f}x | {th} |", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degrees", default="16,24,32,64")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _compare([int(x) for x in a.degrees.split(",")], a.rounds)
