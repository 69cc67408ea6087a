"""Spherical harmonics: locdiff and its anchors in one run (pytest benchmarks --benchmark-only -k sh).

Each case checks the implementation once against locdiff's float64 result (error per unit
of sqrt((2l+1)/4pi), recorded in extra_info; anchors that are wrong are timed anyway and
flagged), then times it. `store-floor` times writing a fresh output of the same size: no
implementation that returns a new array can beat it; `locdiff-out` writes into one reused
buffer (out=), so it can. Report: python benchmarks/report.py FILE.json.
"""
import os

import numpy as np
import pytest
import torch

from sh_anchors import IMPLS, available, check

DEGREES_CPU = [4, 8, 16, 32, 64, 128, 256, 512]
DEGREES_CUDA = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ["cpu", "cuda"]
# Values written per call: enough to leave caches and amortise launch costs.
VALUES = {"cpu": int(os.environ.get("LOCDIFF_BENCH_VALUES", 4_000_000)), "cuda": 400_000_000}


def cases():
    for device in DEVICES:
        for degree in DEGREES_CUDA if device == "cuda" else DEGREES_CPU:
            yield device, degree


def points(device, degree, dtype):
    n = max(64, VALUES[device] // (degree + 1) ** 2)
    if device == "cuda":  # the output of one float64 call must fit next to the gradients
        n = min(n, int(8e9 // 8 // (degree + 1) ** 2 // 3))
    g = np.random.default_rng(degree)
    xyz = torch.tensor(g.normal(size=(n, 3)), dtype=dtype, device=device)
    grad = torch.tensor(g.normal(size=(n, (degree + 1) ** 2)), dtype=dtype, device=device)
    return xyz, grad


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", list(IMPLS) + ["store-floor"])
@pytest.mark.parametrize("device,degree", list(cases()))
def test_sh(benchmark, device, degree, impl, dtype, passes):
    if impl in ("store-floor", "locdiff-out"):
        if passes != "fwd":
            pytest.skip(f"{impl} is a forward-only figure")
    if impl == "store-floor":
        reason = None if device == "cpu" or torch.cuda.is_available() else "no CUDA device"
    else:
        reason = available(impl, device, degree)
    if reason:
        pytest.skip(reason)
    xyz, grad = points(device, degree, DTYPES[dtype])
    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", impl=impl, op="sh",
                degree=degree, dtype=dtype, items=xyz.shape[0], passes=passes,
                values=xyz.shape[0] * (degree + 1) ** 2, threads=torch.get_num_threads())
    if impl == "store-floor":
        shape = (xyz.shape[0], (degree + 1) ** 2)
        if device == "cpu":  # a fresh numpy array, as the anchors' numpy API returns
            np_dtype = np.float32 if dtype == "float32" else np.float64
            def run():
                np.empty(shape, np_dtype).fill(1.0)
        else:
            def run():
                torch.empty(shape, dtype=xyz.dtype, device=device).fill_(1.0)
                sync(device)
    else:
        fwd, fwd_bwd, as_locdiff = IMPLS[impl](xyz, degree, grad)
        info.update(check(fwd(), as_locdiff, xyz, degree))
        body = fwd if passes == "fwd" else fwd_bwd

        def run():
            body()
            sync(device)

    benchmark.extra_info.update(info)
    benchmark(run)
