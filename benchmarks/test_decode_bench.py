"""SHDD decode: locdiff vs the naive torch path vs torch-harmonics' inverse SHT + argmax.

    pytest benchmarks/test_decode_bench.py --benchmark-only -k decode

impls (each checked for accuracy once, on the same encoded points, before timing):
  locdiff        shdd.decode: fused ring-grid synthesis + local maxima (C++), Newton refinement
  locdiff-triton shdd.decode(backend="triton"): the grid stage as one fused Triton kernel,
                 the refinement as another (CUDA only; benchmarks/tools/refine_ab.py times the
                 refinement routes alone)
  locdiff-dense  shdd.decode on a Fibonacci grid of the same spacing: dense product against a
                 cached Y table (torch matmul), then the same refinement (the alternative route)
  naive          precomputed Y on a 100,000-point Fibonacci grid, matmul, argmax
  th-isht        torch-harmonics InverseRealSHT on locdiff's grid size + argmax, in batch
                 chunks of at most 2^24 grid values (accuracy: the grid spacing, worse than
                 locdiff's refined float precision)
Shrunk where infeasible here (skip reasons say so): the naive table needs 100k x (L+1)^2
floats (L <= 64 only on the CPU, L <= 128 on a GPU) and B = 4096 takes minutes on the CPU;
L = 256 at B = 4096 is skipped for all. float32 coefficients; threads from conftest.py (2 by
default). device "cuda" runs where a GPU is present (benchmarks/gpu/run_all.sh).

Quick same-run comparison (interleaved rounds, best of each; no pytest-benchmark), e.g.
    python benchmarks/test_decode_bench.py --threads 1 --rounds 9
"""
import math
import os

import pytest
import torch

import locdiff
from locdiff import grids, shdd
from anchors import inverse_sht, missing, th_grid, to_th

DEGREES = [16, 32, 64, 128, 256]
BATCHES = [1, 64, 4096]
# The lent GPU call runs a trimmed matrix (benchmarks/gpu/run_all.sh sets these).
if os.environ.get("LOCDIFF_BENCH_CUDA_DECODE"):
    DEGREES = [int(d) for d in os.environ["LOCDIFF_BENCH_CUDA_DECODE"].split(",")]
IMPLS = ["locdiff", "locdiff-triton", "locdiff-dense", "naive", "th-isht"]
DEVICES = ["cpu", "cuda"]
_CACHE = {}


def _points(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.asin(torch.rand(n, dtype=torch.float64, generator=g) * 2 - 1) * 180 / math.pi
    lon = torch.rand(n, dtype=torch.float64, generator=g) * 360 - 180
    return torch.stack([lat, lon], -1)


def _naive_table(degree, device="cpu"):
    key = ("naive", degree, device)
    if key not in _CACHE:
        _CACHE.clear()  # one big table at a time
        g = grids.fibonacci(100_000)
        _CACHE[key] = (g.latlon.to(device), locdiff.spherical_harmonics(g.xyz.float().to(device), degree))
    return _CACHE[key]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _runner(impl, degree, coeffs):
    """A function decoding ``coeffs`` on its device, synchronised (so that timings hold)."""
    device = coeffs.device

    def synced(fn):
        def run():
            out = fn()
            _sync(device)
            return out
        return run

    if impl == "locdiff":
        grid = grids.for_degree(degree)
        return synced(lambda: shdd.decode(coeffs, grid=grid))
    if impl == "locdiff-triton":
        grid = grids.for_degree(degree)
        return synced(lambda: shdd.decode(coeffs, grid=grid, backend="triton"))
    if impl == "locdiff-dense":
        grid = grids.for_degree(degree, "fibonacci")
        grid.sh_table(degree, device, coeffs.dtype)
        return synced(lambda: shdd.decode(coeffs, grid=grid))
    if impl == "naive":
        latlon, y = _naive_table(degree, device)
        return synced(lambda: latlon[(coeffs @ y.T).argmax(-1)])
    isht, colat, nlon = inverse_sht(degree, device), th_grid(degree)[0].to(device), grids.for_degree(degree).nlon
    x = to_th(coeffs, degree)
    chunk = max(1, (1 << 24) // (colat.numel() * nlon))

    def run():
        idx = torch.cat([isht(x[i:i + chunk]).flatten(1).argmax(-1) for i in range(0, x.shape[0], chunk)])
        lat = 90 - colat[idx // nlon] * 180 / math.pi
        lon = torch.remainder(360 * (idx % nlon) / nlon + 180, 360) - 180
        return torch.stack([lat.double(), lon.double()], -1)
    return synced(run)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("degree", DEGREES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_decode(benchmark, device, impl, degree, batch):
    cpu = device == "cpu"
    if not cpu and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl == "locdiff-triton" and cpu:
        pytest.skip("Triton runs on CUDA (the CPU interpreter is for tests only)")
    if degree == 256 and batch == 4096:
        pytest.skip("L=256, B=4096: minutes per round on a 2-core CPU")
    if impl == "th-isht" and missing("torch_harmonics"):
        pytest.skip(missing("torch_harmonics"))
    if impl == "naive" and degree > (64 if cpu else 128):
        pytest.skip(f"naive table 100k x {(degree + 1) ** 2} float32 does not fit this machine")
    if impl == "naive" and batch > 64 and cpu:
        pytest.skip("naive path at B=4096: minutes per round (shrunk to B <= 64)")
    if impl == "locdiff-dense" and (degree > 128 or batch > 64):
        pytest.skip("dense route: G x K table and B x G products too large here")
    torch.manual_seed(0)
    truth = _points(batch, seed=degree)
    coeffs = shdd.encode(truth, degree).float().contiguous().to(device)
    run = _runner(impl, degree, coeffs)
    # Accuracy once before timing: locdiff to float32 precision of its coefficients, grid
    # routes to their spacing.
    err_km = float(locdiff.great_circle_km(run().cpu().double(), truth).max())
    spacing_km = {
        "locdiff": 0.025, "locdiff-triton": 0.025, "locdiff-dense": 0.025,
        "naive": 1.0 * math.sqrt(4 * math.pi / 100_000) * locdiff.EARTH_RADIUS_KM,
        "th-isht": 1.5 * 2 * math.pi / grids.for_degree(degree).nlon * locdiff.EARTH_RADIUS_KM,
    }[impl]
    assert err_km <= spacing_km, (impl, degree, err_km, spacing_km)
    benchmark.extra_info.update(device=device if cpu else torch.cuda.get_device_name(), impl=impl, op="decode",
                                degree=degree, dtype="float32", items=batch, max_error_km=err_km,
                                threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=3 if batch * degree ** 3 < 4096 * 64 ** 3 else 1, iterations=1,
                       warmup_rounds=0)


def _compare(degrees, batches, threads, rounds, naive):
    """Markdown table: best-of-``rounds`` ms of each impl, interleaved round by round."""
    import time

    torch.set_num_threads(threads)
    impls = ["locdiff", "th-isht"] + (["naive"] if naive else [])
    have_th = not missing("torch_harmonics")
    if not have_th:  # its column says so rather than stopping the table
        print(f"th-isht: {missing('torch_harmonics')}")
    print(f"| L | B | threads | {' | '.join(impls)} | th-isht / locdiff |")
    print("|" + "---|" * (len(impls) + 4))
    for degree in degrees:
        for batch in batches:
            coeffs = shdd.encode(_points(batch, seed=degree), degree).float().contiguous()
            runs = {i: _runner(i, degree, coeffs) for i in impls
                    if (i != "naive" or degree <= 64) and (i != "th-isht" or have_th)}
            best = {i: math.inf for i in runs}
            for i, run in runs.items():
                run()  # warm-up: tables, plans
            for r in range(rounds):
                for i, run in runs.items():
                    if i == "naive" and r:
                        continue  # seconds per round: one is enough
                    t0 = time.perf_counter()
                    run()
                    best[i] = min(best[i], time.perf_counter() - t0)
            cells = [f"{best[i] * 1e3:.1f}" if i in best else "-" for i in impls]
            ratio = f"{best['th-isht'] / best['locdiff']:.2f}" if "th-isht" in best else "-"
            print(f"| {degree} | {batch} | {threads} | {' | '.join(cells)} | {ratio} |", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degrees", default="32,64,128")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--naive", action="store_true", help="also the naive path (L <= 64; slow)")
    a = ap.parse_args()
    _compare([int(x) for x in a.degrees.split(",")], [int(x) for x in a.batches.split(",")],
             a.threads, a.rounds, a.naive)
