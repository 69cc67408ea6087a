"""``python -m locdiff``: the ``locdiff`` command, so that ``torchrun -m locdiff train ...`` works."""
import sys

from locdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
