"""``locdiff embed``: CLIP embeddings of photo files and folders, written for ``locdiff train``.

The output folder holds

- ``emb-000000.npy``, ``emb-000001.npy``, ...: ``(n, D)`` shards, float16 by default
  (``dtype="float32"`` for full precision); ``open_embeddings(out)`` reads them as one array;
- ``manifest.csv``: ``path,shard,row,lat,lon``, one line per embedded photo; its i-th data
  line is row i of that array; lat/lon are the EXIF GPS position, empty when there is none;
- ``encoder.json``: the encoder (see ``locdiff.encoder``) and the shard dtype;
- ``coords.csv``: ``lat,lon,row,path`` for the photos with EXIF GPS (``row``: the embedding
  row). When every photo has one it pairs with the shards as they are:
  ``locdiff train --embeddings OUT --coords OUT/coords.csv``; otherwise the geotagged rows
  are also copied to ``geotagged/embeddings.npy`` with ``geotagged/coords.csv`` (and an
  ``encoder.json``) for training;
- ``skipped.csv``: ``path,reason`` for the files of the last run that could not be read
  (absolute paths, as in the manifest).

Resumable: photos already in the manifest (same absolute path) are skipped. Each shard is
written to a temporary file and renamed, then its manifest lines are appended; a shard left
without its complete lines by a killed run is deleted on the next run and embedded again.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from locdiff.data.files import (DataError, atomic_replace, atomic_save_npy, atomic_write_bytes, atomic_write_csv,
                                atomic_write_json)
from locdiff.devices import resolve_device
from locdiff.encoder import DEFAULT_MODEL, SPEC_FILE, Encoder, canonical_model, vision_config
from locdiff.images import find_images, ignored_message
from locdiff.runfolder import LOCK_FILE, RunLock, check_run_folder, run_files

MANIFEST, COORDS, SKIPPED, GEOTAGGED = "manifest.csv", "coords.csv", "skipped.csv", "geotagged"
# File names that are not UTF-8 (a latin-1 "caf\xe9.jpg") go into the CSVs as their own bytes
# and come back as the same names, which strict encoding could not write.
PATH_ERRORS = "surrogateescape"
FIELDS = ("path", "shard", "row", "lat", "lon")
DTYPES = ("float16", "float32")
SHARD = re.compile(r"emb-(\d{6})\.npy")
MAX_REPORTED = 20


@dataclass
class EmbedResult:
    out: Path
    embedded: int = 0          # new rows this run
    already: int = 0           # inputs found in the manifest
    rows: int = 0              # rows in the folder now
    geotagged: int = 0         # rows with an EXIF GPS position
    skipped: list = field(default_factory=list)  # [(path, reason)] this run
    ignored: int = 0           # files in the folders without an image extension

    def summary(self) -> str:
        s = (f"embedded {self.embedded} new images ({self.already} already done, {len(self.skipped)} unreadable "
             f"skipped); {self.rows} rows in {self.out}, {self.geotagged} with EXIF GPS")
        if self.geotagged:  # quoted, so that a path with spaces pastes as one argument
            emb, folder = (self.out, self.out) if self.geotagged == self.rows else \
                (self.out / GEOTAGGED / "embeddings.npy", self.out / GEOTAGGED)
            s += f"; train with --embeddings {shlex.quote(str(emb))} --coords {shlex.quote(str(folder / COORDS))}"
        return s


def _read_manifest(out: Path) -> tuple[list[dict], bool]:
    """(rows, complete): complete is False when the file ends inside a line (killed append)."""
    path = out / MANIFEST
    if not path.exists():
        return [], True
    text = path.read_text(encoding="utf-8", errors=PATH_ERRORS)
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and set(FIELDS) - set(rows[0]):
        raise DataError(f"{path}: not a locdiff embed manifest (columns {sorted(rows[0])}, expected {list(FIELDS)})")
    return rows, text == "" or text.endswith("\n")


def _check_not_foreign(out: Path) -> None:
    """DataError unless ``out`` is new, empty, or a folder locdiff embed wrote (its manifest,
    or its encoder.json after a first run that read no image): embed rewrites coords.csv,
    skipped.csv and encoder.json, which in any other folder may be the user's own."""
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".emb-") and p.name != LOCK_FILE)
    # A run trained on embed's output holds its encoder.json too: never embed into a run.
    runs = sorted(p.name for p in run_files(out))
    if runs:
        raise DataError(f"{out}: is a training run's folder ({', '.join(runs[:3])}); embed into another --out")
    if not entries or MANIFEST in entries:
        return
    if SPEC_FILE in entries:
        try:
            spec = json.loads((out / SPEC_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            spec = None
        if isinstance(spec, dict) and {"model", "pretrained", "embedding_dim"} <= set(spec):
            return
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise DataError(f"{out}: holds files that locdiff embed did not write ({shown}); use an empty folder or one "
                    "written by locdiff embed")


def _load_state(out: Path, log) -> list[dict]:
    """The manifest rows whose shards are complete; everything else a killed run left (temp
    files, a shard without its complete lines) is removed."""
    for tmp in [*out.glob(".emb-*"), *(out / GEOTAGGED).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)
    others = [p.name for p in out.glob("*.npy") if not SHARD.fullmatch(p.name) and not p.name.startswith(".")]
    if others:
        raise DataError(f"{out}: holds other .npy files ({', '.join(sorted(others)[:3])}), which would be read "
                        "as embeddings; use an empty folder or one written by locdiff embed")
    rows, complete = _read_manifest(out)
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    if not complete and rows:
        by_shard.pop(rows[-1]["shard"])
    kept = []
    for shard in sorted(out.glob("emb-*.npy")):
        lines = by_shard.get(shard.name, [])
        try:
            n = np.load(shard, mmap_mode="r").shape[0]
        except Exception:  # numpy raises several types for a damaged file
            n = -1
        if n > 0 and [int(r["row"]) for r in lines] == list(range(n)):
            kept.extend(lines)
        else:
            log(f"warning: removing {shard.name}: left incomplete by an interrupted run; its images are embedded again")
            shard.unlink()
    if kept != rows:
        _write_csv(out / MANIFEST, FIELDS, [[r[f] for f in FIELDS] for r in kept])
    return kept


def _write_csv(path: Path, header, rows) -> None:
    atomic_write_csv(path, header, rows, errors=PATH_ERRORS)


def _append_manifest(out: Path, rows: list[list]) -> None:
    path = out / MANIFEST
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        w.writerow(FIELDS)
    w.writerows(rows)
    with open(path, "a", encoding="utf-8", errors=PATH_ERRORS, newline="") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def _check_spec(out: Path, model: str, pretrained: str, dtype: str) -> dict | None:
    path = out / SPEC_FILE
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    was = (spec.get("model"), spec.get("pretrained"), spec.get("dtype"))
    if was != (model, pretrained, dtype):
        raise DataError(f"{out}: embedded with --model {was[0]} --pretrained {was[1]} --dtype {was[2]}, asked for "
                        f"--model {model} --pretrained {pretrained} --dtype {dtype}; use the same settings "
                        "or another --out folder")
    return spec


def _check_args(batch_size, shard_size, dtype) -> None:
    for name, v in (("batch_size (--batch-size)", batch_size), ("shard_size (--shard-size)", shard_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DataError(f"{name} {v!r}: expected an integer >= 1")
    if dtype not in DTYPES:
        raise DataError(f"dtype (--dtype) {dtype!r}: expected one of {', '.join(DTYPES)}")


def embed_images(inputs, out, model: str = DEFAULT_MODEL, pretrained: str = "weights", *, batch_size: int = 32,
                 shard_size: int = 1024, dtype: str = "float16", device=None, progress: bool = True,
                 encoder: Encoder | None = None, log=None) -> EmbedResult:
    """Embed the images in ``inputs`` (files and folders) into the folder ``out`` (layout in
    the module docstring). ``encoder``: an already loaded one (then ``model`` and
    ``pretrained`` are taken from it). Unreadable files are reported through ``log`` and
    skipped; data problems raise DataError."""
    from tqdm.auto import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    _check_args(batch_size, shard_size, dtype)
    if encoder is None:
        resolve_device(device)  # a device this machine lacks: named before the folder is made
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    files, ignored = find_images(inputs)
    if encoder is not None:
        model, pretrained = encoder.spec["model"], encoder.spec["pretrained"]
    else:
        vision_config(model, pretrained)  # a wrong name fails now, before anything is written
        model = canonical_model(model)
    if ignored:
        log(f"warning: {ignored_message(ignored)}")
    _check_not_foreign(out)
    check_run_folder(out, "embeddings folder")  # before the encoder loads, as train checks its --out
    # One writer at a time: two embeds into one folder numbered their shards alike and paired
    # manifest lines with another photo's vector.
    lock = RunLock(out).acquire()
    try:
        return _embed_locked(files, ignored, out, model, pretrained, batch_size, shard_size, dtype, device,
                             progress, encoder, log)
    except BaseException:
        lock.withdraw()  # a folder this run made and left empty goes again
        raise
    finally:
        lock.release()


def _embed_locked(files, ignored, out, model, pretrained, batch_size, shard_size, dtype, device, progress,
                  encoder, log) -> EmbedResult:
    rows = _load_state(out, log)
    # A folder with no rows yet (a first run that read nothing) takes any settings.
    spec = _check_spec(out, model, pretrained, dtype) if rows else None
    done = {r["path"] for r in rows}
    todo = [f for f in files if str(f.resolve()) not in done]
    res = EmbedResult(out, already=len(files) - len(todo), ignored=len(ignored))
    if todo:
        encoder = encoder or Encoder.load(model, pretrained, device)
        if spec is None:
            spec = {**encoder.spec, "dtype": dtype}
            atomic_write_json(out / SPEC_FILE, spec)
        _embed_todo(encoder, todo, out, rows, res, batch_size, shard_size, np.dtype(dtype), progress, log)
    _write_coords(out, rows, res.embedded > 0, log)
    res.rows, res.geotagged = len(rows), sum(1 for r in rows if r["lat"] != "")
    return res


def _embed_todo(encoder, todo, out, rows, res, batch_size, shard_size, dtype, progress, log) -> None:
    from tqdm.auto import tqdm

    numbers = [int(SHARD.fullmatch(p.name).group(1)) for p in out.glob("emb-*.npy")]
    next_shard = max(numbers, default=-1) + 1
    buf_emb, buf_rows = [], []

    def flush(n):
        nonlocal next_shard, buf_emb, buf_rows
        if not buf_rows:
            return
        name = f"emb-{next_shard:06d}.npy"
        arr = np.concatenate(buf_emb)
        cast, buf_emb = arr[:n].astype(dtype), [arr[n:]]
        shard_rows, buf_rows = buf_rows[:n], buf_rows[n:]
        if not np.isfinite(cast).all():
            bad = shard_rows[int(np.flatnonzero(~np.isfinite(cast).all(1))[0])][0]
            raise DataError(f"{bad}: the encoder gave a NaN or an embedding too large for {dtype} "
                            "(try --dtype float32)")
        atomic_save_npy(out / name, cast)
        lines = [[p, name, i, *gps] for i, (p, gps) in enumerate(shard_rows)]
        _append_manifest(out, lines)
        rows.extend(dict(zip(FIELDS, map(str, ln))) for ln in lines)
        res.embedded += len(lines)
        next_shard += 1

    bar = tqdm(total=len(todo), unit="image", desc="embedding", disable=not progress)
    try:
        for emb, kept, gps, skipped in encoder.iter_files(todo, batch_size):
            for p, reason in skipped:
                if len(res.skipped) < MAX_REPORTED:
                    log(f"warning: skipped {reason}")
                res.skipped.append((str(p), reason))
            buf_emb.append(emb)
            buf_rows.extend((str(p.resolve()), ("", "") if g is None else (f"{g[0]:.7f}", f"{g[1]:.7f}"))
                            for p, g in zip(kept, gps))
            bar.update(len(kept) + len(skipped))
            while len(buf_rows) >= shard_size:
                flush(shard_size)
        flush(len(buf_rows))
    except BaseException:
        bar.close()
        try:  # what was skipped so far, but never in place of the error that stopped the run
            _write_skipped(out, res, log)
        except DataError:
            pass
        raise
    bar.close()
    _write_skipped(out, res, log)
    if not res.embedded and not rows:
        shown = [str(p) for p, _ in res.skipped[:3]] + (["..."] if len(res.skipped) > 3 else [])
        raise DataError(f"{', '.join(shown)}: none of the images could be read (the reasons are in {out / SKIPPED})")


def _write_skipped(out: Path, res: EmbedResult, log) -> None:
    if len(res.skipped) > MAX_REPORTED:
        log(f"warning: ... and {len(res.skipped) - MAX_REPORTED} more unreadable files, all listed in {out / SKIPPED}")
    _write_csv(out / SKIPPED, ("path", "reason"),
               [(str(Path(p).resolve()), r.removeprefix(f"{p}: ")) for p, r in res.skipped])


def _csv_rows(path: Path) -> int | None:
    """Data rows of a CSV this module wrote (None: no file)."""
    try:
        with open(path, newline="", encoding="utf-8", errors=PATH_ERRORS) as fh:
            return max(0, sum(1 for _ in csv.reader(fh)) - 1)
    except FileNotFoundError:
        return None


def _npy_rows(path: Path) -> int | None:
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return None


def _write_coords(out: Path, rows: list[dict], changed: bool, log) -> None:
    geo = [(i, r) for i, r in enumerate(rows) if r["lat"] != ""]
    if not geo:
        return
    # The path column is for people (the manifest keeps the exact name): a name that is not
    # UTF-8 is shown with U+FFFD, so that training reads the file without a latin-1 warning.
    table = [[r["lat"], r["lon"], i, r["path"].encode("utf-8", PATH_ERRORS).decode("utf-8", "replace")]
             for i, r in geo]
    header = ("lat", "lon", "row", "path")
    # Rewritten when something was embedded, and whenever a file is missing or does not hold
    # the geotagged rows: a run stopped (full disk, kill) between the manifest and these
    # leaves them short.
    if changed or _csv_rows(out / COORDS) != len(geo):
        _write_csv(out / COORDS, header, table)
    sub = out / GEOTAGGED
    if len(geo) == len(rows):
        return
    whole = (_csv_rows(sub / COORDS) == len(geo) and (sub / SPEC_FILE).exists()
             and _npy_rows(sub / "embeddings.npy") == len(geo))
    if not changed and whole:
        return
    # Not every photo is geotagged: a copy of the geotagged rows pairs with their coords.
    from locdiff.data.files import open_embeddings

    sub.mkdir(exist_ok=True)
    emb = open_embeddings(out)
    idx = np.array([i for i, _ in geo])
    # Copied in chunks through a memory map, so a large collection never sits in RAM.
    with atomic_replace(sub / "embeddings.npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=emb.dtype, shape=(len(idx), emb.shape[1]))
        for i in range(0, len(idx), 65_536):
            arr[i:i + 65_536] = emb[idx[i:i + 65_536]]
        arr.flush()
        del arr
    _write_csv(sub / COORDS, header, table)
    atomic_write_bytes(sub / SPEC_FILE, (out / SPEC_FILE).read_bytes())
    log(f"{len(geo)} of {len(rows)} images have EXIF GPS: copied their embeddings to {sub} for training")
