"""``locdiff.Geolocator``: a trained run as one object that answers "where is this?".

>>> geo = Geolocator.from_run("runs/photos")                 # doctest: +SKIP
>>> ans = geo.predict(["IMG_0001.jpg", "IMG_0002.jpg"], top_k=5)  # doctest: +SKIP
>>> ans.records()[0]["modes"][0]                             # doctest: +SKIP
{'rank': 1, 'lat': 48.86, 'lon': 2.35, 'probability': 0.41, 'country': 'France', ...}

Image files are embedded with the encoder the run records: ``encoder.json`` in the run
folder (copy it there with ``locdiff.encoder.record_encoder``), or else the one beside the
embeddings the run was trained on (``data.embeddings`` in its ``config.json``, which
``locdiff train`` writes), as ``locdiff embed`` leaves it.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np

from locdiff import shdd
from locdiff.answers import LEVELS, answer_first_modes, summarize, top_k_limit
from locdiff.data.files import DataError, embeddings_float32, load_pair, scan_embeddings
from locdiff.encoder import SPEC_FILE, Encoder, read_spec, spec_path_for_embeddings
from locdiff.extras import require
from locdiff.ops.validation import check_int


def find_encoder_spec(run_dir) -> Path | None:
    """The encoder.json a run records (see the module docstring), or None."""
    from locdiff.run import CONFIG_FILE

    run = Path(run_dir)
    if (run / SPEC_FILE).is_file():
        return run / SPEC_FILE
    try:
        data = json.loads((run / CONFIG_FILE).read_text()).get("data", {})
    except (OSError, ValueError, AttributeError):
        return None
    emb = data.get("embeddings") if isinstance(data, dict) else None
    return spec_path_for_embeddings(emb) if emb and Path(emb).exists() else None


def _is_float_array(inputs) -> bool:
    return isinstance(inputs, np.ndarray) and inputs.dtype in (np.float16, np.float32, np.float64) \
        and inputs.ndim == 2


def _is_paths(inputs) -> bool:
    if isinstance(inputs, (str, Path)):
        return True
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and all(isinstance(x, (str, Path)) for x in inputs)


class Geolocator:
    """A run's predictor, its calibrated density temperature and (when recorded) its image
    encoder. Build it with :meth:`from_run`."""

    def __init__(self, predictor, run_dir, encoder_spec: dict | None = None, spec_path=None, device=None,
                 hybrid=None):
        self.predictor, self.run_dir, self.device = predictor, Path(run_dir), device
        self.encoder_spec, self.spec_path, self._encoder = encoder_spec, spec_path, None
        self.hybrid = hybrid

    @classmethod
    def from_run(cls, path, device=None, gallery=None) -> "Geolocator":
        """The run in folder ``path``. ``gallery``: (embeddings (M, D), coordinates (M, 2)) of
        known places (e.g. the training set's) to answer as LocDiff-H, with the settings
        the run calibrated; None: LocDiff."""
        from locdiff.predict import Predictor

        run = Path(path)
        if not run.is_dir():
            raise DataError(f"{run}: run folder not found")
        pred = Predictor.from_run(run, device)
        spec_path = find_encoder_spec(run)
        spec = read_spec(spec_path) if spec_path else None
        if spec is not None and int(spec.get("embedding_dim", -1)) != pred.embedding_dim:
            raise DataError(f"{run}: trained on {pred.embedding_dim}-dimensional embeddings, but its encoder "
                            f"{spec.get('model')} ({spec_path}) gives {spec.get('embedding_dim')}-dimensional ones")
        hybrid = None
        if gallery is not None:
            from locdiff.hybrid import UNFITTED_NOTE, Hybrid, HybridConfig
            from locdiff.run import CONFIG_FILE

            g_emb, g_coords, name = _gallery_arrays(gallery)
            if g_emb.ndim != 2 or g_emb.shape[1] != pred.embedding_dim or g_coords.shape != (len(g_emb), 2):
                raise DataError(f"{name}: embeddings (M, {pred.embedding_dim}) and coordinates (M, 2) expected, "
                                f"got {np.shape(g_emb)} and {np.shape(g_coords)}")
            settings = pred.config.predict.hybrid
            cfg = HybridConfig.of_run(settings, f"{run}/{CONFIG_FILE}")
            if not settings:
                warnings.warn(UNFITTED_NOTE.format(**cfg.to_dict()), stacklevel=2)
            hybrid = Hybrid(g_emb, g_coords, cfg, device=pred.device)
        return cls(pred, run, spec, spec_path, device, hybrid)

    @property
    def temperature(self) -> float:
        """The density temperature the run was calibrated with (validation NLL)."""
        return float(self.predictor.config.predict.temperature)

    @property
    def embedding_dim(self) -> int:
        return int(self.predictor.embedding_dim)

    @property
    def encoder(self) -> Encoder:
        """The run's image encoder, loaded on first use."""
        if self._encoder is None:
            if self.encoder_spec is None:
                raise DataError(f"{self.run_dir}: the run records no image encoder; copy the {SPEC_FILE} that "
                                f"locdiff embed wrote beside the training embeddings into {self.run_dir}")
            self._encoder = Encoder.from_spec(self.encoder_spec, self.device, self.spec_path or SPEC_FILE)
        return self._encoder

    def embed(self, paths, batch_size: int = 32, progress: bool = True):
        """(embeddings (n, D) float32, names of the images read, skipped [(path, reason)]),
        with a progress bar on stderr (``progress``)."""
        from tqdm.auto import tqdm

        from locdiff.images import find_images

        files, _ = find_images([paths] if isinstance(paths, (str, Path)) else paths)
        rows, names, skipped = [], [], []
        with tqdm(total=len(files), unit="image", desc="embedding", disable=not progress) as bar:
            for emb, kept, _, skip in self.encoder.iter_files(files, batch_size):
                rows.append(emb)
                names.extend(str(p) for p in kept)
                skipped.extend((str(p), r) for p, r in skip)
                bar.update(len(kept) + len(skip))
        emb = np.concatenate(rows) if rows else np.empty((0, self.embedding_dim), np.float32)
        return emb, names, skipped

    def predict(self, inputs, top_k: int = 5, density: bool | int = False, geocode: bool | None = None,
                levels=LEVELS, batch_size: int = 32, progress: bool = True, **sampling):
        """:class:`locdiff.answers.Answers` for ``inputs``: embeddings (N, D) or (D,), or image
        files and folders (embedded with the run's encoder; unreadable files are left out and
        listed in ``.skipped``). ``density=True`` keeps each density on ``.grid`` (an int n: the
        first n inputs'). ``sampling``:
        the run's prediction settings to override (``Predictor.predict``); a ``temperature``
        among them is the density's for the probabilities and credible regions too. With the
        run's own settings and no gallery, each level's credible region is the one that held
        that share of the run's validation places (``.masses``: its mass; locdiff.coverage).
        ``progress``: bars while photos are embedded, predicted and answered. ``geocode``: name each mode's country,
        region and place (needs reverse_geocode, of the photos extra); None: where installed."""
        if geocode is None:
            geocode = importlib.util.find_spec("reverse_geocode") is not None
        elif geocode:  # before the predictions, not after them
            require("reverse_geocode", "reverse geocoding (geocode=True; geocode=False leaves it out)")
        cap = top_k_limit(self.predictor.degree)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= cap:
            raise ValueError(f"top_k must be an int in [1, {cap}] (the most separate modes a degree-"
                             f"{self.predictor.degree} run reports), got {top_k!r}")
        top_k = int(top_k)
        check_int(batch_size, "batch_size", note=" (photos embedded at once)")
        t = self.predictor.settings(**sampling)["temperature"]  # checked before any photo is read
        skipped = []
        if _is_paths(inputs):
            emb, names, skipped = self.embed(inputs, batch_size, progress)
            if skipped:
                warnings.warn(f"{len(skipped)} unreadable images left out, e.g. {skipped[0][1]}", stacklevel=2)
        else:
            if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
                raise DataError("no inputs: expected image paths or an (N, D) array with N >= 1")
            try:
                # A float numpy array (a memory map too) is read a batch at a time, not copied.
                emb = inputs if _is_float_array(inputs) else embeddings_float32(inputs)
            except (TypeError, ValueError):
                raise DataError(f"inputs: expected image paths, or an (N, D) array of embeddings, not a mix or "
                                f"{type(inputs).__name__} of other things") from None
            emb = emb[None] if emb.ndim == 1 else emb
            names = [f"row {i}" for i in range(len(emb))]
        if emb.ndim != 2 or emb.shape[1] != self.embedding_dim:
            raise DataError(f"embeddings of shape {tuple(emb.shape)}, but the run {self.run_dir} was trained on "
                            f"{self.embedding_dim}-dimensional ones")
        bad = scan_embeddings(emb)
        if bad:
            raise DataError(f"row {bad[0]} of the embeddings {bad[1]}")
        if len(emb) == 0:
            raise DataError("no image could be read: " + "; ".join(r for _, r in skipped[:3]) if skipped else
                            "no inputs: expected image paths or an (N, D) array with N >= 1")
        out = self.predictor.predict(emb, top_k=top_k, progress=progress, **sampling)
        sep = shdd.default_separation_km(self.predictor.degree)
        if self.hybrid is None:
            latlon, cells = out["latlon"], None
            modes = answer_first_modes(latlon, out["topk_latlon"], sep)
        else:
            # LocDiff-H: its answer, its ranking of the modes and gallery places, and its
            # density for the basins' probabilities and the credible regions.
            c, h = out["coeffs"], self.hybrid
            latlon = h.predict(c, t, emb, out["latlon"], progress=progress)
            modes = h.top_k(c, t, emb, out["latlon"], out["topk_latlon"], top_k, sep, answer=latlon,
                            progress=progress)
            cells = lambda rows, grid: h.grid_probabilities(c[rows], t, emb[rows], grid)  # noqa: E731
        ans = summarize(out["coeffs"], modes, t, latlon=latlon, names=names, levels=levels, geocode=geocode,
                        density=density, cell_probabilities=cells,
                        coverage=self.predictor.credible(**sampling) if self.hybrid is None else {},
                        progress=progress)
        ans.skipped = skipped
        return ans


def _gallery_arrays(gallery) -> tuple[np.ndarray, np.ndarray, str]:
    """(embeddings float32, coordinates float64, the name errors give them) of a gallery
    given as two arrays, or as the paths of an embeddings file (``.npy`` or a folder of
    shards) and a coordinates file (CSV or ``.npy``), read as ``--gallery-embeddings`` /
    ``--gallery-coords`` are."""
    if not isinstance(gallery, (tuple, list)) or len(gallery) != 2:
        raise DataError(f"gallery: expected (embeddings, coordinates), arrays or file paths, got "
                        f"{type(gallery).__name__}")
    emb, coords = gallery
    if isinstance(emb, (str, Path)) != isinstance(coords, (str, Path)):
        raise DataError("gallery: give both embeddings and coordinates as arrays, or both as file paths")
    name = "gallery"
    if isinstance(emb, (str, Path)):
        name = f"gallery {emb}"
        emb, coords = load_pair(emb, coords)
    try:
        return np.asarray(emb, np.float32), np.asarray(coords, np.float64), name
    except (TypeError, ValueError) as err:
        raise DataError(f"gallery: embeddings and coordinates must be numeric arrays ({err})") from None
