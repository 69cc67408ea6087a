"""Spherical harmonics: locdiff and its anchors in one run (pytest benchmarks --benchmark-only -k test_sh).

Each case checks the implementation once against locdiff's float64 result (error per unit
of sqrt((2l+1)/4pi), recorded in extra_info; anchors that are wrong are timed anyway and
flagged), then times it. `store-floor` times allocating a fresh array of the output's size
and filling it, page faults included: what an implementation that returns newly allocated
memory pays at least. locdiff's CPU outputs come from a pool that reuses freed blocks, and
`locdiff-out` writes into one reused buffer (out=), so both can come in under it.
Report: python benchmarks/tools/report.py FILE.json.
"""
import os

import numpy as np
import pytest
import torch

from anchors import IMPLS, available, check

DEGREES_CPU = [4, 8, 16, 32, 64, 128, 256, 512]
# A trimmed matrix on the GPU (one lent call holds the build, the tests and every benchmark):
# the low-degree thread-per-point kernel, each group width, and the highest degree.
DEGREES_CUDA = [int(d) for d in os.environ.get("LOCDIFF_BENCH_CUDA_DEGREES", "2,8,32,128,512").split(",")]
CUDA_IMPLS = {"locdiff", "locdiff-out", "locdiff-triton", "sphericart", "store-floor"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ["cpu", "cuda"]
# Values written per call: enough to leave caches and amortise launch costs. On CUDA 2^26
# (256 MB in float32, 512 MB in float64): five to ten times an H100's 50 MB L2.
VALUES = {"cpu": int(os.environ.get("LOCDIFF_BENCH_VALUES", 4_000_000)),
          "cuda": int(os.environ.get("LOCDIFF_BENCH_CUDA_VALUES", 1 << 26))}
# Rows checked against the CPU float64 result before timing (the whole output would take
# minutes on the host).
CHECK_ROWS = 4096


def cases():
    for device in DEVICES:
        for degree in DEGREES_CUDA if device == "cuda" else DEGREES_CPU:
            yield device, degree


def points(device, degree, dtype):
    n = max(64, VALUES[device] // (degree + 1) ** 2)
    if device == "cuda":  # made on the GPU: no host arrays of hundreds of MB to copy over
        g = torch.Generator(device="cuda").manual_seed(degree)
        xyz = torch.randn((n, 3), generator=g, dtype=dtype, device="cuda")
        grad = torch.randn((n, (degree + 1) ** 2), generator=g, dtype=dtype, device="cuda")
        return xyz, grad
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
    if device == "cuda" and impl not in CUDA_IMPLS:
        pytest.skip(f"{impl} is left out of the trimmed CUDA matrix")
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
        info.update(check(fwd()[:CHECK_ROWS], as_locdiff, xyz[:CHECK_ROWS], degree))
        body = fwd if passes == "fwd" else fwd_bwd

        def run():
            body()
            sync(device)

    benchmark.extra_info.update(info)
    benchmark(run)
