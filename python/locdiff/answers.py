"""Answers a person can use, from predicted SHDD vectors: the probability of each top-k
mode's basin, credible regions (50 % and 90 %) as areas and equivalent radii, and the
country / region / nearest place of each mode (offline, ``reverse_geocode``).

The density is ``shdd.density(coeffs, grid, temperature)`` on a ring grid, by default
``grids.for_degree(L, oversample=2)`` for the basins' climb and, for the basins' masses and
the credible regions, :func:`credible_grid`, as fine as the density's sharpness needs; use
the temperature the run was calibrated with (``predictor.config.predict.temperature``,
chosen by validation NLL).

Basins: every grid cell climbs to its highest neighbour (8 neighbours on the ring grid,
across the poles too) while that one is higher, until it reaches a grid peak; each peak
belongs to the nearest top-k mode within the modes' minimum separation
(``shdd.default_separation_km``, the radius within which ``shdd.top_k`` merges maxima),
otherwise to no mode. A mode's probability is the density mass of its peaks' cells;
``other`` is the mass of the basins of no listed mode.

Ranking (:func:`answer_first_modes`): the answer first (the mode of the density smoothed to
the run's degree, the point with the most probability nearby), then the other modes by the
height of their peak. A mode's probability is its basin's mass, so it need not fall with
the rank.

Credible regions: the highest-density region holding a fraction q of the probability (cells
taken by decreasing density per unit area, the last one in part); its area in km^2 and the
radius of a spherical cap of the same area. Given a run's ``coverage`` record, the q region
is the one that held a fraction q of its validation places (:mod:`locdiff.coverage`), whose
mass ``Answers.masses`` gives.

>>> ans = summarize(out["coeffs"], out["topk_latlon"], pred.config.predict.temperature)  # doctest: +SKIP
>>> ans.records()[0]["modes"][0]                                                          # doctest: +SKIP
{'rank': 1, 'lat': 48.86, 'lon': 2.35, 'probability': 0.41, 'country': 'France', ...}
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from locdiff import grids, shdd
from locdiff.geo import EARTH_RADIUS_KM, cos_of_km, great_circle_km, latlon_to_xyz
from locdiff.extras import require
from locdiff.top_answers import answer_first_top_k

LEVELS = (0.5, 0.9)
MAX_TOP_K = 100  # modes per answer at most, and never more than the sphere holds apart
_CHUNK_CELLS = 1 << 20  # rows x grid cells handled at once (under 100 MB with the 8 neighbours)


# Credible regions are counted in grid cells, so the cells must be small beside the lobe of
# softmax(f / t), sharper than f's by sqrt(f0 / t): 1.2 sqrt(f0 / t) x the decode resolution
# on Gauss-Legendre rings keeps a region's radius within 4 % (docs/photos.md, "Answers").
# Basins climb on the 2x grid (the valleys between them need no finer cells) and sum their
# masses on the credible grid, where two equal lobes share the mass equally wherever they fall.
# A budget of cells rather than a cap on the oversampling: the rule then holds up to the
# sharpest temperature calibration chooses at L <= 128. From L = 512 the 2x floor itself is
# larger than the budget (docs/photos.md, "Answers").
MIN_OVERSAMPLE, MAX_CELLS = 2.0, 1 << 23


def top_k_limit(degree: int) -> int:
    """The most modes a degree-``degree`` answer can hold: caps of half the modes' minimum
    separation that fit on the sphere, at most :data:`MAX_TOP_K`."""
    half = shdd.default_separation_km(degree) / EARTH_RADIUS_KM / 2
    return int(min(MAX_TOP_K, max(1, math.floor(2 / (1 - math.cos(min(half, math.pi / 2)))))))


def default_grid(degree: int) -> grids.Grid:
    """The ring grid of the basins and of ``Answers.density``."""
    return grids.for_degree(degree, oversample=2)


def credible_grid(degree: int, temperature: float) -> grids.Grid:
    """The ring grid of the credible regions of ``softmax(f / temperature)``, degree L."""
    sharpness = shdd.exact_peak(degree) / shdd.check_temperature(temperature)
    return grids.for_degree(degree, "gauss_legendre", oversample=_credible_oversample(degree, sharpness))


def _credible_oversample(degree: int, sharpness: float) -> float:
    """1.2 sqrt(sharpness) x the decode resolution, within MIN_OVERSAMPLE and MAX_CELLS."""
    return max(MIN_OVERSAMPLE, min(1.2 * math.sqrt(sharpness), _largest_oversample(degree)))


@functools.lru_cache(maxsize=None)
def _largest_oversample(degree: int) -> float:
    """The largest oversampling (in steps of 5 %) whose ring grid has at most MAX_CELLS cells."""
    oversample = MIN_OVERSAMPLE
    while math.prod(grids.ring_shape(degree, oversample * 1.05)) <= MAX_CELLS:
        oversample *= 1.05
    return oversample


def credible_max_sharpness(degree: int) -> float:
    """The sharpness f0 / t up to which :func:`credible_grid` follows its rule at ``degree``:
    past it the grid stops at MAX_CELLS cells and narrow regions are resolved to its spacing."""
    return (_largest_oversample(degree) / 1.2) ** 2


def _ring(grid, degree: int) -> grids.Grid:
    grid = default_grid(degree) if grid is None else grid
    if not isinstance(grid, grids.Grid) or not grid.is_ring:
        raise ValueError(f"grid must be a ring grid (equiangular or gauss_legendre), got {grid!r}")
    return grid


@functools.lru_cache(maxsize=16)
def neighbours(nlat: int, nlon: int) -> torch.Tensor:
    """(G, 8) flat indices of the 8 neighbours of each cell of a ring grid; beyond the first
    or last ring, the neighbour is on the same ring half way round (across the pole)."""
    j, k = torch.meshgrid(torch.arange(nlat), torch.arange(nlon), indexing="ij")
    out = []
    for dj in (-1, 0, 1):
        for dk in (-1, 0, 1):
            if dj == dk == 0:
                continue
            jj, kk = j + dj, k + dk
            over = (jj < 0) | (jj >= nlat)
            jj = jj.clamp(0, nlat - 1)
            kk = torch.where(over, kk + nlon // 2, kk) % nlon
            out.append((jj * nlon + kk).reshape(-1))
    return torch.stack(out, 1)


def grid_peaks(values: torch.Tensor, nlat: int, nlon: int) -> torch.Tensor:
    """(B, G) index of the grid peak each cell of ``values`` (B, G) climbs to."""
    nb = neighbours(nlat, nlon).to(values.device)
    nv = values[:, nb]                                   # (B, G, 8)
    best_v, best = nv.max(-1)
    here = torch.arange(values.shape[1], device=values.device).expand_as(values)
    ptr = torch.where(best_v > values, nb[here, best], here)
    # Pointer jumping: each pass doubles the path followed, so a few passes reach the peaks.
    while True:
        nxt = ptr.gather(1, ptr)
        if torch.equal(nxt, ptr):
            return ptr
        ptr = nxt


def _mode_of_peaks(grid, modes: torch.Tensor, sep_km: float, peaks: torch.Tensor) -> torch.Tensor:
    """(B, G) index of the nearest mode within ``sep_km`` of the peak each cell climbs to
    (``peaks``), or -1; distances are taken for the few peak cells alone."""
    ok = torch.isfinite(modes).all(-1)                          # (B, k)
    xyz = latlon_to_xyz(torch.where(ok[..., None], modes, torch.zeros_like(modes)))
    row, cell = torch.nonzero(peaks == torch.arange(peaks.shape[1]), as_tuple=True)
    cos = torch.einsum("pc,pkc->pk", grid.xyz[cell], xyz[row])
    cos = torch.where(ok[row], cos, torch.tensor(-2.0, dtype=cos.dtype))
    best_cos, best = cos.max(-1) if len(row) else (cos.new_empty(0), row.new_empty(0))
    near = best_cos >= cos_of_km(sep_km)
    owner = torch.full(peaks.shape, -1, dtype=torch.long)
    owner[row, cell] = torch.where(near, best, -1)
    return owner.gather(1, peaks)


def _nearest_cell(fine, grid) -> torch.Tensor:
    """(fine.size,) index of the cell of ring grid ``grid`` nearest each point of ring grid
    ``fine``: its nearest ring, then the nearest point on that ring."""
    ring = (fine.theta[:, None] - grid.theta[None]).abs().argmin(1)
    lon = fine.lon0 + 2 * math.pi * torch.arange(fine.nlon, dtype=torch.float64) / fine.nlon
    j = torch.round((lon - grid.lon0) * (grid.nlon / (2 * math.pi))).long() % grid.nlon
    return (ring[:, None] * grid.nlon + j[None]).reshape(-1)


def basin_owner(p: torch.Tensor, grid, modes: torch.Tensor, sep_km: float) -> torch.Tensor:
    """(B, G) index of the mode owning the peak each cell of the density ``p`` climbs to, or
    -1 (what :func:`basin_mass` and :func:`basin_of` take as ``owner`` to share the climb)."""
    peaks = grid_peaks(p / grid.area.to(p), grid.nlat, grid.nlon)
    return _mode_of_peaks(grid, modes, sep_km, peaks)


def basin_mass(p: torch.Tensor, grid, modes: torch.Tensor, sep_km: float, owner=None) -> torch.Tensor:
    """(B, k) probability of each mode's basin from cell probabilities ``p`` (B, G)."""
    owner = basin_owner(p, grid, modes, sep_km) if owner is None else owner
    k = modes.shape[1]
    mass = torch.zeros(p.shape[0], k + 1, dtype=p.dtype)
    mass.scatter_add_(1, torch.where(owner < 0, k, owner), p)
    out = mass[:, :k]
    return torch.where(torch.isfinite(modes).all(-1), out, torch.nan)


def basin_of(p: torch.Tensor, grid, modes: torch.Tensor, sep_km: float, latlon, owner=None) -> torch.Tensor:
    """(B,) index of the mode (of ``modes`` (B, k, 2)) whose basin of the density ``p`` (B, G)
    holds each point of ``latlon`` (B, 2), or -1: the check behind a reliability table (is the
    truth in the basin whose mass was reported?)."""
    owner = basin_owner(p, grid, modes, sep_km) if owner is None else owner
    cell = grid.nearest(latlon_to_xyz(np.asarray(latlon, np.float64)))
    return owner[torch.arange(len(cell)), cell]


def answer_first_modes(latlon, modes, min_separation_km: float) -> np.ndarray:
    """LocDiff's answers best first: the answer ``latlon`` (N, 2), then the top-k ``modes``
    (N, k, 2) in their order (highest first; NaN rows: none) that lie ``min_separation_km``
    from it and from each other -> (N, k, 2), NaN where fewer."""
    modes = np.asarray(modes, np.float64)
    k = modes.shape[1]
    rank = np.where(np.isfinite(modes).all(2), k - 1.0 - np.arange(k), -np.inf)
    return answer_first_top_k(latlon, torch.as_tensor(latlon_to_xyz(np.nan_to_num(modes))), torch.as_tensor(rank),
                              k, min_separation_km)


def credible_area(p: torch.Tensor, grid, levels=LEVELS) -> torch.Tensor:
    """(B, len(levels)) area in km^2 of the highest-density region holding each level."""
    area = grid.area.to(p)
    dens = p / area
    # Cells below this density hold less than 1e-3 of the mass the highest level leaves out
    # (their total is under floor x 4 pi), so no region reaches them: only the rest is sorted.
    floor = 1e-3 * (1 - max(levels)) / (4 * math.pi)
    out = []
    for row, d in zip(p, dens):
        keep = torch.nonzero(d >= floor).squeeze(1)
        if keep.numel() == 0 or float(row[keep].sum()) < max(levels):  # not normalised: sort all
            keep = torch.arange(len(d))
        order = keep[torch.argsort(d[keep], descending=True)]
        ps, cells = row[order], area[order]
        cum, cum_area = ps.cumsum(0), cells.cumsum(0)
        q = torch.tensor(levels, dtype=p.dtype)
        i = torch.searchsorted(cum, q).clamp(max=len(order) - 1)
        before = torch.where(i > 0, cum[(i - 1).clamp(min=0)], torch.zeros_like(q))
        area_before = torch.where(i > 0, cum_area[(i - 1).clamp(min=0)], torch.zeros_like(q))
        frac = ((q - before) / ps[i].clamp_min(1e-300)).clamp(0, 1)
        out.append((area_before + frac * cells[i]) * EARTH_RADIUS_KM ** 2)
    return torch.stack(out) if out else torch.zeros(0, len(levels), dtype=p.dtype)


def cap_radius_km(area_km2):
    """Great-circle radius of the spherical cap of that area: A = 2 pi R^2 (1 - cos(r / R))."""
    a = np.clip(np.asarray(area_km2, np.float64) / (2 * math.pi * EARTH_RADIUS_KM ** 2), 0, 2)
    return EARTH_RADIUS_KM * np.arccos(1 - a)


def reverse_geocode_modes(modes) -> list[list[dict | None]]:
    """Country, region and nearest gazetteer place of each mode (N, k, 2), offline; None for
    a missing (NaN) mode. ``place_km``: distance from the mode to that place."""
    rg = require("reverse_geocode", "reverse geocoding")
    modes = np.asarray(modes, np.float64)
    ok = np.isfinite(modes).all(-1)
    found = iter(rg.search([tuple(m) for m in modes[ok]]) if ok.any() else [])
    out = []
    for i in range(modes.shape[0]):
        row = []
        for j in range(modes.shape[1]):
            if not ok[i, j]:
                row.append(None)
                continue
            g = next(found)
            d = float(great_circle_km(modes[i, j], np.array([g["latitude"], g["longitude"]])))
            row.append({"country": g.get("country", ""), "country_code": g.get("country_code", ""),
                        "region": g.get("state", ""), "place": g.get("city", ""), "place_km": round(d, 1)})
        out.append(row)
    return out


@dataclass
class Answers:
    """Per input (N of them): point prediction ``latlon`` (N, 2), ``modes`` (N, k, 2), their
    basin ``probability`` (N, k) (NaN for a missing mode), ``other`` (N,) the mass outside
    them, ``area_km2`` and ``radius_km`` (N, len(levels)) of the credible regions, ``places``
    (reverse-geocoded modes, or None), ``coeffs`` (N, K) the SHDD vectors (for
    ``plot.plot_predictions``), and on request ``density`` (n, G) on ``grid`` for the first
    n inputs."""

    names: list
    latlon: np.ndarray
    modes: np.ndarray
    probability: np.ndarray
    other: np.ndarray
    area_km2: np.ndarray
    radius_km: np.ndarray
    levels: tuple = LEVELS
    masses: tuple = LEVELS  # the density's mass in each level's region (calibrated: not the level)
    temperature: float = 1.0
    places: list | None = None
    coeffs: np.ndarray | None = None
    density: np.ndarray | None = None
    grid: object = None
    skipped: list = field(default_factory=list)  # [(input, reason)] left out

    def __len__(self) -> int:
        return len(self.names)

    def record(self, i: int) -> dict:
        """A JSON-ready dict for input ``i``."""
        modes = []
        for j in range(self.modes.shape[1]):
            if not np.isfinite(self.modes[i, j]).all():
                continue
            m = {"rank": j + 1, "lat": round(float(self.modes[i, j, 0]), 5),
                 "lon": round(float(self.modes[i, j, 1]), 5), "probability": round(float(self.probability[i, j]), 4)}
            if self.places is not None and self.places[i][j] is not None:
                m.update(self.places[i][j])
            modes.append(m)
        credible = {f"{level_label(q)}%": {"area_km2": round(float(a), 1), "radius_km": round(float(r), 1)}
                    for q, a, r in zip(self.levels, self.area_km2[i], self.radius_km[i])}
        return {"input": str(self.names[i]), "lat": round(float(self.latlon[i, 0]), 5),
                "lon": round(float(self.latlon[i, 1]), 5), "modes": modes,
                "other_probability": round(float(self.other[i]), 4), "credible": credible}

    def records(self) -> list[dict]:
        return [self.record(i) for i in range(len(self))]


def level_label(q: float) -> str:
    """A credible level as its percentage in the answers' keys and columns: 0.9 -> "90",
    0.994 -> "99.4"."""
    return f"{100 * float(q):.6g}"


def summarize(coeffs, modes, temperature: float, latlon=None, names=None, *, levels=LEVELS, grid=None,
              geocode: bool = True, density: bool | int = False, min_separation_km: float | None = None,
              cell_probabilities=None, coverage: dict | None = None, progress: bool = False) -> Answers:
    """:class:`Answers` for SHDD vectors ``coeffs`` (N, (L+1)^2) and their top-k ``modes``
    (N, k, 2) (``predict``'s ``topk_latlon``); ``latlon`` defaults to the first mode.
    ``cell_probabilities(rows, grid)`` -> (n, G) replaces the vectors' density by another
    one on the grid (LocDiff-H's: ``Hybrid.grid_probabilities``) for ``rows``, a slice.
    ``density``: True keeps every input's density on ``grid`` in ``.density``, an int n the
    first n inputs' (a map shows a few; each row holds the whole grid). ``coverage``: a record
    of :func:`locdiff.coverage.fit_levels` for these densities (a run's ``predict.credible``
    entry): each level's region is the one that held that share of the validation places.
    ``progress``: a bar over the inputs."""
    from tqdm.auto import tqdm

    from locdiff.coverage import check_record, level_for

    c = torch.as_tensor(np.asarray(coeffs), dtype=torch.float64)
    if c.ndim != 2:
        raise ValueError(f"coeffs must have shape (N, (L+1)^2), got {tuple(c.shape)}")
    degree = shdd.degree_of(c.shape[1])
    m = torch.as_tensor(np.asarray(modes), dtype=torch.float64)
    if m.ndim != 3 or m.shape[0] != c.shape[0] or m.shape[2] != 2:
        raise ValueError(f"modes must have shape ({c.shape[0]}, k, 2), got {tuple(m.shape)}")
    if not all(0 < q < 1 for q in levels):
        raise ValueError(f"levels must be fractions in (0, 1), got {levels!r}")
    if len({level_label(q) for q in levels}) < len(levels):  # each is a column and a key of the answers
        raise ValueError(f"levels must differ in percent to 6 digits, got {levels!r}")
    temperature = shdd.check_temperature(temperature)
    masses = tuple(level_for(check_record(coverage or {}, "coverage"), q) for q in levels)
    if not isinstance(density, (bool, int)) or density < 0:
        raise ValueError(f"density must be True, False or a number of inputs >= 0, got {density!r}")
    keep = c.shape[0] if density is True else int(density)
    given = grid is not None
    grid = _ring(grid, degree)
    fine = grid if given else credible_grid(degree, temperature)
    sep = shdd.default_separation_km(degree) if min_separation_km is None else float(min_separation_km)

    def cells(rows: slice, g):
        return torch.as_tensor(shdd.density(c[rows], g, temperature) if cell_probabilities is None
                               else cell_probabilities(rows, g))

    n = c.shape[0]
    # Outputs filled in place (docs/evaluation.md, "Memory on large sets").
    prob, area = np.empty((n, m.shape[1])), np.empty((n, len(levels)))
    dens = np.empty((min(keep, n), grid.size), np.float32) if keep else None
    # The basins climb on the 2x grid, but their masses are summed on the fine one: on the 2x
    # grid a sharp lobe's mass depends on where it falls between nodes (two equal modes came
    # out 0.62 / 0.38; tests/test_answers.py). Each fine cell joins its nearest coarse cell's basin.
    near = None if fine is grid else _nearest_cell(fine, grid)
    chunk = max(1, _CHUNK_CELLS // fine.size)
    for i in tqdm(range(0, n, chunk), desc="answers", unit="batch", disable=not progress):
        rows = slice(i, i + chunk)
        p = cells(rows, fine)
        coarse = p if near is None else cells(rows, grid)
        owner = basin_owner(coarse, grid, m[rows], sep)
        prob[rows] = basin_mass(p, fine, m[rows], sep, owner=owner if near is None else owner[:, near]).numpy()
        area[rows] = credible_area(p, fine, masses).numpy()
        if i < keep:
            dens[rows] = coarse[:keep - i].float().numpy()
    latlon = m[:, 0].numpy() if latlon is None else np.asarray(latlon, np.float64)
    return Answers(names=list(names) if names is not None else [f"row {i}" for i in range(n)], latlon=latlon,
                   modes=m.numpy(), probability=prob, other=np.clip(1 - np.nansum(prob, 1), 0, 1),
                   area_km2=area, radius_km=cap_radius_km(area), levels=tuple(levels), masses=masses,
                   temperature=float(temperature), places=reverse_geocode_modes(m.numpy()) if geocode else None,
                   coeffs=c.numpy(),
                   density=dens if n else None, grid=grid)
