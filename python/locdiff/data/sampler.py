"""Whole batches of row indices with epochs, shuffling and a split across ranks.

The global order does not depend on the world size, so a run resumes on another number of
processes and sees the same data:

- epoch ``e`` visits the rows in the order ``perm_e``, a permutation drawn from
  ``(seed, e)`` alone (the identity without shuffling);
- global batch ``k`` of epoch ``e`` is ``perm_e[k * B:(k + 1) * B]`` (``B``: the global batch,
  rows per optimizer step over all ranks);
- rank ``r`` of ``W`` takes the contiguous part ``[r * B / W, (r + 1) * B / W)`` of it, so the
  ranks' parts, concatenated in rank order, are the global batch;
- after ``s`` optimizer steps the run is at epoch ``s // len(sampler)``, batch
  ``s % len(sampler)``: the step count is the whole resume state (:meth:`BatchSampler.seek`).

Gradient accumulation splits a rank's part further; that is the training loop's business.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from locdiff import distributed
from locdiff.data.files import DataError


def fixed_sample(n_rows: int, most: int) -> np.ndarray:
    """Sorted indices of at most ``most`` of ``n_rows`` rows: all of them, or a fixed random
    sample (the same every call), never the first rows, which in a file in some order (by
    region, say) would be one part of it."""
    if n_rows <= most:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(0).choice(n_rows, most, replace=False))


class BatchSampler(Sampler):
    """Yields this rank's part of each global batch (an int64 array of row indices) of one
    epoch, or of all epochs from the current position when ``infinite``.

    ``rows``: the number of rows ``n`` (rows ``0..n-1``) or an array of the row indices to
    draw from (say, the training rows left after holding out validation rows).
    ``batch_size``: the global batch ``B``; it must be a multiple of ``world_size``.
    ``drop_last=True``: an epoch is ``n // B`` batches and the ``n % B`` rows left at the end
    of its permutation are skipped (other rows each epoch, as the permutation changes).
    ``drop_last=False``: the last batch is completed with rows from the start of the same
    permutation, as ``DistributedSampler`` pads, so every batch (and every rank's part) has
    the same size and each row is seen at least once an epoch.
    ``rank``/``world_size`` default to the process group's (0 and 1 without one).
    """

    def __init__(self, rows, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int | None = None, world_size: int | None = None,
                 infinite: bool = False):
        self.rows = np.arange(rows, dtype=np.int64) if np.ndim(rows) == 0 else np.asarray(rows, np.int64)
        self.world_size = distributed.world_size() if world_size is None else int(world_size)
        self.rank = distributed.rank() if rank is None else int(rank)
        n, b, w = len(self.rows), int(batch_size), self.world_size
        if b < 1:
            raise DataError(f"batch size must be >= 1, got {b}")
        if w < 1 or not 0 <= self.rank < w:
            raise DataError(f"rank {self.rank} of world size {w}: expected 0 <= rank < world size")
        if b % w:
            raise DataError(f"batch size {b} is not a multiple of the world size {w} "
                            f"(processes over all nodes); use a batch size divisible by {w}")
        if n < 1 or (drop_last and n < b):
            raise DataError(f"{n} rows are fewer than one batch of {b}; lower the batch size "
                            "or pass drop_last=False")
        self.batch_size, self.shuffle, self.seed = b, shuffle, int(seed)
        self.drop_last, self.infinite = drop_last, infinite
        self.epoch, self.start = 0, 0
        self._perm_epoch, self._perm = None, None

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.rows), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def part_size(self) -> int:
        """Rows of this rank's part of a global batch."""
        return self.batch_size // self.world_size

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite BatchSampler has no length; see steps_per_epoch")
        return self.steps_per_epoch - self.start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its global batch ``start`` on (``DistributedSampler``
        style: call before each epoch's iteration)."""
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"start must be in [0, {self.steps_per_epoch}], got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def seek(self, step: int) -> None:
        """Position after ``step`` optimizer steps from epoch 0 (the resume state)."""
        self.set_epoch(*divmod(int(step), self.steps_per_epoch))

    def permutation(self, epoch: int) -> np.ndarray:
        """The rows in the order epoch ``epoch`` visits them."""
        if self._perm_epoch != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows)) \
                if self.shuffle else np.arange(len(self.rows))
            self._perm, self._perm_epoch = self.rows[order], epoch
        return self._perm

    def global_batch(self, epoch: int, k: int) -> np.ndarray:
        """Global batch ``k`` of epoch ``epoch``: all ranks' rows, in rank order."""
        perm, b = self.permutation(epoch), self.batch_size
        out = perm[k * b:(k + 1) * b]
        if len(out) < b:
            out = np.concatenate([out, np.resize(perm, b - len(out))])
        return out

    def part(self, epoch: int, k: int) -> np.ndarray:
        """This rank's rows of global batch ``k`` of epoch ``epoch``."""
        p = self.part_size
        return self.global_batch(epoch, k)[self.rank * p:(self.rank + 1) * p]

    def __iter__(self):
        epoch, k = self.epoch, self.start
        while True:
            for k in range(k, self.steps_per_epoch):
                yield self.part(epoch, k)
            if not self.infinite:
                return
            epoch, k = epoch + 1, 0
