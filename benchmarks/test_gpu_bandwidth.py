"""Copy bandwidth of the GPU, measured in the same run as the kernels (the SH output
bandwidth is reported as a fraction of it: benchmarks/tools/gpu_summary.py). Skipped without
a GPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

NBYTES = 1 << 29  # 512 MiB read + 512 MiB written per copy: far beyond L2


def _event_gbps(dst, src, repeats=20):
    """Mean GB/s of dst.copy_(src), counting bytes read plus bytes written, by CUDA events."""
    for _ in range(3):
        dst.copy_(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / repeats
    return 2 * src.numel() * src.element_size() / seconds / 1e9, seconds


def test_gpu_copy_bandwidth(benchmark):
    src = torch.empty(NBYTES // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    gbps, seconds = _event_gbps(dst, src)

    def run():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    assert torch.equal(dst, src)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), impl="torch", op="copy", degree=None,
        dtype="float32", items=src.numel(), bytes_read=NBYTES, bytes_written=NBYTES,
        copy_gbps_read_plus_write=round(gbps, 1), copy_seconds_event=seconds,
        # Write-only figure for comparing with an SH kernel's output bytes.
        write_gbps=round(gbps / 2, 1))
