"""A plain regression of the location: an MLP from the embedding to a unit vector,
trained on the great-circle distance (no density, no diffusion).

>>> import numpy as np
>>> r = Regressor(widths=(16,))
>>> _ = r.fit(np.eye(4, dtype=np.float32), np.zeros((4, 2)), steps=2, batch_size=4)
>>> r.predict(np.eye(4, dtype=np.float32)).shape
(4, 2)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from locdiff.baselines.mlp import check_training_pair, fit, mlp, predict_batches, seeded
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon


def _angle(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Great-circle angle between the normalised prediction and unit targets (chord form,
    whose gradient stays finite at zero distance)."""
    chord = (F.normalize(pred, dim=1) - target).norm(dim=1).clamp(max=2.0)
    return 2 * torch.asin(chord / 2)


class Regressor:
    """MLP (``widths``) -> xyz, loss = mean great-circle angle; validation by median km."""

    def __init__(self, widths=(1024, 512, 256), dropout: float = 0.1, seed: int = 0):
        self.widths, self.dropout, self.seed = tuple(widths), float(dropout), seed
        self.net = None

    def fit(self, emb, coords, val=None, **train_kw) -> dict:
        emb, coords = check_training_pair(emb, coords)
        y = torch.as_tensor(latlon_to_xyz(coords)).float()
        with seeded(self.seed):
            self.net = mlp(emb.shape[1], self.widths, 3, self.dropout)
        val_fn = None
        if val is not None:
            vx, vll = check_training_pair(*val, name="val")
            vy = torch.as_tensor(latlon_to_xyz(vll)).float()
            val_fn = lambda net: float(_angle(net(torch.as_tensor(vx)), vy).median()) * EARTH_RADIUS_KM  # noqa: E731
        return fit(self.net, lambda p, t: _angle(p, t).mean(), emb, y, val_fn=val_fn, seed=self.seed, **train_kw)

    def predict(self, emb) -> np.ndarray:
        return xyz_to_latlon(F.normalize(predict_batches(self.net, emb).double(), dim=1)).numpy()
