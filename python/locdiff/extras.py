"""Optional dependencies of the photo workflow (``pip install 'locdiff[photos]'``): imported
when first needed, with an error naming the extra when missing."""
from __future__ import annotations

import importlib

from locdiff.errors import DataError

EXTRA = "photos"


def require(module: str, what: str):
    """Import ``module``, or raise DataError (one line) naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{what} needs the package {module.split('.')[0]!r}: "
                        f"pip install 'locdiff[{EXTRA}]'") from None
