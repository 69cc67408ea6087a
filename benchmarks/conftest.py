import json
import os

import pytest

# Anchors that use OpenMP read this at import: every CPU benchmark runs on two threads,
# the size of the machines this project is measured on. LOCDIFF_BENCH_THREADS sets another
# count, over an OMP_NUM_THREADS of the environment (docs/performance.md).
if "LOCDIFF_BENCH_THREADS" in os.environ:
    os.environ["OMP_NUM_THREADS"] = os.environ["LOCDIFF_BENCH_THREADS"]
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _record_as_it_goes(request):
    """With LOCDIFF_BENCH_JSONL set, each benchmark's figures are appended to that file as
    soon as it finishes: pytest-benchmark writes its --benchmark-json only at the end of
    the session, which a timeout's signal can cut short (benchmarks/gpu/run_all.sh)."""
    yield
    path = os.environ.get("LOCDIFF_BENCH_JSONL")
    bench = request.node.funcargs.get("benchmark")
    meta = getattr(bench, "stats", None)
    if not path or meta is None:
        return
    stats = meta.as_dict(include_data=False, stats=True).get("stats", {})
    row = {"name": request.node.name, "nodeid": request.node.nodeid, "extra_info": dict(bench.extra_info),
           "stats": {k: stats.get(k) for k in ("min", "median", "mean", "max", "stddev", "rounds")}}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
