"""Test helpers over locdiff.shdd's internals: the ring arguments of a grid, the torch
route's candidates and the torch form of the decode's refinement policy."""
from __future__ import annotations

from locdiff import grids, shdd
from locdiff.ops import candidates as candidate_policy
from locdiff.ops import shdd_api, shdd_torch


def ring_args(grid, degree, device="cpu"):
    return shdd._grid_args(grid, degree, device).ring


def torch_route_candidates(c, degree, grid, ncand):
    """The candidates of the devices without the C++ scan: (value, start xyz)."""
    _, value, start = shdd_torch.candidates(c, *ring_args(grid, degree, c.device), ncand)
    return value, shdd_torch.colatlon_to_xyz(start)


def refine_torch(c, degree, value, start, nrefine, backend=None):
    """The torch form of the decode's choice and refinement (locdiff.ops.candidates)."""
    c64 = c.double()
    refine = shdd_api._refine_fn(c64, degree, grids.half_max_radius(degree), backend)
    return candidate_policy.refine_candidates(c64, degree, value, start, nrefine, refine)
