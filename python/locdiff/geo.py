"""Coordinates on the sphere: (lat, lon) degrees <-> unit vectors, great-circle distances.

Conventions (docs/conventions.md): ``x = cos(lat) cos(lon)``, ``y = cos(lat) sin(lon)``,
``z = sin(lat)``; distances on a sphere of radius 6371.0088 km. Every function takes numpy
arrays or torch tensors and returns the same kind.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from locdiff.ops.validation import check_last_dim

EARTH_RADIUS_KM = 6371.0088


def cos_of_km(km: float) -> float:
    """The cosine of the angle a great-circle distance of ``km`` subtends (-1 from half the
    Earth's circumference on): points at most ``km`` apart have unit vectors whose dot
    product is at least this."""
    return math.cos(min(km / EARTH_RADIUS_KM, math.pi))


def _backend(a):
    return torch if isinstance(a, torch.Tensor) else np


def _as_float_array(a, name: str):
    """``a`` as a float array or tensor (integers as float64, values in native byte order), or
    a TypeError naming ``name`` for complex, bool or non-numeric values."""
    if isinstance(a, torch.Tensor):
        if a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"{name} must be a real numeric array, got {a.dtype}")
        return a if a.is_floating_point() else a.double()
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.dtype.kind in "iu":
        return a.astype(np.float64)
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _largest_magnitudes(latlon) -> tuple[float, float]:
    """(max |lat|, max |lon|) of a (..., 2) array in one reduction; NaN where any is NaN."""
    pairs = latlon.reshape(-1, 2)
    if pairs.shape[0] == 0:
        return 0.0, 0.0
    if isinstance(pairs, torch.Tensor):
        # amax skips no NaN (torch propagates them), as np.max does
        return tuple(pairs.detach().abs().amax(0).tolist())
    return tuple(np.abs(pairs).max(0).tolist())


def latlon_to_xyz(latlon):
    """Unit vectors of ``(..., 2)`` (lat, lon) in degrees; lon is wrapped, lat must be in [-90, 90].

    >>> latlon_to_xyz(np.array([90.0, 0.0])).round(12)
    array([0., 0., 1.])
    """
    latlon = _as_float_array(latlon, "latlon")
    check_last_dim(latlon, 2, "latlon")
    xp = _backend(latlon)
    # One reduction checks both columns (NaN fails the comparison), the message only on
    # failure: at a training step's batch size, each op and sync costs more than the maths.
    big_lat, big_lon = _largest_magnitudes(latlon)
    if not (big_lat <= 90 and math.isfinite(big_lon)):
        _raise_bad_latlon(latlon, xp)
    # The trigonometry in float64 whatever the input: float32 degrees made cos(90) -4.4e-8,
    # which high degrees amplify (7.9e-6 per unit at L = 256 on a pole, 2e-6 elsewhere).
    radians = (latlon.double() if xp is torch else latlon.astype(np.float64, copy=False)) * (math.pi / 180)
    cos, sin = xp.cos(radians), xp.sin(radians)
    clat = cos[..., 0]
    out = xp.stack([clat * cos[..., 1], clat * sin[..., 1], sin[..., 0]], -1)
    return out.to(latlon.dtype) if xp is torch else out.astype(latlon.dtype, copy=False)


def _raise_bad_latlon(latlon, xp) -> None:
    """A ValueError naming the first row (its index in the leading dimensions) whose latitude
    is not finite or outside [-90, 90], or else whose longitude is not finite."""
    lat, lon = latlon[..., 0], latlon[..., 1]
    bad_lat = ~(xp.abs(lat) <= 90)
    bad, what = (bad_lat, "latitudes must be finite degrees in [-90, 90]") if bool(bad_lat.any()) else \
        (~xp.isfinite(lon), "longitudes must be finite")
    flat = int(torch.nonzero(bad.reshape(-1))[0]) if xp is torch else int(np.flatnonzero(bad.reshape(-1))[0])
    row = np.unravel_index(flat, tuple(lat.shape)) if lat.ndim else ()
    where = f"row {int(row[0])}" if len(row) == 1 else f"row {tuple(int(i) for i in row)}" if row else "the point"
    pair = [float(v) for v in latlon.reshape(-1, 2)[flat].tolist()]
    raise ValueError(f"latlon: {what}; {where} is {pair}")


def xyz_to_latlon(xyz):
    """(lat, lon) degrees of ``(..., 3)`` vectors (any non-zero length); lon in (-180, 180].

    On the poles lon is 0. ``atan2`` keeps full precision near the poles, where asin does not.
    The zero vector has no direction: (NaN, NaN), the mark of a missing answer.
    """
    xyz = _as_float_array(xyz, "xyz")
    check_last_dim(xyz, 3, "xyz")
    xp = _backend(xyz)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    r = xp.hypot(x, y) if xp is np else torch.hypot(x, y)
    lat = xp.arctan2(z, r) if xp is np else torch.atan2(z, r)
    lon = (xp.arctan2(y, x) if xp is np else torch.atan2(y, x)) * (180 / math.pi)
    # A y of -0.0 or one rounding away from 0 west of the antimeridian gives -180: the range
    # is (-180, 180]. Within float rounding of a pole the longitude means nothing: 0 there.
    lon = xp.where(lon <= -180.0, lon + 360.0, lon)
    lon = xp.where(r <= 1e-15 * abs(z), 0.0 * lon, lon)
    out = xp.stack([lat * (180 / math.pi), lon], -1)
    return xp.where(((r == 0) & (z == 0))[..., None], math.nan, out)


def _check_distance_points(p, name: str, xp) -> None:
    """Latitudes in [-90, 90] and finite longitudes, or a ValueError naming ``name`` and the
    first bad pair. NaN passes: it marks a missing answer, whose distance is NaN."""
    lat, lon = p[..., 0], p[..., 1]
    bad = (xp.abs(lat) > 90) | xp.isinf(lat) | xp.isinf(lon)
    if bool(bad.any()):
        first = p[bad][0]
        raise ValueError(f"{name}: points must be (lat, lon) degrees with lat in [-90, 90] and a finite lon "
                         f"(NaN for none), got ({float(first[0])}, {float(first[1])})")


def great_circle_km(a, b, radius_km: float = EARTH_RADIUS_KM):
    """Great-circle distance in km between ``(..., 2)`` (lat, lon) degree arrays (broadcast).

    Uses the atan2 form of Vincenty's formula, accurate for antipodes and tiny distances.
    A pair holding NaN gets NaN (a missing answer); latitudes beyond +-90 are errors.

    >>> round(float(great_circle_km(np.array([0.0, 0.0]), np.array([0.0, 90.0]))), 3)
    10007.557
    """
    a, b = _as_float_array(a, "a"), _as_float_array(b, "b")
    check_last_dim(a, 2, "a")
    check_last_dim(b, 2, "b")
    xp = _backend(a)
    if xp is torch and not isinstance(b, torch.Tensor):
        b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    if xp is torch and a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}; expected both on one device")
    try:
        np.broadcast_shapes(tuple(a.shape[:-1]), tuple(b.shape[:-1]))
    except ValueError:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must broadcast: the same number of points, "
                         "or one") from None
    dtype = np.result_type(a.dtype, np.asarray(b).dtype) if xp is np else torch.promote_types(a.dtype, b.dtype)
    # In float64 whatever the input: float32 put (12.3, 180) 1 m from (12.3, -180).
    a, b = (a.double(), b.double()) if xp is torch else (a.astype(np.float64, copy=False), np.asarray(b, np.float64))
    _check_distance_points(a, "a", xp)
    _check_distance_points(b, "b", xp)
    if isinstance(radius_km, bool) or not isinstance(radius_km, (int, float, np.integer, np.floating)) or not (
            math.isfinite(radius_km) and radius_km > 0):
        raise ValueError(f"radius_km must be a finite number > 0, got {radius_km!r}")
    lat1, lon1 = a[..., 0] * (math.pi / 180), a[..., 1] * (math.pi / 180)
    lat2, lon2 = b[..., 0] * (math.pi / 180), b[..., 1] * (math.pi / 180)
    dlon = lon2 - lon1
    c1, s1, c2, s2 = xp.cos(lat1), xp.sin(lat1), xp.cos(lat2), xp.sin(lat2)
    cd, sd = xp.cos(dlon), xp.sin(dlon)
    num = xp.hypot(c2 * sd, c1 * s2 - s1 * c2 * cd) if xp is np else torch.hypot(c2 * sd, c1 * s2 - s1 * c2 * cd)
    den = s1 * s2 + c1 * c2 * cd
    ang = xp.arctan2(num, den) if xp is np else torch.atan2(num, den)
    out = ang * radius_km
    return out.to(dtype) if xp is torch else out.astype(dtype, copy=False)
