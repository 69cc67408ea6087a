"""SIGINT and SIGTERM during training: the first asks the loop to stop after its step (it
saves a checkpoint and the command exits with 128 + the signal's number: 130 or 143, so a
scheduler sees an interrupted job, not a finished one); a second stops at once by raising
:class:`Interrupted`, which atomic writes survive (the last checkpoint stays whole).

>>> with StopSignals() as stop:      # doctest: +SKIP
...     while not stop.requested: step()
"""
from __future__ import annotations

import os
import signal
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds within which a worker under torchrun takes the same signal again as the same request.
DUPLICATE_WINDOW_S = 5.0


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


class Interrupted(KeyboardInterrupt):
    """A second stop signal: the process stops where it is. ``exit_code`` is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Handlers for SIGINT and SIGTERM while in the ``with`` block (main thread only; the
    previous handlers come back after). ``signum``: the first signal received, or None."""

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for sig in SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def _handle(self, signum, _frame):
        if self.signum is not None:
            # Under torchrun a scheduler's SIGTERM to every process of the job reaches each
            # worker twice (directly and forwarded by the agent): the same signal soon after
            # is that one request, not a second.
            if not (signum == self.signum and _under_torchrun()
                    and time.monotonic() - self._first_at < DUPLICATE_WINDOW_S):
                raise Interrupted(signum)
            return
        self.signum, self._first_at = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def ignore_in_worker(_worker_id: int = 0) -> None:
    """For loader workers: the training process alone answers SIGINT and SIGTERM (a terminal's
    Ctrl-C and a scheduler's SIGTERM reach the whole process group) and shuts them down. If
    it is killed outright, they are too (Linux)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies. A worker whose trainer was
    SIGKILLed otherwise blocks for ever writing to the pipe no one reads, holding memory
    and the trainer's output pipe (it ignores SIGTERM). Elsewhere a no-op."""
    call = on_parent_death(signal.SIGKILL)
    if call is not None:
        call()


def on_parent_death(sig: int):
    """A callable that asks Linux to send the calling process ``sig`` when its parent dies,
    or None where there is no prctl. As a subprocess ``preexec_fn`` it makes a launcher such
    as torchrun stop its workers when the process that started it is killed. prctl is looked
    up here, in the parent, so that the forked child only makes the call."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl: the workers' own checks remain
        return None
    PR_SET_PDEATHSIG = 1
    return lambda: prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
