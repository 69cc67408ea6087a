import os

# Anchors that use OpenMP read this at import: every CPU benchmark runs on two threads,
# the size of the machines this project is measured on (overridable).
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("LOCDIFF_BENCH_THREADS", "2"))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
