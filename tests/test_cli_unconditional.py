"""The command line for a run trained without embeddings (``--unconditional``): train on
coordinates alone, evaluate without embeddings, predict its answer or draw locations; and
each kind of run refuses the other's inputs in one line, before anything is written."""
import json

import numpy as np
import pytest

from cli_helpers import TINY, expect_error, run_cli, write_task

PLACES = np.array([[48.85, 2.35], [-33.87, 151.21]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("unconditional")
    write_task(d)  # a conditional task's files beside: emb.npy, coords.npy, coords.csv
    coords = PLACES[np.random.default_rng(0).choice(2, 200, p=[0.7, 0.3])]
    np.save(d / "places.npy", coords)
    np.save(d / "val.npy", PLACES[np.random.default_rng(1).choice(2, 40, p=[0.7, 0.3])])
    return d


@pytest.fixture(scope="module")
def run(files):
    from locdiff import cli

    argv = ["train", "--unconditional", "--coords", files / "places.npy", "--val-coords", files / "val.npy",
            "--out", files / "run", "--steps", 30, *TINY]
    assert cli.main([str(a) for a in argv]) == 0
    return files / "run"


def test_train_records_an_unconditional_run(run, capsys):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["conditional"] is False and cfg["model"]["emb_dim"] == 1
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_nll" in h for h in history)  # validation tracks the density


def test_evaluate_without_embeddings(files, run, tmp_path, capsys):
    from locdiff import great_circle_km

    code, out, _ = run_cli(capsys, "evaluate", "--run", run, "--coords", files / "places.npy", "--json",
                           tmp_path / "m.json")
    assert code == 0, out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 200 and np.isfinite(m["nll"]) and 0 <= m["rva_auc"] <= 1
    code, out, _ = run_cli(capsys, "predict", "--run", run, "--out", tmp_path / "a.csv", "--top-k", 2)
    assert code == 0 and "the answer of" in out
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "lat,lon,lat_1,lon_1,score_1,lat_2,lon_2,score_2" and len(lines) == 2
    # One answer for every place: each accuracy is the share of places that near that answer.
    answer = np.array([float(v) for v in lines[1].split(",")[:2]])
    d = great_circle_km(np.load(files / "places.npy"), answer[None])
    assert m["acc_2500km"] == pytest.approx(np.mean(d <= 2500)) and m["median_km"] == pytest.approx(np.median(d))


def test_predict_draws_locations(run, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "predict", "--run", run, "--out", tmp_path / "d.csv", "--draws", 25,
                           "--sampler", "ddim", "--sample-steps", 5, "--seed", 3)
    assert code == 0 and "25 locations drawn" in out
    drawn = np.genfromtxt(tmp_path / "d.csv", delimiter=",", names=True)
    assert drawn.dtype.names == ("lat", "lon") and len(drawn) == 25
    assert np.all(np.abs(drawn["lat"]) <= 90) and np.all(np.abs(drawn["lon"]) <= 180)
    # The same seed draws the same locations.
    run_cli(capsys, "predict", "--run", run, "--out", tmp_path / "e.csv", "--draws", 25, "--sampler", "ddim",
            "--sample-steps", 5, "--seed", 3)
    assert (tmp_path / "d.csv").read_text() == (tmp_path / "e.csv").read_text()


def test_conditional_predict_draws_columns(files, tmp_path, capsys):
    from cli_helpers import trained_task

    folder = trained_task(tmp_path)
    code, out, _ = run_cli(capsys, "predict", "--run", folder / "base", "--embeddings", folder / "emb.npy",
                           "--out", tmp_path / "p.csv", "--draws", 3, "--sampler", "ddim")
    assert code == 0, out
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "lat,lon,draw_lat_1,draw_lon_1,draw_lat_2,draw_lon_2,draw_lat_3,draw_lon_3"
    # Drawn degrees are written as the answers are, to 6 decimals.
    first = (tmp_path / "p.csv").read_text().splitlines()[1].split(",")
    assert all(len(v.split(".")[1]) == 6 for v in first[2:]), first


@pytest.mark.parametrize("argv, fragment", [
    (["--unconditional", "--embeddings", "emb.npy", "--coords", "coords.npy"],
     "--embeddings: --unconditional trains a model of where the coordinates lie, without embeddings"),
    (["--unconditional", "--coords", "coords.npy", "--val-embeddings", "emb.npy", "--val-coords", "coords.npy"],
     "--val-embeddings: --unconditional trains a model"),
    (["--unconditional"], "--coords is needed (--unconditional trains on coordinates alone)"),
    (["--coords", "coords.npy", "--set", "model.conditional=false", "--embeddings", "emb.npy"],
     "--embeddings: --set model.conditional=false trains a model"),
])
def test_train_refuses_embeddings_for_an_unconditional_run(files, tmp_path, capsys, argv, fragment):
    argv = [files / a if a.endswith(".npy") else a for a in argv]
    expect_error(capsys, ["train", "--out", tmp_path / "r", "--steps", 2, *argv], fragment, [tmp_path / "r"])


def test_each_kind_of_run_refuses_the_others_inputs(files, run, tmp_path, capsys):
    out = tmp_path / "o.csv"
    expect_error(capsys, ["evaluate", "--run", run, "--embeddings", files / "emb.npy", "--coords",
                          files / "coords.npy", "--json", tmp_path / "m.json"],
                 "--embeddings: ", [tmp_path / "m.json"])
    expect_error(capsys, ["predict", "--run", run, "--out", out, "--gallery-embeddings", files / "emb.npy",
                          "--gallery-coords", files / "coords.npy"], "LocDiff-H retrieves by embedding", [out])
    expect_error(capsys, ["predict", "--run", run, "--out", out, "--draws", 0],
                 "--draws 0: expected a number of locations to draw, at least 1", [out])
    expect_error(capsys, ["predict", "--run", run, "--out", out, "--draws", 5, "--sampler", "density"],
                 "--sampler density: --draws takes locations from --sampler ddim or ddpm", [out])
    folder = tmp_path / "c"
    folder.mkdir()
    from cli_helpers import trained_task

    trained_task(folder)
    expect_error(capsys, ["evaluate", "--run", folder / "base", "--coords", folder / "coords.npy", "--json",
                          tmp_path / "m.json"], "--embeddings is needed: ", [tmp_path / "m.json"])


def test_resume_continues_an_unconditional_run(files, tmp_path, capsys):
    import shutil

    from locdiff import cli

    argv = ["train", "--unconditional", "--coords", files / "places.npy", "--out", tmp_path / "r", "--steps", 4,
            *TINY]
    assert cli.main([str(a) for a in argv]) == 0
    shutil.copy(tmp_path / "r" / "config.json", tmp_path / "before.json")
    # The run's own settings say it is unconditional: --resume needs no flag for it.
    code, out, _ = run_cli(capsys, "train", "--out", tmp_path / "r", "--resume", "--steps", 8, "--quiet")
    assert code == 0 and "trained 8 steps" in out, out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["conditional"] is False
    expect_error(capsys, ["train", "--out", tmp_path / "r", "--resume", "--steps", 9, "--embeddings",
                          files / "emb.npy"], "--embeddings: model.conditional = false trains a model", [])


def test_review_findings_are_refused_in_one_line(files, run, tmp_path, capsys):
    # Embeddings to predict for an unconditional run, empty coordinates, --top-k beside
    # --draws, a draw too large to hold, and --resume --unconditional of a conditional run.
    np.save(tmp_path / "e.npy", np.zeros((0, 2)))
    np.save(tmp_path / "one.npy", np.random.default_rng(0).normal(size=(5, 1)).astype(np.float32))
    out = tmp_path / "o.csv"
    expect_error(capsys, ["predict", "--run", run, "--embeddings", tmp_path / "one.npy", "--out", out],
                 "--embeddings: ", [out])
    expect_error(capsys, ["evaluate", "--run", run, "--coords", tmp_path / "e.npy", "--json", tmp_path / "m.json"],
                 "e.npy: coordinates file has no rows", [tmp_path / "m.json"])
    for argv in (["--coords", tmp_path / "e.npy"],
                 ["--coords", files / "places.npy", "--val-coords", tmp_path / "e.npy"]):
        expect_error(capsys, ["train", "--unconditional", *argv, "--out", tmp_path / "r", *TINY],
                     "e.npy: coordinates file has no rows", [tmp_path / "r"])
    expect_error(capsys, ["predict", "--run", run, "--out", out, "--draws", 3, "--top-k", 2],
                 "--top-k 2: with --draws the output holds the drawn locations alone", [out])
    expect_error(capsys, ["predict", "--run", run, "--out", out, "--draws", 10 ** 13],
                 f"--draws {10 ** 13}: ", [out])
    cond = tmp_path / "cond"
    code, _, _ = run_cli(capsys, "train", "--embeddings", files / "emb.npy", "--coords", files / "coords.npy",
                         "--out", cond, "--steps", 2, *TINY)
    assert code == 0
    expect_error(capsys, ["train", "--out", cond, "--resume", "--unconditional", "--steps", 9],
                 "--unconditional: the run was trained on embeddings (data.embeddings = ", [])


def test_sampling_flags_that_draws_use_are_not_called_ignored(run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", "--run", run, "--out", tmp_path / "d.csv", "--draws", 3,
                           "--sample-steps", 4)
    assert code == 0 and "ignored" not in err, err
