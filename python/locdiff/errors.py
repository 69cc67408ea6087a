"""The error every layer raises for bad data files and settings: a ValueError whose message
names the file or setting, the value and what was expected (docs/conventions.md)."""
from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file."""
