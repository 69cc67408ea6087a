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
