"""Run by tests/test_distributed.py under torchrun: each rank writes what it saw to
OUT/rank<r>.json, and the test compares the ranks with a single process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py checks OUT
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from locdiff import distributed as D
from locdiff.data.dataset import BatchSampler, EmbeddingDataset, make_loader


def checks(out: str) -> dict:
    r, w = D.rank(), D.world_size()
    res = {"rank": r, "world": w, "local_rank": D.local_rank(), "is_main": D.is_main()}
    res["any_true"] = D.broadcast_decision(r == w - 1)
    res["none_true"] = D.broadcast_decision(False)
    res["from_src0"] = D.broadcast_decision(r != 0, src=0)
    res["mean"] = D.all_reduce_mean({"mse": r + 1.0, "kl": torch.tensor(2.0 * r)})

    n = 11
    part = D.split_for_rank(n)
    rows = np.arange(n)[part]
    merged = D.gather_in_order({"x": np.stack([rows, rows * 2, rows * 3], 1).astype(np.float64),
                                "odd": rows % 2 == 1, "t": torch.from_numpy(rows.astype(np.float32))})
    res["part"] = [part.start, part.stop]
    one = D.gather_in_order(np.arange(1)[D.split_for_rank(1)])  # rank 1 holds no row
    none = D.gather_in_order(torch.zeros((0, 3)))
    res["small"] = None if one is None else [one.tolist(), list(none.shape)]
    res["merged"] = None if merged is None else {
        "x": merged["x"].tolist(), "odd": merged["odd"].tolist(), "t": merged["t"].tolist(),
        "types": [type(merged["x"]).__name__, str(merged["odd"].dtype), type(merged["t"]).__name__]}

    # The sampler's parts over two epochs, and after a resume at step 7 (of 13 an epoch).
    s = BatchSampler(103, 8, seed=5, drop_last=False)
    res["parts"] = [[b.tolist() for b in _epoch(s, e)] for e in (0, 1)]
    s.seek(7)
    res["resumed"] = [b.tolist() for b in s]

    # The loader in a worker process reads this rank's rows.
    emb = np.arange(103 * 4, dtype=np.float32).reshape(103, 4)
    np.save(os.path.join(out, f"emb{r}.npy"), emb)
    ds = EmbeddingDataset(os.path.join(out, f"emb{r}.npy"), np.zeros((103, 2)))
    loader = make_loader(ds, BatchSampler(103, 8, seed=5, drop_last=False), workers=1, prefetch=2)
    res["loader_rows"] = [b.rows.tolist() for b in loader]
    res["loader_ok"] = all(np.array_equal(b.emb.numpy(), emb[b.rows.numpy()]) for b in loader)
    D.barrier()
    return res


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def allreduce(out: str) -> dict:
    t = torch.tensor([float(D.rank() + 1)])
    torch.distributed.all_reduce(t)
    return {"rank": D.rank(), "world": D.world_size(), "sum": float(t), "group_rank": os.environ.get("GROUP_RANK")}


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    assert D.init(timeout_s=60), "expected a process group of more than one process"
    try:
        result = {"checks": checks, "allreduce": allreduce}[mode](out)
    finally:
        D.shutdown()
    with open(os.path.join(out, f"rank{result['rank']}.json"), "w") as fh:
        json.dump(result, fh)
