"""What the tests that start torchrun share: a clean environment, a free port and a
bounded wait for a process."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest


def stop_with_this_process():
    """preexec_fn of a torchrun a test starts: SIGTERM when pytest dies, so that its agent
    stops the workers instead of leaving them running."""
    import signal

    from locdiff.stopping import on_parent_death

    return on_parent_death(signal.SIGTERM)


def clean_env() -> dict:
    """This environment without a parent torchrun's variables, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc: subprocess.Popen, code: int = 0, timeout: float = 120) -> tuple[str, str]:
    """Wait for ``proc``, failing the test if it runs past ``timeout`` seconds or exits with
    another code than ``code``; returns its (stdout, stderr), stderr "" when merged."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"did not finish in {timeout} s:\n{((out or '') + (err or ''))[-3000:]}")
    out, err = out or "", err or ""
    assert proc.returncode == code, (out + err)[-3000:]
    return out, err
