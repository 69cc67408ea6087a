"""locdiff embed: reading photos (orientation, EXIF GPS, unreadable files), the sharded
output and its manifest, resuming after a finished or a killed run, and the one-line errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from cli_helpers import run_cli  # noqa: E402
from photo_helpers import TINY, photo_folder, save_photo, tiny_model_dir  # noqa: E402

from locdiff.data.files import DataError, open_embeddings, read_coords  # noqa: E402
from locdiff.embed import embed_images  # noqa: E402
from locdiff.encoder import DEFAULT_MODEL, Encoder, vision_config  # noqa: E402
from locdiff.images import UnreadableImage, find_images, read_image  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def encoder(tiny):
    return Encoder.load(str(tiny), "none", device="cpu")


def _manifest(out):
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_orientation_and_gps_are_read(tmp_path, suffix):
    p = save_photo(tmp_path / f"a.{suffix}", 1, latlon=(-33.8688, 151.2093), orientation=6, size=(48, 36))
    photo = read_image(p)
    assert photo.image.size == (36, 48) and photo.image.mode == "RGB"  # rotated upright
    assert photo.latlon == pytest.approx((-33.8688, 151.2093), abs=1e-6)
    west = read_image(save_photo(tmp_path / f"b.{suffix}", 2, latlon=(40.5, -73.25)))
    assert west.latlon == pytest.approx((40.5, -73.25), abs=1e-6)
    assert read_image(save_photo(tmp_path / f"c.{suffix}", 3)).latlon is None
    assert read_image(save_photo(tmp_path / f"d.{suffix}", 4, latlon=(0.0, 0.0))).latlon is None


def test_unreadable_and_other_formats_are_named(tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(UnreadableImage, match="bad.jpg: not a readable image"):
        read_image(tmp_path / "bad.jpg")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "g.gif")
    with pytest.raises(UnreadableImage, match=r"g.gif: not a JPEG, PNG or WebP image \(GIF\)"):
        read_image(tmp_path / "g.gif")


def test_phone_jpegs_and_deep_grayscale_are_read_as_they_look(tmp_path, monkeypatch):
    from PIL import Image

    # A JPEG with a multi-picture block (phones' HDR gain maps): Pillow calls it MPO.
    first = Image.new("RGB", (60, 40), (200, 30, 30))
    first.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[Image.new("RGB", (60, 40))])
    with Image.open(tmp_path / "phone.jpg") as img:
        assert img.format == "MPO"
    red = np.asarray(read_image(tmp_path / "phone.jpg").image).reshape(-1, 3).mean(0)
    assert red[0] > 150 and red[1] < 80
    # 16-bit grayscale: a gradient over the whole 16-bit range, not clipped to white.
    Image.fromarray(np.linspace(0, 65535, 12000).reshape(100, 120).astype(np.uint16)).save(tmp_path / "g16.png")
    grey = np.asarray(read_image(tmp_path / "g16.png").image)[..., 0].astype(float)
    assert grey.min() <= 1 and grey.max() >= 254 and abs(grey.mean() - 127.5) < 2
    # Pillow's size warning names no file; read_image adds one that does, and its refusal says
    # what to raise.
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.warns(Image.DecompressionBombWarning) as caught:  # Pillow's, then read_image's
        read_image(tmp_path / "big.png")
    assert any(str(w.message).startswith(f"{tmp_path / 'big.png'}: Image size") for w in caught)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)
    with pytest.raises(UnreadableImage, match="big.png: not read .*raise PIL.Image.MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "big.png")


def test_find_images(tmp_path):
    photos = photo_folder(tmp_path / "d", n=4)
    (tmp_path / "d" / "notes.txt").write_text("x")
    save_photo(tmp_path / "d" / ".thumbs" / "t.jpg", 9)
    files, ignored = find_images([tmp_path / "d", photos[0]])  # the duplicate is dropped
    assert sorted(files) == sorted(photos) and [p.name for p in ignored] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="empty: folder holds no JPEG, PNG or WebP images"):
        find_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="nope: image file or folder not found"):
        find_images([tmp_path / "nope"])


def test_a_folder_of_the_users_own_files_is_not_embedded_into(tmp_path, encoder):
    photos = photo_folder(tmp_path / "d", n=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in (("coords.csv", "lat,lon\n1,2\n"), ("encoder.json", '{"mine": 1}')):
        (mine / name).write_text(text)
        with pytest.raises(DataError, match=f"mine: holds files that locdiff embed did not write \\({name}\\)"):
            embed_images(photos, mine, encoder=encoder, progress=False)
        assert (mine / name).read_text() == text
        (mine / name).unlink()
    # A run trained on embed's output holds a valid encoder.json beside its own files.
    run = tmp_path / "run"
    run.mkdir()
    (run / "encoder.json").write_text(json.dumps(encoder.spec))
    (run / "checkpoint.safetensors").write_bytes(b"weights")
    with pytest.raises(DataError, match=r"run: is a training run's folder \(checkpoint.safetensors\)"):
        embed_images(photos, run, encoder=encoder, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "encoder.json"]
    # A device this machine lacks is named before the folder is made.
    with pytest.raises(DataError, match="cuda:99"):
        embed_images(photos, tmp_path / "new", model=str(tiny_model_dir(tmp_path / "tiny")), pretrained="none",
                     device="cuda:99", progress=False)
    assert not (tmp_path / "new").exists()
    assert embed_images(photos, mine, encoder=encoder, progress=False).embedded == 2  # empty: fine
    assert embed_images(photos, mine, encoder=encoder, progress=False).already == 2   # its own: fine


def test_embed_writes_shards_manifest_coords(tmp_path, encoder):
    photos = photo_folder(tmp_path / "d", n=5)
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "E"
    res = embed_images([tmp_path / "d"], out, encoder=encoder, batch_size=2, shard_size=3, progress=False,
                       log=lambda m: None)
    assert (res.embedded, res.rows, res.geotagged) == (5, 5, 5)
    assert [p.endswith("broken.png") for p, _ in res.skipped] == [True]
    emb = open_embeddings(out)
    assert emb.shape == (5, TINY["projection_dim"]) and emb.dtype == np.float16
    rows = _manifest(out)
    assert [r["shard"] for r in rows] == ["emb-000000.npy"] * 3 + ["emb-000001.npy"] * 2
    assert [r["row"] for r in rows] == ["0", "1", "2", "0", "1"]
    # Row i of the shards is the embedding of manifest line i, and coords.csv pairs with them.
    by_path = {str(p.resolve()): p for p in photos}
    direct = encoder.embed([read_image(by_path[r["path"]], 32).image for r in rows])
    np.testing.assert_allclose(emb[np.arange(5)], direct, rtol=2e-3, atol=2e-3)
    coords = read_coords(out / "coords.csv", rows=len(emb))
    truth = np.array([read_image(by_path[r["path"]]).latlon for r in rows])
    np.testing.assert_allclose(coords, truth, atol=1e-6)
    spec = json.loads((out / "encoder.json").read_text())
    assert spec["embedding_dim"] == 16 and spec["pretrained"] == "none" and spec["dtype"] == "float16"
    assert not (out / "geotagged").exists()


def test_manifest_and_skipped_list_name_files_alike(tmp_path, encoder, monkeypatch):
    # Paths given relative to the working folder: both files hold absolute ones, so a
    # skipped file can be found from the manifest's folder, wherever the user ran from.
    photo_folder(tmp_path / "d", n=2)
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG garbage")
    monkeypatch.chdir(tmp_path)
    embed_images([Path("d")], tmp_path / "E", encoder=encoder, progress=False, log=lambda m: None)
    with open(tmp_path / "E" / "skipped.csv", newline="") as f:
        skipped = list(csv.DictReader(f))
    assert [r["path"] for r in skipped] == [str((tmp_path / "d" / "broken.png").resolve())]
    assert skipped[0]["reason"] and not skipped[0]["reason"].startswith("d/")
    assert all(Path(r["path"]).is_absolute() for r in _manifest(tmp_path / "E"))


def test_resume_skips_done_files_and_adds_new_ones(tmp_path, encoder):
    photo_folder(tmp_path / "d", n=3)
    out = tmp_path / "E"
    kw = dict(encoder=encoder, progress=False, log=lambda m: None, dtype="float32")
    assert embed_images([tmp_path / "d"], out, **kw).embedded == 3
    before = open_embeddings(out)[np.arange(3)]
    again = embed_images([tmp_path / "d"], out, **kw)
    assert (again.embedded, again.already, again.rows) == (0, 3, 3)
    save_photo(tmp_path / "d" / "new.jpg", 7)  # no GPS: the geotagged rows get their own copy
    more = embed_images([tmp_path / "d"], out, **kw)
    assert (more.embedded, more.rows, more.geotagged) == (1, 4, 3)
    np.testing.assert_array_equal(open_embeddings(out)[np.arange(3)], before)
    assert _manifest(out)[-1]["path"].endswith("new.jpg") and _manifest(out)[-1]["lat"] == ""
    sub = open_embeddings(out / "geotagged" / "embeddings.npy")
    np.testing.assert_array_equal(sub, before)
    assert len(read_coords(out / "geotagged" / "coords.csv", rows=len(sub))) == 3
    # A run stopped (full disk, kill) between the manifest and these files left them missing
    # or short; the next run rebuilds them rather than point to them.
    (out / "geotagged" / "coords.csv").unlink()
    (out / "coords.csv").write_text("lat,lon,row,path\n")
    (out / "geotagged" / ".embeddings.123.npy.tmp").write_bytes(b"half")
    embed_images([tmp_path / "d"], out, **kw)
    assert len(read_coords(out / "geotagged" / "coords.csv", rows=3)) == 3
    assert len(read_coords(out / "coords.csv")) == 3 and not list((out / "geotagged").glob(".*.tmp"))
    with pytest.raises(DataError, match="embedded with --model .* --dtype float32, asked for .* --dtype float16"):
        embed_images([tmp_path / "d"], out, encoder=encoder, progress=False, log=lambda m: None)


def test_resume_after_a_kill(tmp_path, encoder, monkeypatch):
    photo_folder(tmp_path / "d", n=6)
    out = tmp_path / "E"
    calls = {"n": 0}
    real = Encoder.embed

    def dies_on_third_batch(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(Encoder, "embed", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_images([tmp_path / "d"], out, encoder=encoder, batch_size=1, shard_size=2, progress=False,
                     log=lambda m: None)
    monkeypatch.setattr(Encoder, "embed", real)
    assert len(_manifest(out)) == 2 and len(list(out.glob("emb-*.npy"))) == 1
    # What a kill between the shard and its manifest lines, or inside a write, leaves behind:
    np.save(out / "emb-000001.npy", np.zeros((2, 16), np.float16))
    (out / ".emb-000002.npy.x1y2.npy").write_bytes(b"partial")
    logged = []
    res = embed_images([tmp_path / "d"], out, encoder=encoder, batch_size=4, progress=False, log=logged.append)
    assert (res.already, res.embedded, res.rows) == (2, 4, 6)
    assert any("removing emb-000001.npy" in m for m in logged)
    assert not list(out.glob(".emb-*"))
    rows = _manifest(out)
    assert len({r["path"] for r in rows}) == 6 and open_embeddings(out).shape == (6, 16)
    assert not np.any(np.all(open_embeddings(out)[np.arange(6)] == 0, axis=1))


def test_truncated_manifest_line_drops_its_shard(tmp_path, encoder):
    photo_folder(tmp_path / "d", n=4)
    out = tmp_path / "E"
    kw = dict(encoder=encoder, shard_size=2, progress=False, log=lambda m: None)
    embed_images([tmp_path / "d"], out, **kw)
    text = (out / "manifest.csv").read_text()
    (out / "manifest.csv").write_text(text[:-5])  # killed inside the last append
    res = embed_images([tmp_path / "d"], out, **kw)
    assert (res.already, res.embedded, res.rows) == (2, 2, 4)
    assert [r["row"] for r in _manifest(out)] == ["0", "1", "0", "1"]


def test_vit_l14_architecture_without_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = vision_config(DEFAULT_MODEL, "none")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size,
            cfg.projection_dim, cfg.hidden_act) == (1024, 24, 16, 14, 224, 768, "quick_gelu")


def test_same_seed_same_random_encoder(tiny, encoder, tmp_path):
    again = Encoder.from_spec(encoder.spec, "cpu")
    img = [read_image(save_photo(tmp_path / "a.png", 3)).image]
    np.testing.assert_array_equal(again.embed(img), encoder.embed(img))
    other = Encoder.load(str(tiny), "none", device="cpu", seed=1)
    assert not np.allclose(other.embed(img), encoder.embed(img))


def test_an_encoder_description_names_itself_when_its_weights_are_gone(tmp_path, encoder):
    # A run's encoder.json names a model folder; errors about it name that file, not --model.
    spec = {**encoder.spec, "pretrained": "weights", "model": str(tmp_path / "moved-away")}
    with pytest.raises(DataError, match=r"^run/encoder.json: model '.*moved-away': cannot load the encoder's weights"):
        Encoder.from_spec(spec, "cpu", path="run/encoder.json")


def test_cli_embed(tmp_path, tiny, capsys):
    photo_folder(tmp_path / "d", n=3)
    code, out, _ = run_cli(capsys, "embed", tmp_path / "d", "--model", tiny, "--pretrained", "none",
                           "--out", tmp_path / "E", "--device", "cpu")
    assert code == 0 and "embedded 3 new images" in out and "--coords" in out
    assert len(_manifest(tmp_path / "E")) == 3


@pytest.mark.parametrize("case", ["no_images", "empty_name", "unknown_model", "unknown_random", "uncached_random",
                                  "bad_device"])
def test_cli_embed_errors(tmp_path, tiny, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photo_folder(tmp_path / "d", n=1)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    argv, fragment = {
        "no_images": ([tmp_path / "txt"], "txt: folder holds no JPEG, PNG or WebP images"),
        "empty_name": ([tmp_path / "d", "--model", ""], "--model '': expected a Hugging Face model name"),
        "unknown_model": ([tmp_path / "d", "--model", "nobody/no-such-clip"],
                          "--model 'nobody/no-such-clip': cannot load the encoder"),
        "unknown_random": ([tmp_path / "d", "--model", tmp_path / "nodir", "--pretrained", "none"],
                           "nodir': model folder not found (expected a folder with a config.json"),
        "uncached_random": ([tmp_path / "d", "--model", "nobody/no-such-clip", "--pretrained", "none"],
                            "cannot load the encoder's configuration from a local folder or the Hugging Face cache"),
        "bad_device": ([tmp_path / "d", "--model", tiny, "--pretrained", "none", "--device", "gpu"],
                       "--device 'gpu': expected cpu, cuda, cuda:N or auto"),
    }[case]
    code, _, err = run_cli(capsys, "embed", *argv, "--out", tmp_path / "E")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0] and lines[0].startswith("locdiff embed: error:"), err
    assert not list((tmp_path / "E").glob("*.npy")) if (tmp_path / "E").exists() else True


def test_an_unreachable_hub_points_to_the_offline_ways(tmp_path, monkeypatch):
    import transformers

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    import socket

    asked = []

    def unreachable(*args, **kwargs):
        asked.append(kwargs["local_files_only"])
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(transformers.CLIPVisionConfig, "from_pretrained", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])  # a host that resolves, as online
    with pytest.raises(DataError, match="from a local folder, the cache or the hub .*set HF_HUB_OFFLINE=1 .*"
                                        "--pretrained none"):
        vision_config("nobody/no-such-clip", "weights")
    # Without name resolution the hub is not asked (huggingface_hub would retry for ~25 s):
    # the cache only, and the error says why.

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    with pytest.raises(DataError, match="the Hugging Face cache, and the hub's host hub.example.org cannot be "
                                        "resolved .*set HF_HUB_OFFLINE=1"):
        vision_config("nobody/no-such-clip", "weights")
    assert asked == [False, True]
    # Behind a proxy only the proxy resolves outside names: the hub is asked.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    with pytest.raises(DataError, match="from a local folder, the cache or the hub"):
        vision_config("nobody/no-such-clip", "weights")
    assert asked == [False, True, False]


def test_missing_extra_is_named(monkeypatch):
    import sys

    from locdiff.extras import require

    monkeypatch.setitem(sys.modules, "folium", None)
    with pytest.raises(DataError, match=r"the HTML map needs the package 'folium': pip install 'locdiff\[photos\]'"):
        require("folium", "the HTML map")


def test_a_run_that_reads_nothing_says_why_and_leaves_a_folder_to_rerun(tmp_path, encoder):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "bad.jpg").write_text("not an image")
    out = tmp_path / "E"
    with pytest.raises(DataError, match=r"bad.jpg: none of the images could be read \(the reasons are in .*skipped.csv\)"):
        embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None)
    with open(out / "skipped.csv", newline="") as fh:
        assert [r["reason"][:20] for r in csv.DictReader(fh)] == ["not a readable image"]
    # Once the photo is mended, the same folder takes it.
    (photos / "bad.jpg").unlink()
    save_photo(photos / "good.jpg", 1)
    res = embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None)
    assert res.embedded == 1 and open_embeddings(out).shape[0] == 1


def test_one_embed_at_a_time_and_its_folder_is_checked_first(tmp_path, encoder):
    # Two embeds into one folder numbered their shards alike: the manifest paired photos with
    # other photos' vectors. The folder is locked as a run's is; a bad --out is named before
    # the encoder runs.
    from locdiff.runfolder import RunLock

    photos = tmp_path / "photos"
    photo_folder(photos, 3)
    out = tmp_path / "E"
    with RunLock(out):
        with pytest.raises(DataError, match="in use by this process"):
            embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None)
    res = embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None)
    assert res.embedded == 3
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for bad, fragment in ((tmp_path / "afile" / "sub", "is a file, so the embeddings folder cannot be made"),
                          (tmp_path / "dangling", "a symbolic link to .*nowhere, which does not exist")):
        with pytest.raises(DataError, match=fragment):
            embed_images([photos], bad, encoder=encoder, progress=False, log=lambda msg: None)
    assert not (tmp_path / "nowhere").exists()


def test_hidden_npy_files_are_not_shards(tmp_path, encoder):
    # A killed writer's temporary (".emb-000005.npy.x.npy") sorted first and shifted every row.
    photos = tmp_path / "photos"
    photo_folder(photos, 3)
    out = tmp_path / "E"
    embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None)
    before = np.asarray(open_embeddings(out))
    np.save(out / ".emb-000005.npy.k2j4x9_q.npy", before)
    np.testing.assert_array_equal(np.asarray(open_embeddings(out)), before)
    np.save(out / ".scratch.npy", before)  # not a shard, so no reason to refuse the folder either
    assert embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None).already == 3


def test_file_names_that_are_not_utf8_are_kept(tmp_path, encoder):
    # A latin-1 name crashed embed (UnicodeEncodeError) and left a manifest every rerun hit.
    import os

    photos = tmp_path / "photos"
    photos.mkdir()
    save_photo(photos / "ok.jpg", 1)
    odd = os.path.join(os.fsencode(photos), b"caf\xe9.jpg")
    save_photo(Path(os.fsdecode(odd)), 2, latlon=(45.0, 5.0))
    out = tmp_path / "E"
    res = embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None)
    assert res.embedded == 2
    again = embed_images([photos], out, encoder=encoder, progress=False, log=lambda msg: None)
    assert again.embedded == 0 and again.already == 2 and open_embeddings(out).shape[0] == 2
    import warnings

    with warnings.catch_warnings():  # training reads embed's coordinates without a latin-1 guess
        warnings.simplefilter("error")
        assert len(read_coords(out / "geotagged" / "coords.csv")) == 1


def test_the_write_that_failed_first_is_the_one_named(tmp_path, encoder, monkeypatch):
    # On a full disk skipped.csv's write failed too, and its error replaced the shard's.
    import locdiff.embed as E

    photos = tmp_path / "photos"
    photo_folder(photos, 3)

    def full(path, *a, **k):
        raise DataError(f"{path}: no space left to write it")
    monkeypatch.setattr(E, "atomic_save_npy", full)
    monkeypatch.setattr(E, "_write_csv", lambda path, *a: full(path))
    with pytest.raises(DataError, match=r"emb-000000.npy: no space left"):
        embed_images([photos], tmp_path / "E", encoder=encoder, progress=False, log=lambda msg: None)


@pytest.mark.parametrize("bad, message", [
    (dict(shard_size=0), r"shard_size \(--shard-size\) 0: expected an integer >= 1"),
    (dict(batch_size=-1), r"batch_size \(--batch-size\) -1: expected an integer >= 1"),
    (dict(batch_size=2.0), r"batch_size \(--batch-size\) 2.0: expected an integer >= 1"),
    (dict(dtype="int8"), r"dtype \(--dtype\) 'int8': expected one of float16, float32"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, encoder, bad, message):
    photo_folder(tmp_path / "d", n=2)
    with pytest.raises(DataError, match=message):
        embed_images([tmp_path / "d"], tmp_path / "E", encoder=encoder, progress=False, log=lambda m: None, **bad)
    assert not (tmp_path / "E").exists()
    # numpy integers are integers
    res = embed_images([tmp_path / "d"], tmp_path / "E", encoder=encoder, batch_size=np.int64(2),
                       shard_size=np.int64(2), progress=False, log=lambda m: None)
    assert res.rows == 2
