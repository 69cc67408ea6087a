"""Faults a user can make on the command line, each one error line (exit 2) before any work
and nothing of theirs lost: outputs that name an input or the run, sampling flags out of
range, values a network cannot read, a diverging run, a folder of the user's own files,
and what --resume keeps and tells."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import TINY, expect_error, run_cli, train_argv, trained_task

from locdiff.run import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return trained_task(tmp_path_factory.mktemp("faults"))


def test_an_output_never_replaces_an_input_or_the_run(files, tmp_path, capsys):
    emb = tmp_path / "emb.npy"
    emb.write_bytes((files / "emb.npy").read_bytes())
    before = emb.read_bytes()
    run = files / "base"
    expect_error(capsys, ["predict", "--run", run, "--embeddings", emb, "--out", emb], "is the input")
    expect_error(capsys, ["evaluate", "--run", run, "--embeddings", emb, "--coords", files / "coords.csv",
                          "--json", files / "coords.csv"], "is the input")
    expect_error(capsys, ["predict", "--run", run, "--embeddings", emb, "--out", run / CHECKPOINT_FILE],
                 "lies inside the run folder")
    expect_error(capsys, ["predict", "--run", run, "--embeddings", emb, "--out", tmp_path / "a.csv",
                          "--map", tmp_path / "a.csv"], "name the same file")
    # A folder of shards: every file in it is read (one was overwritten with the CSV).
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "emb-000000.npy", np.load(emb))
    expect_error(capsys, ["predict", "--run", run, "--embeddings", shards, "--out", shards / "emb-000000.npy"],
                 "would be read as a shard of the input folder")
    assert emb.read_bytes() == before
    load_checkpoint(run)  # intact


@pytest.mark.parametrize("flags, fragment", [
    (["--sampler", "ddim", "--sample-steps", "51"], "--sample-steps 51: steps must be in [1, 50] for DDIM"),
    (["--guidance", "nan"], "--guidance nan: guidance must be a finite number"),
    (["--guidance", "1e30"], "--guidance 1e+30: guidance must be a finite number in [-1e+06, 1e+06]"),
    (["--sampler", "ddim", "--eta", "-3"], "--eta -3.0: eta must be a finite number in [0, 1]"),
    (["--sampler", "ddim", "--eta", "1.5"], "--eta 1.5: eta must be a finite number in [0, 1]"),
    (["--samples", "0"], "--samples 0: samples must be an int >= 1"),
    (["--sampler", "ddpm", "--samples", "100000000000"], "use fewer --samples"),
])
def test_sampling_flags_are_checked_before_any_prediction(files, tmp_path, capsys, flags, fragment):
    for cmd in (["predict", "--out", tmp_path / "p.csv"], ["evaluate", "--coords", files / "coords.csv",
                                                            "--json", tmp_path / "m.json"]):
        expect_error(capsys, [*cmd, "--run", files / "base", "--embeddings", files / "emb.npy", *flags], fragment)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.json").exists()


def test_set_values_a_setting_refuses_are_error_lines(files, tmp_path, capsys):
    expect_error(capsys, train_argv(files, tmp_path / "r", "--set", "predict.sampler=foo"),
                 "--set 'predict.sampler=foo': sampler must be one of")
    expect_error(capsys, train_argv(files, tmp_path / "r", "--set", "predict.sampler=ddim", "--set",
                                    "predict.steps=1000"), "predict.steps")
    # Each loader worker is a process: 5,000 of them took the machine's memory.
    from locdiff.settings import max_workers

    expect_error(capsys, train_argv(files, tmp_path / "r", "--set", "data.workers=5000"),
                 f"--set data.workers=5000: expected none or an integer in [0, {max_workers()}]")
    assert not (tmp_path / "r").exists()


def test_values_the_network_cannot_read_are_named(files, tmp_path, capsys):
    emb = np.load(files / "emb.npy")
    emb[5, 2] = 3e38  # finite, but its square overflows the network's float32 LayerNorm
    np.save(tmp_path / "big.npy", emb)
    fragment = "row 5 of the embeddings holds 3e+38: expected values of magnitude at most 1e+12"
    expect_error(capsys, ["predict", "--run", files / "base", "--embeddings", tmp_path / "big.npy", "--out",
                          tmp_path / "p.csv"], fragment)
    expect_error(capsys, ["train", "--embeddings", tmp_path / "big.npy", "--coords", files / "coords.csv",
                          "--out", tmp_path / "r", *TINY, "--steps", "3"], fragment)


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, *train_argv(files, out, "--steps", "5", "--set", "train.checkpoint_every=5"))
    assert code == 0
    good = (out / CHECKPOINT_FILE).read_bytes()
    # lr 1e6 ruins the weights within a few steps (NaN weights, or a loss that stays NaN):
    # the run stops with an error, and no checkpoint is written meanwhile
    line = expect_error(capsys, train_argv(files, out, "--resume", "--steps", "40", "--lr", "1e6", "--set",
                                           "train.warmup_steps=0"), "training diverged by step")
    assert "the checkpoint of step 5 is kept" in line and "lower train.lr" in line
    assert (out / CHECKPOINT_FILE).read_bytes() == good
    # A run that ends within 3 steps of going bad is no result either.
    short = expect_error(capsys, train_argv(files, out, "--resume", "--steps", "8", "--lr", "1e6", "--set",
                                            "train.warmup_steps=0"), "training diverged by step")
    assert "the checkpoint of step 5 is kept" in short and (out / CHECKPOINT_FILE).read_bytes() == good
    # With the KL, predictions too large for it give skipped NaN losses before the weights
    # turn NaN; the regression alone takes the weights there.
    fresh = expect_error(capsys, train_argv(files, tmp_path / "fresh", "--steps", "30", "--lr", "1e6", "--set",
                                            "train.warmup_steps=0", "--set", "diffusion.kl_weight=0", "--set",
                                            "model.density_head=false"),
                         "the weights hold NaN or infinite values")
    assert "no checkpoint was saved" in fresh and not (tmp_path / "fresh" / CHECKPOINT_FILE).exists()
    for text in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_a_dangling_link_or_an_unopenable_lock_is_one_line(files, tmp_path, capsys, monkeypatch):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    expect_error(capsys, train_argv(files, tmp_path / "link", "--steps", "3"), "a symbolic link to")
    assert not (tmp_path / "nowhere").exists()
    # A lock planted as a link to someone's file: the file is not written.
    (tmp_path / "planted").mkdir()
    (tmp_path / "victim").write_text("precious")
    (tmp_path / "planted" / "locdiff.lock").symlink_to(tmp_path / "victim")
    expect_error(capsys, train_argv(files, tmp_path / "planted", "--steps", "3"),
                 "the folder's lock file is a symbolic link")
    assert (tmp_path / "victim").read_text() == "precious"
    # A lock file another user made and this one cannot open (a shared folder).
    import os

    real_open = os.open

    def no_lock(path, *args, **kw):
        if str(path).endswith("locdiff.lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)
    monkeypatch.setattr(os, "open", no_lock)
    expect_error(capsys, train_argv(files, tmp_path / "shared", "--steps", "3"),
                 "locdiff.lock: cannot open the folder's lock file (Permission denied)")


def test_a_folder_of_the_users_own_files_is_not_trained_into(files, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    expect_error(capsys, train_argv(files, mine, "--steps", "3"), "holds files that no locdiff run writes (notes.txt)")
    (mine / "notes.txt").unlink()
    (mine / CONFIG_FILE).write_text('{"my": "own"}')
    expect_error(capsys, train_argv(files, mine, "--steps", "3"), "not a locdiff run's config")
    assert (mine / CONFIG_FILE).read_text() == '{"my": "own"}'
    (mine / CONFIG_FILE).unlink()
    (mine / ".mynotes.tmp").write_text("mine")  # a dot file of the user's, not a locdiff temporary
    expect_error(capsys, train_argv(files, mine, "--steps", "3"), ".mynotes.tmp")
    assert (mine / ".mynotes.tmp").exists()
    (mine / ".mynotes.tmp").unlink()
    # Named as a run's files, but with no config.json (a run writes it first): the user's.
    for name in ("train.toml", "metrics.jsonl"):
        (mine / name).write_text("# my annotated config\n")
        expect_error(capsys, train_argv(files, mine, "--steps", "3"),
                     f"holds files that no locdiff run writes ({name})")
        assert (mine / name).read_text() == "# my annotated config\n"
        (mine / name).unlink()
    # A refusal leaves no lock file behind, nor a folder it made.
    assert sorted(p.name for p in mine.iterdir()) == []
    expect_error(capsys, train_argv(files, tmp_path / "new", "--steps", "3", "--resume"), "nothing to resume")
    assert not (tmp_path / "new").exists()


def test_a_run_without_its_latest_checkpoint_is_not_trained_over(files, tmp_path, capsys):
    # Its kept and best checkpoints would go: a new run starts by removing them.
    out = tmp_path / "run"
    assert run_cli(capsys, *train_argv(files, out, "--steps", "6", "--set", "train.keep_checkpoints=3", "--set",
                                       "train.checkpoint_every=2"))[0] == 0
    (out / CHECKPOINT_FILE).unlink()
    kept = sorted(p.name for p in out.glob("checkpoint-*.safetensors"))
    assert kept
    expect_error(capsys, train_argv(files, out, "--steps", "3"), f"already holds a trained run ({kept[0]}")
    assert sorted(p.name for p in out.glob("checkpoint-*.safetensors")) == kept


def test_resume_refuses_settings_it_would_drop_and_says_when_nothing_is_left(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *train_argv(files, out, "--steps", "6"))[0] == 0
    config = (out / CONFIG_FILE).read_text()
    for setting in ("diffusion.kl_weight=5", "predict.sampler=ddim"):
        expect_error(capsys, train_argv(files, out, "--resume", "--steps", "8", "--set", setting),
                     f"{setting.partition('=')[0]}: the run has")
    code, stdout, _ = run_cli(capsys, *train_argv(files, out, "--resume", "--steps", "4"))
    assert code == 0 and "the run is at step 6 and train.steps is 4: nothing to train" in stdout
    assert (out / CONFIG_FILE).read_text() == config
    code, stdout, _ = run_cli(capsys, *train_argv(files, out, "--resume", "--steps", "8"))
    assert code == 0 and "trained 8 steps" in stdout


def test_a_run_stopped_by_its_time_budget_says_so(files, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, *train_argv(files, out, "--steps", "100000", "--max-minutes", "0.002"))
    assert code == 0 and "note: stopped at step" in stdout and "of 100000: train.max_minutes = 0.002" in stdout
    code, stdout, _ = run_cli(capsys, *train_argv(files, out, "--resume", "--steps", "100000", "--max-minutes",
                                                  "0.002"))
    assert code == 0 and "train.max_minutes = 0.002 bounds the training time of all its resumes" in stdout


def test_demo_out_that_is_a_file_is_refused_at_once(files, capsys):
    expect_error(capsys, ["demo", "--out", files / "emb.npy"], "exists and is a file, not a run folder")


FORK_AND_DIE = """
import os, sys, time
from locdiff.runfolder import RunLock
RunLock(sys.argv[1]).acquire()
if os.fork() == 0:  # a loader worker: the lock file's descriptor, no pipe of the test's
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(30)
    os._exit(0)
print("forked", flush=True)
os._exit(0)
"""


def test_a_killed_trainers_lock_is_free_at_once_though_its_children_live(tmp_path):
    # Loader workers are forked with the lock file open and outlive a SIGKILLed trainer by
    # seconds; the lock is the trainer's alone, so a resume right after it takes the folder.
    import subprocess
    import sys

    from locdiff.runfolder import RunLock

    out = subprocess.run([sys.executable, "-c", FORK_AND_DIE, str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert "forked" in out.stdout, out.stderr
    with RunLock(tmp_path):
        with pytest.raises(Exception, match="in use by this process"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


def test_resume_never_removes_kept_checkpoints(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *train_argv(files, out, "--steps", "10", "--set", "train.checkpoint_every=5",
                                       "--set", "train.keep_checkpoints=3"))[0] == 0
    (out / CHECKPOINT_FILE).unlink()
    kept = sorted(p.name for p in out.glob("checkpoint-*.safetensors"))
    assert kept
    expect_error(capsys, train_argv(files, out, "--resume", "--steps", "12"), f"but {kept[0]}")
    assert sorted(p.name for p in out.glob("checkpoint-*.safetensors")) == kept


def test_a_resumed_run_validates_as_it_started_and_finishes_what_was_cut(files, tmp_path, capsys):
    # A run whose final calibration was cut off (no finished_step in config.json) resumed at
    # its last step: the final validation runs again with the settings the run started with,
    # so it repeats the first one exactly, though config.json holds calibrated settings.
    out = tmp_path / "run"
    assert run_cli(capsys, *train_argv(files, out, "--steps", "8", "--set", "train.val_size=12"))[0] == 0
    raw = json.loads((out / CONFIG_FILE).read_text())
    assert raw.pop("finished_step") == 8 and raw["predict"]["temperature"] != 1.0  # calibrated
    (out / CONFIG_FILE).write_text(json.dumps(raw))
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_median_km" in x]
    code, stdout, _ = run_cli(capsys, *train_argv(files, out, "--resume", "--steps", "8", "--set",
                                                  "train.val_size=12"))
    assert code == 0 and "completed the run at step 8: final validation and calibration" in stdout
    assert "samples/s" not in stdout
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_median_km" in x]
    assert again[-1]["step"] == 8 and again[-1]["val_median_km"] == first[-1]["val_median_km"]
    assert json.loads((out / CONFIG_FILE).read_text())["finished_step"] == 8
    code, stdout, _ = run_cli(capsys, *train_argv(files, out, "--resume", "--steps", "8", "--set",
                                                  "train.val_size=12"))
    assert "nothing to train" in stdout


def test_train_checks_validation_data_and_resumes_with_the_runs_settings(files, tmp_path):
    from cli_helpers import tiny_config
    from locdiff.data.files import DataError
    from locdiff.train import train

    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    with pytest.raises(DataError, match=r"val: embeddings \(M, 6\) and coordinates \(M, 2\) expected"):
        train(emb, coords, tmp_path / "v", tiny_config(steps=3), val=(emb[:5, :3], coords[:5]), progress=False)
    assert not (tmp_path / "v").exists()
    train(emb, coords, tmp_path / "r", tiny_config(steps=3, seed=7), progress=False)
    res = train(emb, coords, tmp_path / "r", resume=True, progress=False)  # no config: the run's own
    assert res.nothing_to_do and "step 3" in res.nothing_to_do


@pytest.mark.parametrize("where, value, error", [
    ("coords", 200.0, r"coords row 9 is \[200.0, .*expected finite \(lat, lon\) degrees"),
    ("coords", float("nan"), r"coords row 9 is \[nan"),
    ("emb", float("nan"), "embeddings row 9 is NaN or infinite"),
    ("emb", 1e30, "embeddings row 9 holds 1e\\+30"),
    ("val coords", 95.0, r"val coords row 2 is \[95.0"),
    ("val emb", float("inf"), "val embeddings row 2 is NaN or infinite"),
])
def test_train_checks_every_row_before_writing(files, tmp_path, where, value, error):
    # The Python API checks what the CLI checks in its files, before anything is written,
    # rather than when a batch reaches the bad row (or never, in a short run).
    from cli_helpers import tiny_config
    from locdiff.data.files import DataError
    from locdiff.train import train

    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    v_emb, v_coords = emb[:5].copy(), coords[:5].copy()
    target = {"coords": coords, "emb": emb, "val coords": v_coords, "val emb": v_emb}[where]
    target[2 if where.startswith("val") else 9, 0] = value
    with pytest.raises(DataError, match=error):
        train(emb, coords, tmp_path / "r", tiny_config(steps=3), val=(v_emb, v_coords), progress=False)
    assert not (tmp_path / "r").exists()


def test_train_takes_a_list_of_rows(files, tmp_path):
    from cli_helpers import tiny_config
    from locdiff.train import train

    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    res = train(emb.tolist(), coords.tolist(), tmp_path / "r", tiny_config(steps=2), progress=False)
    assert res.steps == 2


@pytest.mark.parametrize("overrides, error", [
    ({"temprature": 0.5}, "unknown prediction setting 'temprature'"),
    ({"coarse_degree": 0}, r"coarse_degree must be None or an int in \[1, 3\]"),
    ({"coarse_degree": 2.5}, "coarse_degree must be None"),
    ({"guidance": "a"}, "guidance must be a finite number"),
    ({"eta": -5.0}, "eta must be a finite number in"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 1e-06 .*got nan"),
    ({"temperature": 1e-9}, r"temperature must be a finite number >= 1e-06 .*got 1e-09"),
    ({"temperature": "0.5"}, "temperature must be a number, got '0.5'"),
    ({"top_k": -1}, r"top_k must be an int >= 0 \(0: no further modes\), got -1"),
])
def test_predictor_names_a_bad_or_unknown_setting(files, overrides, error):
    from locdiff.predict import Predictor

    pred = Predictor.from_run(files / "base", "cpu")
    emb = np.load(files / "emb.npy")[:3]
    with pytest.raises((ValueError, TypeError), match=error):
        pred.predict(emb, **overrides)


def test_predictor_takes_embeddings_as_any_tensor(files):
    # An encoder under bfloat16 autocast, or one whose output still requires grad, hands over
    # such tensors; numpy reads neither, and the errors named numpy, not the argument.
    import torch

    from locdiff.predict import Predictor

    pred = Predictor.from_run(files / "base", "cpu")
    emb = np.load(files / "emb.npy")[:3]
    want = pred.predict(emb)["latlon"]
    for tensor in (torch.tensor(emb), torch.tensor(emb).bfloat16(), torch.tensor(emb).requires_grad_()):
        got = pred.predict(tensor)["latlon"]
        if tensor.dtype == torch.bfloat16:
            np.testing.assert_allclose(got, pred.predict(tensor.float().numpy())["latlon"])
        else:
            np.testing.assert_array_equal(got, want)


def test_paths_of_the_wrong_kind_are_named_as_such(files, tmp_path, capsys):
    expect_error(capsys, ["predict", "--run", files / "emb.npy", "--embeddings", files / "emb.npy", "--out",
                          tmp_path / "p.csv"], "emb.npy: is a file, not a run folder")
    expect_error(capsys, ["evaluate", "--run", files / "base", "--embeddings", files / "emb.npy", "--coords",
                          tmp_path, "--json", tmp_path / "m.json"], "a folder, not a regular file; expected a coordinates file")
    expect_error(capsys, ["train", "--out", tmp_path / "none", "--resume"], "nothing to resume")


def test_float16_embeddings_are_checked_quietly(files, tmp_path):
    # The magnitude bound (1e12) overflows float16: the comparison is made in float64.
    import warnings

    from locdiff.data.files import check_finite_embeddings

    np.save(tmp_path / "e16.npy", np.load(files / "emb.npy").astype(np.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_finite_embeddings(tmp_path / "e16.npy")


@pytest.mark.parametrize("steps, expected", [(40, "the loss was nan for the last 20 steps"),
                                             (9, "the loss was nan for the last 4 steps")])
def test_a_loss_that_stays_nan_with_finite_weights_is_divergence(files, tmp_path, monkeypatch, steps, expected):
    # Skipping a bad step leaves the weights as they are, so a loss that stays non-finite
    # never recovers: 20 in a row, or a streak the run ends in, stop it with the last good
    # checkpoint kept.
    import torch

    import locdiff.train as T
    from cli_helpers import tiny_config

    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    T.train(emb, coords, tmp_path / "r", tiny_config(steps=5), progress=False)
    good = (tmp_path / "r" / CHECKPOINT_FILE).read_bytes()

    def nan_loss(net, x0, *args, **kw):
        out = net(x0, torch.zeros(len(x0), dtype=torch.long), args[0])
        first = out[0] if isinstance(out, tuple) else out
        return first.sum() * float("nan"), {"mse": float("nan")}
    monkeypatch.setattr(T, "diffusion_loss", nan_loss)
    with pytest.raises(T.Diverged, match=expected + ".*the checkpoint of step 5 is kept"):
        T.train(emb, coords, tmp_path / "r", tiny_config(steps=steps, checkpoint_every=1), resume=True, progress=False)
    assert (tmp_path / "r" / CHECKPOINT_FILE).read_bytes() == good


def test_set_of_a_derived_setting_at_another_value_is_named(files, tmp_path, capsys):
    # model.emb_dim follows the data and model.timesteps diffusion.timesteps: a --set that
    # asks otherwise was replaced without a word.
    expect_error(capsys, train_argv(files, tmp_path / "r", "--set", "model.emb_dim=8"),
                 "--set model.emb_dim=8: this setting follows the embeddings' width (6)")
    expect_error(capsys, train_argv(files, tmp_path / "r", "--set", "model.timesteps=10"),
                 "--set model.timesteps=10: this setting follows diffusion.timesteps (50)")
    assert not (tmp_path / "r").exists()
    code, _, _ = run_cli(capsys, *train_argv(files, tmp_path / "r", "--steps", "2", "--set", "model.emb_dim=6"))
    assert code == 0


@pytest.mark.parametrize("device, fragment", [
    ("meta", "--device='meta': locdiff runs on cpu and cuda devices"),
    ("cuda:64", "--device='cuda:64': "),  # no CUDA here, or fewer than 65 GPUs
    ("gpu", "--device 'gpu': expected cpu, cuda, cuda:N or auto"),
])
def test_device_the_kernels_cannot_use(files, tmp_path, capsys, device, fragment):
    out = tmp_path / "p.csv"
    expect_error(capsys, ["predict", "--run", files / "base", "--embeddings", files / "emb.npy", "--out", out,
                          "--device", device], fragment, [out])


@pytest.mark.parametrize("hybrid, fragment", [
    ({"weight": 2.0}, "config.json: predict.hybrid: weight must be a number in [0, 1], got 2.0"),
    ({"foo": 1}, "config.json: predict.hybrid has an unknown key 'foo'"),
    ([1, 2], "config.json: predict.hybrid = [1, 2]: expected a table"),
])
def test_damaged_hybrid_settings_are_named(files, tmp_path, capsys, hybrid, fragment):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files / "base", run)
    raw = json.loads((run / CONFIG_FILE).read_text())
    raw["predict"]["hybrid"] = hybrid
    (run / CONFIG_FILE).write_text(json.dumps(raw))
    gallery = ["--gallery-embeddings", files / "emb.npy", "--gallery-coords", files / "coords.csv"]
    expect_error(capsys, ["predict", "--run", run, "--embeddings", files / "emb.npy", *gallery, "--out",
                          tmp_path / "p.csv"], fragment, [tmp_path / "p.csv"])


def test_an_unfitted_run_says_its_locdiff_h_settings_are_the_defaults(files, tmp_path, capsys):
    # files/base was trained without validation: no LocDiff-H settings were fitted.
    import warnings

    from locdiff.data.files import DataError
    from locdiff.geolocator import Geolocator

    gallery = ["--gallery-embeddings", files / "emb.npy", "--gallery-coords", files / "coords.csv"]
    code, _, err = run_cli(capsys, "predict", "--run", files / "base", "--embeddings", files / "emb.npy", *gallery,
                           "--out", tmp_path / "p.csv")
    assert code == 0 and "locdiff predict: note: the run has no LocDiff-H settings fitted on validation data" in err
    assert "weight 0.5, bandwidth 25 km" in err
    emb, coords = np.load(files / "emb.npy"), np.load(files / "coords.npy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = Geolocator.from_run(files / "base", "cpu", gallery=(emb, coords))
        paths = Geolocator.from_run(files / "base", "cpu", gallery=(str(files / "emb.npy"), files / "coords.csv"))
    assert any("no LocDiff-H settings fitted" in str(w.message) for w in caught)
    # A gallery given as files is read as --gallery-embeddings / --gallery-coords read them.
    np.testing.assert_array_equal(paths.predict(emb[:5]).latlon, arrays.predict(emb[:5]).latlon)
    for bad, fragment in (((files / "emb.npy", coords), "as arrays, or both as file paths"),
                          ((files / "emb.npy", tmp_path / "none.csv"), "none.csv: coordinates file not found"),
                          (files / "emb.npy", "expected \\(embeddings, coordinates\\)")):
        with pytest.raises(DataError, match=fragment):
            Geolocator.from_run(files / "base", "cpu", gallery=bad)


def test_a_temperature_override_reaches_the_densities(files):
    # evaluate(..., temperature=T) scores the densities at T, and Geolocator.predict's
    # probabilities and credible regions use it too.
    from locdiff import shdd
    from locdiff.evaluate import evaluate
    from locdiff.geolocator import Geolocator
    from locdiff.predict import Predictor

    pred = Predictor.from_run(files / "base", "cpu")
    emb, coords = np.load(files / "emb.npy")[:16], np.load(files / "coords.npy")[:16]
    coeffs = pred.coefficients(emb).double()
    for t in (0.5, 5.0):
        want = -float(shdd.log_density_at(coeffs, coords, temperature=t).mean())
        assert evaluate(pred, emb, coords, temperature=t)["nll"] == pytest.approx(want, rel=1e-9)
    geo = Geolocator.from_run(files / "base", "cpu")
    sharp, broad = (geo.predict(emb[:2], geocode=False, temperature=t) for t in (0.05, 5.0))
    assert sharp.temperature == 0.05 and broad.temperature == 5.0
    assert (sharp.radius_km[:, -1] < broad.radius_km[:, -1]).all()


def test_a_metrics_file_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path):
    # A full disk mid-run: metrics.jsonl's flush failed with a traceback before the final save
    # could say what it kept. Now one warning, later lines skipped, close() quiet.
    import errno
    import warnings

    from locdiff.trainlog import TrainLog

    log = TrainLog(tmp_path)
    log.write(1, {"loss": 0.5})

    class Full:
        def write(self, text):
            return len(text)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.flush()
    log._fh.close()
    log._fh = Full()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        log.write(2, {"loss": 0.4})
        log.write(3, {"loss": 0.3})
        log.close()
    assert [str(w.message) for w in seen] == [
        f"{tmp_path / 'metrics.jsonl'}: cannot be written (No space left on device); the metrics of later steps "
        "are not recorded there, the run goes on"]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1, "loss": 0.5}']


def test_outputs_write_through_links_and_keep_protection_and_long_names(files, tmp_path, capsys, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "pred.csv").write_text("old results\n")
    (tmp_path / "mine.csv").symlink_to(shared / "pred.csv")
    argv = ["predict", "--run", files / "base", "--embeddings", files / "emb.npy", "--out"]
    assert run_cli(capsys, *argv, tmp_path / "mine.csv")[0] == 0
    assert (tmp_path / "mine.csv").is_symlink() and (shared / "pred.csv").read_text().startswith("lat,lon")
    # A 250-byte name is legal; its temporary's name must be too.
    long = tmp_path / ("p" * 246 + ".csv")
    assert run_cli(capsys, *argv, long)[0] == 0 and long.read_text().startswith("lat,lon")
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("keep.csv") else real_access(p, mode))
    (tmp_path / "keep.csv").write_text("mine\n")
    expect_error(capsys, argv + [tmp_path / "keep.csv"], "keep.csv: is write-protected")
    assert (tmp_path / "keep.csv").read_text() == "mine\n"


def test_a_run_killed_before_it_saved_anything_resumes_from_step_0(files, tmp_path, capsys):
    # A job killed in its first second leaves only the lock (and maybe a temporary); a
    # requeue script passes --resume every time, and that must start the run, not fail.
    out = tmp_path / "run"
    out.mkdir()
    (out / "locdiff.lock").write_text("PID 1 on elsewhere\n")
    (out / ".config.json.abc123.tmp").write_text("{")
    code, _, err = run_cli(capsys, *train_argv(files, out, "--steps", "3", "--resume"))
    assert code == 0 and "holds no config.json or checkpoint yet" in err and "starting at step 0" in err
    assert (out / CONFIG_FILE).exists() and json.loads(load_checkpoint(out)[1]["state"])["step"] == 3
    # A folder that never held a run is still no run to resume.
    expect_error(capsys, train_argv(files, tmp_path / "new", "--steps", "3", "--resume"), "nothing to resume")


def test_integer_flags_read_integers_as_set_does():
    # `--set train.steps=1e5` was accepted while `--steps 1e5` was an argparse error.
    from locdiff.cli import build_parser

    args = build_parser().parse_args(["train", "--embeddings", "e.npy", "--coords", "c.csv", "--out", "r",
                                      "--steps", "2e1", "--seed", "1_000", "--batch-size", "0x10"])
    assert (args.steps, args.seed, args.batch_size) == (20, 1000, 16)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--embeddings", "e.npy", "--coords", "c.csv", "--out", "r",
                                   "--seed", "1.5"])


@pytest.mark.parametrize("name, make, what", [
    ("metrics.jsonl", lambda p: p.mkdir(), "a folder"),
    (CHECKPOINT_FILE, lambda p: __import__("os").mkfifo(p), "a FIFO"),  # a read would block for ever
    ("train.toml", lambda p: p.mkdir(), "a folder"),
])
def test_a_run_file_that_is_not_a_file_stops_a_resume(files, tmp_path, capsys, name, make, what):
    # before anything is written: the run's files stay as they were
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files / "base", run)
    (run / name).unlink()
    make(run / name)
    (run / "locdiff.lock").write_text("PID 1 on the machine that trained it\n")  # a refusal leaves it as found
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    expect_error(capsys, train_argv(files, run, "--resume", "--steps", "6"),
                 f"{run / name}: {what}, not a regular file, where the run keeps its own file")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_density_head_without_the_kl_is_refused_and_an_old_such_run_samples(files, tmp_path, capsys):
    # The head learns from the SHDD-KL alone: without it the head stays at zero, and its
    # answers were (90, 0) for every row. An earlier locdiff trained such runs.
    expect_error(capsys, train_argv(files, tmp_path / "r", "--set", "diffusion.kl_weight=0"),
                 "diffusion.kl_weight = 0.0: expected > 0 when model.density_head is true", [tmp_path / "r"])
    import shutil

    run = tmp_path / "old"
    shutil.copytree(files / "base", run)
    raw = json.loads((run / CONFIG_FILE).read_text())
    raw["diffusion"]["kl_weight"] = 0.0
    (run / CONFIG_FILE).write_text(json.dumps(raw))
    predict = ["predict", "--run", run, "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"]
    expect_error(capsys, predict, "the run's predict.sampler: sampler 'density' reads the run's density head, "
                 "which it never trained", [tmp_path / "p.csv"])
    code, _, _ = run_cli(capsys, *predict, "--sampler", "ddim", "--sample-steps", "2")
    assert code == 0 and (tmp_path / "p.csv").exists()
    code, _, err = run_cli(capsys, *train_argv(files, run, "--resume", "--steps", "5"))  # its denoiser trains on
    assert code == 0, err


def _as_an_earlier_locdiff_left_it(run, validated: bool):
    """A finished run as locdiff wrote it before config.json recorded the finished step and
    the training data, and before checkpoints held the settings validation started with
    (``validated``: as if it had validated, and so calibrated its prediction settings)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    raw = json.loads((run / CONFIG_FILE).read_text())
    del raw["finished_step"], raw["training_data"]
    raw["predict"]["temperature"] = 0.5  # as calibrated
    (run / CONFIG_FILE).write_text(json.dumps(raw))
    with safe_open(str(run / CHECKPOINT_FILE), "pt") as fh:
        meta = fh.metadata()
    state = json.loads(meta["state"])
    del state["val_predict"]
    if validated:
        state["history"] = [{"step": 3, "val_median_km": 1000.0, "val_acc_750km": 0.5}]
    save_file(load_file(str(run / CHECKPOINT_FILE)), str(run / CHECKPOINT_FILE),
              metadata={**meta, "state": json.dumps(state)})


def test_a_run_of_an_earlier_locdiff_resumes_as_it_was_left(files, tmp_path, capsys):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(files / "base", run)
    _as_an_earlier_locdiff_left_it(run, validated=True)
    # evaluate --json names the step it finished at, as for a run of this version.
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--embeddings", files / "emb.npy", "--coords",
                           files / "coords.csv", "--json", tmp_path / "old.json")
    assert code == 0, err
    assert json.loads((tmp_path / "old.json").read_text())["run"]["finished_step"] == 3
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "locdiff.lock"}
    # Finished: a resume to the same train.steps leaves it as it is (it was re-calibrated).
    code, out, _ = run_cli(capsys, *train_argv(files, run, "--resume", "--steps", "3"))
    assert code == 0 and "nothing to train" in out and "the run is unchanged" in out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "locdiff.lock"} == before
    # Trained on: its data cannot be checked (said), nor recorded as the run's; it validates
    # with the settings calibration chooses at their defaults, not the calibrated ones.
    argv = [a for a in train_argv(files, run, "--resume", "--steps", "5") if a != "--quiet"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "does not record the run's training data (an earlier locdiff made it)" in out + err
    raw = json.loads((run / CONFIG_FILE).read_text())
    assert "training_data" not in raw and raw["finished_step"] == 5
    assert "temperature = 1.0" in (run / "train.toml").read_text()
    # A run that never validated was never calibrated: its settings are its own.
    never = tmp_path / "never"
    shutil.copytree(files / "base", never)
    _as_an_earlier_locdiff_left_it(never, validated=False)
    code, _, err = run_cli(capsys, *train_argv(files, never, "--resume", "--steps", "5"))
    assert code == 0, err
    assert "temperature = 0.5" in (never / "train.toml").read_text()


def test_sampling_flags_the_sampler_does_not_use_are_named(files, tmp_path, capsys):
    base = ["predict", "--run", files / "base", "--embeddings", files / "emb.npy", "--out", tmp_path / "p.csv"]
    code, _, err = run_cli(capsys, *base, "--samples", "5", "--sample-steps", "7")  # the run's density sampler
    assert code == 0 and "note: --sample-steps, --samples do not apply to the density sampler (ignored)" in err
    code, _, err = run_cli(capsys, *base, "--sampler", "ddpm", "--eta", "0.5")
    assert code == 0 and "note: --eta does not apply to the ddpm sampler (ignored)" in err
    code, _, err = run_cli(capsys, *base, "--sampler", "ddim", "--sample-steps", "2", "--eta", "0.5")
    assert code == 0 and "note" not in err


def test_an_earlier_locdiffs_run_counts_as_finished_only_at_its_end():
    # Earlier versions wrote periodic checkpoints without any marker: one at step 400 of
    # 1,000 was a run killed mid-way, not a finished one.
    from locdiff.run import finished_step

    assert finished_step({"train": {"steps": 1000}}, {"step": 400}) is None
    assert finished_step({"train": {"steps": 1000}}, {"step": 1000}) == 1000
    assert finished_step({"train": {"steps": 1000, "max_minutes": 1.0}}, {"step": 400, "elapsed_s": 61.0}) == 400
    assert finished_step({"train": {"steps": 1000}, "finished_step": 7}, {"step": 9}) == 7
    assert finished_step({"train": {"steps": 5}}, {"step": 5, "val_predict": {}}) is None  # this version's, cut
