"""`locdiff train`, `predict` and `evaluate` under torchrun on the CPU (gloo): two processes
make the same weights as one process with the same global batch and seed, two "nodes" on
localhost train, a killed two-process run resumes in one process, and the distributed
errors are one line with exit code 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from torchrun_helpers import clean_env, finish, free_port, stop_with_this_process

from locdiff.run import CHECKPOINT_FILE, load_checkpoint

# A tiny model, so that each run takes seconds; the TOML file also tests --config.
TINY_TOML = """format_version = 1
[model]
degree = 4
widths = [32, 16]
cond_dim = 16
emb_widths = [32]
dropout = 0.1
density_head = true
[diffusion]
timesteps = 50
kl_weight = 1.0
[train]
steps = 60
batch_size = 16
lr = 3e-3
warmup_steps = 2
val_size = 0
val_every = 0
log_every = 4
checkpoint_every = 4
[data]
workers = 0
"""


def _locdiff(*args, nproc: int | None = None, torchrun=(), **kw) -> subprocess.Popen:
    """``python -m locdiff ARGS``, under torchrun with ``nproc`` processes when given."""
    cmd = [sys.executable, "-m", "locdiff", *map(str, args)]
    if nproc or torchrun:
        launch = list(torchrun) or ["--standalone", "--nproc-per-node", str(nproc)]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "locdiff", *map(str, args)]
    kw.setdefault("preexec_fn", stop_with_this_process())
    return subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                text = open(f"/proc/{stat}/stat").read()
            except OSError:
                continue
            parents.setdefault(int(text.rsplit(")", 1)[1].split()[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    n = 96
    lab = rng.integers(0, 4, n)
    centres = np.array([[48.8, 2.3], [40.7, -74.0], [-33.9, 151.2], [35.7, 139.7]])
    coords = centres[lab] + rng.normal(0, 0.5, (n, 2))
    emb = np.concatenate([np.eye(4)[lab], rng.normal(size=(n, 4))], 1).astype(np.float32)
    np.save(d / "emb.npy", emb)
    np.save(d / "coords.npy", coords)
    (d / "tiny.toml").write_text(TINY_TOML)
    return d


def _train_args(data, out, *extra):
    return ["train", "--config", data / "tiny.toml", "--embeddings", data / "emb.npy", "--coords",
            data / "coords.npy", "--out", out, "--device", "cpu", "--quiet", *extra]


def _weights(run) -> dict:
    tensors, meta = load_checkpoint(run)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}, json.loads(meta["state"])


def _assert_close(a: dict, b: dict, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        scale = float(b[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) <= rtol * scale, k


@pytest.fixture(scope="module")
def one_process(data):
    """The reference: one process cutting the global batch of 16 into 2 pieces of 8."""
    out = data / "one"
    finish(_locdiff(*_train_args(data, out, "--accumulate", "2")))
    return out


def test_two_processes_match_one(data, one_process):
    out = data / "two"
    finish(_locdiff(*_train_args(data, out), nproc=2))
    a, sa = _weights(out)
    b, sb = _weights(one_process)
    assert sa["step"] == sb["step"] == 60
    _assert_close(a, b)
    # Rank 0 alone wrote the run folder: config, TOML, metrics, the kept checkpoints.
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 16 and cfg["model"]["degree"] == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(4, 61, 4))
    assert {"loss", "mse", "lr", "samples_per_s"} <= set(lines[0])


def test_two_nodes_on_localhost(data):
    port, out = free_port(), data / "nodes"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "locdiff-train-test"]
    procs = [_locdiff(*_train_args(data, out, "--steps", "8"), torchrun=common) for _ in range(2)]
    for p in procs:
        finish(p)
    _, state = _weights(out)
    assert state["step"] == 8 and state["world_size"] == 2


def test_killed_run_resumes_with_another_world_size(data, one_process):
    out = data / "killed"
    proc = _locdiff(*_train_args(data, out), nproc=2)
    deadline = time.monotonic() + 90
    while not (out / CHECKPOINT_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    for pid in [*_descendants(proc.pid), proc.pid]:  # both ranks and torchrun, as a node failure would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    _, state = _weights(out)
    assert state["step"] < 60, "the run ended before it could be killed"
    # One process accumulating 2 pieces continues the two processes' run exactly.
    finish(_locdiff(*_train_args(data, out, "--resume", "--accumulate", "2")))
    a, sa = _weights(out)
    b, _ = _weights(one_process)
    assert sa["step"] == 60 and sa["world_size"] == 1
    _assert_close(a, b)


def test_world_size_not_dividing_the_batch(data):
    out = data / "odd"
    _, err = finish(_locdiff(*_train_args(data, out, "--batch-size", "15"), nproc=2), code=1)
    lines = [ln for ln in err.splitlines() if ln.startswith("locdiff train: error")]
    assert lines and "--batch-size 15: expected a multiple of the world size 2" in lines[0], err[-2000:]
    assert not (out / "config.json").exists()


def test_rendezvous_timeout_is_one_line(data):
    env = clean_env() | {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(free_port())}
    argv = _train_args(data, data / "rdzv", "--dist-timeout", "2")
    proc = subprocess.run([sys.executable, "-m", "locdiff", *map(str, argv)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    # torch's own C++ log lines about the retries may come first; locdiff's error is one line, last.
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("locdiff train: error") and "rendezvous at 127.0.0.1:" in line and "rank 1 of 2" in line


def test_config_of_another_format_version(data, tmp_path, capsys):
    from locdiff import cli

    (tmp_path / "old.toml").write_text(TINY_TOML.replace("format_version = 1", "format_version = 0"))
    code = cli.main([str(a) for a in _train_args(data, tmp_path / "run")[:1]] +
                    ["--config", str(tmp_path / "old.toml"), "--embeddings", str(data / "emb.npy"),
                     "--coords", str(data / "coords.npy"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "format_version = 0, but this locdiff reads format version 1" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate", "predict-gallery"])
def test_predict_and_evaluate_merge_in_input_order(data, one_process, tmp_path, command):
    # predict-gallery: LocDiff-H, whose gallery rank 0 alone loads and searches.
    def args(out):
        if command.startswith("predict"):
            gallery = ["--gallery-embeddings", data / "emb.npy", "--gallery-coords", data / "coords.npy"]
            return ["predict", "--run-dir", one_process, "--embeddings", data / "emb.npy", "--out", out,
                    "--top-k", "2", "--device", "cpu", *(gallery if command == "predict-gallery" else [])]
        return ["evaluate", "--run-dir", one_process, "--embeddings", data / "emb.npy", "--coords",
                data / "coords.npy", "--json", out, "--device", "cpu"]
    # --run-dir: torchrun's parser would take --run for its --run-path. Batches of 16 rows: the 96 rows are split 3 + 3 batches between the processes.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    finish(_locdiff(*args(tmp_path / "a" / "out")))
    finish(_locdiff(*args(tmp_path / "b" / "out"), nproc=2))
    one, two = (tmp_path / "a" / "out").read_text(), (tmp_path / "b" / "out").read_text()
    if command.startswith("predict"):
        assert one == two and len(one.splitlines()) == 97
    else:
        a, b = json.loads(one), json.loads(two)
        assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-6) for k in a
                                            if isinstance(a[k], float))
    assert sorted(os.listdir(tmp_path / "b")) == ["out"]


def test_checkpoints_keep_last_k_and_best(data, tmp_path):
    from locdiff import cli

    val = ["--val-embeddings", data / "emb.npy", "--val-coords", data / "coords.npy"]
    code = cli.main([str(a) for a in _train_args(data, tmp_path / "run", "--steps", "12", *val, "--set",
                                                  "train.keep_checkpoints=3", "--set", "train.val_every=4")])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint*.safetensors"))
    assert names == ["checkpoint-best.safetensors", "checkpoint-step00000004.safetensors",
                     "checkpoint-step00000008.safetensors", "checkpoint.safetensors"]
    best = json.loads(load_checkpoint(tmp_path / "run", "checkpoint-best.safetensors")[1]["state"])
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    medians = {r["step"]: r["val_median_km"] for r in recs if "val_median_km" in r}
    assert best["step"] == min(medians, key=medians.get)


def test_time_bound_stops_every_rank_at_the_same_step(data):
    # Rank 0's clock decides for all: a rank stopping alone would leave the other waiting
    # in the next exchange until --dist-timeout.
    out = data / "timed"
    finish(_locdiff(*_train_args(data, out, "--steps", "100000", "--max-minutes", "0.002", "--dist-timeout", "30"),
                    nproc=2))
    _, state = _weights(out)
    assert 0 < state["step"] < 100_000


def test_a_rank_0_error_leaves_the_others_one_line_not_a_traceback(data, tmp_path):
    # Rank 0 alone reads the run folder; its error ends it while rank 1 waits in a collective,
    # whose gloo "Connection closed by peer" was a traceback (docs/cli.md, "Exit codes").
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _, err = finish(_locdiff(*_train_args(data, mine), nproc=2), code=1)
    assert "locdiff train: error (rank 0 of 2):" in err and "notes.txt" in err, err[-2000:]
    assert "locdiff train: error (rank 1 of 2): another process of the group stopped first" in err, err[-2000:]
    assert "[rank1]: Traceback" not in err, err[-2000:]
