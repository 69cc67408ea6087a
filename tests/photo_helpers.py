"""Generated photos (with EXIF orientation and GPS) and a tiny random CLIP vision encoder, so
the photo workflow is tested with no download."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=16)


def tiny_model_dir(folder: Path) -> Path:
    """A local model folder holding only a tiny CLIPVisionConfig (built with --pretrained none)."""
    from transformers import CLIPVisionConfig

    folder.mkdir(parents=True, exist_ok=True)
    CLIPVisionConfig(**TINY).save_pretrained(folder)
    return folder


def dms(x: float) -> tuple:
    x = abs(x)
    d = int(x)
    m = int((x - d) * 60)
    return (float(d), float(m), round((x - d - m / 60) * 3600, 4))


def save_photo(path: Path, seed: int, latlon=None, orientation: int | None = None, size=(48, 36)) -> Path:
    """A random RGB image of ``size`` (w, h); the format follows the suffix."""
    from PIL import ExifTags, Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
    if latlon is not None:
        lat, lon = latlon
        exif[ExifTags.IFD.GPSInfo] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W",
                                      4: dms(lon)}
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif)
    return path


def photo_folder(folder: Path, n: int = 6, gps: bool = True, rng_seed: int = 0) -> list[Path]:
    """``n`` photos (JPEG, PNG, WebP in turn, one in a subfolder) with EXIF GPS positions."""
    rng = np.random.default_rng(rng_seed)
    out = []
    for i in range(n):
        ll = (float(rng.uniform(-60, 60)), float(rng.uniform(-179, 179))) if gps else None
        name = f"{'sub/' if i == n - 1 else ''}p{i}.{('jpg', 'png', 'webp')[i % 3]}"
        out.append(save_photo(folder / name, seed=rng_seed * 100 + i, latlon=ll))
    return out
