"""locdiff: geolocation by diffusion in spherical-harmonic space (LocDiff), with exact, fast
spherical harmonics on CPU and GPU."""
try:
    from locdiff import _C
except ImportError as _err:  # the source tree, not the installed package, is on sys.path
    import os as _os

    raise ImportError(f"locdiff's compiled extension (_C) is not in {_os.path.dirname(__file__)}: this is the "
                      "source tree, not an installed locdiff; run from another folder, or pip install -e . "
                      f"to build it in place ({_err})") from None
from locdiff.ops.output_pool import output_cache_bytes, set_output_cache
from locdiff.geo import EARTH_RADIUS_KM, great_circle_km, latlon_to_xyz, xyz_to_latlon
from locdiff.sh import SphericalHarmonics, spherical_harmonics

try:  # the installed distribution's version, so that pyproject.toml is its one source
    from importlib.metadata import PackageNotFoundError as _NotFound, version as _version

    __version__ = _version("locdiff")
except _NotFound:
    __version__ = "unknown"


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
