"""Training-data loader on a synthetic file the size of MP-16's CLIP ViT-L/14 embeddings
(4.7M x 768 float16, 7.2 GB), against the training step rate of the demo's model.

    pytest benchmarks/test_loader_bench.py --benchmark-only -s      # full size
    pytest benchmarks/test_loader_bench.py --benchmark-only -m fast  # 100,000 rows, seconds

Goals (asserted): the loader delivers at least 5x the samples/s of a training step of the
demo's model at degree 24 (benchmarks/train_step.py: 768-float embeddings, batch 256,
forward + backward + AdamW, measured in the same run), and the loader adds less
than 2 GB of resident memory (PSS of the process and its workers) beyond the model.

The file is written in chunks to ``$LOCDIFF_CACHE/bench`` (or the largest that fits half of
the free disk, scaled down and said so in ``extra_info``) and deleted after the run unless
LOCDIFF_LOADER_KEEP=1. Each size is read twice over the same batches: first with the file
evicted from the page cache (a first epoch; rows come from the disk) and then again (later
epochs of a file that fits in memory). Settings: LOCDIFF_LOADER_ROWS (rows of the full-size
case), LOCDIFF_LOADER_WORKERS (2), LOCDIFF_LOADER_BATCHES (batches per pass),
LOCDIFF_LOADER_DEVICE (the training step's device and where batches are copied; CUDA when
available, with pinned batches).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from locdiff.data.dataset import EmbeddingDataset, make_loader
from locdiff.data.files import cache_dir
from locdiff.data.sampler import BatchSampler
from train_step import make_step, samples_per_s

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for memory figures")

DIM, BATCH, GOAL_RATIO, GOAL_BYTES = 768, 256, 5.0, 2 * 1024**3
DEGREE = 24  # the training step the loader is measured against
SIZES = {"fast": 100_000, "full": int(os.environ.get("LOCDIFF_LOADER_ROWS", 4_700_000))}


def _rows_that_fit(rows: int, folder: Path) -> int:
    free = shutil.disk_usage(folder).free
    return int(min(rows, free // 2 // (DIM * 2)))


def _write_file(path: Path, rows: int, chunk: int = 65_536) -> None:
    """A float16 ``(rows, DIM)`` .npy written chunk by chunk through a plain file (a memory
    map would put the whole file in this process's resident memory)."""
    if path.exists() and path.stat().st_size == 128 + rows * DIM * 2:
        return
    base = np.random.default_rng(0).standard_normal((chunk, DIM), dtype=np.float32).astype(np.float16)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f2", "fortran_order": False, "shape": (rows, DIM)})
        assert fh.tell() == 128
        for i in range(0, rows, chunk):
            n = min(chunk, rows - i)
            fh.write((base[:n] + np.float16(i // chunk % 64)).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pss(procs) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def train_rate(device: torch.device) -> float:
    """Samples/s of training steps of the demo's model at batch 256 with 768-float
    embeddings on ``device`` (bfloat16 autocast on CUDA; the CPU threads of conftest.py)."""
    step, net = make_step(device, degree=DEGREE, emb_dim=DIM, bf16=device.type == "cuda", batch=BATCH)
    rate = samples_per_s(step, device)
    _MODEL.append(net)  # kept alive: the memory goal is "beyond the model"
    return rate


_MODEL: list = []


@pytest.mark.parametrize("size", [pytest.param("fast", marks=pytest.mark.fast), "full"])
def test_loader_throughput_and_memory(benchmark, size):
    folder = cache_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = SIZES[size]
    rows = _rows_that_fit(wanted, folder)
    path = folder / f"loader_{rows}x{DIM}_f16.npy"
    workers = int(os.environ.get("LOCDIFF_LOADER_WORKERS", 2))
    batches = int(os.environ.get("LOCDIFF_LOADER_BATCHES", 200 if size == "fast" else 2000))
    keep = os.environ.get("LOCDIFF_LOADER_KEEP") == "1"
    try:
        t0 = time.perf_counter()
        _write_file(path, rows)
        write_s = time.perf_counter() - t0
        dev = torch.device(os.environ.get("LOCDIFF_LOADER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        train_before = train_rate(dev)

        me = psutil.Process()
        base_pss, base_hwm = _pss([me]), _status_kb(me.pid, "VmHWM")
        coords = np.zeros((rows, 2))  # a real run holds its coordinates too: 16 bytes a row
        sampler = BatchSampler(rows, BATCH, seed=0, infinite=True)
        loader = make_loader(EmbeddingDataset(path, coords), sampler, workers=workers, prefetch=4, device=dev)
        peak = [0]

        def one_pass():
            sampler.seek(0)
            it = iter(loader)
            next(it)  # workers started and the first batch in
            t = time.perf_counter()
            for k in range(batches - 1):
                b = next(it)
                b.emb.to(dev, non_blocking=True), b.latlon.to(dev, non_blocking=True)
                if k % 100 == 0:
                    procs = [me, *me.children(recursive=True)]
                    peak[0] = max(peak[0], _pss(procs))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rate = (batches - 1) * b.emb.shape[0] / (time.perf_counter() - t)
            return rate, procs

        _evict(path)
        cold, _ = one_pass()
        warm, procs = benchmark.pedantic(one_pass, rounds=1, iterations=1)
        worker_hwm = [_status_kb(p.pid, "VmHWM") for p in procs[1:] if p.is_running()]
        worker_file = [_status_kb(p.pid, "RssFile") for p in procs[1:] if p.is_running()]
        extra = peak[0] - base_pss
        del loader
        # Measured on both sides of the loader's passes, for the same reason as the rounds.
        train_after = train_rate(dev)
        step_rate = max(train_before, train_after)
        benchmark.extra_info.update({
            "impl": "locdiff", "op": "loader", "degree": DEGREE, "dtype": "float16", "items": batches * BATCH,
            "rows": rows, "rows_wanted": wanted, "scaled": rows < wanted, "file_gb": round(path.stat().st_size / 1e9, 2),
            "write_s": round(write_s, 1), "workers": workers, "batch": BATCH, "batches": batches,
            "device": str(dev), "train_samples_per_s": round(step_rate),
            "train_samples_per_s_before_after": [round(train_before), round(train_after)], "loader_cold_samples_per_s": round(cold),
            "loader_warm_samples_per_s": round(warm), "ratio_cold": round(cold / step_rate, 1),
            "ratio_warm": round(warm / step_rate, 1), "model_and_process_pss_mb": round(base_pss / 2**20),
            "peak_pss_beyond_model_mb": round(extra / 2**20), "main_vmhwm_before_mb": round(base_hwm / 1024),
            "main_vmhwm_after_mb": round(_status_kb(me.pid, "VmHWM") / 1024),
            "worker_vmhwm_mb": [round(k / 1024) for k in worker_hwm],
            "worker_rss_file_mb": [round(k / 1024) for k in worker_file],
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
        print({k: v for k, v in benchmark.extra_info.items()})
        assert warm >= GOAL_RATIO * step_rate, f"loader {warm:.0f} samples/s < {GOAL_RATIO} x training {step_rate:.0f}"
        assert extra < GOAL_BYTES, f"loader adds {extra / 2**30:.2f} GB of resident memory"
    finally:
        if not keep:
            path.unlink(missing_ok=True)
            path.with_suffix(".tmp").unlink(missing_ok=True)
