"""benchmarks/gpu/run_all.sh, the one call a lent GPU machine gets: its stage timeouts fit
the 8 minutes, and its dry run (no GPU: no build, collection only, one CPU benchmark
through the per-case recorder, the summary) passes, so a broken script shows here first."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_all.sh"


def test_stage_timeouts_fit_eight_minutes():
    budgets = {k: int(v) for k, v in re.findall(r"^(T_[A-Z]+)=(\d+)$", SCRIPT.read_text(), re.M)}
    assert set(budgets) == {"T_BUILD", "T_TEST", "T_BENCH", "T_SHDD", "T_DECODE"}, budgets
    # each stage's SIGKILL comes 10 s after its SIGINT; the default call runs all but decode,
    # the second call (STAGES=decode) may have to build again on a fresh machine
    first = [budgets[k] for k in ("T_BUILD", "T_TEST", "T_BENCH", "T_SHDD")]
    assert sum(first) + 10 * len(first) < 480, budgets
    assert budgets["T_BUILD"] + budgets["T_DECODE"] + 20 < 480, budgets


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_dry_run_exercises_the_script(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for stage in ("environment", "tests:", "spherical harmonics on CUDA", "decode and SHDD-KL", "summary"):
        assert stage in out, (stage, out[-2000:])
    assert re.search(r"collected: \d+/\d+ tests collected", out)
    assert (tmp_path / "sh_cuda.jsonl").stat().st_size > 0
    assert "benchmark cases recorded: 1 SH" in (tmp_path / "summary.txt").read_text()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_dry_run_of_the_decode_call(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, DRY_RUN="1", STAGES="decode", OUT=str(tmp_path), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "decode matrix on CUDA" in out and "spherical harmonics on CUDA" not in out, out[-2000:]
    # the whole matrix: five degrees x three batches x five impls on CUDA
    assert re.search(r"collected: 75/\d+ tests collected", out), out[-2000:]


def test_summary_gives_decode_speedups_over_the_anchors(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "tools"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)

    def case(impl, t):
        return {"extra_info": {"op": "decode", "impl": impl, "degree": 64, "items": 4096}, "stats": {"min": t}}
    lines = gpu_summary.timing_lines([case("locdiff", 0.002), case("naive", 0.05), case("th-isht", 0.004)], "decode")
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["locdiff"][-2:] == ["25.0", "2.0"], lines
    assert rows["naive"][-1] == "0.1" and len(rows["naive"]) == 5, lines  # no ratio of naive to itself
