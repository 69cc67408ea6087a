"""locdiff.Geolocator end to end: photos embedded by locdiff embed with a tiny random encoder,
a tiny run trained on them, then predictions from embeddings and from the image files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("reverse_geocode")

from photo_helpers import photo_folder, save_photo, tiny_model_dir  # noqa: E402

import locdiff  # noqa: E402
from locdiff.data.files import DataError, open_embeddings, read_coords  # noqa: E402
from locdiff.diffusion import DiffusionConfig  # noqa: E402
from locdiff.embed import embed_images  # noqa: E402
from locdiff.encoder import Encoder, record_encoder  # noqa: E402
from locdiff.geolocator import Geolocator  # noqa: E402
from locdiff.models import CSUNetConfig  # noqa: E402
from locdiff.run import PredictConfig, RunConfig, TrainConfig
from locdiff.train import train  # noqa: E402


def _train(emb, coords, run, embeddings_path):
    cfg = RunConfig(CSUNetConfig(degree=4, widths=(32, 16), cond_dim=16, emb_widths=(32,), density_head=True), DiffusionConfig(timesteps=50),
                    TrainConfig(steps=3, batch_size=8, val_size=0, val_every=0),
                    PredictConfig(samples=2))
    train(emb, coords, run, cfg, progress=False, extra_config={"data": {"embeddings": str(embeddings_path)}})
    return run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("geo")
    photos = photo_folder(d / "photos", n=8)
    enc = Encoder.load(str(tiny_model_dir(d / "tiny")), "none", device="cpu")
    embed_images([d / "photos"], d / "E", encoder=enc, progress=False, log=lambda m: None)
    emb = open_embeddings(d / "E")
    coords = read_coords(d / "E" / "coords.csv", rows=len(emb))
    run = _train(emb[np.arange(len(emb))], coords, d / "run", d / "E")
    return d, photos, run


def test_exported_lazily():
    assert locdiff.Geolocator is Geolocator


def test_predict_from_embeddings(setup):
    d, _, run = setup
    geo = Geolocator.from_run(run, device="cpu")
    emb = open_embeddings(d / "E")[np.arange(3)]
    ans = geo.predict(emb, top_k=2, density=True)
    assert len(ans) == 3 and ans.modes.shape == (3, 2, 2) and ans.latlon.shape == (3, 2)
    ok = np.isfinite(ans.probability)
    assert np.all((ans.probability[ok] >= 0) & (ans.probability[ok] <= 1))
    np.testing.assert_allclose(np.nansum(ans.probability, 1) + ans.other, 1.0, atol=1e-9)
    assert ans.density.shape == (3, ans.grid.size) and np.allclose(ans.density.sum(1), 1, atol=1e-5)
    assert np.all(ans.radius_km[:, 1] >= ans.radius_km[:, 0]) and ans.places[0][0]["country"] is not None
    one = geo.predict(emb[0], top_k=2, geocode=False)  # one embedding (D,)
    assert one.modes.shape == (1, 2, 2) and one.places is None and one.names == ["row 0"]


def test_predict_from_image_files_uses_the_recorded_encoder(setup):
    d, photos, run = setup
    geo = Geolocator.from_run(run, device="cpu")  # encoder.json found through config.json's data.embeddings
    (d / "photos" / "broken.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="1 unreadable images left out"):
        ans = geo.predict([d / "photos"], top_k=2, geocode=False)
    (d / "photos" / "broken.jpg").unlink()
    assert len(ans) == 8 and [p for p, _ in ans.skipped][0].endswith("broken.jpg")
    # The run's encoder embeds the files as locdiff embed did.
    emb, names, _ = geo.embed(sorted(photos))
    stored = open_embeddings(d / "E")
    rows = {r["path"]: i for i, r in enumerate(_manifest(d / "E"))}
    idx = [rows[str(p.resolve())] for p in sorted(photos)]
    np.testing.assert_allclose(emb, stored[np.array(idx)], rtol=2e-3, atol=2e-3)
    single = geo.predict(str(photos[0]), top_k=1, geocode=False)
    assert single.names == [str(photos[0])]


def _manifest(out):
    import csv

    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_encoder_recorded_in_the_run_folder(setup, tmp_path):
    d, photos, run = setup
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["data"]["embeddings"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    geo = Geolocator.from_run(moved, device="cpu")
    assert geo.encoder_spec is None
    with pytest.raises(DataError, match="the run records no image encoder; copy the encoder.json"):
        geo.predict([photos[0]])
    assert len(geo.predict(np.zeros((2, 16), np.float32), top_k=1, geocode=False)) == 2  # embeddings still work
    assert record_encoder(d / "E", moved)
    assert len(Geolocator.from_run(moved, device="cpu").predict([photos[0]], geocode=False)) == 1


def test_width_mismatch_names_both(setup, tmp_path):
    d, _, run = setup
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    spec = json.loads((d / "E" / "encoder.json").read_text())
    (moved / "encoder.json").write_text(json.dumps({**spec, "embedding_dim": 768}))
    with pytest.raises(DataError, match="trained on 16-dimensional embeddings, but its encoder .* gives "
                                        "768-dimensional ones"):
        Geolocator.from_run(moved, device="cpu")
    geo = Geolocator.from_run(run, device="cpu")
    with pytest.raises(DataError, match=r"embeddings of shape \(2, 7\), but the run .* was trained on 16"):
        geo.predict(np.zeros((2, 7)))


@pytest.mark.parametrize("change, fragment", [
    ({"seed": "abc"}, r"seed = 'abc': expected an integer in \[0, 9223372036854775807\]"),
    ({"image_size": 100_000}, r"image_size = 100000: expected an integer in \[1, 4096\]"),  # took 20 GB a photo
    ({"pretrained": "maybe"}, "pretrained = 'maybe': expected one of weights, none"),
    ({"config": {"hidden_size": "big"}}, "config is not a CLIP vision architecture"),
    ({"config": {"hidden_size": 64, "num_attention_heads": 3}}, "config is not a CLIP vision architecture"),
    ({"config": {}}, "embedding_dim = 16 but the architecture's projection_dim is 512"),
])
def test_a_damaged_encoder_description_is_named_before_any_photo(setup, tmp_path, change, fragment):
    d, photos, run = setup
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    spec = json.loads((d / "E" / "encoder.json").read_text())
    (moved / "encoder.json").write_text(json.dumps({**spec, **change}))
    geo = Geolocator.from_run(moved, device="cpu")
    with pytest.raises(DataError, match=f"{moved / 'encoder.json'}: {fragment}"):
        geo.predict([photos[0]], progress=False)


def test_embeddings_need_no_photos_extra(setup, monkeypatch):
    # Without reverse_geocode (a base install predicting on embeddings) the answers come
    # without place names; asking for names says which extra, before any prediction.
    import sys

    _, _, run = setup
    geo = Geolocator.from_run(run, device="cpu")
    monkeypatch.setitem(sys.modules, "reverse_geocode", None)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "reverse_geocode" else real(name, *a))
    ans = geo.predict(np.zeros((2, 16)), top_k=2)
    assert ans.places is None or all(p is None for row in ans.places for p in row)
    called = []
    monkeypatch.setattr(geo.predictor, "predict", lambda *a, **k: called.append(1))
    with pytest.raises(DataError, match=r"reverse geocoding \(geocode=True; geocode=False leaves it out\) needs "
                                        r"the package 'reverse_geocode': pip install 'locdiff\[photos\]'"):
        geo.predict(np.zeros((2, 16)), geocode=True)
    assert not called


def test_bad_arguments(setup, tmp_path):
    _, _, run = setup
    with pytest.raises(DataError, match="nope: run folder not found"):
        Geolocator.from_run(tmp_path / "nope")
    geo = Geolocator.from_run(run, device="cpu")
    from locdiff.answers import top_k_limit

    cap = top_k_limit(geo.predictor.degree)
    for k in (0, cap + 1, 10**9):  # a huge k was left to the decode's memory check
        with pytest.raises(ValueError, match=rf"top_k must be an int in \[1, {cap}\] .* got {k}"):
            geo.predict(np.zeros((1, 16)), top_k=k)
    assert len(geo.predict(np.zeros((1, 16)), top_k=np.int64(2), geocode=False)) == 1  # numpy ints are ints
    for size in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"batch_size must be an int >= 1 \(photos embedded at once\), got "
                                             rf"{size}"):
            geo.predict(np.zeros((1, 16)), batch_size=size)
    with pytest.raises(DataError, match="no inputs: expected image paths or an"):
        geo.predict([])
    with pytest.raises(DataError, match="inputs: expected image paths, or an .* not a mix"):
        geo.predict(["a.jpg", np.zeros(16)])
    bad = save_photo(tmp_path / "x.png", 1)
    bad.write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no image could be read: .*x.png"):
        geo.predict([bad])


def test_a_memory_mapped_array_is_predicted_in_place_like_a_copy(setup, tmp_path):
    d, _, run = setup
    geo = Geolocator.from_run(run, device="cpu")
    emb = np.asarray(open_embeddings(d / "E")[np.arange(4)], np.float16)
    np.save(tmp_path / "q.npy", emb)
    mapped = np.load(tmp_path / "q.npy", mmap_mode="r")  # read-only: nothing may write to it
    seen, predict = [], geo.predictor.predict
    geo.predictor.predict = lambda emb, **kw: seen.append(emb) or predict(emb, **kw)
    from_map = geo.predict(mapped, top_k=2, geocode=False, progress=False)
    assert seen[0] is mapped  # the map itself, not a copy
    del geo.predictor.predict
    from_copy = geo.predict(emb.astype(np.float32), top_k=2, geocode=False, progress=False)
    np.testing.assert_array_equal(from_map.latlon, from_copy.latlon)
    np.testing.assert_array_equal(from_map.modes, from_copy.modes)
    bad = np.array(emb, np.float32)
    bad[2, 5] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match="row 2 of the embeddings is NaN or infinite"):
        geo.predict(np.load(tmp_path / "bad.npy", mmap_mode="r"), geocode=False, progress=False)
