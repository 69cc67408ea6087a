"""locdiff.data.dataset and locdiff.data.sampler: batches read from .npy files and shard
folders, the per-epoch shuffle, the split across ranks, resuming, and the loader."""
from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from locdiff.data.dataset import Batch, EmbeddingDataset, make_loader
from locdiff.data.files import DataError
from locdiff.data.sampler import BatchSampler


@pytest.fixture
def files(tmp_path, rng):
    """One float16 file, and the same rows as a folder of three float32/float16 shards."""
    emb = rng.standard_normal((50, 6)).astype(np.float16)
    coords = np.column_stack([rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)])
    np.save(tmp_path / "emb.npy", emb)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (a, b) in enumerate([(0, 20), (20, 21), (21, 50)]):
        np.save(shards / f"part{i}.npy", emb[a:b].astype(np.float32 if i != 1 else np.float16))
    return emb, coords, tmp_path / "emb.npy", shards


@pytest.mark.parametrize("source", ["file", "shards", "memory"])
def test_batches_hold_the_rows_asked_for_in_order(files, source):
    emb, coords, path, shards = files
    ds = EmbeddingDataset({"file": path, "shards": shards, "memory": emb}[source], coords)
    rows = np.array([49, 3, 20, 3, 0, 21, 19])  # unsorted, repeated, across shard edges
    b = ds[rows]
    assert isinstance(b, Batch) and b.emb.dtype == torch.float32 and b.latlon.dtype == torch.float64
    assert np.array_equal(b.emb.numpy(), emb[rows].astype(np.float32))
    assert np.array_equal(b.latlon.numpy(), coords[rows]) and b.rows.tolist() == rows.tolist()
    one = ds[7]
    assert one.emb.shape == (6,) and np.array_equal(one.emb.numpy(), emb[7].astype(np.float32))
    assert len(ds) == 50 and ds.shape == (50, 6)


def test_file_dtype_can_be_kept(files):
    emb, coords, path, _ = files
    b = EmbeddingDataset(path, coords, dtype=None)[np.arange(5)]
    assert b.emb.dtype == torch.float16 and np.array_equal(b.emb.numpy(), emb[:5])


def test_coordinates_from_a_file_and_their_checks(files, tmp_path):
    emb, coords, path, _ = files
    np.save(tmp_path / "c.npy", coords)
    assert np.array_equal(EmbeddingDataset(path, tmp_path / "c.npy")[np.arange(3)].latlon.numpy(), coords[:3])
    with pytest.raises(DataError, match=r"coordinates: shape \(49, 2\), expected \(50, 2\)"):
        EmbeddingDataset(path, coords[:49])
    with pytest.raises(DataError, match="49 coordinate rows but the embeddings have 50"):
        np.save(tmp_path / "short.npy", coords[:49])
        EmbeddingDataset(path, tmp_path / "short.npy")


def test_out_of_range_rows_raise(files):
    emb, coords, path, _ = files
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        EmbeddingDataset(path, coords)[np.array([0, 50])]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_file_is_never_mapped(files):
    emb, coords, path, shards = files
    for src in (path, shards):
        ds = EmbeddingDataset(src, coords)
        ds[np.arange(50)]
        maps = open("/proc/self/maps").read()
        assert str(src) not in maps, "the dataset must read with pread, not keep a memory map"


def test_pickles_without_the_data(files):
    emb, coords, path, _ = files
    ds = EmbeddingDataset(path, np.zeros((50, 2)))
    ds[np.arange(3)]  # opens the file
    blob = pickle.dumps(ds)
    assert emb.tobytes() not in blob and len(blob) < 4000
    again = pickle.loads(blob)
    assert np.array_equal(again[np.arange(50)].emb.numpy(), emb.astype(np.float32))


def test_nonfinite_rows_name_the_shard_and_row(files, tmp_path):
    emb, coords, path, shards = files
    bad = np.load(shards / "part2.npy")
    bad[4, 1] = np.nan
    np.save(shards / "part2.npy", bad)
    ds = EmbeddingDataset(shards, coords)
    ds[np.arange(25)]
    with pytest.raises(DataError, match=r"part2.npy: row 4 of the embeddings is NaN or infinite"):
        ds[np.array([0, 25, 1])]
    assert EmbeddingDataset(shards, coords, check_finite=False)[np.array([25])].emb.isnan().any()
    # Through a worker process the error stays one line.
    loader = make_loader(ds, BatchSampler(50, 10, shuffle=False), workers=1, prefetch=1)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(info.value) == f"{shards / 'part2.npy'}: row 4 of the embeddings is NaN or infinite"


def test_truncated_file_is_reported(files, tmp_path):
    emb, coords, path, _ = files
    data = path.read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])
    # np.load refuses a short file already; a file cut after opening reaches the reader.
    ds = EmbeddingDataset(path, coords)
    path.write_bytes(data[:-100])
    with pytest.raises(DataError, match="shorter than its header says"):
        ds[np.array([49])]
    with pytest.raises(DataError, match="not a readable .npy"):
        EmbeddingDataset(tmp_path / "cut.npy", coords)


def test_fortran_ordered_files_are_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((4, 3), np.float32)))
    with pytest.raises(DataError, match="Fortran-ordered"):
        EmbeddingDataset(tmp_path / "f.npy", np.zeros((4, 2)))
    # train refuses it before the run folder is made, not at the loader's first batch
    from locdiff.data.files import open_embeddings
    from locdiff.train import train

    with pytest.raises(DataError, match="Fortran-ordered"):
        train(open_embeddings(tmp_path / "f.npy"), np.zeros((4, 2)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---- the sampler ---------------------------------------------------------------------------
def test_each_epoch_is_a_new_shuffle_of_every_row():
    s = BatchSampler(100, 10, seed=3)
    epochs = []
    for e in range(3):
        s.set_epoch(e)
        batches = list(s)
        assert len(batches) == len(s) == 10 and all(len(b) == 10 for b in batches)
        epochs.append(np.concatenate(batches))
        assert np.array_equal(np.sort(epochs[-1]), np.arange(100))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    s2 = BatchSampler(100, 10, seed=3)
    s2.set_epoch(1)
    assert np.array_equal(np.concatenate(list(s2)), epochs[1]), "an epoch depends on (seed, epoch) only"
    s3 = BatchSampler(100, 10, seed=4)
    s3.set_epoch(1)
    assert not np.array_equal(np.concatenate(list(s3)), epochs[1])
    unshuffled = BatchSampler(100, 10, shuffle=False)
    assert np.array_equal(np.concatenate(list(unshuffled)), np.arange(100))


def test_drop_last():
    kept = BatchSampler(23, 5, seed=1)
    assert kept.steps_per_epoch == 4 and len(np.unique(np.concatenate(list(kept)))) == 20
    padded = BatchSampler(23, 5, seed=1, drop_last=False)
    batches = list(padded)
    assert padded.steps_per_epoch == 5 and all(len(b) == 5 for b in batches)
    allrows = np.concatenate(batches)
    assert np.array_equal(np.unique(allrows), np.arange(23))
    assert np.array_equal(allrows[23:], padded.permutation(0)[:2]), "padding repeats the epoch's first rows"
    small = BatchSampler(3, 8, drop_last=False)
    assert [len(b) for b in small] == [8]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_single_process_batches(world):
    one = BatchSampler(203, 8, seed=9, drop_last=False, rank=0, world_size=1)
    parts = [BatchSampler(203, 8, seed=9, drop_last=False, rank=r, world_size=world) for r in range(world)]
    for e in (0, 1):
        for s in [one, *parts]:
            s.set_epoch(e)
        for k, batch in enumerate(one):
            rank_parts = [s.part(e, k) for s in parts]
            assert all(len(p) == 8 // world for p in rank_parts)
            assert np.array_equal(np.concatenate(rank_parts), batch)
        assert all(len(s) == len(one) for s in parts)


def test_seek_resumes_where_an_uninterrupted_run_is():
    rows = np.arange(5, 95)  # a subset, as when validation rows are held out
    whole = BatchSampler(rows, 16, seed=2, infinite=True)
    straight = [b.tolist() for b in itertools.islice(whole, 20)]  # crosses epochs (5 steps each)
    assert set(np.concatenate(straight[:5]).tolist()) <= set(rows.tolist())
    for step in (0, 3, 5, 12):
        for world in (1, 2):
            parts = []
            for r in range(world):
                s = BatchSampler(rows, 16, seed=2, infinite=True, rank=r, world_size=world)
                s.seek(step)
                parts.append([b.tolist() for b in itertools.islice(s, 20 - step)])
            resumed = [sum(p, []) for p in zip(*parts)]
            assert resumed == straight[step:], f"resume at step {step} on {world} ranks"
    finite = BatchSampler(rows, 16, seed=2)
    finite.seek(12)
    assert (finite.epoch, finite.start, len(finite)) == (2, 2, 3)
    assert [b.tolist() for b in finite] == straight[12:15]


@pytest.mark.parametrize("kwargs, words", [
    (dict(rows=100, batch_size=10, world_size=3, rank=0), "batch size 10 is not a multiple of the world size 3"),
    (dict(rows=5, batch_size=10), "5 rows are fewer than one batch of 10"),
    (dict(rows=0, batch_size=1, drop_last=False), "0 rows are fewer"),
    (dict(rows=100, batch_size=0), "batch size must be >= 1, got 0"),
    (dict(rows=100, batch_size=4, world_size=2, rank=2), "rank 2 of world size 2"),
])
def test_sampler_errors_are_one_line(kwargs, words):
    with pytest.raises(DataError, match=words):
        BatchSampler(kwargs.pop("rows"), **kwargs)


def test_infinite_sampler_has_no_length():
    with pytest.raises(TypeError, match="no length"):
        len(BatchSampler(10, 5, infinite=True))


# ---- the loader ----------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_follows_the_sampler_across_epochs(files, workers):
    emb, coords, path, _ = files
    ds = EmbeddingDataset(path, coords)
    sampler = BatchSampler(50, 8, seed=1, drop_last=False)
    loader = make_loader(ds, sampler, workers=workers, prefetch=2)
    assert loader.persistent_workers == (workers > 0) and not loader.pin_memory
    rng_before = torch.get_rng_state()
    for e in (0, 1):
        sampler.set_epoch(e)
        got = list(loader)
        expect = [sampler.part(e, k) for k in range(sampler.steps_per_epoch)]
        assert [b.rows.tolist() for b in got] == [x.tolist() for x in expect]
        for b in got:
            assert np.array_equal(b.emb.numpy(), emb[b.rows.numpy()].astype(np.float32))
            assert np.array_equal(b.latlon.numpy(), coords[b.rows.numpy()])
    assert torch.equal(torch.get_rng_state(), rng_before), "the loader must not draw from the global RNG"


def test_loader_resumes_mid_epoch(files):
    emb, coords, path, _ = files
    sampler = BatchSampler(50, 8, seed=1, infinite=True)
    loader = make_loader(EmbeddingDataset(path, coords), sampler, workers=1, prefetch=2)
    straight = [b.rows.tolist() for b in itertools.islice(loader, 15)]
    sampler.seek(9)
    assert [b.rows.tolist() for b in itertools.islice(loader, 6)] == straight[9:]


@pytest.mark.parametrize("kwargs, words", [(dict(workers=-1), "workers must be >= 0"),
                                           (dict(prefetch=0), "prefetch must be >= 1")])
def test_loader_argument_errors(files, kwargs, words):
    emb, coords, path, _ = files
    with pytest.raises(DataError, match=words):
        make_loader(EmbeddingDataset(path, coords), BatchSampler(50, 5), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_loader_pins_batches_for_cuda(files):
    emb, coords, path, _ = files
    for workers in (0, 1):
        loader = make_loader(EmbeddingDataset(path, coords), BatchSampler(50, 10), workers=workers, device="cuda")
        b = next(iter(loader))
        assert isinstance(b, Batch) and b.emb.is_pinned() and b.latlon.is_pinned()
        assert np.array_equal(b.emb.to("cuda", non_blocking=True).cpu().numpy(), emb[b.rows.numpy()].astype(np.float32))


def test_forked_workers_after_threaded_work_do_not_hang(tmp_path):
    """Workers are forked from a process whose OpenMP pool is running (libgomp hangs a
    forked child that enters a parallel region); the loader's batch work must not."""
    np.save(tmp_path / "e.npy", np.ones((20_000, 768), np.float16))
    code = f"""
import numpy as np, torch
torch.set_num_threads(2)
a = torch.randn(1500, 1500); (a @ a).sum(); (torch.randn(4_000_000).exp() + 1).sum()
from locdiff import shdd
shdd.encode(torch.zeros(5000, 2, dtype=torch.float64), 24)
from locdiff.data.dataset import EmbeddingDataset, make_loader
from locdiff.data.sampler import BatchSampler
ds = EmbeddingDataset({str(tmp_path / "e.npy")!r}, np.zeros((20_000, 2)))
print(sum(len(b.rows) for b in make_loader(ds, BatchSampler(20_000, 4096), workers=2)))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "16384", proc.stderr[-2000:]


def test_a_loader_alive_at_exit_ends_quietly(tmp_path):
    """A script that breaks out of a loader with persistent workers and ends: the workers
    are stopped at exit, without torch reporting them as failed (a traceback after the
    script's own output), and the exit code stays 0."""
    np.save(tmp_path / "e.npy", np.ones((400, 8), np.float32))
    code = f"""
import numpy as np
from locdiff.data.dataset import EmbeddingDataset, make_loader
from locdiff.data.sampler import BatchSampler
ds = EmbeddingDataset({str(tmp_path / "e.npy")!r}, np.zeros((400, 2)))
loader = make_loader(ds, BatchSampler(400, 128, infinite=True), workers=2)
for i, batch in enumerate(loader):
    if i == 2:
        break
print("done")
"""
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
        assert "killed by signal" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
