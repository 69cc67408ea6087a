"""Coordinates in float32 keep float64's trigonometry: poles and the antimeridian."""
import numpy as np
import pytest
import torch

from locdiff import geo, great_circle_km, latlon_to_xyz, metrics, shdd


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


def test_great_circle_km_refuses_points_off_the_sphere_and_keeps_nan_as_missing():
    import pytest

    ok = great_circle_km(np.array([[np.nan, 0.0], [10.0, 20.0]]), np.array([0.0, 0.0]))
    assert np.isnan(ok[0]) and abs(ok[1] - 2476.17) < 0.01
    for bad in ([100.0, 0.0], [-90.5, 10.0], [10.0, np.inf], [-np.inf, 0.0]):
        for make in (np.array, torch.tensor):
            with pytest.raises(ValueError, match=r"b: points must be .*lat in \[-90, 90\]"):
                great_circle_km(make([0.0, 0.0]), make(bad))
    for radius in (-1.0, 0.0, np.inf, True):
        with pytest.raises(ValueError, match="radius_km must be a finite number > 0"):
            great_circle_km(np.zeros(2), np.ones(2), radius)


def test_bad_points_and_types_are_named_by_argument_and_row():
    bad = np.zeros((5, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"longitudes must be finite; row 3 is \[0.0, nan\]"):
        geo.latlon_to_xyz(bad)
    batch = torch.zeros(2, 3, 2)
    batch[1, 2, 0] = 95.0
    with pytest.raises(ValueError, match=r"latitudes must be finite degrees in \[-90, 90\]; row \(1, 2\) is \[95.0"):
        geo.latlon_to_xyz(batch)
    for odd in (torch.tensor([[10 + 5j, 20 + 0j]]), torch.tensor([[True, False]])):
        with pytest.raises(TypeError, match="latlon must be a real numeric array"):
            geo.latlon_to_xyz(odd)
    with pytest.raises(TypeError, match="pred_latlon must be real numbers, got dtype complex128"):
        metrics.distance_metrics(np.array([[0, 50j]]), np.array([[0.0, 0.0]]))
    with pytest.raises(TypeError, match="pred_latlon must be real numbers, got torch.bool"):
        metrics.distance_metrics(torch.tensor([[True, True]]), np.array([[0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"a \(6, 2\) and b \(5, 2\) must broadcast"):
        geo.great_circle_km(np.zeros((6, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="a is on cpu but b is on meta"):
        geo.great_circle_km(torch.zeros(1, 2), torch.zeros(1, 2, device="meta"))
    # Another byte order is read as the same numbers, with torch or numpy on the other side.
    far = np.array([[0.0, 90.0]], ">f8")
    assert float(geo.great_circle_km(torch.zeros(1, 2, dtype=torch.float64), far)[0]) == pytest.approx(10007.557, abs=1e-3)
    assert float(geo.great_circle_km(np.zeros((1, 2)), far)[0]) == pytest.approx(10007.557, abs=1e-3)
