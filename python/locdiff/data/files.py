"""Data files (docs/evaluation.md): embeddings as ``.npy`` (memory-mapped) or a folder of
``.npy`` shards, coordinates as CSV (header with ``lat`` and ``lon``) or ``.npy`` ``(N, 2)``.

Every problem raises :class:`DataError` with a one-line message naming the file, which the
command line prints as is (exit code 2).

>>> emb = open_embeddings("train_emb.npy")        # doctest: +SKIP
>>> coords = read_coords("train.csv", rows=len(emb))  # doctest: +SKIP
>>> emb[np.array([0, 5, 7])].shape                 # doctest: +SKIP
(3, 768)
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from locdiff.errors import DataError


def not_a_file(path) -> str | None:
    """What stands at ``path`` where a regular file should ("a folder", "a FIFO", ...), or
    None for a regular file or nothing at all. Reading a FIFO blocks, a device may never end."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, what in ((stat.S_ISREG, None), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def cache_dir() -> Path:
    """``$LOCDIFF_CACHE`` or ``~/.cache/locdiff``."""
    return Path(os.environ.get("LOCDIFF_CACHE") or Path.home() / ".cache" / "locdiff").expanduser()


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_replace(path):
    """Yields a temporary path beside ``path`` (``.NAME.XXXXXXXX.tmp``) to write; when the
    block ends it is synced and becomes ``path`` (``os.replace``), and when the block fails
    it is removed: a killed process leaves either the old file or the new one, never half of
    one. A failed write is a DataError naming ``path``; an error reading another file in the
    block is raised as it is."""
    path = Path(path)
    if path.is_symlink():  # write where the link points, and keep the link
        path = Path(os.path.realpath(path))
    # The temporary's name is 14 bytes longer than the file's: a long name gets a short one.
    prefix = f".{path.name}." if len(os.fsencode(path.name)) <= 230 else ".locdiff-write."
    with _write_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
    try:
        with _write_errors(path, tmp):
            yield Path(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            # mkstemp creates 0600 files; give the result the permissions of a normal file.
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_replace`."""
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def _write_errors(path: Path, tmp: str | None = None):
    """A failed write (a full disk or quota, a file-size limit, a read-only or forbidden
    folder) as a DataError naming the file: free-space checks cannot foresee them all. An
    error naming another file than ``path`` or its temporary ``tmp`` (a source read while
    writing) passes as it is."""
    try:
        yield
    except OSError as err:
        if tmp is not None and err.filename is not None and os.fsdecode(err.filename) not in (str(path), tmp):
            raise
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"{path}: no space left to write it ({err.strerror}); free some space") from None
        raise DataError(f"{path}: cannot be written ({err.strerror or err}); lift the limit or write elsewhere") \
            from None


def atomic_write_csv(path, header, rows, errors: str = "strict") -> None:
    """A CSV of ``header`` and ``rows`` (lines ending in \\n, UTF-8 with ``errors``) written
    through :func:`atomic_replace`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", errors=errors))


def atomic_write_json(path, obj) -> None:
    """``obj`` as indented JSON with a final newline, written through :func:`atomic_replace`."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_npy(path, array: np.ndarray) -> None:
    """``np.save`` through :func:`atomic_replace`."""
    with atomic_replace(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


class ShardedArray:
    """Rows of several ``(n_i, D)`` memory-mapped ``.npy`` shards seen as one ``(N, D)`` array.

    Only the rows asked for are read, so the shards never sit in RAM at once. Indexing takes
    an integer array (or a slice) and returns a float32 numpy array.
    """

    def __init__(self, arrays: list[np.ndarray], names: list[str]):
        self.arrays, self.names = arrays, names
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.offsets[-1]), arrays[0].shape[1])
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All rows in RAM (``np.asarray``), for users that need the whole array, such as a
        retrieval gallery."""
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), self.shape[1]), np.float32)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][idx[sel] - self.offsets[s]]
        return out


def _open_npy(path: Path) -> np.ndarray:
    what = not_a_file(path)
    if what is not None:
        raise DataError(f"{path}: {what}, not a regular file; give a .npy file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy raises several types for a corrupt header
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    if not isinstance(arr, np.ndarray):  # np.load reads a .npz archive whatever its name
        raise DataError(f"{path}: a .npz archive, not a .npy file; save one array with np.save")
    return arr


def open_embeddings(path) -> np.ndarray | ShardedArray:
    """Memory-map ``path`` (an ``(N, D)`` float16/float32 ``.npy`` or a folder of shards).

    Raises :class:`DataError` naming the file for a missing path, wrong rank or dtype.
    Values are not scanned here (that would read everything); training checks each batch.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: embeddings file not found")
    if path.is_dir():
        # Hidden files are never shards: a killed writer's temporary (".emb-000005.npy.XXXX.tmp")
        # would sort first and shift every row against the manifest.
        files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: folder holds no .npy shards")
        arrays = [_check_emb(_open_npy(f), f) for f in files]
        dims = {a.shape[1] for a in arrays}
        if len(dims) != 1:
            raise DataError(f"{path}: shards have different embedding dimensions {sorted(dims)}")
        return ShardedArray(arrays, [str(f) for f in files])
    if path.suffix != ".npy":
        raise DataError(f"{path}: embeddings must be a .npy file or a folder of .npy shards")
    return _check_emb(_open_npy(path), path)


def _check_emb(arr: np.ndarray, path) -> np.ndarray:
    if arr.ndim != 2:
        raise DataError(f"{path}: embeddings must be 2-D (N, D), got shape {arr.shape}")
    if arr.dtype.kind == "f" and not arr.dtype.isnative and arr.dtype.itemsize in (2, 4, 8):
        raise DataError(f"{path}: embeddings in the other byte order ({arr.dtype.str}); save them in "
                        "this machine's: np.save(path, a.astype(a.dtype.newbyteorder('=')))")
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise DataError(f"{path}: embeddings must be floating point (float16, float32 or float64), got {arr.dtype}")
    if len(arr) == 0:
        raise DataError(f"{path}: embeddings file has no rows")
    if arr.shape[1] == 0:
        raise DataError(f"{path}: embeddings have shape {arr.shape}: no columns (expected (N, D) with D >= 1)")
    return arr


# Embedding values a network can take: the LayerNorm that reads them squares them in float32.
MAX_EMBEDDING_ABS = 1e12


def constant_embeddings(rows: int) -> np.ndarray:
    """The input of an unconditional model (``model.conditional = False``): the constant 1
    for each of ``rows`` rows, ``(rows, 1)`` float32."""
    return np.ones((rows, 1), np.float32)


def embeddings_float32(emb) -> np.ndarray:
    """``emb`` (an array, nested lists, or a torch tensor of any dtype and device, with or
    without grad) as a float32 numpy array: numpy reads neither bfloat16 nor a tensor that
    requires grad or lives on a GPU."""
    if hasattr(emb, "detach") and hasattr(emb, "numpy"):  # a tensor (torch is not imported here)
        emb = emb.detach().cpu()
        emb = (emb.float() if emb.is_floating_point() else emb).numpy()
    return np.array(emb, np.float32)


def embeddings_ok(block) -> bool:
    """Whether every value of a block (numpy or torch) is finite with magnitude at most
    :data:`MAX_EMBEDDING_ABS` (one reduction: NaN fails the comparison)."""
    if (block.size if isinstance(block, np.ndarray) else block.numel()) == 0:
        return True
    return float(abs(block).max()) <= MAX_EMBEDDING_ABS  # (in float64: the bound overflows float16)


def first_bad_embedding(emb) -> tuple[int, str]:
    """The first row of ``emb`` that :func:`embeddings_ok` refuses and what is wrong with it,
    as the end of a sentence: ``(4, "is NaN or infinite")``."""
    emb = np.asarray(emb, np.float64)
    with np.errstate(invalid="ignore"):
        row = int(np.flatnonzero(~(np.abs(emb) <= MAX_EMBEDDING_ABS).all(1))[0])
    values = emb[row]
    if not np.isfinite(values).all():
        return row, "is NaN or infinite"
    return row, (f"holds {values[np.argmax(np.abs(values))]:g}: expected values of magnitude at most "
                 f"{MAX_EMBEDDING_ABS:g}")


def scan_embeddings(emb, chunk: int = 65_536) -> tuple[int, str] | None:
    """:func:`first_bad_embedding` over all of ``emb`` (an array, memmap or shards) read in
    chunks of copied rows, so that a file of several GB is scanned without loading it; None
    when every row is fine."""
    for i in range(0, len(emb), chunk):
        block = np.array(emb[i:i + chunk])
        if not embeddings_ok(block):
            row, what = first_bad_embedding(block)
            return i + row, what
    return None


def check_finite_embeddings(path, chunk: int = 65_536) -> None:
    """Every value of the embeddings file ``path`` finite and within what the network can read
    (``files.embeddings_ok``). Chunked copies from a mapping of its own, dropped at the end:
    a file of several GB is scanned without loading it, and its pages do not stay resident
    in this process (the training loader reads rows without mapping it; docs/training.md)."""
    scan = open_embeddings(path)
    bad = scan_embeddings(scan, chunk)
    del scan  # (the blocks are copies: nothing else holds the mapping)
    if bad:
        raise DataError(f"{path}: row {bad[0]} of the embeddings {bad[1]}")


# Files from this many rows on get a line before they are read and checked (that takes a while).
LOAD_NOTE_ROWS = 1_000_000


def load_pair(emb_path, coords_path, log=None):
    """Embeddings (memory-mapped) and coordinates, checked: rows agree, values finite.
    ``log(message)``, if given, hears that a large file is being read."""
    emb = open_embeddings(emb_path)
    if log is not None and len(emb) >= LOAD_NOTE_ROWS:
        log(f"reading {coords_path} and checking the {len(emb):,} rows of {emb_path}")
    coords = read_coords(coords_path, rows=len(emb))
    check_finite_embeddings(emb_path)
    return emb, coords


def read_coords(path, rows: int | None = None) -> np.ndarray:
    """``(N, 2)`` float64 (lat, lon) from a CSV with ``lat`` and ``lon`` columns (header names
    ``latitude``/``longitude``/``lng`` are accepted too) or an ``(N, 2)`` ``.npy``.

    Checks: the file exists and parses, no NaN, latitudes in [-90, 90], longitudes in
    [-360, 360] (0-360 and -180-180 conventions; larger values are errors in the data), and,
    when ``rows`` is given, the row count matches. Longitudes outside [-180, 180] are wrapped.
    """
    path = Path(path)
    what = not_a_file(path)
    if what is not None or not path.exists():
        raise DataError(f"{path}: " + (f"{what}, not a regular file; expected a coordinates file (CSV or .npy)"
                                       if what else "coordinates file not found"))
    if path.suffix == ".npy":
        raw = _open_npy(path)
        if raw.ndim != 2 or raw.shape[1] != 2:
            raise DataError(f"{path}: coordinates must have shape (N, 2), got {raw.shape}")
        if raw.dtype.kind not in "fiu":
            raise DataError(f"{path}: coordinates must be numbers (float or integer), got dtype {raw.dtype}")
        if rows is not None and len(raw) != rows:  # before a header's claimed rows are read
            raise DataError(f"{path}: {len(raw)} coordinate rows but the embeddings have {rows}")
        arr = np.array(raw, np.float64)
        where = lambda i: f"row {i}"  # noqa: E731
    else:
        arr, lines = _read_csv(path)
        where = lambda i: f"line {lines[i]} (data row {i})"  # noqa: E731  (the line an editor shows)
        if rows is not None and len(arr) != rows:
            raise DataError(f"{path}: {len(arr)} coordinate rows but the embeddings have {rows}")
    bad = np.flatnonzero(~np.isfinite(arr).all(1))
    if len(bad):
        raise DataError(f"{path}: {where(bad[0])} has a NaN or infinite coordinate: {arr[bad[0]].tolist()}")
    bad = np.flatnonzero(np.abs(arr[:, 0]) > 90)
    if len(bad):
        lat, lon = arr[bad[0]]
        swapped = "; are the columns swapped (lon, lat)?" if abs(lon) <= 90 else ""
        raise DataError(f"{path}: {where(bad[0])} has latitude {lat} outside [-90, 90]{swapped}")
    bad = np.flatnonzero(np.abs(arr[:, 1]) > 360)
    if len(bad):
        raise DataError(f"{path}: {where(bad[0])} has longitude {arr[bad[0], 1]} outside [-360, 360]")
    out = np.abs(arr[:, 1]) > 180
    arr[out, 1] = (arr[out, 1] + 180.0) % 360.0 - 180.0
    _warn_if_radians(arr, path)
    return arr


def _warn_if_radians(arr: np.ndarray, path) -> None:
    # Radians pass every range check and train a model on a box of 350 x 700 km off West
    # Africa; with 10+ places all inside that box, degrees are unlikely.
    import warnings

    if len(arr) >= 10 and np.abs(arr[:, 0]).max() <= np.pi / 2 and np.abs(arr[:, 1]).max() <= np.pi:
        warnings.warn(f"{path}: every coordinate lies within +-pi/2 latitude and +-pi longitude; locdiff reads "
                      "degrees, so if these are radians convert them (numpy.degrees)", UserWarning, stacklevel=3)


def decode_text(data: bytes, path) -> str:
    """Text of a file from a spreadsheet or another tool: UTF-8 (a byte-order mark, as
    Excel writes, is dropped; UTF-16 with its mark is read too), else latin-1 with a warning
    (every byte is a latin-1 character, so this never fails; the warning says the guess)."""
    import warnings

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:  # cut short: an odd number of bytes
            raise DataError(f"{path}: UTF-16 text cut short or damaged ({err.reason} at byte {err.start})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        warnings.warn(f"{path}: not UTF-8 (byte {err.start}); read as latin-1", UnicodeWarning, stacklevel=3)
        return data.decode("latin-1")


def _read_csv(path: Path) -> tuple[np.ndarray, list[int]]:
    """(lat, lon) rows and the file line each came from."""
    import io

    text = decode_text(path.read_bytes(), path)
    try:
        # Comma, semicolon (spreadsheets in locales with a decimal comma) or tab.
        dialect = csv.Sniffer().sniff(text[:8192].split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty CSV file") from None
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    lat = next((header.index(n) for n in ("lat", "latitude") if n in header), None)
    lon = next((header.index(n) for n in ("lon", "lng", "long", "longitude") if n in header), None)
    if lat is None or lon is None:
        raise DataError(f"{path}: CSV header needs 'lat' and 'lon' columns, got {header}")
    # Where the separator is not a comma, a comma in a number is a decimal comma ("33,7").
    comma = dialect.delimiter != ","

    def number(cell: str) -> float:
        if "_" in cell:  # float() reads "1_0" as 10: a typo, not a number in a data file
            raise ValueError(cell)
        return float(cell.replace(",", ".", 1) if comma else cell)

    out, lines = [], []
    try:
        for row in reader:
            if not row or not any(c.strip() for c in row):
                continue
            if any(c.strip() for c in row[len(header):]):  # "45,5,10,2": decimal commas, comma-separated
                raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields but the header has "
                                f"{len(header)} ({dialect.delimiter.join(row)!r}); quote numbers with a decimal "
                                "comma, or separate the columns with ';'")
            try:
                out.append((number(row[lat]), number(row[lon])))
            except (ValueError, IndexError):
                cells = [row[c] if c < len(row) else "" for c in (lat, lon)]
                raise DataError(f"{path}: line {reader.line_num} has no numeric lat/lon: got {cells[0]!r}, "
                                f"{cells[1]!r}") from None
            lines.append(reader.line_num)
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV file, line {reader.line_num} ({err})") from None
    if not out:
        raise DataError(f"{path}: CSV file has no data rows")
    return np.array(out, np.float64), lines


def write_coords_csv(path, latlon: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write ``lat,lon`` (plus ``extra`` columns) atomically."""
    cols = ["lat", "lon"] + list(extra or {})
    ex = [np.asarray(v) for v in (extra or {}).values()]
    # Further coordinates (lat_1, lon_1, ...) as the answer's: 6 decimals, about 0.1 m.
    degrees = [re.fullmatch(r"(draw_)?(lat|lon)_\d+", c) is not None for c in cols[2:]]
    atomic_write_csv(path, cols, ([f"{latlon[i, 0]:.6f}", f"{latlon[i, 1]:.6f}"]
                                  + [_fmt(e[i], d) for e, d in zip(ex, degrees)] for i in range(len(latlon))))


def _fmt(v, degrees: bool = False) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{v:.6f}" if degrees else f"{v:.6g}"
    return str(v)


def gather_rows(emb, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of ``emb`` (an array, a memmap or shards) as float32, in that order:
    read sorted, so that memory-mapped files are read sequentially."""
    order = np.argsort(idx)
    rows = np.asarray(emb[idx[order]], dtype=np.float32)
    out = np.empty_like(rows)
    out[order] = rows
    return out
