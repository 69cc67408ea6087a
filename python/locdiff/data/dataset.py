"""Training data at scale: a dataset that reads whole batches of rows from ``.npy`` files
(one file or a folder of shards, float16 or float32) without loading or mapping them, and
:func:`make_loader`, a ``DataLoader`` with workers, prefetch and pinned memory, driven by
:class:`locdiff.data.sampler.BatchSampler` (epochs, shuffling, the split across ranks).
See docs/training.md, "What is held in memory".

Reads go through ``os.pread`` into the batch buffer, so a process's resident memory holds
the batches in flight, never the file (a memory map would count every page it touched as
resident, up to the file's size). The coordinates and the sampler's permutation are held in
memory: 16 and 8 bytes a row.

>>> ds = EmbeddingDataset("train_emb.npy", coords)                 # doctest: +SKIP
>>> sampler = BatchSampler(len(ds), batch_size=1024, seed=0)       # doctest: +SKIP
>>> loader = make_loader(ds, sampler, workers=4, device="cuda")    # doctest: +SKIP
>>> sampler.seek(step)   # resume: the batches after `step` global batches   # doctest: +SKIP
>>> for emb, latlon, rows in loader: ...                           # doctest: +SKIP
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from locdiff.data.files import DataError, ShardedArray, embeddings_ok, first_bad_embedding, open_embeddings, read_coords
from locdiff.data.sampler import BatchSampler
from locdiff.stopping import ignore_in_worker

__all__ = ["Arrays", "Batch", "BatchLoader", "BatchSampler", "EmbeddingDataset", "make_loader"]


@atexit.register
def _kill_workers_left_at_exit() -> None:
    # Loader workers ignore SIGTERM (the training process stops them itself). A loader still
    # alive at interpreter exit (say, held by a traceback) would leave multiprocessing's own
    # exit handler, which runs after this one, waiting forever on the SIGTERM it sends.
    # torch's SIGCHLD handler would report each kill as a failed worker: it is reset first.
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


class Batch(NamedTuple):
    """One batch: ``emb`` (B, D), ``latlon`` (B, 2) float64 degrees, ``rows`` (B,) int64
    (the rows' indices in the file, in the order the sampler gave them)."""

    emb: torch.Tensor
    latlon: torch.Tensor
    rows: torch.Tensor


class Arrays:
    """A batch as numpy arrays, as loader workers send it: pickled by value, which costs the
    main process less than receiving torch tensors through shared memory."""

    __slots__ = ("emb", "latlon", "rows")

    def __init__(self, emb: np.ndarray, latlon: np.ndarray, rows: np.ndarray):
        self.emb, self.latlon, self.rows = emb, latlon, rows

    def __getstate__(self):
        return (self.emb, self.latlon, self.rows)

    def __setstate__(self, state):
        self.emb, self.latlon, self.rows = state

    def tensors(self) -> Batch:
        return Batch(torch.from_numpy(self.emb), torch.from_numpy(self.latlon), torch.from_numpy(self.rows))

    def pin_memory(self) -> Batch:
        """Called by the loader's pin-memory thread (CUDA), off the training thread."""
        return Batch(*(t.pin_memory() for t in self.tensors()))


class _FileRows:
    """The rows of one ``(n, D)`` C-ordered ``.npy`` file, read with ``os.pread``."""

    def __init__(self, arr: np.memmap, path: str):
        self._fd = None
        if arr.ndim == 2 and not arr.flags.c_contiguous:
            raise DataError(f"{path}: Fortran-ordered .npy; save the array C-ordered "
                            "(np.save(path, np.ascontiguousarray(a)))")
        self.path, self.offset, self.dtype = path, int(arr.offset), arr.dtype
        self.shape = arr.shape
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __getstate__(self):
        # File descriptors do not travel to spawned workers; each process opens its own.
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)

    def _open(self) -> int:
        self._fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            # Rows are read at random: the kernel's readahead would fetch pages nobody asked for.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        return self._fd

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) as an array of the file's dtype."""
        fd = self._fd if self._fd is not None else self._open()
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        # One read per run of consecutive rows.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), len(rows)]
        rb, first = self.row_bytes, rows[starts].tolist()
        if len(starts) > 1 and hasattr(os, "posix_fadvise"):
            # Queue every run's read first, so that a cold file is read with many requests in
            # flight rather than one at a time (several times faster on SSDs and network disks).
            for a, b, r in zip(starts, ends, first):
                os.posix_fadvise(fd, self.offset + r * rb, (b - a) * rb, os.POSIX_FADV_WILLNEED)
        for a, b, r in zip(starts, ends, first):
            got = os.preadv(fd, [buf[a * rb:b * rb]], self.offset + r * rb)
            if got != (b - a) * rb:
                raise DataError(f"{self.path}: file is shorter than its header says "
                                f"(row {r} of {self.shape[0]}); was it truncated?")
        return out


class EmbeddingDataset(Dataset):
    """``(embedding, lat/lon)`` pairs over an ``(N, D)`` float16/float32 ``.npy`` file or a
    folder of ``.npy`` shards (rows in file-name order), never loaded whole.

    ``coords``: ``(N, 2)`` (lat, lon) degrees, or a coordinates file for
    :func:`locdiff.data.files.read_coords`. Indexing with an integer array returns a
    :class:`Batch`; rows are read in sorted order (sequential on disk) and returned in the
    order asked. ``dtype``: the embeddings' dtype in the batch (None keeps the file's).
    ``check_finite``: a NaN or infinite embedding raises :class:`DataError` naming the file
    and row. An in-memory ``(N, D)`` array is accepted too (indexed directly).
    """

    def __init__(self, embeddings, coords, *, dtype: torch.dtype | None = torch.float32,
                 check_finite: bool = True):
        if isinstance(embeddings, (str, os.PathLike)):
            embeddings = open_embeddings(embeddings)
        self._parts, self._names = _parts_of(embeddings)
        self._offsets = np.cumsum([0] + [p.shape[0] for p in self._parts])
        dims = {p.shape[1] for p in self._parts}
        if len(dims) != 1:
            raise DataError(f"embeddings: parts have different dimensions {sorted(dims)}")
        self.shape = (int(self._offsets[-1]), dims.pop())
        if isinstance(coords, (str, os.PathLike)):
            coords = read_coords(coords, rows=self.shape[0])
        coords = np.asarray(coords, np.float64)
        if coords.shape != (self.shape[0], 2):
            raise DataError(f"coordinates: shape {coords.shape}, expected ({self.shape[0]}, 2) "
                            "to match the embeddings")
        self.coords = coords
        self.dtype, self.check_finite = dtype, check_finite

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def reads_files(self) -> bool:
        """True when rows come from files (worth loader workers), False for arrays in memory."""
        return any(isinstance(p, _FileRows) for p in self._parts)

    def __getitem__(self, rows) -> Batch:
        if np.ndim(rows) == 0:
            b = self[np.array([rows])]
            return Batch(b.emb[0], b.latlon[0], b.rows[0])
        return self.read(rows).tensors()

    def read(self, rows) -> "Arrays":
        """The batch of ``rows`` (an integer array) as numpy arrays."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        # Sorted, unique reads; `inverse` restores the caller's order (and repeats).
        uniq, inverse = np.unique(rows, return_inverse=True)
        # torch converts and checks float16 several times faster than numpy does.
        emb = torch.from_numpy(self._read(uniq))
        if self.dtype is not None:
            emb = emb.to(self.dtype)
        emb = emb[torch.from_numpy(inverse.reshape(-1))]
        if self.check_finite and not embeddings_ok(emb):
            self._raise_nonfinite(emb.numpy(), rows)
        return Arrays(emb.numpy(), self.coords[rows], rows)

    def _read(self, uniq: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self._offsets, uniq, side="right") - 1
        if len(self._parts) == 1:
            return np.asarray(self._parts[0][uniq])
        dtype = np.result_type(*[p.dtype for p in self._parts])
        out = np.empty((len(uniq), self.shape[1]), dtype)
        for s in np.unique(part).tolist():
            sel = part == s
            out[sel] = self._parts[s][uniq[sel] - self._offsets[s]]
        return out

    def _raise_nonfinite(self, emb: np.ndarray, rows: np.ndarray):
        i, what = first_bad_embedding(emb)
        row = int(rows[i])
        s = int(np.searchsorted(self._offsets, row, side="right") - 1)
        raise DataError(f"{self._names[s]}: row {row - self._offsets[s]} of the embeddings {what}")


def check_rows_readable(embeddings) -> None:
    """A DataError now, not at the loader's first batch, for embeddings it cannot read by
    rows (a Fortran-ordered .npy, an array that is not 2-D floats)."""
    _parts_of(embeddings)


def _parts_of(embeddings) -> tuple[list, list[str]]:
    """File readers for memory-mapped arrays (as :func:`open_embeddings` returns them), the
    arrays themselves otherwise; and a name for each part, for error messages."""
    if isinstance(embeddings, ShardedArray):
        pairs = list(zip(embeddings.arrays, embeddings.names))
    else:
        pairs = [(embeddings, getattr(embeddings, "filename", None) or "embeddings")]
    parts = []
    for arr, name in pairs:
        if isinstance(arr, np.memmap) and arr.filename:
            parts.append(_FileRows(arr, str(name)))
            continue
        if not isinstance(arr, np.ndarray) and hasattr(arr, "__getitem__") and len(getattr(arr, "shape", ())) == 2:
            parts.append(arr)  # an array-like read by rows (indexed with sorted row arrays)
            continue
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise DataError(f"{name}: embeddings must be a 2-D float array, got {arr.dtype} {arr.shape}")
        parts.append(arr)
    return parts, [str(n) for _, n in pairs]


class BatchLoader(DataLoader):
    """A ``DataLoader`` whose data errors stay one line: a :class:`DataError` raised in a
    worker reaches the caller as a :class:`DataError` with the worker's message alone
    (``DataLoader`` would prefix the worker's traceback)."""

    def __iter__(self):
        try:
            for item in super().__iter__():
                yield item.tensors() if isinstance(item, Arrays) else item
        except DataError as err:
            lines = str(err).rstrip().splitlines()
            if len(lines) <= 1:
                raise
            raise DataError(lines[-1].split(": ", 1)[-1]) from None


def make_loader(dataset: EmbeddingDataset, sampler: BatchSampler, *, workers: int = 2,
                prefetch: int = 4, device=None, persistent: bool = True) -> BatchLoader:
    """A loader of :class:`Batch` es: one per item of ``sampler`` (a whole batch of rows).

    ``workers`` processes read ahead, ``prefetch`` batches each (0 workers: reads on the
    calling thread); they stay alive across epochs when ``persistent``. Batches are pinned
    when ``device`` is CUDA, so ``.to(device, non_blocking=True)`` overlaps the copy. The
    loader's own generator is private, so iterating it leaves the global torch RNG alone.
    Workers ignore SIGINT and SIGTERM: the training process answers them and stops them.
    """
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    if prefetch < 1:
        raise DataError(f"prefetch must be >= 1, got {prefetch}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return BatchLoader(_ArraysView(dataset), sampler=sampler, batch_size=None, num_workers=workers,
                       prefetch_factor=prefetch if workers else None, collate_fn=_identity,
                       persistent_workers=persistent and workers > 0,
                       pin_memory=dev.type == "cuda", generator=torch.Generator(),
                       worker_init_fn=ignore_in_worker if workers else None)


class _ArraysView(Dataset):
    """The dataset as the loader's workers see it: batches as :class:`Arrays`."""

    def __init__(self, dataset: EmbeddingDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows) -> Arrays:
        return self.dataset.read(rows)


def _identity(x):
    return x
