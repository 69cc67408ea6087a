"""Training throughput of the demo's LocDiff model (benchmarks/train_step.py: batch 256 per
process, 768-float embeddings) at L = 24 and 64: eager, ``torch.compile`` and bfloat16
autocast in one process, and DistributedDataParallel over several processes. The
``eager-plain-adamw`` rows are the anchor of training's optimiser: eager with torch's
default (unfused) AdamW.

    pytest benchmarks/test_train_bench.py --benchmark-only              # CPU: 1 and 2 processes
    pytest benchmarks/test_train_bench.py --benchmark-only -k "not ddp"  # one process only

``extra_info["samples_per_s"]`` is the figure (the best of a few rounds). On CUDA the
single-process rows run on ``cuda:0``; the DDP rows use every GPU of the machine (NCCL),
on the CPU two processes (gloo) of one thread each, against one process of one thread in
the same run: the ratio is the scaling, not the speed of the machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from train_step import BATCH, make_step, samples_per_s

from locdiff.stopping import on_parent_death

DEGREES = [24, 64]
DIM = 768
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _info(benchmark, **kw):
    benchmark.extra_info.update({"device": str(DEVICE), "op": "train_step", "dtype": "float32", "items": BATCH, **kw})


@pytest.mark.parametrize("degree", DEGREES)
@pytest.mark.parametrize("impl", ["eager", "eager-plain-adamw", "compile", "bf16"])
def test_train_step(benchmark, degree, impl):
    if impl == "compile" and sys.platform != "linux":
        pytest.skip("torch.compile's CPU backend is measured on Linux")
    step, _ = make_step(DEVICE, degree=degree, emb_dim=DIM, compiled=impl == "compile", bf16=impl == "bf16",
                         plain_adamw=impl == "eager-plain-adamw")
    rate = benchmark.pedantic(lambda: samples_per_s(step, DEVICE), rounds=1, iterations=1)
    _info(benchmark, impl=impl, degree=degree, samples_per_s=round(rate), threads=torch.get_num_threads(),
          dtype="bfloat16" if impl == "bf16" else "float32")


def _ddp_rate(tmp_path, degree: int, nproc: int, steps: int = 30) -> float:
    """Samples/s of ``locdiff train`` under torchrun with ``nproc`` processes, from the run's
    metrics.jsonl (the last logged rate: steps after the warm-up)."""
    rows = BATCH * nproc * 4
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((rows, DIM), dtype=np.float32))
    np.save(tmp_path / "coords.npy", np.stack([rng.uniform(-80, 80, rows), rng.uniform(-180, 180, rows)], 1))
    out = tmp_path / f"run{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": "1" if not CUDA else os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "locdiff", "train", "--embeddings", str(tmp_path / "emb.npy"),
           "--coords", str(tmp_path / "coords.npy"), "--out", str(out), "--degree", str(degree),
           "--steps", str(steps), "--batch-size", str(BATCH * nproc), "--set", "train.log_every=5",
           "--set", "train.val_every=0"]
    # SIGTERM to torchrun if pytest dies (Ctrl-C, a killed job): its agent stops the workers.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800,
                          preexec_fn=on_parent_death(signal.SIGTERM))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = [r["samples_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("samples_per_s")]
    return float(rates[-1])


@pytest.mark.parametrize("degree", DEGREES)
def test_train_ddp_scaling(benchmark, tmp_path, degree):
    nproc = torch.cuda.device_count() if CUDA else 2
    if nproc < 2:
        pytest.skip("one GPU: DDP scaling needs two or more")
    one = _ddp_rate(tmp_path, degree, 1)
    many = benchmark.pedantic(lambda: _ddp_rate(tmp_path, degree, nproc), rounds=1, iterations=1)
    _info(benchmark, impl=f"ddp{nproc}", degree=degree, items=BATCH * nproc, processes=nproc,
          samples_per_s=round(many), samples_per_s_one_process=round(one), scaling=round(many / one, 2))
