"""Coordinates in float32 keep float64's trigonometry: poles and the antimeridian."""
import numpy as np
import torch

from locdiff import great_circle_km, latlon_to_xyz, shdd


def test_float32_coordinates_are_exact_on_poles_and_the_antimeridian():
    # float32 radians made cos(90) -4.4e-8 and put (12.3, 180) 1 m from (12.3, -180).
    pts = np.array([[90.0, 0.0], [-90.0, 0.0], [12.3, 180.0], [0.0, -180.0]])
    for make in (np.float32, lambda a: torch.tensor(a, dtype=torch.float32)):
        xyz = latlon_to_xyz(make(pts))
        assert xyz.dtype in (np.float32, torch.float32)
        np.testing.assert_allclose(np.asarray(xyz, np.float64), latlon_to_xyz(pts), rtol=0, atol=1e-7)
    same = great_circle_km(np.float32([[12.3, 180.0], [90.0, 0.0]]), np.float32([[12.3, -180.0], [90.0, 120.0]]))
    assert same.dtype == np.float32 and float(np.abs(same).max()) < 1e-6  # km
    c32, c64 = shdd.encode(np.float32([[90.0, 0.0]]), 256), shdd.encode(np.array([[90.0, 0.0]]), 256)
    assert float(np.abs(np.asarray(c32, np.float64) - np.asarray(c64)).max()) < 2e-6
