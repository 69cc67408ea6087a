"""The ranges of a run's settings, section by section, and the one error that names a
setting out of its range. A leaf module: the configs check themselves against it when
built (``DiffusionConfig``, ``CSUNetConfig``), and :mod:`locdiff.settings` checks a whole
run with it.

>>> from locdiff.diffusion import DiffusionConfig
>>> DiffusionConfig(p_uncond=2.0)
Traceback (most recent call last):
...
locdiff.ranges.SettingError: diffusion.p_uncond = 2.0: expected a number in [0, 1)
"""
from __future__ import annotations

import math

from locdiff.errors import DataError

# Classifier-free guidance weights accepted (config and Predictor): beyond, the guided vector
# is the difference of two predictions scaled past float32's useful precision.
MAX_GUIDANCE = 1e6


class SettingError(DataError):
    """A setting out of its range: ``key`` (``"model.degree"``), ``value``, ``expected``."""

    def __init__(self, key: str, value, expected: str, source: str | None = None):
        self.key, self.value, self.expected, self.source = key, value, expected, source
        super().__init__(f"{source + ': ' if source else ''}{key} = {value!r}: expected {expected}")


def _int(lo=None, hi=None):
    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
    text = "an integer" + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else "")
    return ok, text


def _num(lo=None, hi=None, lo_open=False, hi_open=False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if lo is not None and hi is not None:
        text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        text = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    return ok, text


def _optional(check):
    ok, text = check
    return (lambda v: v is None or ok(v)), f"{text} or none"


def _choice(*names):
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _ints(lo, hi, allow_empty=False):
    def ok(v):
        return isinstance(v, (list, tuple)) and (allow_empty or len(v) > 0) and all(_int(lo, hi)[0](x) for x in v)
    return ok, f"a{'' if allow_empty else ' non-empty'} list of integers in [{lo}, {hi}]"


# Sizes a shared config file could set to anything: past these, building the network or the
# schedule would spin or allocate without bound before any message.
MAX_WIDTH, MAX_DEPTH, MAX_TIMESTEPS = 1 << 16, 64, 100_000


RULES = {
    "model": {"emb_dim": _int(1, MAX_WIDTH), "widths": _ints(1, MAX_WIDTH), "cond_dim": _int(1, MAX_WIDTH),
              "dropout": _num(0, 1, hi_open=True), "emb_widths": _ints(1, MAX_WIDTH, allow_empty=True),
              "emb_dropout": _num(0, 1, hi_open=True), "w0": _num(0, lo_open=True), "w0_first": _num(0, lo_open=True),
              "bottleneck_depth": _int(0, MAX_DEPTH), "density_from": _choice("embedding", "trunk"),
              "timesteps": _int(2, MAX_TIMESTEPS)},
    "diffusion": {"schedule": _choice("cosine", "linear"), "timesteps": _int(2, MAX_TIMESTEPS),
                  "prediction": _choice("eps", "x0", "v"), "mse_weight": _num(0), "kl_weight": _num(0),
                  "kl_sharpness": _num(0, lo_open=True), "kl_grid_oversample": _num(0, lo_open=True),
                  "density_fraction": _num(0, 1, lo_open=True), "smoothing": _optional(_num(0, lo_open=True)),
                  "p_uncond": _num(0, 1, hi_open=True), "timestep_power": _num(0, lo_open=True),
                  "scale": _num(0, lo_open=True)},
    "train": {"steps": _int(1), "batch_size": _int(1), "lr": _num(0, lo_open=True), "min_lr_ratio": _num(0, 1),
              "weight_decay": _num(0), "warmup_steps": _int(0), "grad_clip": _num(0), "ema_decay": _num(0, 1, hi_open=True),
              "spike_factor": _num(0), "max_minutes": _optional(_num(0, lo_open=True)), "val_every": _int(0),
              "val_size": _int(0), "checkpoint_every": _int(0), "checkpoint_minutes": _num(0, lo_open=True),
              "seed": _int(0, 2**63 - 1), "accumulate": _int(1), "keep_checkpoints": _int(1), "log_every": _int(1)},
    "data": {"workers": _optional(_int(0)), "prefetch": _int(1)},
    "predict": {"steps": _int(1), "samples": _int(1), "guidance": _num(-MAX_GUIDANCE, MAX_GUIDANCE), "eta": _num(0, 1),
                "temperature": _num(0, lo_open=True), "batch_size": _int(1), "coarse_degree": _optional(_int(1))},
}


def check_section(section: str, settings, source: str | None = None) -> None:
    """:class:`SettingError` for the first field of ``settings`` (one section of a run's
    config, e.g. a ``DiffusionConfig`` for ``"diffusion"``) out of its range: the configs
    check themselves when built in Python, as a config file is checked."""
    for name, (ok, expected) in RULES[section].items():
        value = getattr(settings, name)
        if not ok(value):
            raise SettingError(f"{section}.{name}", value, expected, source)
