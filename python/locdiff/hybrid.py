"""LocDiff-H: the model's density combined with retrieval over a gallery of (embedding,
location) pairs, by default the training set.

The hybrid density multiplies the model's density q by a mixture of "anywhere" and the
query's nearest gallery entries,

    p_H(x)  ∝  q(x) [ (1 - w) / (4 pi)  +  w sum_j a_j vMF(x; mu_j, kappa) ],

with ``a = softmax(similarity / temperature)`` over the ``neighbours`` most similar gallery
embeddings (cosine), ``mu_j`` their locations and ``kappa = (R / bandwidth)^2``. Its
normaliser is ``(1 - w) / (4 pi) + w sum_j a_j E_j[q]``, where ``E_j[q]``, the mean of q
under the j-th vMF, is a product rule in the tangent plane at ``mu_j`` whose spacing
resolves both the vMF and q's sharpest lobe (:func:`vmf_lattice`), so NLL needs no global
grid. The prediction is the best of the model's mode and the
gallery locations under p_H: where a similar gallery entry lies in a likely region the
answer snaps to it (fine scales), elsewhere the model's mode stands. Gallery entries within
``snap_km`` of that answer count as the same place, and the answer moves to the most similar
of them: a cluster of entries wins the product, its best-matching entry is the finest
answer. With weight 0 the answer is the model's own. :meth:`Hybrid.top_k` ranks further
answers by p_H. :meth:`Hybrid.fit` chooses the settings on validation data.

>>> h = Hybrid(gallery_emb, gallery_coords, HybridConfig(weight=0.5))          # doctest: +SKIP
>>> latlon = h.predict(coeffs, temperature, query_emb, model_latlon)           # doctest: +SKIP
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from locdiff import shdd
from locdiff.baselines.knn import NeighbourIndex, log_vmf_mixture
from locdiff.geo import EARTH_RADIUS_KM, cos_of_km, great_circle_km, latlon_to_xyz, xyz_to_latlon
from locdiff.heap import release_free_memory
from locdiff.metrics import check_latlon
from locdiff.ops.validation import check_int
from locdiff.selection import MIN_GAIN, clearly_better
from locdiff.top_answers import answer_first_top_k, check_top_k_args

# The tangent-plane rule for E_j[q]: nodes out to RULE_EXTENT vMF standard deviations
# (the vMF falls to e^-18 there), RULE_SPACING widths of the product of the vMF and q's
# sharpest lobe apart (a uniform rule's relative error on a Gaussian, exp(-2 pi^2 / 1.5^2),
# is 1.5e-4), at most RULE_MAX_NODES per axis (docs/model.md, "LocDiff-H").
RULE_EXTENT = 6.0
RULE_SPACING = 1.5
RULE_MAX_NODES = 129
# Points evaluated at once: rows are taken in chunks of this many (row, neighbour, node)s.
RULE_CHUNK = 1 << 21


def lobe_width(coeffs: torch.Tensor, temperature: float) -> float:
    """A lower bound (radians) on the standard deviation of the sharpest lobe of
    ``softmax(f / t)`` over the rows ``coeffs`` (B, K): an exact SHDD's lobe,
    ``2 / sqrt(S L (L + 2))``, at the sharpness S that bounds the rows' peak over t
    (``|f| <= |c| sqrt(K / 4 pi)``)."""
    degree = shdd.degree_of(coeffs.shape[-1])
    if not len(coeffs) or degree == 0:
        return math.pi
    peak = float(shdd.peak_bound(coeffs, temperature).max())
    return 2.0 / math.sqrt(max(peak, 1e-12) * degree * (degree + 2))


def vmf_lattice(bandwidth: float, spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tangent-plane offsets (n, 2) (radians) and log weights (n,) of a rule for the mean of
    a function under vMF(mu, kappa = 1 / bandwidth^2): the nodes of a square lattice at most
    ``spacing`` apart (at most RULE_MAX_NODES a side) within RULE_EXTENT bandwidths (at most
    pi), weighted by the vMF and the exponential map's area factor; the weights sum to 1."""
    reach = min(RULE_EXTENT * bandwidth, math.pi)
    half = min(math.ceil(reach / spacing), (RULE_MAX_NODES - 1) // 2)
    h = torch.linspace(-reach, reach, 2 * half + 1, dtype=torch.float64)
    ab = torch.stack([g.reshape(-1) for g in torch.meshgrid(h, h, indexing="ij")], 1)
    r = ab.norm(dim=1)
    ab, r = ab[r <= reach], r[r <= reach]
    log_w = (torch.cos(r) - 1) / bandwidth ** 2 + torch.log(torch.sinc(r / math.pi))
    return ab, log_w - torch.logsumexp(log_w, 0)


def vmf_rule(mu: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The nodes (..., n, 3) of :func:`vmf_lattice`'s ``offsets`` (n, 2) in the tangent plane
    at each unit vector ``mu`` (..., 3), mapped onto the sphere by the exponential map."""
    helper = torch.where(mu[..., 2:3].abs() < 0.9, mu.new_tensor([0.0, 0.0, 1.0]), mu.new_tensor([1.0, 0.0, 0.0]))
    e1 = torch.nn.functional.normalize(torch.cross(mu, helper.expand_as(mu), dim=-1), dim=-1)
    e2 = torch.cross(mu, e1, dim=-1)
    a, b = offsets.to(mu.dtype).unbind(1)
    r = torch.hypot(a, b)
    u = a[:, None] * e1[..., None, :] + b[:, None] * e2[..., None, :]
    return torch.cos(r)[:, None] * mu[..., None, :] + torch.sinc(r / math.pi)[:, None] * u


# Said where a run has no LocDiff-H settings fitted on validation data (trained without it).
UNFITTED_NOTE = ("the run has no LocDiff-H settings fitted on validation data (it was trained without "
                 "validation); using the defaults weight {weight:g}, bandwidth {bandwidth_km:g} km, "
                 "similarity temperature {temperature:g}")


@dataclass(frozen=True)
class HybridConfig:
    """Settings of :class:`Hybrid` (see the module docstring)."""

    neighbours: int = 32
    temperature: float = 0.05
    bandwidth_km: float = 25.0
    weight: float = 0.5
    snap_km: float = 10.0

    def __post_init__(self):
        object.__setattr__(self, "neighbours", check_int(self.neighbours, "neighbours"))  # (frozen)
        for name, ok, expected in (("temperature", lambda v: v > 0, "a positive finite number"),
                                   ("bandwidth_km", lambda v: v > 0, "a positive finite number"),
                                   ("weight", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                                   ("snap_km", lambda v: v >= 0, "a finite number >= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and ok(v)):
                raise ValueError(f"{name} must be {expected}, got {v!r}")
            object.__setattr__(self, name, float(v))  # (frozen)

    @property
    def kappa(self) -> float:
        return (EARTH_RADIUS_KM / self.bandwidth_km) ** 2

    @classmethod
    def of_run(cls, settings: dict, source: str) -> "HybridConfig":
        """The settings a run recorded as ``predict.hybrid`` (``source``: its config file, for
        the message); a DataError naming the key or value a damaged file holds. An empty dict
        (a run trained without validation) gives the defaults: see :data:`UNFITTED_NOTE`."""
        from locdiff.data.files import DataError

        if not isinstance(settings, dict):
            raise DataError(f"{source}: predict.hybrid must be a table of LocDiff-H settings, got {settings!r}")
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise DataError(f"{source}: predict.hybrid has an unknown key {unknown[0]!r}; expected some of {known}")
        try:
            return cls(**settings)
        except (TypeError, ValueError) as err:
            raise DataError(f"{source}: predict.hybrid: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def _coefficients(coeffs) -> torch.Tensor:
    """The model's vectors as float64, checked as locdiff.shdd checks them (a NaN named by its
    row in the whole batch, not in a chunk)."""
    return shdd.checked_coefficients(coeffs).double()


def _bar(label: str, progress: bool) -> str | None:
    return label if progress else None


class Hybrid:
    """LocDiff-H over a gallery; see the module docstring."""

    def __init__(self, gallery_emb, gallery_coords, config: HybridConfig | None = None,
                 index: NeighbourIndex | None = None, device=None):
        self.index = index or NeighbourIndex(gallery_emb, gallery_coords, device=device)
        self.config = config or HybridConfig()

    def _parts(self, c_all: torch.Tensor, temperature: float, emb, points, neighbours: int, bandwidths_km=(),
               progress: str | None = None):
        """Per batch of 256 rows, what every setting needs: similarities (b, k), gallery
        locations mu (b, k, 3), the extra points (b, P, 3) given by ``points(slice)``, log q
        at mu and at the points, for each of ``bandwidths_km`` log E_j[q] (b, k), and the
        batch's ``rows`` (a slice). A generator: a single pass holds one batch's
        (tens of KB a row), not every row's, and fills its outputs in place
        (docs/evaluation.md, "Memory on large sets"). ``c_all``: the vectors as
        :func:`_coefficients` gives them (each public method converts once). ``progress``: a
        bar's label, or None."""
        from tqdm.auto import tqdm

        if c_all.ndim != 2 or np.ndim(emb) != 2 or len(emb) != len(c_all):
            raise ValueError(f"coeffs (B, K) and emb (B, D) must have one row per query, got {tuple(c_all.shape)} "
                             f"and {tuple(np.shape(emb))}")
        for i in tqdm(range(0, len(c_all), 256), desc=progress, unit="batch", disable=progress is None):
            sl = slice(i, i + 256)
            c = c_all[sl]
            sim, idx = self.index.search(emb[sl], neighbours)
            mu = self.index.xyz[idx]
            x = points(sl)
            logz = shdd.log_normalizer(c, temperature=temperature)

            def log_q(xyz, rows=slice(None), c=c, logz=logz):
                flat = xyz.reshape(len(xyz), -1, 3)
                v = shdd.values_at(c[rows, None], xyz_to_latlon(flat)) / temperature - logz[rows, None]
                return v.reshape(xyz.shape[:-1])
            part = {"sim": sim.double(), "mu": mu, "x": x, "lq_mu": log_q(mu), "lq_x": log_q(x), "lq_vmf": {},
                    "rows": sl}
            lobe = lobe_width(c, temperature) if bandwidths_km else math.pi
            for bw in bandwidths_km:
                part["lq_vmf"][bw] = self._log_mean_q(log_q, mu, bw / EARTH_RADIUS_KM, lobe)
            release_free_memory()
            yield part

    @staticmethod
    def _log_mean_q(log_q, mu: torch.Tensor, bandwidth: float, lobe: float) -> torch.Tensor:
        """log E_j[q] (b, k) for the vMFs at ``mu`` (b, k, 3), ``log_q(xyz (b, ..., 3))``
        giving log q per row. The rule's spacing is RULE_SPACING x the width of the product
        of the vMF and q's sharpest lobe, ``(bandwidth^-2 + lobe^-2)^-1/2``."""
        offsets, log_w = vmf_lattice(bandwidth, RULE_SPACING * (bandwidth ** -2 + lobe ** -2) ** -0.5)
        step = max(1, RULE_CHUNK // max(1, mu.shape[1] * len(offsets)))
        out = mu.new_empty(mu.shape[:2])
        for i in range(0, len(mu), step):
            out[i:i + step] = torch.logsumexp(log_q(vmf_rule(mu[i:i + step], offsets), slice(i, i + step)) + log_w, -1)
        return out

    @staticmethod
    def _log_weights(part: dict, cfg: HybridConfig) -> tuple[torch.Tensor, float]:
        """(log a_j (b, k), the neighbours' weights; log of the 'anywhere' weight
        ``(1 - w) / (4 pi)``)."""
        log_a = torch.log_softmax(part["sim"][:, :cfg.neighbours] / cfg.temperature, 1)
        w = cfg.weight
        return log_a, math.log1p(-w) - math.log(4 * math.pi) if w < 1 else -math.inf

    @classmethod
    def _log_r(cls, part: dict, xyz: torch.Tensor, cfg: HybridConfig) -> torch.Tensor:
        """log of the retrieval factor ``(1 - w) / (4 pi) + w sum_j a_j vMF(x; mu_j)``."""
        log_a, base = cls._log_weights(part, cfg)
        base = torch.full(xyz.shape[:2], base, dtype=torch.float64)
        if cfg.weight == 0:
            return base
        mu = part["mu"][:, :cfg.neighbours]
        return torch.logaddexp(base, log_vmf_mixture(xyz, mu, log_a, cfg.kappa) + math.log(cfg.weight))

    def _choose(self, parts, cfg: HybridConfig, n: int) -> np.ndarray:
        """LocDiff-H's answers (n, 2) from the :meth:`_parts` of n rows."""
        out = torch.empty(n, 3, dtype=torch.float64)
        for part in parts:
            if cfg.weight == 0:
                # No retrieval: LocDiff-H is LocDiff, whose answer need not be the highest
                # point of q among the gallery's places (it is the mode of the smoothed density).
                out[part["rows"]] = part["x"][:, 0]
                continue
            k = cfg.neighbours
            mu = part["mu"][:, :k]
            cand = torch.cat([part["x"], mu], 1)
            score = torch.cat([part["lq_x"], part["lq_mu"][:, :k]], 1) + self._log_r(part, cand, cfg)
            best = cand[torch.arange(len(cand)), score.argmax(1)]
            if cfg.snap_km > 0:
                near = (mu @ best[:, :, None])[..., 0] >= cos_of_km(cfg.snap_km)
                sim = part["sim"][:, :k].masked_fill(~near, -math.inf)
                j = sim.argmax(1)
                best = torch.where(near.any(1, keepdim=True), mu[torch.arange(len(mu)), j], best)
            out[part["rows"]] = best
        return xyz_to_latlon(out).numpy() if n else np.empty((0, 2))

    @classmethod
    def _log_norm(cls, part: dict, cfg: HybridConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(log Z (b,), log of each neighbour's share ``w a_j E_j[q]`` (b, k), log of the
        'anywhere' weight ``(1 - w) / (4 pi)``)."""
        k, w = cfg.neighbours, cfg.weight
        log_a, base = cls._log_weights(part, cfg)
        share = log_a + part["lq_vmf"][cfg.bandwidth_km][:, :k] + (math.log(w) if w > 0 else -math.inf)
        norm = torch.logaddexp(torch.logsumexp(share, 1), torch.full(share.shape[:1], base, dtype=share.dtype))
        return norm, share, base

    def _log_density(self, parts, cfg: HybridConfig, n: int) -> np.ndarray:
        """log p_H (n,) at the points of the :meth:`_parts` of n rows."""
        out = np.empty(n)
        for part in parts:
            norm, _, _ = self._log_norm(part, cfg)
            out[part["rows"]] = ((part["lq_x"] + self._log_r(part, part["x"], cfg))[:, 0] - norm).numpy()
        return out

    @staticmethod
    def _points(latlon, emb, name: str):
        """``latlon`` (B, 2), one point per row of the queries ``emb`` (B, D), as a slicer."""
        if np.ndim(emb) != 2:
            raise ValueError(f"emb must have shape (B, D), one row per query, got {tuple(np.shape(emb))}")
        xyz = torch.as_tensor(latlon_to_xyz(check_latlon(latlon, name, rows=len(emb))))
        return lambda sl: xyz[sl][:, None]

    def predict(self, coeffs, temperature: float, emb, model_latlon, config: HybridConfig | None = None,
                progress: bool = False) -> np.ndarray:
        """The mode of p_H among the model's mode and the gallery neighbours -> (B, 2)."""
        return self._predict(_coefficients(coeffs), temperature, emb, model_latlon, config or self.config, progress)

    def _predict(self, c: torch.Tensor, temperature: float, emb, model_latlon, cfg: HybridConfig,
                 progress: bool) -> np.ndarray:
        points = self._points(model_latlon, emb, "model_latlon")
        bar = _bar("LocDiff-H answers", progress)
        return self._choose(self._parts(c, temperature, emb, points, cfg.neighbours, progress=bar), cfg, len(emb))

    def top_k(self, coeffs, temperature: float, emb, model_latlon, modes, k: int = 5,
              min_separation_km: float = 1000.0, config: HybridConfig | None = None,
              answer=None, progress: bool = False) -> np.ndarray:
        """LocDiff-H's first k answers ``min_separation_km`` apart -> ``(B, k, 2)``: its answer
        (``answer``, :meth:`predict`'s when the caller has it, else computed here), then the
        model's ``modes`` (B, m, 2; NaN: none) and the gallery neighbours, ranked by p_H;
        NaN where fewer. ``progress``: show bars."""
        k, sep = check_top_k_args(k, min_separation_km)
        cfg = config or self.config
        modes = np.asarray(modes, np.float64)
        coeffs = _coefficients(coeffs)
        if modes.ndim != 3 or len(modes) != len(coeffs):
            raise ValueError(f"modes must have shape ({len(coeffs)}, m, 2), one row per query, got "
                             f"{modes.shape}")
        if answer is None:
            answer = self._predict(coeffs, temperature, emb, model_latlon, cfg, progress)
        if not len(modes):
            return np.empty((0, k, 2))
        found = torch.as_tensor(np.isfinite(modes).all(2))
        xyz = torch.as_tensor(latlon_to_xyz(np.nan_to_num(modes)))
        m = modes.shape[1] + min(cfg.neighbours, len(self.index))
        cand = torch.empty(len(modes), m, 3, dtype=torch.float64)
        score = torch.empty(len(modes), m, dtype=torch.float64)
        for part in self._parts(coeffs, temperature, emb, lambda sl: xyz[sl], cfg.neighbours,
                                progress=_bar("LocDiff-H top-k", progress)):
            c = torch.cat([part["x"], part["mu"][:, :cfg.neighbours]], 1)
            cand[part["rows"]] = c
            score[part["rows"]] = torch.cat([part["lq_x"], part["lq_mu"][:, :cfg.neighbours]], 1) \
                + self._log_r(part, c, cfg)
        score[:, :modes.shape[1]][~found] = -math.inf
        return answer_first_top_k(answer, cand, score, k, sep)

    def log_density_at(self, coeffs, temperature: float, emb, latlon, config: HybridConfig | None = None) -> np.ndarray:
        """log p_H per steradian at ``latlon`` (B, 2) -> (B,)."""
        cfg = config or self.config
        parts = self._parts(_coefficients(coeffs), temperature, emb, self._points(latlon, emb, "latlon"),
                            cfg.neighbours, (cfg.bandwidth_km,))
        return self._log_density(parts, cfg, len(emb))

    def grid_probabilities(self, coeffs, temperature: float, emb, grid, config: HybridConfig | None = None) -> np.ndarray:
        """Cell probabilities ``(B, G)`` of p_H on ``grid``: the 'anywhere' part is the
        model's own cell probabilities, each neighbour's part ``w a_j E_j[q]`` lands in the
        cell that holds mu_j (the vMF bandwidths are about a cell of the RvA grid or less)."""
        cfg = config or self.config
        coeffs = _coefficients(coeffs)
        none = lambda sl: torch.empty(len(coeffs[sl]), 0, 3, dtype=torch.float64)  # noqa: E731
        parts = self._parts(coeffs, temperature, emb, none, cfg.neighbours, (cfg.bandwidth_km,))
        out = np.empty((len(coeffs), grid.size))
        for part in parts:
            c = coeffs[part["rows"]]
            norm, share, base = self._log_norm(part, cfg)
            q = torch.as_tensor(shdd.density(c, grid, temperature))
            p = q * torch.exp(base - norm)[:, None] if math.isfinite(base) else torch.zeros_like(q)
            cell = grid.nearest(part["mu"][:, :cfg.neighbours])  # (b, k)
            p.scatter_add_(1, cell, torch.exp(share - norm[:, None]))
            out[part["rows"]] = p.numpy()
        return out

    def fit(self, coeffs, temperature: float, emb, model_latlon, coords, objective: str = "nll",
            weights=(0.05, 0.2, 0.5, 0.8, 0.95), bandwidths_km=(10.0, 25.0, 75.0),
            temperatures=(0.02, 0.05, 0.1), min_gain: float = MIN_GAIN, groups=None) -> dict:
        """Grid search of weight, bandwidth and temperature on validation data by
        ``objective``: "nll" (of p_H) or "median" (median error of :meth:`predict`).
        Retrieval is used (weight > 0) only where the chosen settings' validation median
        beats the model's own by more than ``min_gain`` (relative), and is lower in 95 % of
        resamples of the validation ``groups`` (N,) (regions; default: every place its own):
        a lower NLL can come with a worse median where similar embeddings lie far apart, and
        a gain that rests on a few regions does not carry to others. Otherwise the weight is
        0 and p_H is the model's density. Sets and returns the chosen settings with their
        ``score`` and ``val_median_km``."""
        from locdiff.intervals import median_intervals

        if objective not in ("median", "nll"):
            raise ValueError(f"objective must be 'median' or 'nll', got {objective!r}")
        coords = np.asarray(coords, np.float64)
        groups = np.arange(len(coords)) if groups is None else np.asarray(groups)
        if groups.shape != (len(coords),):
            raise ValueError(f"groups must have one entry per validation place ({len(coords)}), "
                             f"got shape {groups.shape}")
        k = self.config.neighbours
        coeffs = _coefficients(coeffs)
        # Held at once: the fit goes over the same parts once per setting.
        at_mode = list(self._parts(coeffs, temperature, emb, self._points(model_latlon, emb, "model_latlon"), k))
        at_truth = list(self._parts(coeffs, temperature, emb, self._points(coords, emb, "coords"), k,
                                    bandwidths_km)) if objective == "nll" else None

        def errors(cfg):
            return np.asarray(great_circle_km(self._choose(at_mode, cfg, len(emb)), coords))

        def score(cfg):
            return -float(np.mean(self._log_density(at_truth, cfg, len(emb)))) if objective == "nll" \
                else float(np.median(errors(cfg)))

        best = (math.inf, self.config)
        for w, bw, t in itertools.product(weights, bandwidths_km, temperatures):
            cfg = replace(self.config, weight=w, bandwidth_km=bw, temperature=t)
            if (s := score(cfg)) < best[0]:
                best = (s, cfg)
        chosen, own = errors(best[1]), np.asarray(great_circle_km(np.asarray(model_latlon, np.float64), coords))
        val_median = float(np.median(chosen))
        spread = median_intervals({"own": own, "hybrid": chosen}, groups, reference="hybrid")
        robust = spread["own"]["ratio_interval"][1] < 1.0
        if not (clearly_better(val_median, float(np.median(own)), min_gain) and robust):
            off = replace(best[1], weight=0.0)
            val_median = float(np.median(errors(off)))
            best = (val_median if objective == "median" else score(off), off)
        self.config = best[1]
        return {"score": best[0], "val_median_km": val_median, **self.config.to_dict()}
