"""World maps of predicted densities and top-k modes (matplotlib, offline coastlines).

Coastlines are the 0.5 contour of the GLOBE land mask shipped in the PyPI package
``global-land-mask`` (no download at run time), reduced once to 0.25 degrees and cached
under ``$LOCDIFF_CACHE``; without the package the maps have a graticule only.

>>> plot_predictions("map.png", coeffs, titles=texts, truths=coords, topk=modes)  # doctest: +SKIP
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def land_mask(step_deg: float = 0.25) -> np.ndarray | None:
    """Boolean land mask ``(180/step, 360/step)``, rows from north to south, columns from
    -180 east; None when ``global-land-mask`` is not installed."""
    from locdiff.data.files import atomic_save_npy, cache_dir

    path = cache_dir() / f"land_mask_{step_deg:g}.npy"
    if path.exists():
        return np.load(path)
    try:
        from global_land_mask import globe
    except ImportError:
        return None
    # The packaged mask is 30 arc-seconds (21600 x 43200), rows from north to south; a strided
    # read is plenty for a world map and keeps the cached file small.
    stride = int(round(step_deg * 120))
    small = np.ascontiguousarray(globe._mask[stride // 2::stride, stride // 2::stride])
    if globe._lat[0] < globe._lat[-1]:
        small = small[::-1].copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(path, small)
    return small


def draw_coastlines(ax, color: str = "0.25", linewidth: float = 0.5) -> None:
    mask = land_mask()
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    if mask is None:
        ax.grid(True, lw=0.3, color="0.7")
        return
    h, w = mask.shape
    lon = -180 + (np.arange(w) + 0.5) * 360 / w
    lat = 90 - (np.arange(h) + 0.5) * 180 / h
    ax.contour(lon, lat, mask.astype(np.float32), levels=[0.5], colors=color, linewidths=linewidth)


def plot_predictions(path, coeffs, titles=None, truths=None, topk=None, points=None,
                     temperature: float = 1.0, ncols: int = 2, nlat: int = 180) -> None:
    """PNG of one world map per SHDD vector in ``coeffs`` (n, K): the predicted density
    (softmax of f / temperature, per unit area), the truth (``truths`` (n, 2), star), the
    top-k modes (``topk`` (n, k, 2), numbered) and the point prediction (``points``, cross).
    Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from locdiff import grids, shdd
    from locdiff.data.files import atomic_write_bytes

    coeffs = torch.as_tensor(np.asarray(coeffs)).double()
    n = coeffs.shape[0]
    grid = grids.equiangular(nlat, 2 * nlat)
    f = np.asarray(shdd.grid_values(coeffs, grid)).reshape(n, grid.nlat, grid.nlon) / temperature
    # Square root of the density relative to its peak: broad, low modes stay visible.
    dens = np.sqrt(np.exp(f - f.max(axis=(1, 2), keepdims=True)))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.5 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(dens[i], extent=(-180, 180, -90, 90), origin="upper", cmap="Reds",
                  vmin=0, vmax=1, interpolation="bilinear", aspect="equal")
        draw_coastlines(ax)
        if topk is not None:
            for j, (la, lo) in enumerate(np.asarray(topk)[i]):
                if np.isfinite(la):
                    ax.plot(lo, la, "o", ms=7, mfc="none", mec="tab:cyan", mew=1.5)
                    ax.annotate(str(j + 1), (lo, la), xytext=(4, 4), textcoords="offset points",
                                color="tab:cyan", fontsize=8, weight="bold")
        if points is not None:
            ax.plot(points[i][1], points[i][0], "x", ms=8, mew=2, color="tab:blue")
        if truths is not None:
            ax.plot(truths[i][1], truths[i][0], "*", ms=12, mfc="lime", mec="k", mew=0.7)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("LocDiff: predicted density (red = likely), top-k modes (numbered), "
                 "prediction (x), truth (star)", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
