"""``locdiff predict`` and ``locdiff evaluate``. Outputs, optional packages and the run are
checked before any prediction; under ``torchrun`` the inputs are split across processes
in whole prediction batches (each keeps the seed it has in one process, so the merged
output equals a single process's) and rank 0 writes one output in input order."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from locdiff import distributed
from locdiff.cli_common import CliError, add_dist_timeout, join_process_group, check_dim, require_packages
from locdiff.data.files import (DataError, atomic_write_json, check_finite_embeddings, load_pair, open_embeddings,
                                read_coords)
from locdiff.runfolder import check_output_file
from locdiff.run import CONFIG_FILE


SCORE_BAR_ROWS = 10_000  # predictions from this many rows on show a bar while their modes are scored


def _check_top_k(k: int, degree: int, lo: int = 0) -> None:
    from locdiff.answers import top_k_limit

    cap = top_k_limit(degree)
    if not lo <= k <= cap:
        raise CliError(f"--top-k {k}: expected an integer in [{lo}, {cap}] (the most separate modes a "
                       f"degree-{degree} run reports{'; answers for --images need at least 1' if lo else ''})")


def _join(args):
    """The device to predict on, after joining the ``torchrun`` process group when there is
    one (each process on its own GPU under NCCL)."""
    from locdiff.devices import resolve_device

    dev = resolve_device(args.device)
    join_process_group(args, dev)
    return distributed.device() if distributed.is_distributed() and dev.type == "cuda" else dev


def _inputs(args) -> list:
    """The files (and folders of shards) a predict or evaluate command reads."""
    return [getattr(args, name, None) for name in ("embeddings", "coords", "gallery_embeddings", "gallery_coords")] \
        + list(getattr(args, "images", None) or [])


def _predictor(run, device):
    from locdiff.predict import Predictor

    return Predictor.from_run(run, device)  # (read_config names a file or a missing folder)


# The command line's names of the sampling settings (locdiff.run.PredictConfig).
SAMPLING_FLAGS = {"sampler": "sampler", "steps": "sample-steps", "samples": "samples", "guidance": "guidance",
                  "eta": "eta"}


def _sampling(args, pred) -> dict:
    """Prediction settings given on the command line (None: the run's own), checked against
    the run before any prediction: one error line naming the flag."""
    given = {name: getattr(args, flag.replace("-", "_")) for name, flag in SAMPLING_FLAGS.items()}
    try:
        s = pred.settings(**given)
    except ValueError as err:
        name = str(err).split()[0]
        where = f"the run's predict.{name}" if given.get(name) is None else \
            f"--{SAMPLING_FLAGS.get(name, name)} {given.get(name)!r}"
        raise CliError(f"{where}: {err}") from None
    from locdiff.predict import IGNORED_BY_SAMPLER

    sampler = s["sampler"]
    if getattr(args, "draws", None) is not None and given["sampler"] is None and sampler == "density":
        sampler = "ddim"  # what draws use where the run answers by its density (Predictor.draw)
    ignored = IGNORED_BY_SAMPLER[sampler]
    unused = [f"--{SAMPLING_FLAGS[k]}" for k in ignored if given[k] is not None]
    if unused and distributed.is_main():
        print(f"locdiff {args.command}: note: {', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply "
              f"to the {sampler} sampler (ignored)", file=sys.stderr)
    if s["sampler"] != "density":  # one prediction batch of rows x samples vectors at a time
        rows = pred.config.predict.batch_size
        try:
            pred.check_sample_memory(rows, s["samples"], f"--samples {s['samples']} x {rows} rows a batch",
                                     "use fewer --samples")
        except MemoryError as err:
            raise CliError(str(err)) from None
    return given


def _gallery_paths(args):
    """(--gallery-embeddings, --gallery-coords), or None without them."""
    if not args.gallery_embeddings and not args.gallery_coords:
        return None
    if not (args.gallery_embeddings and args.gallery_coords):
        raise CliError("--gallery-embeddings and --gallery-coords go together")
    return args.gallery_embeddings, args.gallery_coords


def _gallery(args):
    """(embeddings, coordinates) of --gallery-embeddings and --gallery-coords, checked, or
    None without them."""
    paths = _gallery_paths(args)
    return None if paths is None else load_pair(*paths)


def _hybrid(args, pred):
    """LocDiff-H over the gallery files, with the settings calibrated at training (None
    without --gallery-embeddings)."""
    gallery = _gallery(args)
    if gallery is None:
        return None
    from locdiff.hybrid import UNFITTED_NOTE, Hybrid, HybridConfig

    check_dim(gallery[0], args.gallery_embeddings, pred, args.run)
    settings = pred.config.predict.hybrid
    cfg = HybridConfig.of_run(settings, f"{args.run}/{CONFIG_FILE}")
    if not settings:
        print(f"locdiff {args.command}: note: " + UNFITTED_NOTE.format(**cfg.to_dict()), file=sys.stderr)
    return Hybrid(*gallery, cfg, device=pred.device)  # the search runs where the model does


def sharded_predict(pred, emb, top_k: int = 0, progress: bool = False, coeffs: bool = True, seed: int = 0,
                    **sampling) -> dict | None:
    """``pred.predict(emb, top_k, coeffs=...)`` over the processes of a ``torchrun`` group:
    each takes whole batches of ``predict.batch_size`` rows, seeded by their position as in
    one process; rank 0 gets the merged outputs in input order, the others None."""
    if distributed.world_size() == 1:
        return pred.predict(emb, top_k=top_k, progress=progress, coeffs=coeffs, seed=seed, **sampling)
    bs, n = pred.config.predict.batch_size, len(emb)
    batches = distributed.split_for_rank(-(-n // bs))
    rows = slice(batches.start * bs, min(batches.stop * bs, n))
    mine = pred.predict(emb, top_k=top_k, coeffs=coeffs, seed=seed, part=rows, **sampling)
    return distributed.gather_in_order(mine)


class _Predicted:
    """A predictor whose outputs are already computed (for :func:`locdiff.evaluate.evaluate`)."""

    def __init__(self, pred, out: dict):
        self.config, self._out, self.credible = pred.config, out, pred.credible

    def predict(self, emb, **_):
        return self._out


def cmd_evaluate(args) -> int:
    from locdiff.evaluate import evaluate, format_table

    dev = _join(args)
    # Outputs are rank 0's: other nodes need not see the output folder.
    out = check_output_file(args.json, "metrics JSON", _inputs(args), args.run) if distributed.is_main() \
        else Path(args.json)
    pred = _predictor(args.run, dev)
    sampling = _sampling(args, pred)
    note = None if not distributed.is_main() else \
        (lambda msg: print(f"locdiff evaluate: {msg}", file=sys.stderr, flush=True))
    if not pred.conditional:
        _check_no_inputs(args)
    elif not args.embeddings:
        raise CliError(f"--embeddings is needed: {args.run} was trained on embeddings")
    if pred.conditional:
        emb, coords = load_pair(args.embeddings, args.coords, log=note)
        check_dim(emb, args.embeddings, pred, args.run)
    else:  # one prediction for every place, made by rank 0
        emb, coords = None, read_coords(args.coords)
        if not len(coords):
            raise CliError(f"{args.coords}: coordinates file has no rows")
    hybrid = _hybrid(args, pred) if distributed.is_main() else None  # rank 0 alone answers with it
    if emb is not None:
        done = sharded_predict(pred, emb, progress=distributed.is_main(), seed=args.seed, **sampling)
    else:
        done = pred.predict(None, seed=args.seed, **sampling) if distributed.is_main() else None
    if not distributed.is_main():
        return 0
    m = evaluate(_Predicted(pred, done), emb, coords, hybrid=hybrid, progress=True, **sampling)
    # What produced the figures: the prediction settings in force and LocDiff-H's, if it ran.
    m["settings"] = {**pred.settings(**sampling), "hybrid": hybrid.config.to_dict() if hybrid else None,
                     "batch_size": pred.config.predict.batch_size, "seed": args.seed}
    m["run"] = _provenance(args.run)
    atomic_write_json(out, m)
    print(format_table({"LocDiff-H" if hybrid else "LocDiff": m}))
    nominal = " (LocDiff-H's regions: nominal mass, not calibrated)" if hybrid else \
        "" if pred.credible(**sampling) else " (regions of nominal mass: not calibrated)"
    sample = f" (a fixed sample of {m['coverage_places']:,} of the {len(coords):,} places)" \
        if m["coverage_places"] < len(coords) else ""
    print(f"inside the credible regions the answers report: {100 * m['coverage_50']:.1f} % of the places in the 50 % "
          f"region, {100 * m['coverage_90']:.1f} % in the 90 % region{nominal}{sample}")
    print(f"metrics written to {out}")
    return 0


def _check_no_inputs(args) -> None:
    """For a run trained without embeddings: a CliError naming the first input flag given
    (embeddings, photos or a gallery), since it has nothing to read them by."""
    given = [f for f, v in (("--embeddings", args.embeddings), ("--images", getattr(args, "images", None)),
                            ("--gallery-embeddings", args.gallery_embeddings),
                            ("--gallery-coords", args.gallery_coords)) if v]
    if given:
        why = ("LocDiff-H retrieves by embedding: leave out the gallery" if given[0].startswith("--gallery") else
               "leave out --embeddings and --images")
        raise CliError(f"{given[0]}: {args.run} was trained without embeddings (an unconditional model of "
                       f"locations); {why}")


def _provenance(run) -> dict:
    """Which weights produced the figures: the run folder, its last finished step, the EMA
    weights (what Predictor.from_run reads) and the locdiff that read them."""
    import locdiff
    from locdiff.run import CHECKPOINT_FILE, checkpoint_state, finished_step, read_config

    raw = read_config(run)[1]
    done = finished_step(raw, checkpoint_state(Path(run) / CHECKPOINT_FILE))
    return {"folder": str(Path(run).resolve()), "weights": "ema", "finished_step": done,
            "trained_with": raw.get("software"), "locdiff": locdiff.__version__}


def cmd_predict(args) -> int:
    if args.draws is not None and args.draws < 1:
        raise CliError(f"--draws {args.draws}: expected a number of locations to draw, at least 1")
    conditional = _conditional_run(args.run)
    if not conditional:
        _check_no_inputs(args)
    elif (args.embeddings is None) == (args.images is None):
        raise CliError("give --embeddings FILE or --images PATH... (one of them)")
    if args.draws is not None and args.images:
        raise CliError("--draws: locations are drawn for --embeddings (or a run trained without them), not --images")
    if args.images:
        # Photos are answered by the first process alone, outside any process group: the
        # others end at once rather than wait in a group for however long the photos take.
        from locdiff.devices import resolve_device

        if os.environ.get("RANK", "0") != "0":
            return 0
        dev = resolve_device(args.device)
    else:
        dev = _join(args)
        if not distributed.is_main():  # outputs are rank 0's: other nodes need not see their folders
            return _predict_embeddings(args, dev, None, None) if conditional else 0
    inputs = _inputs(args)
    out = check_output_file(args.out, "predictions CSV", inputs, args.run)
    jsonl = check_output_file(out.with_suffix(".jsonl"), "predictions JSON Lines", inputs, args.run) \
        if args.images else None
    html = check_output_file(args.html, "HTML map", inputs, args.run) if args.html else None
    png = check_output_file(args.map, "map", inputs, args.run) if args.map else None
    if jsonl is not None and jsonl.resolve() == out.resolve():
        raise CliError(f"--out {args.out}: with --images the answers also go to --out with a .jsonl suffix, the same "
                       "file here; give --out a .csv name")
    named = [p.resolve() for p in (out, jsonl, html, png) if p]
    if len(set(named)) < len(named):
        raise CliError(f"--out, --map and --html name the same file: {', '.join(map(str, named))}")
    if args.html and not args.images:
        raise CliError("--html maps the answers of --images")
    require_packages(*[f for f, on in (("--map", png), ("--html", html), ("--images", args.images)) if on])
    if args.images:
        return _predict_images(args, dev, out, jsonl, html, png)
    if not conditional:
        return _predict_unconditional(args, dev, out, png)
    return _predict_embeddings(args, dev, out, png)


def _predict_embeddings(args, dev, out, png) -> int:
    pred = _predictor(args.run, dev)
    k = 0 if args.top_k is None else args.top_k
    _check_top_k(k, pred.degree)
    sampling = _sampling(args, pred)
    _check_draws(args, sampling)
    emb = open_embeddings(args.embeddings)
    check_dim(emb, args.embeddings, pred, args.run)
    check_finite_embeddings(args.embeddings)
    # The gallery on rank 0 alone, which answers with it (a copy per rank would hold the
    # gallery's memory once a rank).
    hybrid = _hybrid(args, pred) if distributed.is_main() else None
    # The vectors (K floats a row, 10 KB at L = 32) only where something reads them; decided
    # from the flags, alike on every rank, since the ranks' outputs are gathered.
    needs_coeffs = _gallery_paths(args) is not None or k > 0 or bool(png)
    res = sharded_predict(pred, emb, top_k=k, progress=distributed.is_main(), coeffs=needs_coeffs, seed=args.seed,
                          **sampling)
    if not distributed.is_main():
        return 0
    from locdiff.data.files import write_coords_csv

    latlon, topk = _answers(pred, hybrid, emb, res, k)
    extra = _mode_columns(pred, hybrid, emb, res, topk, k)
    if args.draws is not None:
        drawn = _draws(args, pred, emb, sampling)
        for j in range(args.draws):
            extra.update({f"draw_lat_{j + 1}": drawn[:, j, 0], f"draw_lon_{j + 1}": drawn[:, j, 1]})
    write_coords_csv(out, latlon, extra)
    if png:
        _png(png, res["coeffs"], [f"row {i}" for i in range(len(latlon))], topk if k else None,
             latlon, pred.config.predict.temperature)
    print(f"{len(latlon)} predictions written to {out}" + (f", map to {png}" if png else ""))
    return 0


def _conditional_run(run) -> bool:
    from locdiff.run import read_config

    return read_config(run)[0].model.conditional  # (names a missing folder or a damaged config)


def _mode_columns(pred, hybrid, emb, res: dict, topk, k: int) -> dict:
    """The CSV columns lat_j, lon_j and score_j of the k answers (N, k, 2); ``res``: the
    predictions, whose vectors are there when k > 0."""
    from tqdm.auto import tqdm

    extra = {}
    # One density pass per mode, after the predicting bar has ended: a bar for many rows.
    for j in tqdm(range(k), desc="scoring modes", unit="mode", disable=not k or len(topk) < SCORE_BAR_ROWS):
        extra[f"lat_{j + 1}"] = topk[:, j, 0]
        extra[f"lon_{j + 1}"] = topk[:, j, 1]
        extra[f"score_{j + 1}"] = _log_density(pred, hybrid, emb, res["coeffs"], topk[:, j])
    return extra


def _predict_unconditional(args, dev, out, png) -> int:
    """A run trained without embeddings (rank 0): its answer (one row, with --top-k its
    modes), or with --draws N locations drawn from it (N rows)."""
    from locdiff.data.files import write_coords_csv

    pred = _predictor(args.run, dev)
    k = 0 if args.top_k is None else args.top_k
    _check_top_k(k, pred.degree)
    if k and args.draws is not None:
        raise CliError(f"--top-k {k}: with --draws the output holds the drawn locations alone; ask for the modes "
                       "without --draws")
    sampling = _sampling(args, pred)
    _check_draws(args, sampling)
    res = pred.predict(None, top_k=k, seed=args.seed, **sampling)
    latlon, topk = _answers(pred, None, None, res, k)
    if args.draws is not None:
        drawn = _draws(args, pred, None, sampling)[0]
        write_coords_csv(out, drawn)
        what = f"{len(drawn)} locations drawn from {args.run}"
    else:
        write_coords_csv(out, latlon, _mode_columns(pred, None, None, res, topk, k))
        what = f"the answer of {args.run} (trained without embeddings)"
    if png:
        _png(png, res["coeffs"], ["the model's density"], topk if k else None, latlon,
             pred.config.predict.temperature)
    print(f"{what} written to {out}" + (f", map to {png}" if png else ""))
    return 0


def _check_draws(args, sampling: dict) -> None:
    if args.draws is not None and sampling["sampler"] == "density":
        raise CliError("--sampler density: --draws takes locations from --sampler ddim or ddpm")


def _draws(args, pred, emb, sampling: dict) -> np.ndarray:
    """``--draws N`` locations drawn from each input's distribution (N, draws, 2), with the
    sampler given, or the run's where it draws (else DDIM)."""
    try:
        return pred.draw(emb, args.draws, **{k: sampling[k] for k in ("sampler", "steps", "guidance", "eta")},
                         seed=args.seed, progress=True)
    except MemoryError as err:
        raise CliError(f"--draws {args.draws}: {err}") from None


def _answers(pred, hybrid, emb, res, k: int):
    """The answer (N, 2) and the top-k answers (N, k, 2), the answer first: LocDiff's and its
    other modes (``answers.answer_first_modes``), or with a gallery LocDiff-H's and its
    ranking of LocDiff's modes and the gallery's places (``Hybrid.top_k``)."""
    from locdiff import shdd
    from locdiff.answers import answer_first_modes

    sep = shdd.default_separation_km(pred.degree)
    if hybrid is None:
        return res["latlon"], answer_first_modes(res["latlon"], res["topk_latlon"], sep) if k else None
    tau = pred.config.predict.temperature
    latlon = hybrid.predict(res["coeffs"], tau, emb, res["latlon"], progress=True)
    if not k:
        return latlon, None
    topk = hybrid.top_k(res["coeffs"], tau, emb, res["latlon"], res["topk_latlon"], k, sep, answer=latlon,
                        progress=True)
    return latlon, topk


def _log_density(pred, hybrid, emb, coeffs, latlon) -> np.ndarray:
    """log density per steradian (LocDiff's, or LocDiff-H's with a gallery) at ``latlon``
    (N, 2); NaN where the answer is missing."""
    from locdiff import shdd

    tau = pred.config.predict.temperature
    out = np.full(len(latlon), np.nan)
    ok = np.isfinite(latlon).all(1)
    if ok.any():
        rows = np.flatnonzero(ok)
        out[ok] = (hybrid.log_density_at(coeffs[rows], tau, emb[rows], latlon[ok]) if hybrid is not None
                   else np.asarray(shdd.log_density_at(coeffs[rows], latlon[ok], temperature=tau)))
    return out


def _png(path, coeffs, names, topk, points, temperature) -> None:
    from locdiff.plot import plot_predictions

    k = min(4, len(coeffs))
    plot_predictions(path, coeffs[:k], titles=list(names[:k]), topk=topk[:k] if topk is not None else None,
                     points=points[:k], temperature=temperature)


def _predict_images(args, dev, out, jsonl, html, png) -> int:
    """Photos to answers: embedded with the run's encoder, one process (rank 0 under torchrun)."""
    import warnings

    from locdiff.answer_files import HTML_MAX_INPUTS, write_csv, write_html_map, write_jsonl
    from locdiff.geolocator import Geolocator
    from locdiff.images import find_images, ignored_message

    # A missing path or a folder without images: before loading anything.
    _, ignored = find_images(args.images)
    if ignored:
        print(f"locdiff predict: warning: {ignored_message(ignored)}", file=sys.stderr)
    if not Path(args.run).is_dir():
        raise DataError(f"{args.run}: run folder not found")
    # The gallery as files: the Geolocator reads them as _gallery does, and names them.
    geo = Geolocator.from_run(args.run, str(dev), gallery=_gallery_paths(args))
    k = 5 if args.top_k is None else args.top_k
    _check_top_k(k, geo.predictor.degree, lo=1)
    sampling = _sampling(args, geo.predictor)
    with warnings.catch_warnings():  # the summary warning: each skipped file is listed below
        warnings.filterwarnings("ignore", message=r"\d+ unreadable images left out")
        ans = geo.predict(args.images, top_k=k, density=HTML_MAX_INPUTS if html else False, **sampling)
    for path, reason in ans.skipped:
        print(f"locdiff predict: warning: skipped {path}: {reason.removeprefix(f'{path}: ')}", file=sys.stderr)
    write_csv(out, ans)
    write_jsonl(jsonl, ans)
    if html:
        write_html_map(html, ans)
    if png:
        _png(png, ans.coeffs, ans.names, ans.modes, ans.latlon, geo.temperature)
    written = ", ".join(str(p) for p in (out, jsonl, html, png) if p)
    print(f"{len(ans)} photos located; written to {written}")
    return 0


def _seed(raw: str) -> int:
    import argparse

    from locdiff.config import integer
    from locdiff.predict import MAX_SEED, check_seed

    try:
        return check_seed(integer(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected an integer in [0, {MAX_SEED}]") from None


def add_sampling(p) -> None:
    from locdiff.run import SAMPLERS

    g = p.add_argument_group("sampling (default: the run's settings)")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="density: the density head in one call; ddim or ddpm: average sampled vectors")
    g.add_argument("--sample-steps", type=int, default=None, help="DDIM steps")
    g.add_argument("--samples", type=int, default=None, help="sampled vectors per input (ddim, ddpm)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
    g.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seed of the sampled noise (ddim, ddpm; default 0): another seed, an independent draw")
    g = p.add_argument_group("LocDiff-H (retrieval over a gallery)")
    g.add_argument("--gallery-embeddings", default=None, help="gallery embeddings (e.g. the training set's)")
    g.add_argument("--gallery-coords", default=None, help="gallery coordinates")


# torchrun's own parser takes `--run` as an abbreviation of its --run-path (an error), so
# under torchrun the run folder is given as --run-dir.
RUN_HELP = "run folder (--run-dir: the same, for use under torchrun)"


def add_parsers(sub) -> None:
    import argparse

    e = sub.add_parser("evaluate", help="metrics of a run on labelled data (torchrun: split across processes)")
    e.add_argument("--run", "--run-dir", dest="run", required=True, help=RUN_HELP)
    e.add_argument("--embeddings", default=None, help="embeddings (.npy or folder of shards); none for a run trained "
                   "without them")
    e.add_argument("--coords", required=True)
    e.add_argument("--json", required=True, help="output metrics JSON")
    e.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    add_sampling(e)
    add_dist_timeout(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="predict locations for embeddings or photos")
    r.add_argument("--run", "--run-dir", dest="run", required=True, help=RUN_HELP)
    r.add_argument("--embeddings", default=None, help="embeddings (.npy or folder of shards)")
    r.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="photos (files or folders), embedded with the encoder the run records")
    r.add_argument("--out", required=True, help="output CSV (with --images, answers; and the same name with .jsonl beside it)")
    r.add_argument("--top-k", type=int, default=None,
                   help="the k answers, best first (the answer, then the highest other modes), as lat_j, lon_j "
                        "and score_j, the log density per steradian there (default: 0; 5 with --images)")
    r.add_argument("--draws", type=int, default=None, metavar="N",
                   help="N locations drawn from each input's distribution (DDIM or DDPM), as draw_lat_j, draw_lon_j; "
                        "for a run trained without embeddings, N rows of lat, lon")
    r.add_argument("--map", default=None, help="PNG world map of the first predictions")
    r.add_argument("--html", default=None, help="with --images: interactive HTML map (density and modes)")
    r.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    add_sampling(r)
    add_dist_timeout(r)
    r.set_defaults(func=cmd_predict)
