"""locdiff: geolocation by diffusion in spherical-harmonic space (LocDiff), with exact, fast
spherical harmonics on CPU and GPU."""
from locdiff import _C
from locdiff.ops.output_pool import output_cache_bytes, set_output_cache
from locdiff.geo import EARTH_RADIUS_KM, great_circle_km, latlon_to_xyz, xyz_to_latlon
from locdiff.sh import SphericalHarmonics, spherical_harmonics

__version__ = "0.1.0"


def has_cuda() -> bool:
    """True when the compiled extension contains the CUDA kernels."""
    return _C.has_cuda()


def __getattr__(name):
    # Heavier submodules load on first use: `locdiff.shdd`, `locdiff.grids`, `locdiff.metrics`.
    import importlib

    if name in {"shdd", "grids", "metrics", "models", "diffusion", "data"}:
        return importlib.import_module(f"locdiff.{name}")
    if name == "Geolocator":
        return importlib.import_module("locdiff.geolocator").Geolocator
    raise AttributeError(f"module 'locdiff' has no attribute {name!r}")


__all__ = [
    "EARTH_RADIUS_KM", "Geolocator", "SphericalHarmonics", "great_circle_km", "has_cuda", "latlon_to_xyz",
    "output_cache_bytes", "set_output_cache", "spherical_harmonics", "xyz_to_latlon",
]
