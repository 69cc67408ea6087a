"""The CLI's guarantees (docs/cli.md), one test per case of the issue that asked for them:
the run-folder lock, exit codes after signals, settings and outputs checked before work,
damaged run folders, CSV encodings and the resume messages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cli_helpers import TINY, expect_error, run_cli, tiny_config, train_argv, trained_task

from locdiff.run import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint
from locdiff.train import train

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return trained_task(tmp_path_factory.mktemp("guarantees"))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- 1. a lock per run folder -----------------------------------------------------------------
HOLD = ("import sys, time\nfrom locdiff.runfolder import RunLock\nRunLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\ntime.sleep(60)\n")


def test_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(files, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        line = expect_error(capsys, train_argv(files, out, "--steps", 2), f"run folder in use by PID {holder.pid}")
        assert not (out / CONFIG_FILE).exists() and not (out / CHECKPOINT_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    assert "locdiff.lock" in line
    # The holder died without cleaning up: its lock file stays, and is taken over.
    assert (out / "locdiff.lock").exists()
    code, out_text, _ = run_cli(capsys, *train_argv(files, out, "--steps", 2))
    assert code == 0 and "trained 2 steps" in out_text


# ---- 2. signals: 130 / 143, exact resume, a second signal -------------------------------------
class SignalOnRead:
    """Embeddings that send this process ``signals`` on the n-th batch read, as a terminal or a
    scheduler would."""

    def __init__(self, arr, at: int, signals=(signal.SIGTERM,)):
        self.arr, self.at, self.signals, self.reads = arr, at, signals, 0
        self.shape = arr.shape

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, idx):
        self.reads += 1
        if self.reads == self.at:
            for s in self.signals:
                os.kill(os.getpid(), s)
        return self.arr[idx]


def test_signal_saves_and_resume_continues_exactly(files, tmp_path):
    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    train(emb, coords, tmp_path / "full", tiny_config(), progress=False)
    res = train(SignalOnRead(emb, 8), coords, tmp_path / "cut", tiny_config(), progress=False)
    assert res.signal == signal.SIGTERM and 0 < res.steps < 20
    _, meta = load_checkpoint(tmp_path / "cut")
    assert json.loads(meta["state"])["step"] == res.steps  # saved at the step it stopped
    train(emb, coords, tmp_path / "cut", tiny_config(), resume=True, progress=False)
    full, _ = load_checkpoint(tmp_path / "full")
    cut, _ = load_checkpoint(tmp_path / "cut")
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=0, msg=k)


def test_second_signal_stops_at_once_and_the_last_checkpoint_stays_whole(files, tmp_path):
    from locdiff.stopping import Interrupted

    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    with pytest.raises(Interrupted) as info:
        train(SignalOnRead(emb, 8, (signal.SIGINT, signal.SIGINT)), coords, tmp_path / "run", tiny_config(),
              progress=False)
    assert info.value.exit_code == 130
    _, meta = load_checkpoint(tmp_path / "run")  # verified by its checksum
    assert json.loads(meta["state"])["step"] == 5
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_under_torchrun_the_same_signal_twice_is_one_request(monkeypatch):
    # A scheduler signals every process of a job, and torchrun's agent forwards its own copy:
    # each worker got SIGTERM twice and stopped at once, without its agreed checkpoint.
    from locdiff import stopping

    for env, second, stops in (({"LOCAL_RANK": "1"}, signal.SIGTERM, False),
                               ({"LOCAL_RANK": "1"}, signal.SIGINT, True),  # another signal: the user insists
                               ({}, signal.SIGTERM, True)):                # no torchrun: a second request
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        stop = stopping.StopSignals()
        stop._handle(signal.SIGTERM, None)
        if stops:
            with pytest.raises(stopping.Interrupted):
                stop._handle(second, None)
        else:
            stop._handle(second, None)
            assert stop.signum == signal.SIGTERM
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(stopping, "DUPLICATE_WINDOW_S", 0.0)  # long after: the user insists
    stop = stopping.StopSignals()
    stop._handle(signal.SIGTERM, None)
    with pytest.raises(stopping.Interrupted):
        stop._handle(signal.SIGTERM, None)


def test_second_signal_during_the_final_save_stops_at_once(files, tmp_path, monkeypatch):
    from locdiff import train as train_module
    from locdiff.stopping import Interrupted

    saves = []

    def signalled_save(keeper, data, step):  # the user presses Ctrl-C again while it saves
        saves.append(step)
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(keeper, data, step)

    real_save = train_module._final_save
    monkeypatch.setattr(train_module, "_final_save", signalled_save)
    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    with pytest.raises(Interrupted) as info:
        train(SignalOnRead(emb, 8, (signal.SIGINT,)), coords, tmp_path / "run", tiny_config(), progress=False)
    assert info.value.exit_code == 130 and len(saves) == 1
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_a_run_stopped_during_calibration_validates_once(files, tmp_path, monkeypatch):
    from locdiff import train as train_module

    real = train_module.calibrate

    def interrupted(*args, **kw):  # Ctrl-C while the finished run calibrates
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)
    monkeypatch.setattr(train_module, "calibrate", interrupted)
    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    val = (emb[:40], coords[:40])
    assert train(emb, coords, tmp_path / "run", tiny_config(), val=val, progress=False).signal == signal.SIGINT
    monkeypatch.undo()
    train(emb, coords, tmp_path / "run", tiny_config(), val=val, resume=True, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "val_median_km" in r]
    assert steps and len(steps) == len(set(steps)), steps


def _children(pid: int) -> list[int]:
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(stat))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_loader_workers_die_with_a_killed_trainer(files, tmp_path):
    # Workers ignore SIGINT / SIGTERM (the trainer stops them); after a SIGKILL of the trainer
    # they blocked for ever on the pipe no one reads, holding memory and its output pipe.
    # Batches of 2 MB fill the pipes, so the workers are blocked writing when the trainer dies.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "wide.npy", rng.normal(size=(4096, 2048)).astype(np.float32))
    np.save(tmp_path / "coords.npy", np.stack([rng.uniform(-80, 80, 4096), rng.uniform(-180, 180, 4096)], 1))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "locdiff", "train", "--embeddings", str(tmp_path / "wide.npy"), "--coords",
            str(tmp_path / "coords.npy"), "--out", str(out), *TINY, "--steps", "100000", "--batch-size", "256",
            "--workers", "2", "--set", "train.log_every=1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.kill()
    proc.wait()
    assert len(workers) >= 2
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(workers):
        time.sleep(0.1)
    assert not _alive(workers)


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_command_exits_128_plus_signal(files, tmp_path, sig, code):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "locdiff", *map(str, train_argv(files, out, "--steps", 100_000, "--set",
                                                                  "train.log_every=1"))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume" in err
    _, meta = load_checkpoint(out)
    assert json.loads(meta["state"])["step"] >= 2


# ---- 3. settings checked before anything is written -------------------------------------------
@pytest.mark.parametrize("extra, fragment", [
    (["--degree", "-1"], "--degree -1: expected an integer in [1, "),
    (["--degree", "5000"], "--degree 5000: expected an integer in [1, "),
    (["--steps", "-5"], "--steps -5: expected an integer >= 1"),
    (["--max-minutes", "-1"], "--max-minutes -1.0: expected a finite number > 0"),
    (["--max-minutes", "nan"], "--max-minutes nan: expected a finite number > 0"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--set", "model.widths=[0, 4]"], "--set model.widths=[0, 4]: expected a non-empty list of integers in [1, 65536]"),
    (["--set", "train.lr=0"], "--set train.lr=0: expected"),  # as typed, not the parsed 0.0
])
def test_settings_out_of_range(files, tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    expect_error(capsys, train_argv(files, out, *extra), fragment, [out])


def test_an_unknown_argument_is_named_by_its_command(files, tmp_path, capsys):
    # An unquoted list splits in two: argparse's error names the command, as the others do.
    from locdiff import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in train_argv(files, tmp_path / "run", "--set", "model.widths=[64,", "32]")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == ["locdiff train: error: unrecognized arguments: 32] (see locdiff train --help)"]


def test_embeddings_without_columns(files, tmp_path, capsys):
    np.save(tmp_path / "e0.npy", np.zeros((64, 0), np.float32))
    out = tmp_path / "run"
    expect_error(capsys, ["train", "--embeddings", tmp_path / "e0.npy", "--coords", files / "coords.csv", "--out",
                          out, *TINY], "no columns", [out])


def test_degree_bound_follows_memory(monkeypatch):
    from locdiff import settings

    monkeypatch.setattr(settings, "available_bytes", lambda dev: (2**30, "available memory"))
    top, why = settings.max_degree(tiny_config(), "cpu", 16)
    assert 4 < top < settings.KERNEL_MAX_DEGREE and "1.0 GiB of available memory" in why
    assert settings.training_bytes(tiny_config(), top, 16) <= 2**30 < settings.training_bytes(tiny_config(), top + 1, 16)


# ---- 4. outputs checked before the work -------------------------------------------------------
def test_predict_outputs_checked_before_predicting(files, tmp_path, capsys, monkeypatch):
    from locdiff import predict

    monkeypatch.setattr(predict.Predictor, "predict", lambda *a, **k: pytest.fail("predicted before checking"))
    (tmp_path / "dir").mkdir()
    base = ["predict", "--run", files / "base", "--embeddings", files / "emb.npy"]
    expect_error(capsys, base + ["--out", tmp_path / "dir"], "dir: is a folder; the predictions CSV needs a file")
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, base + ["--out", tmp_path / "afile" / "p.csv"], "is a file, not a folder")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    expect_error(capsys, base + ["--out", tmp_path / "p.csv", "--map", tmp_path / "m.png"],
                 "--map needs the package 'matplotlib'", [tmp_path / "p.csv"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(files, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        expect_error(capsys, ["predict", "--run", files / "base", "--embeddings", files / "emb.npy", "--out",
                              ro / "p.csv"], "cannot write the predictions CSV")
    finally:
        ro.chmod(0o755)


def test_train_out_under_a_file(files, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, train_argv(files, tmp_path / "afile" / "run"), "afile is a file, so the run folder")


def test_free_space_checked_before_each_checkpoint(files, tmp_path, capsys, monkeypatch):
    from locdiff import runfolder

    monkeypatch.setattr(runfolder, "free_bytes", lambda folder: 1000)
    out = tmp_path / "run"
    line = expect_error(capsys, train_argv(files, out, "--steps", 2), "needs 17 MB free (", [out / CONFIG_FILE])
    assert "B and a 16 MB margin) but the file system has 1 kB" in line  # the checkpoint's own need shown
    # Space runs out during training: the final save names the checkpoint that is intact.
    calls = []

    def shrinking(folder):
        calls.append(folder)
        return 10**12 if len(calls) <= 2 else 1000
    monkeypatch.setattr(runfolder, "free_bytes", shrinking)
    line = expect_error(capsys, train_argv(files, out, "--steps", 8, "--set", "train.checkpoint_every=4"),
                        "free some space")
    assert "the checkpoint of step 4 is intact" in line
    _, meta = load_checkpoint(out)
    assert json.loads(meta["state"])["step"] == 4


def test_write_errors_no_space_check_foresees_are_named(files, tmp_path, capsys, monkeypatch):
    # A file-size limit or quota: the periodic checkpoint is skipped with a warning and
    # training goes on; elsewhere the write is a one-line error naming the file.
    import errno
    import os

    from locdiff.data import files as data_files

    real, failed = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(CHECKPOINT_FILE) and not failed:
            failed.append(dst)
            raise OSError(errno.EFBIG, "File too large")
        return real(src, dst)
    monkeypatch.setattr(data_files.os, "replace", replace)
    out = tmp_path / "run"
    code, text, err = run_cli(capsys, *train_argv(files, out, "--steps", 8, "--set", "train.checkpoint_every=4"))
    assert code == 0 and failed, err
    assert "locdiff train: warning: checkpoint of step 4 not saved" in err and "cannot be written (File too large)" in err
    assert json.loads(load_checkpoint(out)[1]["state"])["step"] == 8
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_dead_loader_worker_ends_training_with_a_checkpoint_and_one_line(files, tmp_path, capsys, monkeypatch):
    from locdiff.data import dataset

    real = dataset.make_loader

    def dying(*args, **kw):
        for i, batch in enumerate(real(*args, **kw)):
            if i == 5:
                raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
            yield batch
    monkeypatch.setattr(dataset, "make_loader", dying)
    out = tmp_path / "run"
    line = expect_error(capsys, train_argv(files, out, "--steps", 20), "data loading stopped at step 5: DataLoader "
                        "worker (pid(s) 4242) exited unexpectedly; the checkpoint of step 5 is saved: --resume")
    assert "fewer loader workers" in line
    assert json.loads(load_checkpoint(out)[1]["state"])["step"] == 5
    monkeypatch.undo()
    code, text, _ = run_cli(capsys, *train_argv(files, out, "--steps", 8, "--resume"))
    assert code == 0 and "trained 8 steps" in text


def test_stale_temp_files_are_removed_on_start(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *train_argv(files, out, "--steps", 2))[0] == 0
    stale = out / ".checkpoint.safetensors.x1y2.tmp"
    stale.write_bytes(b"\0" * 1000)
    code, text, err = run_cli(capsys, *train_argv(files, out, "--steps", 3, "--resume"))
    assert code == 0 and not stale.exists() and "removed .checkpoint.safetensors.x1y2.tmp" in text + err


# ---- 5. damaged run folders --------------------------------------------------------------------
def _copy_run(files, tmp_path):
    import shutil

    shutil.copytree(files / "base", tmp_path / "r")
    return tmp_path / "r"


def _set_config(run, fn):
    cfg = json.loads((run / CONFIG_FILE).read_text())
    (run / CONFIG_FILE).write_text(json.dumps(fn(cfg)))


@pytest.mark.parametrize("damage, fragment", [
    (lambda c: [1, 2, 3], "expected a JSON object of settings, got list"),
    (lambda c: {**c, "model": {**c["model"], "widths": 5}}, "model.widths"),
    (lambda c: {**c, "model": {**c["model"], "degree": "eight"}}, "model.degree"),
    (lambda c: {**c, "train": {**c["train"], "batch_size": 0}}, "train.batch_size = 0: expected an integer >= 1"),
    (lambda c: {**c, "model": {**c["model"], "degree": 6}}, "the weights are of degree 4 but config.json says "
                                                            "model.degree = 6"),
    # named before the network is built: degree 2000 took gigabytes first
    (lambda c: {**c, "model": {**c["model"], "degree": 2000}}, "the weights are of degree 4 but config.json says "
                                                               "model.degree = 2000"),
    (lambda c: {**c, "model": {**c["model"], "bottleneck_depth": 10**8}}, "model.bottleneck_depth"),
])
def test_damaged_config(files, tmp_path, capsys, damage, fragment):
    run = _copy_run(files, tmp_path)
    _set_config(run, damage)
    expect_error(capsys, ["predict", "--run", run, "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"],
                 fragment, [tmp_path / "p.csv"])


def _rewrite_checkpoint(run, change):
    from safetensors.torch import load, save

    data = (run / CHECKPOINT_FILE).read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    tensors = load(data)
    change(tensors, meta)
    (run / CHECKPOINT_FILE).write_bytes(save(tensors, metadata=meta))


def test_changed_bytes_fail_the_checksum(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    data = bytearray((run / CHECKPOINT_FILE).read_bytes())
    data[-3] ^= 0x40  # one bit of one weight
    (run / CHECKPOINT_FILE).write_bytes(bytes(data))
    expect_error(capsys, ["predict", "--run", run, "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"],
                 "checksum mismatch")


def test_a_run_with_only_its_best_checkpoint_says_how_to_use_it(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    (run / CHECKPOINT_FILE).rename(run / "checkpoint-best.safetensors")
    argv = ["predict", "--run", run, "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"]
    expect_error(capsys, argv, "not found, but checkpoint-best.safetensors are there; copy the one to use to "
                               "checkpoint.safetensors")
    (run / "checkpoint-best.safetensors").unlink()
    expect_error(capsys, argv, "no checkpoint (training has not saved one yet)")


def test_nan_weights(files, tmp_path, capsys):
    from locdiff.run import tensors_digest

    run = _copy_run(files, tmp_path)

    def poison(tensors, meta):
        key = next(k for k in tensors if k.startswith("ema.") and tensors[k].is_floating_point())
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        meta["sha256"] = tensors_digest(tensors)  # consistent bytes: the NaN check must catch it
    _rewrite_checkpoint(run, poison)
    expect_error(capsys, ["predict", "--run", run, "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"],
                 "holds NaN or infinite values")


# ---- 6. CSV files from real tools --------------------------------------------------------------
def test_csv_encodings(tmp_path):
    from locdiff.data.files import read_coords

    (tmp_path / "bom.csv").write_bytes("\ufefflat,lon\n48.8,2.3\n".encode("utf-8"))
    (tmp_path / "latin.csv").write_bytes("name;lat;lon\nZürich;47.4;8.5\n".encode("latin-1"))
    assert read_coords(tmp_path / "bom.csv").tolist() == [[48.8, 2.3]]
    with pytest.warns(UnicodeWarning, match="not UTF-8.*read as latin-1"):
        assert read_coords(tmp_path / "latin.csv").tolist() == [[47.4, 8.5]]


def test_csv_warning_is_one_line_in_the_cli(files, tmp_path, capsys):
    coords = np.load(files / "coords.npy")
    text = "place,lat,lon\n" + "".join(f"caf\xe9 {i},{a},{b}\n" for i, (a, b) in enumerate(coords))
    (tmp_path / "c.csv").write_bytes(text.encode("latin-1"))
    code, _, err = run_cli(capsys, "evaluate", "--run", files / "base", "--embeddings", files / "emb.npy",
                           "--coords", tmp_path / "c.csv", "--json", tmp_path / "m.json")
    assert code == 0 and err.strip().startswith("locdiff evaluate: warning:")
    assert "read as latin-1" in err.splitlines()[0]


# ---- 8. resume -----------------------------------------------------------------------------------
def test_resume_without_config_json(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    (run / CONFIG_FILE).unlink()
    line = expect_error(capsys, train_argv(files, run, "--resume"), "config.json: not found")
    assert "pass --resume" not in line


def test_resume_refusal_names_the_setting(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    expect_error(capsys, train_argv(files, run, "--resume", "--degree", "6"),
                 "model.degree: the run has 4, this command 6")


def test_failed_resume_leaves_config_json(files, tmp_path, capsys):
    run = _copy_run(files, tmp_path)
    before = (run / CONFIG_FILE).read_bytes()
    ckpt = run / CHECKPOINT_FILE
    ckpt.write_bytes(ckpt.read_bytes()[:len(ckpt.read_bytes()) // 2])
    expect_error(capsys, train_argv(files, run, "--resume", "--steps", 6), "unreadable checkpoint, truncated")
    assert (run / CONFIG_FILE).read_bytes() == before


def test_a_checkpoint_longer_than_its_header_says_is_not_read_whole(files, tmp_path, capsys):
    # A sparse copy of 12 GB was read into memory before safetensors refused it.
    import os

    run = _copy_run(files, tmp_path)
    ckpt = run / CHECKPOINT_FILE
    size = ckpt.stat().st_size
    os.truncate(ckpt, 12 << 30)
    want = f"unreadable checkpoint, truncated or not a checkpoint ({12 << 30} bytes where its header describes {size})"
    expect_error(capsys, train_argv(files, run, "--resume", "--steps", 6), want)
    expect_error(capsys, ["predict", "--run", run, "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"],
                 want)
    ckpt.write_bytes(b"\xff" * 64)
    expect_error(capsys, ["predict", "--run", run, "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"],
                 "(64 bytes, no safetensors header)")


def test_a_log_file_gets_few_progress_lines(files, tmp_path):
    # Without a terminal (a scheduler's log file) the bar wrote a line a step.
    argv = [sys.executable, "-m", "locdiff", *map(str, [a for a in train_argv(files, tmp_path / "run", "--steps", 60)
                                                        if a != "--quiet"])]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    updates = proc.stderr.replace("\r", "\n").count("training:")
    assert 1 <= updates <= 3, proc.stderr[-2000:]
