"""Nearest neighbours in embedding space: the k-NN location (1-NN, softmax-weighted 10-NN)
and a k-NN von Mises-Fisher mixture density whose settings are chosen on validation data.

>>> import numpy as np
>>> emb = np.eye(3, dtype=np.float32); coords = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
>>> knn_predict(emb, coords, emb[:1], k=1).round(6).tolist()
[[0.0, 0.0]]
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from locdiff.baselines.rows import float_rows
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon
from locdiff.metrics import check_latlon
from locdiff.ops.validation import check_int
from locdiff.top_answers import check_top_k_args, separated_top_k


# Rows converted, checked and normalised at a time: a multi-million-row float16 gallery went
# through two whole float32 copies and a whole-array finiteness mask (5x its file at peak).
UNIT_ROWS_CHUNK = 1 << 16


def _unit_rows(a, name: str, offset: int = 0, zero_rows: bool = False) -> torch.Tensor:
    """Rows of ``a`` (N, D) as one float32 tensor of unit rows, filled chunk by chunk from any
    array (a read-only memory map too: it is never shared with torch) or tensor; the errors
    of :func:`float_rows`, and a ValueError naming a zero row: a query with no direction,
    whose neighbours would all tie. ``zero_rows``: keep them as zeros instead (a gallery
    entry no query resembles)."""
    t = torch.empty((len(a), np.shape(a)[1]), dtype=torch.float32)
    for i in range(0, len(a), UNIT_ROWS_CHUNK):
        rows = t[i:i + UNIT_ROWS_CHUNK]
        rows.numpy()[...] = float_rows(a[i:i + UNIT_ROWS_CHUNK], name, offset + i)
        norm = rows.norm(dim=1, keepdim=True)
        # Squares of float32 values below about 1e-19 underflow: such rows are scaled in float64.
        tiny = torch.nonzero(norm[:, 0] < 1e-15)[:, 0]
        if len(tiny):
            small = rows[tiny].double()
            small_norm = small.norm(dim=1, keepdim=True)
            if not zero_rows and bool((small_norm == 0).any()):
                row = int(tiny[torch.nonzero(small_norm[:, 0] == 0)[0]])
                raise ValueError(f"{name} row {offset + i + row} is a zero vector: it has no direction to compare "
                                 "by cosine similarity")
            rows[tiny] = (small / small_norm.clamp_min(1e-300)).float()
            norm[tiny] = 1.0
        rows.div_(norm)
    return t


def _check_mixture_args(k, temperature, kappa=None) -> None:
    """ValueError naming the first of ``k`` (int >= 1), ``temperature`` (> 0) and ``kappa``
    (>= 0, 0 being the uniform density) that is out of range: k = 0 gives no density,
    temperature 0 NaN weights, and a negative temperature favours dissimilar places."""
    check_int(k, "k")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float, np.number))
                                             and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if kappa is not None and (isinstance(kappa, bool) or not (isinstance(kappa, (int, float, np.number))
                                                              and math.isfinite(kappa) and kappa >= 0)):
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")


# Similarities held at once in a search (floats, 256 MB): blocks of the gallery keep a
# multi-million-row gallery's search within it, whatever the query batch.
MAX_BLOCK = 1 << 26
# Results kept for queries searched again (LocDiff-H's answer, ranking and scores each
# search the same rows): at most this many (row, neighbour) pairs, 12 bytes each (400 MB),
# so a command's passes search a million queries' 32 neighbours once.
CACHE_PAIRS = 1 << 25


class NeighbourIndex:
    """Cosine-similarity search over a gallery of (embedding, location) pairs, ``batch``
    queries at a time against blocks of the gallery (at most MAX_BLOCK similarities held),
    the results of recent searches kept for the same queries (CACHE_PAIRS). ``device``: where
    the gallery is held and searched (a GPU, for multi-million-row galleries); results come
    back on the CPU."""

    def __init__(self, emb, coords, batch: int = 2048, device=None):
        from locdiff.ops.validation import check_device

        self.device = check_device(device or "cpu")
        if np.ndim(emb) != 2 or len(emb) == 0:
            raise ValueError(f"gallery embeddings must have shape (M, D) with M >= 1, got {np.shape(emb)}")
        coords = check_latlon(coords, "gallery coordinates", rows=len(emb))
        self.emb = _unit_rows(emb, "gallery embeddings", zero_rows=True).to(self.device)
        self.xyz = torch.as_tensor(latlon_to_xyz(coords))
        self.batch = batch
        self._cache: dict = {}
        self._cached_pairs = 0

    def __len__(self) -> int:
        return self.emb.shape[0]

    def search(self, query, k: int):
        """``(similarity (N, k) float32, index (N, k) int64)``, most similar first."""
        if np.ndim(query) != 2 or np.shape(query)[1] != self.emb.shape[1]:
            raise ValueError(f"query embeddings must have shape (N, {self.emb.shape[1]}) like the gallery's, "
                             f"got {tuple(np.shape(query))}")
        k = min(int(k), len(self))
        sims, idxs = [], []
        for i in range(0, len(query), self.batch):
            q = _unit_rows(query[i:i + self.batch], "query embeddings", i)
            s, j = self._search_cached(q, k)
            sims.append(s)
            idxs.append(j)
        if not sims:  # no queries
            return torch.empty((0, k)), torch.empty((0, k), dtype=torch.int64)
        return torch.cat(sims), torch.cat(idxs)

    def _search_cached(self, q: torch.Tensor, k: int):
        key = (hashlib.blake2b(q.numpy().tobytes(), digest_size=16).digest(), tuple(q.shape))
        hit = self._cache.get(key)
        if hit is not None and hit[0].shape[1] >= k:
            return hit[0][:, :k], hit[1][:, :k]
        s, j = self._search_blocks(q.to(self.device), k)
        s, j = s.cpu(), j.cpu()
        if q.shape[0] * k <= CACHE_PAIRS:
            if self._cached_pairs + q.shape[0] * k > CACHE_PAIRS:
                self._cache.clear()
                self._cached_pairs = 0
            self._cache[key] = (s, j)
            self._cached_pairs += q.shape[0] * k
        return s, j

    def _search_blocks(self, q: torch.Tensor, k: int):
        block = max(k, MAX_BLOCK // max(len(q), 1))
        best_s = best_j = None
        for g in range(0, len(self), block):
            s, j = (q @ self.emb[g:g + block].T).topk(min(k, len(self) - g), dim=1)
            j += g
            if best_s is not None:  # merge with the blocks before: the k best of both
                s, top = torch.cat([best_s, s], 1).topk(k, dim=1)
                j = torch.cat([best_j, j], 1).gather(1, top)
            best_s, best_j = s, j
        return best_s, best_j


def knn_predict(train_emb, train_coords, query_emb, k: int = 10, temperature: float = 0.05,
                index: NeighbourIndex | None = None) -> np.ndarray:
    """The k nearest training locations (cosine similarity of embeddings), averaged on the
    sphere with softmax(similarity / temperature) weights; k = 1 is the nearest one's
    location. Returns ``(N, 2)`` (lat, lon)."""
    _check_mixture_args(k, temperature)
    index = index or NeighbourIndex(train_emb, train_coords)
    sim, idx = index.search(query_emb, k)
    w = torch.softmax(sim.double() / temperature, 1)
    return xyz_to_latlon((w[..., None] * index.xyz[idx]).sum(1)).numpy()


def knn_top_k(train_emb, train_coords, query_emb, k: int = 5, min_separation_km: float = 1000.0,
              pool: int = 64, index: NeighbourIndex | None = None) -> np.ndarray:
    """The k most similar of the ``pool`` nearest training places that lie
    ``min_separation_km`` apart (1-NN's answer first) -> ``(N, k, 2)``, NaN where fewer."""
    k, sep = check_top_k_args(k, min_separation_km)
    index = index or NeighbourIndex(train_emb, train_coords)
    sim, idx = index.search(query_emb, max(pool, k))
    return separated_top_k(index.xyz[idx], sim, k, sep)


def log_vmf_mixture(x: torch.Tensor, centres: torch.Tensor, log_w: torch.Tensor, kappa: float) -> torch.Tensor:
    """log of ``sum_j w_j vMF(x; mu_j, kappa)`` per steradian: x (B, P, 3), centres (B, k, 3),
    log_w (B, k) -> (B, P). The normaliser ``kappa / (2 pi (1 - exp(-2 kappa)))`` times
    ``exp(kappa (mu.x - 1))`` stays finite for any kappa; kappa = 0 is the uniform density."""
    _check_mixture_args(1, 1.0, kappa)
    if kappa == 0:
        log_c = -math.log(4 * math.pi)
    else:  # expm1 keeps 1 - exp(-2 kappa) exact for tiny kappa, where it tends to 2 kappa
        log_c = math.log(kappa) - math.log(2 * math.pi) - math.log(-math.expm1(-2 * kappa))
    dots = x @ centres.transpose(1, 2)  # (B, P, k)
    return torch.logsumexp(log_w[:, None, :] + kappa * (dots - 1), -1) + log_c


class KnnDensity:
    """A von Mises-Fisher mixture over the ``k`` nearest gallery locations of each query,
    weighted by softmax(similarity / ``temperature``), concentration ``kappa``
    (bandwidth ``1 / sqrt(kappa)`` radians). :meth:`fit` chooses the three on validation
    data by NLL.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> emb = rng.normal(size=(200, 8)).astype(np.float32); coords = rng.uniform(-60, 60, (200, 2))
    >>> d = KnnDensity(emb, coords, k=5, temperature=0.1, kappa=100.0)
    >>> d.log_density_at(emb[:3], coords[:3]).shape
    (3,)
    """

    def __init__(self, emb, coords, k: int = 10, temperature: float = 0.05, kappa: float = 1000.0,
                 index: NeighbourIndex | None = None):
        _check_mixture_args(k, temperature, kappa)
        self.index = index or NeighbourIndex(emb, coords)
        self.k, self.temperature, self.kappa = int(k), float(temperature), float(kappa)

    def _mixture(self, query):
        sim, idx = self.index.search(query, self.k)
        log_w = torch.log_softmax(sim.double() / self.temperature, 1)
        return self.index.xyz[idx], log_w

    def log_density_at(self, query, latlon) -> np.ndarray:
        """log density (per steradian) of each query's mixture at its ``latlon`` -> (N,)."""
        centres, log_w = self._mixture(query)
        x = torch.as_tensor(latlon_to_xyz(check_latlon(latlon, "latlon", rows=len(centres))))[:, None, :]
        return log_vmf_mixture(x, centres, log_w, self.kappa)[:, 0].numpy()

    def top_k(self, query, k: int = 5, min_separation_km: float = 1000.0) -> np.ndarray:
        """The mixture's k highest peaks ``min_separation_km`` apart -> ``(N, k, 2)``: its
        centres ranked by the density there (at the bandwidths :meth:`fit` chooses, each
        peak lies on a centre), NaN where fewer."""
        k, sep = check_top_k_args(k, min_separation_km)
        centres, log_w = self._mixture(query)
        return separated_top_k(centres, log_vmf_mixture(centres, centres, log_w, self.kappa), k, sep)

    def grid_probabilities(self, query, grid) -> np.ndarray:
        """Cell probabilities ``(N, G)`` on a :class:`locdiff.grids.Grid` (density x area,
        normalised over the grid); cells far from every neighbour underflow to 0, so rank
        cells by :meth:`grid_log_probabilities`."""
        return np.exp(self.grid_log_probabilities(query, grid))

    def grid_log_probabilities(self, query, grid) -> np.ndarray:
        """log of :meth:`grid_probabilities`, in float64 and never -inf: at small bandwidths
        the exponents of cells far from every neighbour span thousands of nats, and in
        exp form those cells would tie at 0 (the RvA would rank them as one)."""
        centres, log_w = self._mixture(query)
        out = np.empty((len(query), grid.size))
        cells, log_area = grid.xyz.double(), grid.area.double().log()
        for i in range(0, len(query), 8):
            c, lw = centres[i:i + 8], log_w[i:i + 8]
            b, k = lw.shape
            z = torch.mm(cells, (self.kappa * c).reshape(-1, 3).T.double()).view(-1, b, k) + (lw - self.kappa)
            logp = torch.logsumexp(z, 2).T + log_area
            out[i:i + b] = (logp - torch.logsumexp(logp, 1, keepdim=True)).numpy()
        return out

    def fit(self, val_emb, val_coords, ks=(5, 10, 20, 50), temperatures=(0.01, 0.02, 0.05, 0.1, 0.2),
            bandwidths_km=(10, 25, 50, 100, 200, 400, 800)) -> "KnnDensity":
        """Choose ``k``, ``temperature`` and ``kappa`` by the lowest validation NLL (grid search)."""
        sim, idx = self.index.search(val_emb, max(ks))
        x = torch.as_tensor(latlon_to_xyz(np.asarray(val_coords, np.float64)))[:, None, :]
        best = (math.inf, None)
        for k in ks:
            for t in temperatures:
                log_w = torch.log_softmax(sim[:, :k].double() / t, 1)
                centres = self.index.xyz[idx[:, :k]]
                for bw in bandwidths_km:
                    kappa = (EARTH_RADIUS_KM / bw) ** 2
                    nll = -float(log_vmf_mixture(x, centres, log_w, kappa).mean())
                    if nll < best[0]:
                        best = (nll, (k, t, kappa))
        self.k, self.temperature, self.kappa = best[1]
        return self
