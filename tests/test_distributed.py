"""locdiff.distributed and the sampler under torchrun on the CPU (gloo): two processes on one
node, two single-process "nodes" on localhost, a rendezvous that times out, and the
single-process fallbacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrun_helpers import clean_env, finish, free_port, stop_with_this_process

from locdiff import distributed as D
from locdiff.data.sampler import BatchSampler

WORKER = Path(__file__).with_name("dist_worker.py")


def _torchrun(*args, timeout=60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=stop_with_this_process())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    finish(_torchrun("--standalone", "--nproc-per-node", "2", str(WORKER), "checks", str(out)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ranks_and_decisions(two_ranks):
    r0, r1 = two_ranks
    assert [(r["rank"], r["world"], r["local_rank"], r["is_main"]) for r in two_ranks] == \
        [(0, 2, 0, True), (1, 2, 1, False)]
    for r in two_ranks:
        assert r["any_true"] is True, "rank 1's True must reach every rank"
        assert r["none_true"] is False
        assert r["from_src0"] is False, "src=0 takes rank 0's flag, not the others'"
        assert r["mean"] == {"kl": 1.0, "mse": 1.5}


def test_gather_in_order(two_ranks):
    r0, r1 = two_ranks
    assert r0["part"] == [0, 6] and r1["part"] == [6, 11]
    assert r1["merged"] is None and r1["small"] is None
    assert r0["small"] == [[0], [0, 3]]
    m = r0["merged"]
    rows = np.arange(11)
    assert m["x"] == np.stack([rows, rows * 2, rows * 3], 1).tolist()
    assert m["odd"] == (rows % 2 == 1).tolist() and m["t"] == rows.tolist()
    assert m["types"] == ["ndarray", "bool", "Tensor"]


def test_sampler_parts_make_the_single_process_batches(two_ranks):
    one = BatchSampler(103, 8, seed=5, drop_last=False, rank=0, world_size=1)
    for epoch in (0, 1):
        one.set_epoch(epoch)
        expect = [b.tolist() for b in one]
        got = [p0 + p1 for p0, p1 in zip(two_ranks[0]["parts"][epoch], two_ranks[1]["parts"][epoch])]
        assert got == expect
    one.seek(7)
    assert [p0 + p1 for p0, p1 in zip(two_ranks[0]["resumed"], two_ranks[1]["resumed"])] == \
        [b.tolist() for b in one]
    for r in two_ranks:
        assert r["loader_rows"] == r["parts"][0] and r["loader_ok"]


def test_two_nodes_on_localhost(tmp_path):
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "locdiff-test"]
    procs = [_torchrun(*common, "--node-rank", str(i), str(WORKER), "allreduce", str(tmp_path)) for i in (0, 1)]
    for p in procs:
        finish(p)
    res = sorted((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["sum"]) for r in res] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert sorted(r["group_rank"] for r in res) == ["0", "1"], "each launch is one node"


@pytest.mark.parametrize("rank", [0, 1])
def test_rendezvous_timeout_is_one_line(rank):
    env = clean_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    code = ("import sys\nfrom locdiff import distributed as D\n"
            "try:\n    D.init(timeout_s=2)\nexcept D.DistributedError as e:\n    print(e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and "rendezvous at 127.0.0.1:" in line
    assert f"rank {rank} of 2" in line and "within 2 s" in line


def test_single_process_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.init() is False and not D.is_distributed()
    assert (D.rank(), D.world_size(), D.local_rank(), D.is_main()) == (0, 1, 0, True)
    D.barrier()
    assert D.broadcast_decision(True) is True and D.broadcast_decision(False) is False
    assert D.all_reduce_mean({"a": torch.tensor(2.5), "b": 1}) == {"a": 2.5, "b": 1.0}
    x = np.arange(6).reshape(3, 2)
    assert D.gather_in_order(x) is x
    assert D.device() == torch.device("cpu")


def test_bad_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(D.DistributedError, match="RANK=5 with WORLD_SIZE=2"):
        D.init()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(D.DistributedError, match="RANK='one': expected an integer"):
        D.init()


@pytest.mark.parametrize("n, world", [(0, 1), (1, 3), (10, 3), (11, 2), (7, 7), (100, 8)])
def test_split_for_rank_covers_the_inputs_once(n, world):
    parts = [D.split_for_rank(n, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate([np.arange(n)[p] for p in parts]), np.arange(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        D.split_for_rank(n, world, world)


def test_python_dash_m_locdiff_is_the_cli(tmp_path):
    """torchrun -m locdiff needs `python -m locdiff`; errors keep the CLI's contract."""
    proc = subprocess.run([sys.executable, "-m", "locdiff", "train", "--embeddings", str(tmp_path / "no.npy"),
                           "--coords", str(tmp_path / "no.csv"), "--out", str(tmp_path / "run")],
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"locdiff train: error: {tmp_path / 'no.npy'}: embeddings file not found"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_launcher_started_with_on_parent_death_ends_with_its_parent():
    # A torchrun started by pytest (or by a benchmark) gets SIGTERM when pytest is killed,
    # so that its agent stops the workers rather than leaving them running.
    import os
    import signal
    import time

    script = ("import signal, subprocess, sys, time\nfrom locdiff.stopping import on_parent_death\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
              "preexec_fn=on_parent_death(signal.SIGTERM))\nprint(child.pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=clean_env())
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as f:  # reaped by init once it exits: a zombie counts as gone
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed parent")


def test_shutdown_takes_a_peer_that_left_as_done(monkeypatch):
    # A SIGTERM during rank 0's final calibration stopped rank 1, and rank 0's closing
    # barrier raised a traceback after its work and checkpoint were done.
    from locdiff import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    left = []

    def barrier():
        raise RuntimeError(f"[../gloo/transport/tcp/pair.cc] {distributed._PEER_GONE[0]}")
    monkeypatch.setattr(distributed.dist, "barrier", barrier)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: left.append(1))
    distributed.shutdown(wait=True)
    assert left == [1]
    monkeypatch.setattr(distributed.dist, "barrier", lambda: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):
        distributed.shutdown(wait=True)
