import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/sh_exact.py and friends

# Fresh random inputs each run unless LOCDIFF_TEST_SEED pins them; the seed is printed so a
# failure can be replayed.
SEED = int(os.environ.get("LOCDIFF_TEST_SEED", np.random.SeedSequence().entropy % 2**31))


def pytest_report_header(config):
    return f"locdiff test seed: {SEED} (replay with LOCDIFF_TEST_SEED={SEED})"


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(SEED)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture
def at_most_two_threads():
    """The CPU kernels are chosen by points per thread (csrc/cpu/sh_cpu.cpp few_points):
    tests aimed at one kernel run on the thread count of this project's machines, so that
    they reach the same kernel on machines with more cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)
