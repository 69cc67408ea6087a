"""What the command-line tests share: calling ``locdiff.cli.main`` in-process, a small
task's files and the config of a tiny run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from locdiff import cli
from locdiff.diffusion import DiffusionConfig
from locdiff.models import CSUNetConfig
from locdiff.run import PredictConfig, RunConfig, TrainConfig


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``locdiff ARGV`` in this process -> (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_config(steps: int = 20, **train_kw) -> RunConfig:
    """A degree-4 run small enough to train in a second."""
    tc = dict(steps=steps, batch_size=16, val_size=0, val_every=0, checkpoint_every=5)
    tc.update(train_kw)
    return RunConfig(CSUNetConfig(degree=4, widths=(32, 16), cond_dim=16, emb_widths=(32,), density_head=True),
                     DiffusionConfig(timesteps=50), TrainConfig(**tc), PredictConfig(samples=2))


def write_task(folder: Path, n: int = 64, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Random embeddings and coordinates as ``emb.npy``, ``coords.npy`` and ``coords.csv``
    in ``folder`` -> (emb, coords)."""
    rng = np.random.default_rng(0)
    coords = np.stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)], 1)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    np.save(folder / "emb.npy", emb)
    np.save(folder / "coords.npy", coords)
    (folder / "coords.csv").write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in coords))
    return emb, coords


# `locdiff train` flags of a degree-4 run that trains in a second.
TINY = ["--degree", "4", "--set", "model.widths=[32,16]", "--set", "model.cond_dim=16", "--set",
        "model.emb_widths=[32]", "--set", "diffusion.timesteps=50", "--batch-size", "16", "--set",
        "train.val_size=0", "--workers", "0", "--device", "cpu", "--quiet"]


def trained_task(folder: Path) -> Path:
    """``write_task``'s files in ``folder`` and a 3-step run of them in ``folder/base``."""
    from locdiff.train import train

    emb, coords = write_task(folder)
    train(emb, coords, folder / "base", tiny_config(steps=3), progress=False)
    return folder


def expect_error(capsys, argv, fragment, must_not_exist=()) -> str:
    """Run ``locdiff ARGV``: exit code 2 and one stderr line holding ``fragment`` (returned);
    none of ``must_not_exist`` written."""
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    for p in must_not_exist:
        assert not p.exists(), p
    return lines[0]


def train_argv(files: Path, out, *extra) -> list:
    """``locdiff train`` of ``files``' task into ``out`` with :data:`TINY` settings."""
    return ["train", "--embeddings", files / "emb.npy", "--coords", files / "coords.csv", "--out", out, *TINY,
            *extra]
