"""Torch custom ops ``locdiff::*`` over the compiled kernels, with a pure-torch reference
beside each (``*_reference``)."""
from locdiff.ops.sh import spherical_harmonics_backward_op, spherical_harmonics_op, spherical_harmonics_out_op
from locdiff.ops.sh_reference import spherical_harmonics_reference

__all__ = ["spherical_harmonics_op", "spherical_harmonics_out_op", "spherical_harmonics_backward_op", "spherical_harmonics_reference"]
