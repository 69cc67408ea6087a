"""Prediction with a trained CS-UNet: the vector describing each input's distribution over
the sphere (by the density head in one network call, or by averaging DDIM / DDPM samples),
its mode (optionally coarse to fine), top-k modes, and individual samples.

>>> pred = Predictor.from_run("runs/demo")               # doctest: +SKIP
>>> out = pred.predict(embeddings, top_k=3)              # doctest: +SKIP
>>> out["latlon"].shape, out["topk_latlon"].shape       # doctest: +SKIP
((N, 2), (N, 3, 2))
>>> pred.predict(embeddings, sampler="ddpm", samples=16)  # doctest: +SKIP
"""
from __future__ import annotations

import math

import numpy as np
import torch

from locdiff import grids, shdd
from locdiff.data.files import constant_embeddings, embeddings_float32, embeddings_ok, first_bad_embedding
from locdiff.devices import resolve_device
from locdiff.ops import validation
from locdiff.ops.validation import check_int
from locdiff.diffusion import guided, sample_ddim, sample_ddpm, split_prediction
from locdiff.run import MODES, SAMPLERS, load_model
from locdiff.ranges import MAX_GUIDANCE


# Grids for the density's mode: the band-limited projection of softmax(f / t) is taken by
# quadrature, which must resolve the softmax's lobe. On a grid of 2x the decode resolution an
# exact L = 16 SHDD's answer moved 6 km (median) at f0 / t = 11.5, 66 km at 40; at
# max(4, 1.2 sqrt(f0 / t)) x, under 1 km. Gauss-Legendre rings keep it so at the poles
# (docs/model.md, "Point predictions").
MIN_MODE_OVERSAMPLE, MAX_MODE_OVERSAMPLE = 4.0, 8.0
DENSITY_CHUNK_BYTES = 1 << 29


def density_mode_grid(degree: int, temperature: float):
    """The grid on which :meth:`Predictor.locate` projects ``softmax(f / temperature)``, or
    None when the density is so sharp (f0 / t above 44) that its mode is f's own."""
    sharpness = shdd.exact_peak(degree) / temperature
    oversample = max(MIN_MODE_OVERSAMPLE, 1.2 * math.sqrt(sharpness))
    return None if oversample > MAX_MODE_OVERSAMPLE else grids.for_degree(degree, "gauss_legendre", oversample=oversample)


MAX_SEED = 2**31 - 1
# The prediction settings a call may override: those that make the vectors, then those that
# read them; and the ones each sampler does not read.
SAMPLING = ("sampler", "steps", "samples", "guidance", "eta")
SETTINGS = (*SAMPLING, "coarse_degree", "temperature", "mode_of")
IGNORED_BY_SAMPLER = {"density": ("steps", "samples", "eta"), "ddpm": ("steps", "eta"), "ddim": ()}


def check_seed(seed, most: int = MAX_SEED, shown: str | None = None) -> int:
    """``seed`` if it is an int in [0, ``most``] (written ``shown`` in the error), else a
    ValueError naming it. :meth:`Predictor.sample` and :meth:`Predictor.coefficients` take a
    batch's seed (:func:`batch_seed`), up to 2^63 - 1."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= most:
        raise ValueError(f"seed must be an int in [0, {shown or most}], got {seed!r}")
    return int(seed)


def _generator_seed(seed) -> int:
    return check_seed(seed, 2**63 - 1, "2^63 - 1")


def batch_seed(seed: int, start: int) -> int:
    """The seed of the prediction batch whose first row is ``start``: ``start`` itself for
    seed 0, else a 32-bit mix of both (torch's CPU generator keeps 32 bits of a seed)."""
    if seed == 0:
        return int(start)
    return int(np.random.SeedSequence([int(seed), int(start)]).generate_state(1)[0])


class Predictor:
    """Wraps a network and its :class:`locdiff.run.RunConfig` for batched prediction. Every
    setting of ``config.predict`` can be overridden per call."""

    def __init__(self, net, config, device="cpu"):
        self.net, self.config, self.device = net.eval(), config, validation.check_device(device)
        self.schedule = config.diffusion.make_schedule().to(self.device)

    @classmethod
    def from_run(cls, run_dir, device: str | None = None, ema: bool = True) -> "Predictor":
        dev = resolve_device(device)
        net, config, _ = load_model(run_dir, dev, ema=ema)
        return cls(net, config, dev)

    @property
    def degree(self) -> int:
        return self.config.model.degree

    @property
    def embedding_dim(self) -> int:
        return self.config.model.emb_dim

    def settings(self, **overrides) -> dict:
        """The run's prediction settings with ``overrides`` (None: the run's own), checked:
        a ValueError names the first one out of range."""
        s = {k: getattr(self.config.predict, k) for k in SETTINGS}
        unknown = sorted(set(overrides) - set(s))
        if unknown:
            raise TypeError(f"unknown prediction setting {unknown[0]!r}; expected one of {sorted(s)}")
        s.update({k: v for k, v in overrides.items() if v is not None})
        if s["sampler"] not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {s['sampler']!r}")
        if "sampler" in overrides:  # (a call that samples)
            self._check_sampler(s["sampler"])
        if s["mode_of"] not in MODES:
            raise ValueError(f"mode_of must be one of {MODES}, got {s['mode_of']!r}")
        for name in ("steps", "samples"):
            check_int(s[name], name)
        if s["sampler"] == "ddim" and s["steps"] > len(self.schedule):
            raise ValueError(f"steps must be in [1, {len(self.schedule)}] for DDIM (the run's diffusion timesteps), "
                             f"got {s['steps']}")
        for name, lo, hi in (("guidance", -MAX_GUIDANCE, MAX_GUIDANCE), ("eta", 0.0, 1.0)):
            v = s[name]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not (
                    math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {v!r}")
        cd = s["coarse_degree"]
        if cd is not None and (isinstance(cd, bool) or not isinstance(cd, (int, np.integer))
                               or not 1 <= cd < self.degree):
            raise ValueError(f"coarse_degree must be None or an int in [1, {self.degree - 1}] (below the run's "
                             f"degree), got {cd!r}")
        t = s["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)):
            raise ValueError(f"temperature must be a number, got {t!r}")
        s["temperature"] = shdd.check_temperature(t)
        return s

    def credible(self, **overrides) -> dict:
        """The run's credible-region record for LocDiff's density (:mod:`locdiff.coverage`,
        written by calibration) under these prediction settings, or {} (nominal masses) where
        they differ from the run's own: calibration saw only those."""
        s, own = self.settings(**overrides), self.settings()
        used = [k for k in (*SAMPLING, "temperature") if k not in IGNORED_BY_SAMPLER[s["sampler"]]]
        if any(s[k] != own[k] for k in used):
            return {}
        return self.config.predict.credible.get("locdiff", {})

    def _check_sampler(self, sampler: str) -> None:
        mc, dc = self.config.model, self.config.diffusion
        if sampler == "density" and mc.density_head and dc.kl_weight == 0:
            raise ValueError("sampler 'density' reads the run's density head, which it never trained "
                             "(model.density_head with diffusion.kl_weight = 0, as earlier locdiff versions allowed); "
                             "use sampler 'ddim' or 'ddpm'")

    @property
    def conditional(self) -> bool:
        """False for a run trained without embeddings (``model.conditional``): its methods take
        ``emb=None``, one input, the distribution of locations it learned."""
        return self.config.model.conditional

    def inputs(self, emb):
        """``emb`` checked against the kind of run: an unconditional run takes None (its one
        input, the constant 1, :func:`locdiff.data.files.constant_embeddings`), a conditional
        run embeddings; a ValueError otherwise."""
        if emb is None:
            if self.conditional:
                raise ValueError("embeddings are needed: this run was trained on embeddings (model.conditional); "
                                 "emb=None is for a run trained without them")
            return constant_embeddings(1)
        return emb

    def _embeddings(self, emb) -> torch.Tensor:
        emb = torch.from_numpy(embeddings_float32(self.inputs(emb))).to(self.device)
        if emb.ndim != 2 or emb.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings have shape {tuple(emb.shape)}, the model expects "
                             f"(N, {self.embedding_dim})")
        if not embeddings_ok(emb):
            row, what = first_bad_embedding(emb.cpu().numpy())
            raise ValueError(f"embeddings row {row} {what}")
        if not self.conditional and not bool((emb == 1).all()):
            raise ValueError("this run was trained without embeddings (model.conditional = False): give emb=None, "
                             "or rows of the constant 1")
        return emb

    @torch.no_grad()
    def _last_step(self, emb: torch.Tensor, guidance: float, gen) -> torch.Tensor:
        """The density head (or the clean-vector estimate without one) at the last timestep,
        from pure noise; with guidance, ``(1 + w) cond - w uncond`` of it."""
        dc, mc = self.config.diffusion, self.config.model
        b = emb.shape[0]
        x = torch.randn(b, mc.dim, generator=gen, device=self.device)
        t = torch.full((b,), len(self.schedule) - 1, device=self.device, dtype=torch.long)

        def call(drop):
            if mc.density_head:
                return self.net(x, t, emb, drop=drop, density_rows=b)[1].float()
            out = self.net(x, t, emb, drop=drop).float()
            return split_prediction(out, x, self.schedule.abar(t), dc.prediction)[0]
        out = call(None)
        if guidance:
            out = (1 + guidance) * out - guidance * call(torch.ones(b, dtype=torch.bool, device=self.device))
        return out / dc.scale

    def check_sample_memory(self, rows: int, samples: int, name: str, hint: str) -> None:
        """MemoryError (naming ``name``, suggesting ``hint``) before :meth:`sample` draws
        ``samples`` vectors for each of ``rows`` inputs in one call where they cannot fit:
        the noise, the state and the outputs, three (rows x samples, K) float32 arrays."""
        validation.check_allocation((3, rows * samples, self.config.model.dim), torch.float32, self.device, name,
                                    hint=hint)

    @torch.no_grad()
    def sample(self, emb, sampler: str | None = None, steps: int | None = None, samples: int | None = None,
               guidance: float | None = None, eta: float | None = None, seed: int = 0) -> torch.Tensor:
        """Individual SHDD vectors drawn by DDIM or DDPM: ``(B, samples, (L+1)^2)`` float32 on
        the CPU, on the scale of ``shdd.encode``."""
        s = self.settings(sampler=sampler, steps=steps, samples=samples, guidance=guidance, eta=eta)
        if s["sampler"] == "density":
            raise ValueError("sample() draws with sampler 'ddim' or 'ddpm'; 'density' is not a sampler of "
                             "individual vectors")
        emb = self._embeddings(emb)
        dc = self.config.diffusion
        self.check_sample_memory(emb.shape[0], s["samples"], f"{emb.shape[0]} rows x samples={s['samples']}",
                                 "use fewer samples or rows per call")
        gen = torch.Generator(self.device).manual_seed(_generator_seed(seed))
        rep = emb.repeat_interleave(s["samples"], 0)
        x = torch.randn(rep.shape[0], self.config.model.dim, generator=gen, device=self.device)
        model = guided(self.net, rep, s["guidance"])
        if s["sampler"] == "ddpm":
            out = sample_ddpm(model, x, self.schedule, prediction=dc.prediction, generator=gen)
        else:
            out = sample_ddim(model, x, self.schedule, steps=s["steps"], eta=s["eta"], prediction=dc.prediction,
                              generator=gen)
        return (out.float() / dc.scale).reshape(emb.shape[0], s["samples"], -1).cpu()

    def draw(self, emb, n: int, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
             eta: float | None = None, seed: int = 0, progress: bool = False) -> np.ndarray:
        """``n`` locations drawn from each input's distribution: ``(B, n, 2)`` (lat, lon) in
        degrees, the point of each vector that DDIM or DDPM draws (the maximum of its f). The
        run's sampler where it draws, else DDIM. Drawn in batches of about ``predict.batch_size``
        vectors, each seeded by :func:`batch_seed` (seed, its first draw's index over all rows):
        the same seed, ``n`` and batch size give the same draws."""
        from tqdm.auto import tqdm

        check_int(n, "n", 1)
        check_seed(seed)
        sampler = sampler or (self.config.predict.sampler if self.config.predict.sampler != "density" else "ddim")
        rows = embeddings_float32(self.inputs(emb))
        self._embeddings(rows)  # every row checked before any draw
        validation.check_allocation((len(rows), n, 2), torch.float64, torch.device("cpu"),
                                    f"{len(rows)} rows x n={n} draws", hint="draw fewer locations at a time")
        out = np.empty((len(rows), n, 2))
        per = self.config.predict.batch_size
        block, chunk = (max(1, per // n), n) if n <= per else (1, per)  # rows, then draws a batch
        batches = [(i, j) for i in range(0, len(rows), block) for j in range(0, n, chunk)]
        for i, j in tqdm(batches, desc="drawing", unit="batch", disable=not progress):
            m = min(chunk, n - j)
            v = self.sample(rows[i:i + block], sampler=sampler, steps=steps, samples=m, guidance=guidance,
                            eta=eta, seed=batch_seed(seed, i * n + j))
            out[i:i + block, j:j + m] = np.asarray(shdd.decode(v.reshape(-1, v.shape[-1]).double())).reshape(
                len(v), m, 2)
        return out

    @torch.no_grad()
    def coefficients(self, emb, seed: int = 0, **overrides) -> torch.Tensor:
        """The vector describing each input's predicted distribution ``(B, (L+1)^2)`` float32
        on the CPU: the density head at the last step (sampler "density"), or the mean of
        the sampled vectors."""
        s = self.settings(**overrides)
        if s["sampler"] == "density":
            self._check_sampler("density")
            gen = torch.Generator(self.device).manual_seed(_generator_seed(seed))
            return self._last_step(self._embeddings(emb), s["guidance"], gen).cpu()
        return self.sample(emb, seed=seed, **{k: s[k] for k in SAMPLING}).mean(1)

    def locate(self, coeffs, coarse_degree: int | None = None, mode_of: str | None = None,
               temperature: float | None = None) -> np.ndarray:
        """The mode of each vector ``(B, 2)``. ``mode_of="density"``: the mode of the density
        ``softmax(f / temperature)`` band-limited to the run's degree (the point with the most
        probability nearby); ``"function"``: the maximum of f itself. With ``coarse_degree``,
        the maximum that ascent on the full vector reaches from the mode of its truncation to
        that degree (the basin that holds the most mass at the coarse scale)."""
        s = self.settings(mode_of=mode_of, temperature=temperature, coarse_degree=coarse_degree)
        c = torch.as_tensor(coeffs).double()
        grid = density_mode_grid(self.degree, s["temperature"]) if s["mode_of"] == "density" else None
        if grid is not None:
            # Rows per chunk so that the (rows, grid) densities and their temporaries stay
            # within DENSITY_CHUNK_BYTES: at high degree the grid holds millions of points.
            step = max(1, min(256, DENSITY_CHUNK_BYTES // (3 * 8 * grid.size)))
            smooth = torch.empty_like(c)  # (filled in place: docs/evaluation.md, "Memory on large sets")
            for i in range(0, len(c), step):
                p = shdd.density(c[i:i + step], grid, s["temperature"])
                smooth[i:i + step] = shdd.project(p, self.degree, grid)
            c = smooth
        cd = s["coarse_degree"]
        if cd is None or cd >= self.degree:
            return np.asarray(shdd.decode(c))
        start = shdd.decode(c[:, :(cd + 1) ** 2])
        return np.asarray(shdd.ascend(c, start)[0])

    def predict(self, emb, top_k: int = 0, progress: bool = False, coeffs: bool = True, seed: int = 0,
                part: slice | None = None, **overrides) -> dict:
        """``{"latlon": (N, 2), "coeffs": (N, K)}`` numpy arrays (``coeffs=False``: without
        the vectors, K floats a row, which the answers alone do not need), plus ``"topk_latlon"``
        (N, k, 2) and ``"topk_values"`` (N, k) when ``top_k`` > 0: the function's distinct
        modes by height (:func:`locdiff.shdd.top_k`; the answer, the density's mode, need not be
        the first: ``locdiff.answers.answer_first_modes`` puts it there as the CLI does).
        Batched by the config's ``batch_size``; ``emb`` may be a memory-mapped array.
        ``overrides``: any setting of :class:`locdiff.run.PredictConfig` (sampler, steps,
        samples, guidance, eta, coarse_degree, mode_of, temperature). ``seed``: the noise of
        the batch from row i is drawn from :func:`batch_seed` (seed, i): the same file, batch
        size and seed give the same answers, another seed an independent draw. ``part``: the
        rows ``start:stop`` of ``emb`` alone (``start`` a multiple of ``batch_size``), batched and
        seeded as in the whole; N is then their number."""
        from tqdm.auto import tqdm

        check_int(top_k, "top_k", 0, note=" (0: no further modes)")
        check_seed(seed)
        emb = self.inputs(emb)
        s = self.settings(**overrides)
        bs = self.config.predict.batch_size
        lo, hi, step = (part or slice(0, len(emb))).indices(len(emb))
        if step != 1:
            raise ValueError(f"part must be a slice of consecutive rows (step 1), got {part!r}")
        if lo % bs and lo < hi:
            raise ValueError(f"part must start at a multiple of predict.batch_size ({bs}), got {part!r}")
        n = max(0, hi - lo)
        # The outputs are filled in place (docs/evaluation.md, "Memory on large sets").
        out = {"latlon": np.empty((n, 2))}
        if coeffs:
            out["coeffs"] = np.empty((n, self.config.model.dim), np.float32)
        if top_k:
            out["topk_latlon"], out["topk_values"] = np.empty((n, top_k, 2)), np.empty((n, top_k))
        for i in tqdm(range(0, n, bs), desc="predicting", unit="batch", disable=not progress):
            rows = emb[lo + i:min(lo + i + bs, hi)]  # (read and cast in coefficients)
            c = self.coefficients(rows, seed=batch_seed(seed, lo + i), **{k: s[k] for k in SAMPLING})
            if coeffs:
                out["coeffs"][i:i + bs] = c.numpy()
            out["latlon"][i:i + bs] = self.locate(c, s["coarse_degree"], s["mode_of"], s["temperature"])
            if top_k:
                tl, tv = shdd.top_k(c.double(), top_k)
                out["topk_latlon"][i:i + bs], out["topk_values"][i:i + bs] = np.asarray(tl), np.asarray(tv)
        return out
