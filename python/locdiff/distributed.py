"""Distributed runs on PyTorch's own engine, as ``torchrun`` launches them.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init` joins the process group from them (NCCL on CUDA, gloo on the
CPU). Without them (a plain ``python`` or ``locdiff`` command) nothing is initialised and
every helper here acts as the single process it is: rank 0 of 1.

>>> init()                                    # doctest: +SKIP
>>> stop = broadcast_decision(time_is_up)     # every rank stops at the same step  # doctest: +SKIP
>>> part = split_for_rank(len(inputs))        # this rank's contiguous rows  # doctest: +SKIP
>>> merged = gather_in_order(predict(inputs[part]))   # rank 0: all rows, input order  # doctest: +SKIP
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from locdiff.errors import DataError

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(DataError):
    """The process group could not form (a rank did not reach the rendezvous in time, a bad
    environment). A :class:`DataError`, so the command line prints it as one line."""


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r}: expected an integer") from None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank over all nodes (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node: its GPU index (``LOCAL_RANK``, 0 without torchrun)."""
    return _env_int("LOCAL_RANK") or 0


def is_main() -> bool:
    """True on the rank that writes checkpoints, logs and outputs."""
    return rank() == 0


def device() -> torch.device:
    """The device this rank computes and communicates on: its GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group ``torchrun`` describes in the environment; returns whether a
    group of more than one process is (now) running.

    ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"``. Under NCCL the
    process's GPU becomes ``cuda:LOCAL_RANK``. ``timeout_s`` bounds the rendezvous and each
    collective; a rank that cannot reach the others in time raises :class:`DistributedError`
    with one line naming the address, the rank and the timeout.
    """
    if is_distributed():
        return world_size() > 1
    world, rk = _env_int("WORLD_SIZE"), _env_int("RANK")
    if world is None or world == 1:
        return False
    if rk is None or not 0 <= rk < world:
        raise DistributedError(f"RANK={rk} with WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE "
                               "(launch with torchrun)")
    if not timeout_s > 0:
        raise DistributedError(f"timeout_s must be > 0, got {timeout_s}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DistributedError(f"rendezvous at {where} failed: rank {rk} of {world} did not reach all "
                               f"ranks within {timeout_s:g} s ({detail[:200]})") from None
    return True


# What gloo and NCCL say when a peer process ended (its own error says why).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
              "Broken pipe")


def peer_left(err: BaseException) -> bool:
    """Whether ``err``, raised by a collective, means another rank of the group ended: in a
    command, the consequence of that rank's own error, not a second one."""
    return is_distributed() and isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_GONE)


def shutdown(wait: bool = False) -> None:
    """Leave the process group (a no-op without one). ``wait``: after a barrier, so that no
    rank tears its connections down while another still finishes (a gloo rank whose peer
    left first can abort at exit); only where every rank got here without an error."""
    if is_distributed():
        if wait:
            try:
                dist.barrier()
            except RuntimeError as err:  # a peer stopped by a signal meanwhile: this rank's work is done
                if not peer_left(err):
                    raise
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_decision(flag: bool, src: int | None = None) -> bool:
    """One decision for every rank. ``src=None``: True everywhere if any rank passed True (a
    signal or a time bound seen by one rank stops them all at the same step); ``src=r``:
    rank ``r``'s flag. Every rank must call it at the same point."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device())
    if src is None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    else:
        dist.broadcast(t, src=src)
    return bool(t.item())


def all_reduce_max(values) -> list[float]:
    """The largest value over ranks of each of ``values`` (floats), in one collective: one
    rank's signal number, or rank 0's clock where the others pass 0."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Rank ``src``'s bytes on every rank (a file that rank alone reads, such as a run's
    checkpoint on a disk of its node); the other ranks pass None. As tensors, no pickling."""
    if not is_distributed():
        return data
    dev = device()
    n = torch.tensor([len(data) if rank() == src else 0], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=src)
    if rank() == src:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if len(data) else \
            torch.empty(0, dtype=torch.uint8, device=dev)
    else:
        buf = torch.empty(int(n), dtype=torch.uint8, device=dev)
    if int(n):
        dist.broadcast(buf, src=src)
    return bytes(buf.cpu().numpy()) if rank() != src else data


def all_reduce_mean(values: dict) -> dict[str, float]:
    """The mean over ranks of each value (floats or scalar tensors, such as loss parts), in
    one collective; floats back on every rank. For logs: DDP averages the gradients itself."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return dict(zip(keys, t.tolist()))


def split_for_rank(n: int, rank_index: int | None = None, num_ranks: int | None = None) -> slice:
    """This rank's contiguous part of ``n`` inputs: parts in rank order cover ``0..n-1``
    once, earlier ranks holding one more row when the number of ranks does not divide ``n``.
    ``rank_index``/``num_ranks`` default to this process's rank and the world size."""
    i = rank() if rank_index is None else int(rank_index)
    w = world_size() if num_ranks is None else int(num_ranks)
    if w < 1 or not 0 <= i < w or n < 0:
        raise ValueError(f"split_for_rank: expected n >= 0 and 0 <= rank < ranks, got n={n}, rank {i} of {w}")
    q, r = divmod(int(n), w)
    start = i * q + min(i, r)
    return slice(start, start + q + (i < r))


def gather_in_order(part, dst: int = 0):
    """Rank ``dst`` gets the ranks' parts concatenated in rank order (with
    :func:`split_for_rank`, input order); other ranks get None. ``part``: an array or
    tensor of rows, or a dict of them (say a predictor's outputs). numpy in, numpy out;
    tensors come back on the CPU.
    Parts travel as tensors (no pickling); every rank must call it with the same keys."""
    if isinstance(part, dict):
        out = {k: gather_in_order(part[k], dst) for k in sorted(part)}
        return out if rank() == dst else None
    if not is_distributed():
        return part
    as_numpy = not isinstance(part, torch.Tensor)
    t = torch.from_numpy(np.ascontiguousarray(part)) if as_numpy else part.contiguous()
    gathered = _gather_rows(t, dst)
    if gathered is None:
        return None
    return gathered.numpy() if as_numpy else gathered


def _gather_rows(t: torch.Tensor, dst: int) -> torch.Tensor | None:
    dev, world = device(), world_size()
    # Rows differ between ranks by one at most; pad to the longest part for one gather.
    sizes = torch.zeros(world, dtype=torch.int64, device=dev)
    sizes[rank()] = t.shape[0]
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    if longest == 0:  # no rank holds a row: nothing to send
        return t.cpu() if rank() == dst else None
    wire = t.to(torch.uint8) if t.dtype == torch.bool else t
    padded = torch.zeros((longest, *t.shape[1:]), dtype=wire.dtype, device=dev)
    padded[:t.shape[0]] = wire
    bufs = [torch.empty_like(padded) for _ in range(world)] if rank() == dst else None
    dist.gather(padded, bufs, dst=dst)
    if bufs is None:
        return None
    out = torch.cat([b[:int(s)] for b, s in zip(bufs, sizes.tolist())]).cpu()
    return out.to(t.dtype)
