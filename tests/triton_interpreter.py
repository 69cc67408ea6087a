"""Running a test file's Triton tests on the CPU, under TRITON_INTERPRET=1.

The interpreter must be switched on before Triton compiles anything, and switching it on in
a process would change how every later Triton kernel runs there (e.g. the CUDA comparisons
in test_sh_cuda.py). So a file marks its interpreted tests `needs_interpreter` and calls
`run_interpreted(__file__)` from one ordinary test, which runs the file again in a
subprocess that sets TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess (run_interpreted)")


def run_interpreted(test_file: str) -> None:
    """Runs ``test_file`` under TRITON_INTERPRET=1 in a subprocess; fails with its output."""
    if INTERPRETED:
        pytest.skip("already interpreted")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-W", "ignore::RuntimeWarning", test_file],
        env=env, capture_output=True, text=True, timeout=1800,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton tests failed:\n{tail}"
    print(tail.strip().splitlines()[-1])
