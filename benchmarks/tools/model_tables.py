"""The places-task tables of docs/model.md, one subcommand each (CPU, two threads).

    python benchmarks/tools/model_tables.py degree --degree 16 --steps 2000 --out runs/L16
    python benchmarks/tools/model_tables.py degree --degree 64 --minutes 6 --out runs/L64
    python benchmarks/tools/model_tables.py samplers --run demo-run/run --places 120
    python benchmarks/tools/model_tables.py reliability --run demo-run/run
    python benchmarks/tools/model_tables.py coverage --run demo-run/run --text name
    python benchmarks/tools/model_tables.py hybrid --run demo-run/run
    python benchmarks/tools/model_tables.py regions --predictions demo-run/predictions.csv

``degree`` trains the demo's LocDiff at another degree and reports the test row; the others
read a run (for example the one ``locdiff demo`` leaves in ``OUT/run``) trained on the same
split; ``regions`` reads the demo's per-place answers. Needs the ``demo`` extra.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from locdiff import shdd
from locdiff.metrics import distance_metrics

KEYS = ("median_km", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "nll", "rva_auc")


def row(name: str, m: dict, extra: str = "") -> str:
    cells = [f"{m[k]:.0f}" if k == "median_km" else f"{100 * m[k]:.1f}%" if k.startswith("acc")
             else f"{m[k]:.3f}" if k in m else "-" for k in KEYS]
    return f"| {name} | " + " | ".join(cells) + f" | {extra} |"


def header(first: str, extra: str = "") -> str:
    return f"| {first} | " + " | ".join(KEYS) + f" | {extra} |\n|" + "---|" * (len(KEYS) + 2)


def task(split: str, text: str = "full"):
    from locdiff.data.places import load_places

    return load_places(variant=text, split=split, progress=False).splits()


def cmd_degree(a) -> None:
    from locdiff.demo import demo_config
    from locdiff.evaluate import density_scores
    from locdiff.predict import Predictor
    from locdiff.train import train

    tr, va, te = task(a.split)
    cfg = demo_config(a.minutes or 1e6, a.seed)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, degree=a.degree),
                              train=dataclasses.replace(cfg.train, steps=a.steps or 10**7, checkpoint_minutes=1e6))
    res = train(*tr, a.out, cfg, val=va, progress=False)
    pred = Predictor.from_run(a.out)
    p = pred.predict(te[0])
    m = {**distance_metrics(p["latlon"], te[1]), **density_scores(p["coeffs"], te[1], pred.config.predict.temperature)}
    print(header("L", "steps, samples/s"))
    print(row(str(a.degree), m, f"{res.steps}, {res.samples_per_s:.0f}"))


SAMPLERS = [("density head (1 call)", dict(sampler="density")),
            ("density head, guidance 1", dict(sampler="density", guidance=1.0)),
            ("DDIM 1 step (x0 mean)", dict(sampler="ddim", steps=1, samples=1)),
            ("DDIM 10 steps x16", dict(sampler="ddim", steps=10, samples=16)),
            ("DDIM 50 steps x16", dict(sampler="ddim", steps=50, samples=16)),
            ("DDIM 50 steps x16, guidance 1", dict(sampler="ddim", steps=50, samples=16, guidance=1.0)),
            ("DDPM 1000 steps x16", dict(sampler="ddpm", samples=16)),
            ("DDPM 1000 steps x16, guidance 1", dict(sampler="ddpm", samples=16, guidance=1.0))]


def cmd_samplers(a) -> None:
    """Each sampler's temperature is chosen by NLL on validation places, as training does."""
    from locdiff.calibration import nll_temperature
    from locdiff.predict import Predictor

    _, va, te = task(a.split)
    rng = np.random.default_rng(0)
    ti, vi = (np.sort(rng.choice(len(x[1]), a.places, replace=False)) for x in (te, va))
    (te_e, te_c), (va_e, va_c) = (te[0][ti], te[1][ti]), (va[0][vi], va[1][vi])
    pred = Predictor.from_run(a.run)
    print(header("sampler", "ms per place"))
    for name, kw in SAMPLERS:
        if a.only and a.only not in name:
            continue
        tau, _ = nll_temperature(pred.coefficients(va_e, **kw).double(), va_c, pred.degree)
        t0 = time.perf_counter()
        c = pred.coefficients(te_e, **kw).double()
        ms = 1000 * (time.perf_counter() - t0) / a.places
        m = distance_metrics(pred.locate(c, None, "density", tau), te_c)
        m["nll"] = -float(shdd.log_density_at(c, torch.as_tensor(te_c), temperature=tau).mean())
        print(row(name, m, f"{ms:.2f}"), flush=True)


def cmd_reliability(a) -> None:
    """Predicted probability of the top mode's basin against how often the truth lies in it."""
    from locdiff.answers import basin_of, default_grid, summarize
    from locdiff.predict import Predictor

    _, _, te = task(a.split)
    pred = Predictor.from_run(a.run)
    tau = pred.config.predict.temperature
    out = pred.predict(te[0], top_k=5)
    c, modes = torch.as_tensor(out["coeffs"]).double(), torch.as_tensor(out["topk_latlon"])
    grid, sep = default_grid(pred.degree), shdd.default_separation_km(pred.degree)
    prob, hit = [], []
    for i in range(0, len(c), 128):
        p, m = torch.as_tensor(shdd.density(c[i:i + 128], grid, tau)), modes[i:i + 128]
        hit.append((basin_of(p, grid, m, sep, te[1][i:i + 128]) == 0).numpy())
        # The probability predict reports (masses on the credible grid).
        prob.append(summarize(c[i:i + 128], m, tau, geocode=False).probability[:, 0])
    prob, hit = np.concatenate(prob), np.concatenate(hit)
    print(f"temperature {tau:.3g}; {len(prob)} test places; mean predicted {prob.mean():.3f}, observed {hit.mean():.3f}")
    print("| predicted probability of the top basin | places | mean predicted | observed |\n|---|---|---|---|")
    edges = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (prob >= lo) & ((prob < hi) if hi < 1 else (prob <= hi))
        if sel.any():
            print(f"| {lo:.1f}-{hi:.1f} | {sel.sum()} | {prob[sel].mean():.3f} | {hit[sel].mean():.3f} |")


def cmd_coverage(a) -> None:
    """How often the test places lie in the 50 % and 90 % credible regions: the density's own
    (nominal mass) against those whose masses held 50 % and 90 % of the validation places, as
    calibration computes them (locdiff.coverage), and the regions' median areas."""
    from locdiff.answers import credible_area, credible_grid
    from locdiff.calibration import coverage_sample
    from locdiff.coverage import hpd_scores, level_for, validation_levels
    from locdiff.predict import Predictor

    _, va, te = task(a.split, a.text)
    pred = Predictor.from_run(a.run)
    tau = pred.config.predict.temperature
    grid = credible_grid(pred.degree, tau)
    cv = pred.coefficients(va[0]).double()
    pick = coverage_sample(len(va[1]), grid.size)
    record = validation_levels(lambda rows, g: shdd.density(cv[pick[rows]], g, tau), grid, va[1][pick])
    c = pred.coefficients(te[0]).double()
    levels = (0.5, 0.9)
    masses = tuple(level_for(record, q) for q in levels)
    scores, nominal, calibrated = [], [], []
    for i in range(0, len(c), 64):
        p = torch.as_tensor(shdd.density(c[i:i + 64], grid, tau))
        scores.append(hpd_scores(p, grid, te[1][i:i + 64]).numpy())
        nominal.append(credible_area(p, grid, levels).numpy())
        calibrated.append(credible_area(p, grid, masses).numpy())
    s, nominal, calibrated = np.concatenate(scores), np.concatenate(nominal), np.concatenate(calibrated)
    print(f"temperature {tau:.3g}; {len(s)} test places; masses from {record.get('places', 0)} validation places")
    print("| region | mass | test places inside | median area km² |\n|---|---|---|---|")
    for j, (q, m) in enumerate(zip(levels, masses)):
        print(f"| {q:.0%}, nominal | {q:.3f} | {np.mean(s <= q):.1%} | {np.median(nominal[:, j]):,.0f} |")
        print(f"| {q:.0%}, calibrated | {m:.3f} | {np.mean(s <= m):.1%} | {np.median(calibrated[:, j]):,.0f} |")


def cmd_hybrid(a) -> None:
    """LocDiff-H variants: re-ranking the gallery's neighbours by the density, against the
    product density fitted on validation by median or by NLL (both behind the median
    guard), with and without the snap to the most similar entry of the chosen cluster."""
    from locdiff.baselines.knn import NeighbourIndex
    from locdiff.geo import xyz_to_latlon
    from locdiff.hybrid import Hybrid, HybridConfig
    from locdiff.predict import Predictor

    tr, va, te = task(a.split)
    pred = Predictor.from_run(a.run)
    tau = pred.config.predict.temperature
    pv, pt = pred.predict(va[0]), pred.predict(te[0])
    index = NeighbourIndex(*tr)
    print(header("variant", "settings"))
    print(row("LocDiff", distance_metrics(pt["latlon"], te[1])))
    c = torch.as_tensor(pt["coeffs"]).double()
    for k in (10, 50):
        sim, ix = index.search(te[0], k)
        mu = index.xyz[ix]
        for t in (0.02, 0.05, 0.1):
            score = shdd.values_at(c[:, None], xyz_to_latlon(mu)) / tau + sim.double() / t
            best = mu[torch.arange(len(mu)), score.argmax(1)]
            print(row("re-rank neighbours", distance_metrics(xyz_to_latlon(best).numpy(), te[1]), f"k {k}, T {t}"))
    default = HybridConfig()
    for objective in ("median", "nll"):
        for snap_km in (0.0, default.snap_km):
            h = Hybrid(*tr, index=index, config=dataclasses.replace(default, snap_km=snap_km))
            fit = h.fit(pv["coeffs"], tau, va[0], pv["latlon"], va[1], objective=objective)
            m = distance_metrics(h.predict(pt["coeffs"], tau, te[0], pt["latlon"]), te[1])
            m["nll"] = float(-np.mean(h.log_density_at(pt["coeffs"], tau, te[0], te[1])))
            name = f"product, fitted by {objective}, snap {snap_km:g} km"
            if objective == "nll" and snap_km == default.snap_km:
                name += " (default)"
            print(row(name, m, ", ".join(f"{k} {v:.3g}" for k, v in fit.items() if isinstance(v, (int, float)))),
                  flush=True)


def cmd_regions(a) -> None:
    """The test regions with the most places, each method's median error in them, how many
    of each method's misses beyond 2500 km they hold, and the medians' bootstrap intervals
    over test regions with ratios to ``--reference``."""
    import csv

    from locdiff import great_circle_km
    from locdiff.data.places import gazetteer, load_places
    from locdiff.intervals import format_intervals, median_intervals

    t = load_places(split=a.split, progress=False)
    keys = np.array([f"{r['region']}, {r['country_code']}" for r in gazetteer()])[t.test_mask]
    rows = list(csv.DictReader(open(a.predictions, encoding="utf-8")))
    if len(rows) != len(keys):
        raise SystemExit(f"{a.predictions} has {len(rows)} places, the {a.split} split's test has {len(keys)}")
    truth = np.array([[float(r["lat"]), float(r["lon"])] for r in rows])
    methods = [c[:-4] for c in rows[0] if c.endswith(" lat") and c != "lat"]
    err = {m: np.asarray(great_circle_km(np.array([[float(r[f"{m} lat"]), float(r[f"{m} lon"])] for r in rows]),
                                         truth)) for m in methods}
    names, counts = np.unique(keys, return_counts=True)
    top = names[np.argsort(-counts, kind="stable")[:a.top]]
    in_top = np.isin(keys, top)
    print(f"{len(names)} test regions; the {a.top} largest hold "
          f"{100 * in_top.mean():.0f}% of the {len(keys)} test places")
    print("| region | places | " + " | ".join(f"{m} median km" for m in methods) + " |")
    print("|" + "---|" * (len(methods) + 2))
    for name in top:
        m = keys == name
        print(f"| {name} | {m.sum()} | " + " | ".join(f"{np.median(err[k][m]):.0f}" for k in methods) + " |")
    held = {k: (err[k] > 2500) for k in methods}
    print("| misses beyond 2500 km, all regions / in these |  | " + " | ".join(
        f"{held[k].sum()} / {(held[k] & in_top).sum()}" for k in methods) + " |")
    print("| places within 1 / 2500 km |  | " + " | ".join(
        f"{(err[k] <= 1).sum()} / {(err[k] <= 2500).sum()}" for k in methods) + " |")
    print()
    # The task's group ids, as the demo resamples them, so the intervals are the demo's.
    print(format_intervals(median_intervals(err, t.groups[t.test_mask], reference=a.reference)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("degree")
    d.add_argument("--degree", type=int, required=True)
    d.add_argument("--steps", type=int)
    d.add_argument("--minutes", type=float)
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    for name in ("samplers", "reliability", "coverage", "hybrid"):
        p = sub.add_parser(name)
        p.add_argument("--run", required=True)
        if name == "coverage":
            p.add_argument("--text", default="full", choices=("full", "name"), help="as locdiff demo --text")
        if name == "samplers":
            p.add_argument("--places", type=int, default=120)
            p.add_argument("--only", help="the samplers whose name contains this text")
    r = sub.add_parser("regions")
    r.add_argument("--predictions", required=True, help="predictions.csv of a locdiff demo run")
    r.add_argument("--top", type=int, default=8)
    r.add_argument("--reference", default="LocDiff", help="the method whose median the ratios divide")
    for p in sub.choices.values():
        p.add_argument("--split", default="regions", choices=("regions", "random"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    {"degree": cmd_degree, "samplers": cmd_samplers, "reliability": cmd_reliability, "coverage": cmd_coverage,
     "hybrid": cmd_hybrid, "regions": cmd_regions}[a.cmd](a)


if __name__ == "__main__":
    main()
