"""The rule every validation choice between a run's own setting and an alternative follows:
the alternative must be clearly better, since a 1,000-place validation median moves by a few
percent between seeds and between validation and test groups
(docs/model.md, "Point predictions" and "LocDiff-H")."""
from __future__ import annotations

MIN_GAIN = 0.03


def clearly_better(candidate: float, own: float, min_gain: float = MIN_GAIN) -> bool:
    """Whether ``candidate`` (lower is better, e.g. a median error) beats ``own`` by more
    than ``min_gain`` relative."""
    return candidate < (1 - min_gain) * own
