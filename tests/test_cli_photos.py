"""From a folder of photos to answers on the command line: `locdiff embed DIR --pretrained
none`, `locdiff train` on its output (which records the encoder in the run), then
`locdiff predict --run R --images DIR` writing CSV, JSON Lines, an HTML map and a PNG map.
A tiny random encoder stands in for CLIP ViT-L/14, so nothing is downloaded."""
from __future__ import annotations

import csv
import json
from html.parser import HTMLParser

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytest.importorskip("reverse_geocode")

from cli_helpers import run_cli  # noqa: E402
from photo_helpers import photo_folder, tiny_model_dir  # noqa: E402

from locdiff import cli  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    photo_folder(d / "photos", n=6)
    tiny = tiny_model_dir(d / "tiny")
    assert cli.main(["embed", str(d / "photos"), "--model", str(tiny), "--pretrained", "none", "--out", str(d / "E"),
                     "--device", "cpu"]) == 0
    code = cli.main(["train", "--embeddings", str(d / "E"), "--coords", str(d / "E" / "coords.csv"), "--out",
                     str(d / "run"), "--degree", "4", "--steps", "3", "--batch-size", "4", "--set",
                     "model.widths=[32,16]", "--set", "model.cond_dim=16", "--set", "model.emb_widths=[32]",
                     "--set", "model.density_head=true", "--set", "diffusion.timesteps=50", "--set",
                     "train.val_size=0", "--workers", "0", "--device", "cpu", "--quiet"])
    assert code == 0
    return d


def test_train_records_the_encoder(trained):
    spec = json.loads((trained / "run" / "encoder.json").read_text())
    assert spec == json.loads((trained / "E" / "encoder.json").read_text())


VOID = ("meta", "link", "br", "img", "input", "hr", "base")


class _Tags(HTMLParser):
    """Every element that is opened is closed, in order (void elements need no end tag)."""

    def __init__(self):
        super().__init__()
        self.open = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.open and self.open[-1] == tag, (tag, self.open[-3:])
        self.open.pop()


def test_predict_images_end_to_end(trained, tmp_path, capsys):
    out = tmp_path / "answers.csv"
    code, text, err = run_cli(capsys, "predict", "--run", trained / "run", "--images", trained / "photos",
                              "--out", out, "--top-k", 2, "--html", tmp_path / "map.html", "--map",
                              tmp_path / "map.png", "--device", "cpu")
    assert code == 0, err
    assert "6 photos located" in text
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    records = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    # An untrained density may have fewer separate modes than asked: top_k stops at the real ones.
    assert len(records) == 6 and all(1 <= len(r["modes"]) <= 2 for r in records)
    # The first mode is the answer (the density's mode), whatever the order of the peaks.
    assert all((r["modes"][0]["lat"], r["modes"][0]["lon"]) == (r["lat"], r["lon"]) for r in records), records
    # The CSV has a row per mode, ranked from 1, for every photo.
    assert len(rows) == sum(len(r["modes"]) for r in records)
    assert len({r["input"] for r in rows}) == 6 and {r["rank"] for r in rows} <= {"1", "2"}
    html = (tmp_path / "map.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    parser = _Tags()
    parser.feed(html)
    parser.close()
    assert not parser.open
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_top_k_is_capped(trained, tmp_path, capsys):
    from locdiff.answers import top_k_limit

    cap = top_k_limit(4)
    out = tmp_path / "a.csv"
    for k in (cap + 1, 0):  # an answer is at least its first mode
        code, _, err = run_cli(capsys, "predict", "--run", trained / "run", "--images", trained / "photos",
                               "--out", out, "--top-k", k, "--device", "cpu")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f"--top-k {k}: expected an integer in [1, {cap}]" in lines[0]
        assert not out.exists()


def test_predict_images_with_a_gallery_answers_as_locdiff_h(trained, tmp_path, capsys):
    # Gallery = the photos' own embeddings and places: LocDiff-H answers photos at their own
    # place (where the untrained model's density allows), the model alone none; the answers
    # keep their whole shape.
    gallery = ["--gallery-embeddings", trained / "E", "--gallery-coords", trained / "E" / "coords.csv"]
    base = ["predict", "--run", trained / "run", "--images", trained / "photos", "--device", "cpu", "--top-k", 2]
    assert run_cli(capsys, *base, "--out", tmp_path / "plain.csv")[0] == 0
    assert run_cli(capsys, *base, *gallery, "--out", tmp_path / "h.csv")[0] == 0
    truth = {r["path"]: (float(r["lat"]), float(r["lon"])) for r in csv.DictReader(open(trained / "E" / "coords.csv"))}
    from locdiff import great_circle_km

    def errors(path):
        return [great_circle_km((float(r["lat"]), float(r["lon"])), truth[r["input"]])
                for r in csv.DictReader(open(path))]

    plain, hybrid = errors(tmp_path / "plain.csv"), errors(tmp_path / "h.csv")
    assert sum(e < 1 for e in hybrid) >= len(hybrid) // 2 and sum(e < 1 for e in plain) == 0
    records = [json.loads(line) for line in open(tmp_path / "h.jsonl")]
    assert all(0 < r["modes"][0]["probability"] <= 1 for r in records)
    # The same folder of shards as the gallery of `evaluate` (every photo here is geotagged).
    assert run_cli(capsys, "evaluate", "--run", trained / "run", "--embeddings", trained / "E", "--coords",
                   trained / "E" / "coords.csv", *gallery, "--json", tmp_path / "m.json",
                   "--device", "cpu")[0] == 0
    import numpy as np

    from locdiff import Geolocator
    from locdiff.data import DataError

    with pytest.raises(DataError, match="gallery: embeddings"):
        Geolocator.from_run(trained / "run", "cpu", gallery=(np.zeros((3, 5)), np.zeros((3, 2))))
    code, _, err = run_cli(capsys, *base, gallery[0], gallery[1], "--out", tmp_path / "x.csv")
    assert code == 2 and "--gallery-coords" in err and not (tmp_path / "x.csv").exists()


def test_an_unreadable_photo_is_reported_once(trained, tmp_path, capsys):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(trained / "photos", photos)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "notes.txt").write_text("not an image")
    code, text, err = run_cli(capsys, "predict", "--run", trained / "run", "--images", photos,
                              "--out", tmp_path / "a.csv", "--top-k", 1, "--device", "cpu")
    assert code == 0, err
    assert "6 photos located" in text
    lines = [line for line in err.splitlines() if "broken.jpg" in line]
    broken = photos / "broken.jpg"
    assert len(lines) == 1 and lines[0].startswith(f"locdiff predict: warning: skipped {broken}: not a readable"), err
    # Left out for its extension, as embed says too.
    assert "locdiff predict: warning: ignored 1 file without an image extension" in err and "notes.txt" in err
    code, _, err = run_cli(capsys, "predict", "--run", trained / "run", "--images", photos, "--out",
                           tmp_path / "a.jsonl", "--device", "cpu")
    assert code == 2 and "with --images the answers also go to --out with a .jsonl suffix" in err


def test_embed_reports_an_unreadable_photo_as_a_warning_line(trained, tmp_path, capsys):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(trained / "photos", photos)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "notes.txt").write_text("not an image")
    code, text, err = run_cli(capsys, "embed", photos, "--model", trained / "tiny", "--pretrained", "none",
                              "--out", tmp_path / "E", "--device", "cpu")
    assert code == 0, err
    assert "1 unreadable skipped" in text
    broken = photos / "broken.jpg"
    lines = [line for line in err.splitlines() if "broken.jpg" in line or "notes.txt" in line]
    assert len(lines) == 2, err
    assert lines[0].startswith("locdiff embed: warning: ignored 1 file without an image extension"), err
    assert lines[1].startswith(f"locdiff embed: warning: skipped {broken}: not a readable"), err
