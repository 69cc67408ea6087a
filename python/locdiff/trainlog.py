"""The training log of a run folder: ``metrics.jsonl``, one JSON object a line (``step``,
then the loss parts, ``lr``, ``samples_per_s``, or the validation metrics ``val_*``; null for
a non-finite value), and
with ``tensorboard`` the same scalars as TensorBoard event files in ``RUN/tensorboard``.

A resumed run drops the lines past its checkpoint's step (written after the checkpoint by
the process that was stopped), so the file reads as one uninterrupted run.

>>> log = TrainLog("runs/a", resume_step=None)         # doctest: +SKIP
>>> log.write(10, {"loss": 0.52, "lr": 1e-4})          # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from locdiff.data.files import DataError, atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> None:
    """:class:`DataError` (one line) when the ``tensorboard`` package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise DataError("--tensorboard needs the package 'tensorboard', which is not installed: "
                        "pip install tensorboard (or leave out --tensorboard; metrics.jsonl is written anyway)")


def _kept_lines(path: Path, upto: int) -> list[str]:
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # a line cut short by a kill, or no log line at all
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= upto:
            keep.append(line)
    return keep


class TrainLog:
    """Appends records to ``RUN/metrics.jsonl`` (flushed a line at a time) and, with
    ``tensorboard``, to TensorBoard. ``resume_step``: None starts the file anew; a step keeps
    the lines up to it."""

    def __init__(self, run_dir, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        lines = _kept_lines(self.path, resume_step) if resume_step is not None and self.path.exists() else []
        atomic_write_bytes(self.path, "".join(line + "\n" for line in lines).encode("utf-8"))
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at and past it: the checkpoint's own step was logged
            # before it was saved and stays.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def write(self, step: int, values: dict) -> None:
        rec = {"step": int(step)}
        # A NaN or infinite value is written as null: the file stays strict JSON for any reader.
        rec.update({k: (v if not isinstance(v, float) else round(v, 6) if math.isfinite(v) else None)
                    for k, v in values.items()})
        if self._fh is not None:
            try:
                self._fh.write(json.dumps(rec, allow_nan=False) + "\n")
                self._fh.flush()
            except OSError as err:
                self._lost(err)
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k.replace("val_", "validation/", 1) if k.startswith("val_") else f"train/{k}",
                                        v, step)

    def _lost(self, err: OSError) -> None:
        # A full disk or quota: the run goes on (its checkpoints say for themselves whether they
        # could be saved) and this file stops here, said once, rather than a traceback.
        import warnings

        warnings.warn(f"{self.path}: cannot be written ({err.strerror or err}); the metrics of later steps are not "
                      "recorded there, the run goes on", RuntimeWarning, stacklevel=3)
        self._fh, fh = None, self._fh
        try:
            fh.close()
        except OSError:
            pass

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as err:
                self._fh = fh
                self._lost(err)
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
