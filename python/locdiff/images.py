"""Reading photos for the image encoder: JPEG, PNG and WebP files, EXIF orientation applied,
EXIF GPS position as (lat, lon) degrees.

Folders are searched recursively for files with an image extension (``IMAGE_SUFFIXES``);
a file named on its own is always tried. A file that cannot be decoded raises
:class:`UnreadableImage` naming it, so that a caller can report it and go on.

>>> files, ignored = find_images(["photos/"])          # doctest: +SKIP
>>> photo = read_image(files[0], size=224)             # doctest: +SKIP
>>> photo.image.size, photo.latlon                     # doctest: +SKIP
((224, 298), (48.8584, 2.2945))
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from locdiff.data.files import DataError
from locdiff.extras import require

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# MPO: a JPEG with a multi-picture block (phones' HDR gain maps, some cameras); its first
# picture is the photo.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP")


class UnreadableImage(Exception):
    """A file that is not a readable JPEG, PNG or WebP image; the message names it."""


def find_images(paths) -> tuple[list[Path], list[Path]]:
    """(image files to read, files in the folders skipped for their extension), both sorted
    and without duplicates. A missing path, or no image file at all, raises DataError."""
    files, ignored, seen = [], [], set()
    for p in map(Path, paths):
        if p.is_dir():
            # Hidden files and folders (".thumbnails", editor backups) are not photos.
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in found):
                raise DataError(f"{p}: folder holds no JPEG, PNG or WebP images "
                                f"(looked for {', '.join(IMAGE_SUFFIXES)} files in it and below)")
            for f in found:
                (files if f.suffix.lower() in IMAGE_SUFFIXES else ignored).append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: image file or folder not found")
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise DataError(f"{', '.join(map(str, paths)) or 'no path'}: no JPEG, PNG or WebP images given")
    return unique, ignored


@dataclass
class Photo:
    """An RGB image, upright, and its EXIF GPS position (None when it has none)."""

    image: object  # PIL.Image.Image
    latlon: tuple[float, float] | None


def read_image(path, size: int | None = None) -> Photo:
    """Decode ``path`` to an upright RGB image. With ``size``, JPEGs are decoded at a reduced
    scale that keeps both sides >= ``size`` (several times faster for camera photos, which
    the encoder shrinks to ``size`` anyway)."""
    pil = require("PIL.Image", "reading images")
    from PIL import ImageOps

    path = Path(path)
    try:
        img = pil.open(path)
        # Pillow's size warning names no file: a second one does. (Catching Pillow's instead
        # would swap the process's warning handlers, which threads reading photos share.)
        limit, pixels = pil.MAX_IMAGE_PIXELS, img.size[0] * img.size[1]
        if limit and pixels > limit:
            warnings.warn(f"{path}: Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be a "
                          "decompression bomb", pil.DecompressionBombWarning, stacklevel=2)
        with img:
            if img.format not in FORMATS:
                raise UnreadableImage(f"{path}: not a JPEG, PNG or WebP image ({img.format})")
            if size and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (size, size))
            latlon = gps_latlon(img.getexif())
            upright = _eight_bits(ImageOps.exif_transpose(img))
            rgb = upright.convert("RGB")
            rgb.load()
    except UnreadableImage:
        raise
    except pil.DecompressionBombError as err:
        raise UnreadableImage(f"{path}: not read ({_one_line(err)}); raise PIL.Image.MAX_IMAGE_PIXELS to read such "
                              "images") from None
    except (OSError, ValueError, SyntaxError) as err:
        # PIL reports truncated or corrupt files with all of these.
        raise UnreadableImage(f"{path}: not a readable image ({_one_line(err)})") from None
    return Photo(rgb, latlon)


def _eight_bits(img):
    """16- and 32-bit grayscale (PNG "I;16", "I") scaled to 8 bits: PIL's convert("RGB")
    clips such values at 255, which turns most of a 16-bit image white."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return img
    import numpy as np
    from PIL import Image

    arr = np.asarray(img).astype(np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(arr.max())
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def gps_latlon(exif) -> tuple[float, float] | None:
    """(lat, lon) degrees from a PIL ``Image.Exif``, or None when the GPS block is missing,
    incomplete, out of range, or exactly (0, 0), which cameras without a fix write."""
    from PIL import ExifTags

    try:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except (KeyError, ValueError, TypeError, OSError):
        return None
    tags = ExifTags.GPS
    try:
        lat = _degrees(gps[tags.GPSLatitude]) * _sign(gps.get(tags.GPSLatitudeRef, "N"), "S")
        lon = _degrees(gps[tags.GPSLongitude]) * _sign(gps.get(tags.GPSLongitudeRef, "E"), "W")
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
        return None
    if lat == 0 and lon == 0:
        return None
    return lat, lon


def _degrees(dms) -> float:
    """Degrees, minutes, seconds (three rationals; some writers give fewer) -> degrees."""
    parts = [float(x) for x in (dms if isinstance(dms, (tuple, list)) else (dms,))]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"GPS coordinate with {len(parts)} parts")
    return sum(v / 60 ** i for i, v in enumerate(parts))


def _sign(ref, negative: str) -> float:
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    return -1.0 if str(ref).strip().upper().startswith(negative) else 1.0


def ignored_message(ignored) -> str:
    """The warning for files that ``find_images`` left out of folders for their extension."""
    n = len(ignored)
    return (f"ignored {n} file{'s' if n != 1 else ''} without an image extension ({', '.join(IMAGE_SUFFIXES)}), "
            f"e.g. {ignored[0]}")
