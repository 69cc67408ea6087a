"""A run folder as a training process owns it: an advisory lock for the run's life, stale
temporary files removed on start, free space checked before each checkpoint, the last K
checkpoints and the best by validation median kept, and output paths checked before work.

>>> with RunLock("runs/a"):          # a second writer gets a DataError naming this PID  # doctest: +SKIP
...     keeper = Checkpoints("runs/a", keep=3)
...     keeper.save(data, step=500)
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from locdiff.data.files import DataError, atomic_write_bytes
from locdiff.run import CHECKPOINT_FILE, CONFIG_FILE, TOML_FILE, saved_checkpoints
from locdiff.trainlog import METRICS_FILE

LOCK_FILE = "locdiff.lock"
BEST_FILE = "checkpoint-best.safetensors"
_KEPT = re.compile(r"^checkpoint-step(\d+)\.safetensors$")
# Room beyond a checkpoint's own bytes (file-system metadata, the logs written meanwhile).
SPACE_MARGIN = 16 * 2**20


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 1024:,.0f} kB"


class RunLock:
    """An exclusive POSIX record lock (``fcntl.lockf``) on ``RUN/locdiff.lock``, held until
    :meth:`release` (or the process ends: the kernel drops the lock of a dead process, so a
    stale lock file is simply taken over). A record lock belongs to the process, not to the
    descriptor, so forked children (loader workers) that outlive a killed trainer do not
    keep holding it. The file names the holder (PID and host) for the error of the next
    writer."""

    _held: set = set()  # record locks never conflict within one process: this set does

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd = None
        self._made_dir = self._made_file = False

    def acquire(self) -> "RunLock":
        import fcntl

        self._made_dir = not self.path.parent.exists()
        self._made_file = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"{self.path.parent}: cannot make the folder ({err.strerror})") from None
        key = str(self.path.resolve())
        if key in RunLock._held:
            raise DataError(f"{self.path.parent}: run folder in use by this process (PID {os.getpid()}); wait for "
                            "its training to finish or choose another --out")
        # Group-writable (within the umask): a shared folder's next user can take it over. Never
        # through a link: a lock planted as one would have this process write the file it names.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o664)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise DataError(f"{self.path}: the folder's lock file is a symbolic link (to {os.readlink(self.path)}); "
                                "remove the link") from None
            raise DataError(f"{self.path}: cannot open the folder's lock file ({err.strerror}); it must be "
                            "writable by whoever writes into the folder") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataError(f"{self.path.parent}: run folder in use by {holder} (lock {self.path}); wait for it "
                                "to finish or choose another --out") from None
            raise DataError(f"{self.path}: cannot lock the run folder ({err.strerror})") from None
        self._found = os.pread(fd, 4096, 0)  # the last holder's name, put back by withdraw()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd, self._key = fd, key
        RunLock._held.add(key)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
            RunLock._held.discard(self._key)

    def withdraw(self) -> None:
        """Release, leaving the folder as it was found: for a command refused before any work,
        the lock file goes if this lock made it, and the folder if this lock made it."""
        if self._fd is not None and self._made_file:
            self.path.unlink(missing_ok=True)
        elif self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self._found, 0)
        self.release()
        if self._made_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # not empty: something else was written meanwhile
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# What a run folder holds (locdiff.run, locdiff.trainlog, locdiff.encoder), and the
# temporary files of atomic writes of those (``.NAME.XXXXXXXX.tmp``, tempfile.mkstemp).
_RUN_FILES = r"(config\.json|train\.toml|metrics\.jsonl|encoder\.json|checkpoint(-best|-step\d+)?\.safetensors)"
RUN_ENTRIES = re.compile(rf"({_RUN_FILES}|locdiff\.lock|tensorboard)")
RUN_TEMP = re.compile(rf"\.{_RUN_FILES}\.[A-Za-z0-9_]+\.tmp")


def run_files(run_dir) -> list[Path]:
    """The files a trained run keeps in ``run_dir`` that exist there (as anything: a folder
    so named too): config.json, train.toml, metrics.jsonl and every checkpoint. Not its
    encoder.json, which an embedding folder holds as well."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    named = [folder / name for name in (CONFIG_FILE, TOML_FILE, METRICS_FILE)]
    return [p for p in named if p.exists()] + [folder / name for name in saved_checkpoints(folder)]


def foreign_entries(run_dir) -> list[str]:
    """The names in ``run_dir`` that no locdiff run writes (sorted), so that training never
    overwrites a folder of the user's own files."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not (RUN_ENTRIES.fullmatch(p.name) or RUN_TEMP.fullmatch(p.name)))


def entries_besides_lock(run_dir) -> list[str]:
    """The names in ``run_dir`` other than its lock and atomic writes' temporaries (sorted):
    what a run that has written nothing yet leaves is only those."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE and not RUN_TEMP.fullmatch(p.name))


def clean_stale_temp(run_dir) -> list[Path]:
    """Remove the temporary files of atomic writes of a run's files (``.NAME.*.tmp``) that a
    killed process left; call with the run's lock held, so that no live writer owns them."""
    removed = []
    for p in Path(run_dir).glob(".*.tmp"):
        if not RUN_TEMP.fullmatch(p.name):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def free_bytes(folder) -> int:
    return shutil.disk_usage(folder).free


def ensure_space(folder, needed: int, what: str) -> None:
    """:class:`DataError` naming the need when ``folder``'s file system has less than
    ``needed`` bytes (plus a margin) free."""
    free = free_bytes(folder)
    if free < needed + SPACE_MARGIN:
        raise DataError(f"{folder}: {what} needs {_mb(needed + SPACE_MARGIN)} free ({_mb(needed)} and a "
                        f"{_mb(SPACE_MARGIN)} margin) but the file system has {_mb(free)}; free some space")


class Checkpoints:
    """Writes a run's checkpoints: ``checkpoint.safetensors`` (the latest, what ``--resume``
    and prediction read), the ``keep - 1`` before it as ``checkpoint-step<N>.safetensors``
    (hard links of the files they were, so keeping costs no copy), and
    ``checkpoint-best.safetensors`` (lowest validation median). Every write is atomic and
    checked for space first."""

    def __init__(self, run_dir, keep: int = 1):
        self.dir, self.keep = Path(run_dir), int(keep)
        self.latest_step: int | None = None

    def remove_others(self) -> None:
        """A fresh run: drop kept and best checkpoints a previous run left in the folder."""
        for p in self.dir.iterdir():
            if _KEPT.match(p.name) or p.name == BEST_FILE:
                p.unlink()

    def save(self, data: bytes, step: int) -> None:
        ensure_space(self.dir, len(data), f"the checkpoint of step {step}")
        latest = self.dir / CHECKPOINT_FILE
        if self.keep > 1 and self.latest_step not in (None, step) and latest.exists():
            kept = self.dir / f"checkpoint-step{self.latest_step:08d}.safetensors"
            if not kept.exists():
                try:
                    os.link(latest, kept)
                except OSError:  # a file system without hard links
                    atomic_write_bytes(kept, latest.read_bytes())
        atomic_write_bytes(latest, data)
        self.latest_step = step
        self._prune()

    def save_best(self, data: bytes, step: int) -> None:
        ensure_space(self.dir, len(data), f"the best checkpoint (step {step})")
        atomic_write_bytes(self.dir / BEST_FILE, data)

    def kept(self) -> list[Path]:
        """Older checkpoints kept, oldest first."""
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _KEPT.match(p.name))]
        return [p for _, p in sorted(found)]

    def _prune(self) -> None:
        old = self.kept()
        for p in old[:max(0, len(old) - (self.keep - 1))]:
            p.unlink(missing_ok=True)


def check_output_file(path, what: str, inputs=(), run=None) -> Path:
    """``path`` can be written as a file: not a folder, its folder exists and is writable,
    and writing it loses nothing the command reads: it is none of the files ``inputs``, not a
    shard of one of them that is a folder of shards, and not inside the run folder ``run``."""
    p = Path(path)
    try:
        if p.is_dir():
            raise DataError(f"{p}: is a folder; the {what} needs a file name")
        target = p.resolve()
        if target.exists() and not os.access(target, os.W_OK):  # replacing it would drop its protection
            raise DataError(f"{p}: is write-protected; make it writable or choose another file for the {what}")
    except OSError as err:  # a name too long, a loop of links
        raise DataError(f"{p}: cannot be used for the {what} ({err.strerror})") from None
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if target == src:
            raise DataError(f"{p}: is the input {source}; the {what} needs a file of its own")
        # A folder of shards reads every .npy in it that is not hidden: one more would be read too.
        if src.is_dir() and target.parent == src and target.suffix == ".npy" and not target.name.startswith("."):
            raise DataError(f"{p}: would be read as a shard of the input folder {source}; write the {what} "
                            "outside it")
    if run is not None and Path(run).resolve() in target.parents:
        raise DataError(f"{p}: lies inside the run folder {run}; write the {what} outside it")
    parent = target.parent  # a symbolic link's target is what gets written
    if not parent.is_dir():
        what_is = "is a file, not a folder" if parent.exists() else "does not exist"
        raise DataError(f"{p}: folder {parent} for the {what} {what_is}")
    _check_writable(parent, p, what)
    return p


def check_run_folder(path, what: str = "run folder") -> Path:
    """``path`` is a folder or can be made one: every existing part is a folder, the nearest
    existing one is writable (``what``: the folder's name in the errors)."""
    p = Path(path)
    try:
        if p.is_symlink() and not p.exists():
            raise DataError(f"{p}: a symbolic link to {os.readlink(p)}, which does not exist; make that folder or "
                            "give another path")
        if p.exists() and not p.is_dir():
            raise DataError(f"{p}: exists and is a file, not a {what}")
        ancestor = p
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as err:  # a name too long, a loop of links
        raise DataError(f"{p}: cannot be used as a folder ({err.strerror})") from None
    if not ancestor.is_dir():
        raise DataError(f"{p}: {ancestor} is a file, so the {what} cannot be made")
    _check_writable(ancestor, p, what)
    return p


def _check_writable(folder: Path, target: Path, what: str) -> None:
    # Create a file rather than ask os.access: root passes access() on read-only mounts.
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise DataError(f"{target}: cannot write the {what} in {folder} ({err.strerror})") from None
