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
    from locdiff.run import RunConfig
    from locdiff.train import train

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


def _sampling(args) -> dict:
    """Prediction settings given on the command line (None: the run's own)."""
    if args.samples is not None and args.samples < 1:
        raise CliError(f"--samples must be >= 1, got {args.samples}")
    if args.sample_steps is not None and args.sample_steps < 1:
        raise CliError(f"--sample-steps must be >= 1, got {args.sample_steps}")
    return {"sampler": args.sampler, "steps": args.sample_steps, "samples": args.samples,
            "guidance": args.guidance, "eta": args.eta}


def _hybrid(args, pred):
    """LocDiff-H over the gallery files, with the settings calibrated at training (None
    without --gallery-embeddings)."""
    if not args.gallery_embeddings and not args.gallery_coords:
        return None
    if not (args.gallery_embeddings and args.gallery_coords):
        raise CliError("--gallery-embeddings and --gallery-coords go together")
    from locdiff.hybrid import Hybrid, HybridConfig

    emb, coords = _load_pair(args.gallery_embeddings, args.gallery_coords)
    _check_dim(emb, args.gallery_embeddings, pred, args.run)
    return Hybrid(emb, coords, HybridConfig(**pred.config.predict.hybrid))


def cmd_evaluate(args) -> int:
    from locdiff.evaluate import evaluate, format_table

    out = _check_out_dir(args.json, "metrics JSON")
    pred = _predictor(args.run, args.device)
    emb, coords = _load_pair(args.embeddings, args.coords)
    _check_dim(emb, args.embeddings, pred, args.run)
    hybrid = _hybrid(args, pred)
    m = evaluate(pred, emb, coords, hybrid=hybrid, progress=True, **_sampling(args))
    atomic_write_bytes(out, (json.dumps(m, indent=2) + "\n").encode())
    print(format_table({"LocDiff-H" if hybrid else "LocDiff": m}))
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
    hybrid = _hybrid(args, pred)
    res = pred.predict(emb, top_k=args.top_k, progress=True, **_sampling(args))
    latlon = res["latlon"]
    if hybrid is not None:
        latlon = hybrid.predict(res["coeffs"], pred.config.predict.temperature, emb, latlon)
    extra = {}
    for j in range(args.top_k):
        extra[f"lat_{j + 1}"] = res["topk_latlon"][:, j, 0]
        extra[f"lon_{j + 1}"] = res["topk_latlon"][:, j, 1]
        extra[f"score_{j + 1}"] = res["topk_values"][:, j]
    write_coords_csv(out, latlon, extra)
    if args.map:
        from locdiff.plot import plot_predictions

        k = min(4, len(emb))
        plot_predictions(args.map, res["coeffs"][:k], titles=[f"row {i}" for i in range(k)],
                         topk=res.get("topk_latlon", [None] * k)[:k] if args.top_k else None,
                         points=latlon[:k], temperature=pred.config.predict.temperature)
    print(f"{len(emb)} predictions written to {out}" + (f", map to {args.map}" if args.map else ""))
    return 0


def cmd_demo(args) -> int:
    from locdiff.demo import run_demo

    run_demo(args.out, split=args.split, device=args.device)
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
def _add_sampling(p) -> None:
    from locdiff.run import SAMPLERS

    g = p.add_argument_group("sampling (default: the run's settings)")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="density: the density head in one call; ddim or ddpm: average sampled vectors")
    g.add_argument("--sample-steps", type=int, default=None, help="DDIM steps")
    g.add_argument("--samples", type=int, default=None, help="sampled vectors per input (ddim, ddpm)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
    g.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    g = p.add_argument_group("LocDiff-H (retrieval over a gallery)")
    g.add_argument("--gallery-embeddings", default=None, help="gallery embeddings (e.g. the training set's)")
    g.add_argument("--gallery-coords", default=None, help="gallery coordinates")


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
    _add_sampling(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="predict locations for embeddings")
    r.add_argument("--run", required=True)
    r.add_argument("--embeddings", required=True)
    r.add_argument("--out", required=True, help="output CSV (lat, lon[, top-k columns])")
    r.add_argument("--top-k", type=int, default=0, help="also write the k highest modes")
    r.add_argument("--map", default=None, help="PNG world map of the first predictions")
    r.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    _add_sampling(r)
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="offline places task: build, train, evaluate, map (about 10 min on CPU)")
    d.add_argument("--out", default="locdiff_demo", help="output folder (default ./locdiff_demo)")
    d.add_argument("--split", choices=("regions", "random"), default="regions",
                   help="test places: whole unseen (country, region) groups (default) or 10%% at random")
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
