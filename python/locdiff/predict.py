"""Prediction: sample SHDD vectors with a trained CS-UNet, aggregate them, and decode the
location (mode), top-k modes and densities with ``locdiff.shdd``.

>>> pred = Predictor.from_run("runs/demo")               # doctest: +SKIP
>>> out = pred.predict(embeddings, top_k=3)              # doctest: +SKIP
>>> out["latlon"].shape, out["topk_latlon"].shape       # doctest: +SKIP
((N, 2), (N, 3, 2))
"""
from __future__ import annotations

import numpy as np
import torch

from locdiff.diffusion import guided, sample_ddim, sample_ddpm


class Predictor:
    """Wraps a network and its :class:`locdiff.train.RunConfig` for batched prediction."""

    def __init__(self, net, config, device="cpu"):
        self.net, self.config, self.device = net.eval(), config, torch.device(device)
        self.schedule = config.diffusion.make_schedule().to(self.device)

    @classmethod
    def from_run(cls, run_dir, device: str | None = None, ema: bool = True) -> "Predictor":
        from locdiff.train import load_model, resolve_device

        dev = resolve_device(device)
        net, config, _ = load_model(run_dir, dev, ema=ema)
        return cls(net, config, dev)

    @property
    def degree(self) -> int:
        return self.config.model.degree

    @property
    def embedding_dim(self) -> int:
        return self.config.model.emb_dim

    @torch.no_grad()
    def coefficients(self, emb, samples: int | None = None, steps: int | None = None,
                     guidance: float | None = None, sampler: str = "ddim", seed: int = 0) -> torch.Tensor:
        """Mean of ``samples`` sampled SHDD vectors per row of ``emb`` (B, D): ``(B, (L+1)^2)``
        float32 on the CPU, on the SHDD scale of ``shdd.encode``."""
        pc, dc = self.config.predict, self.config.diffusion
        samples = pc.samples if samples is None else samples
        steps = pc.steps if steps is None else steps
        guidance = pc.guidance if guidance is None else guidance
        emb = torch.from_numpy(np.array(emb, np.float32)).to(self.device)
        if emb.ndim != 2 or emb.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings have shape {tuple(emb.shape)}, the model expects "
                             f"(N, {self.embedding_dim})")
        gen = torch.Generator(self.device).manual_seed(seed)
        b = emb.shape[0]
        # Samples of one input run side by side in one batch (repeat_interleave), then average.
        rep = emb.repeat_interleave(samples, 0)
        x = torch.randn(rep.shape[0], self.config.model.dim, generator=gen, device=self.device)
        model = guided(self.net, rep, guidance)
        if sampler == "ddpm":
            out = sample_ddpm(model, x, self.schedule, prediction=dc.prediction, generator=gen)
        else:
            out = sample_ddim(model, x, self.schedule, steps=steps, eta=pc.eta, prediction=dc.prediction,
                              generator=gen)
        return (out.float() / dc.scale).reshape(b, samples, -1).mean(1).cpu()

    def predict(self, emb, top_k: int = 0, samples: int | None = None, steps: int | None = None,
                guidance: float | None = None, progress: bool = False) -> dict:
        """``{"latlon": (N, 2), "coeffs": (N, K)}`` numpy arrays, plus ``"topk_latlon"``
        (N, k, 2) and ``"topk_values"`` (N, k) when ``top_k`` > 0. Batched by the config's
        ``batch_size``; ``emb`` may be a memory-mapped array."""
        from tqdm.auto import tqdm

        from locdiff import shdd

        n = len(emb)
        bs = self.config.predict.batch_size
        coeffs, lls, tks, tvs = [], [], [], []
        for i in tqdm(range(0, n, bs), desc="predicting", unit="batch", disable=not progress):
            c = self.coefficients(np.asarray(emb[i:i + bs], np.float32), samples, steps, guidance)
            coeffs.append(c.numpy())
            lls.append(np.asarray(shdd.decode(c.double())))
            if top_k:
                tl, tv = shdd.top_k(c.double(), top_k)
                tks.append(np.asarray(tl))
                tvs.append(np.asarray(tv))
        out = {"latlon": np.concatenate(lls), "coeffs": np.concatenate(coeffs)}
        if top_k:
            out["topk_latlon"], out["topk_values"] = np.concatenate(tks), np.concatenate(tvs)
        return out
