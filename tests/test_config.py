"""locdiff.config: typed dataclass trees from TOML, dicts and --set overrides; the TOML writer."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from locdiff import config as C
from locdiff.config import ConfigError
from locdiff.data.files import DataError


class Schedule(str, enum.Enum):
    COSINE = "cosine"
    LINEAR = "linear"


@dataclass
class Net:
    """Network shape. More words here that the writer leaves out."""

    widths: tuple[int, ...] = (64, 32)
    pair: tuple[int, float] = (1, 0.5)
    act: Literal["sin", "relu"] = "sin"
    extra: dict = field(default_factory=dict)


@dataclass
class Opt:
    lr: float = 1e-3
    steps: int = 100
    max_minutes: float | None = None
    amp: bool = True
    schedule: Schedule = Schedule.COSINE
    name: str = "run"
    out: Path = Path("runs")
    tags: list[str] = field(default_factory=list)
    anything: tuple = ()


@dataclass
class Root:
    net: Net = field(default_factory=Net)
    opt: Opt = field(default_factory=Opt)
    seed: int = 0


def _error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, DataError)
    return msg


def test_defaults_round_trip_through_toml(tmp_path):
    text = C.dumps(Root(), version=3, header="test settings")
    assert text.startswith("# test settings\nformat_version = 3\n")
    assert "# Network shape.\n[net]" in text and "More words" not in text
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert C.load(Root, path, version=3) == Root()


def test_every_kind_of_value_round_trips(tmp_path):
    cfg = Root(Net(widths=(8,), pair=(3, 2.5), act="relu", extra={"a": 1, "b": {"c": [1, 2]}}),
               Opt(lr=float("inf"), steps=7, max_minutes=1.5, amp=False, schedule=Schedule.LINEAR,
                   name='quote " and \\ and é', out=Path("a/b"), tags=["x", "y"]), seed=-4)
    path = tmp_path / "run.toml"
    path.write_text(C.dumps(cfg))
    back = C.load(Root, path)
    assert back == cfg and isinstance(back.net.widths, tuple) and back.opt.schedule is Schedule.LINEAR


def test_file_values_are_typed():
    cfg = C.from_dict(Root, {"opt": {"lr": 1, "steps": 1e3, "max_minutes": "none", "schedule": "LINEAR"},
                             "net": {"widths": [4, 2]}})
    assert cfg.opt.lr == 1.0 and isinstance(cfg.opt.lr, float)
    assert cfg.opt.steps == 1000 and isinstance(cfg.opt.steps, int)
    assert cfg.opt.max_minutes is None and cfg.opt.schedule is Schedule.LINEAR
    assert cfg.net.widths == (4, 2) and cfg.net.pair == (1, 0.5)


@pytest.mark.parametrize("data, words", [
    ({"opt": {"lrr": 1}}, ["unknown setting 'opt.lrr'", "opt has: lr, steps"]),
    ({"bogus": 1}, ["unknown setting 'bogus'", "the top level has: net, opt, seed"]),
    ({"opt": {"lr": "fast"}}, ["opt.lr = 'fast'", "expected a number"]),
    ({"opt": {"steps": 1.5}}, ["opt.steps = 1.5", "expected an integer"]),
    ({"opt": {"steps": True}}, ["opt.steps = True", "expected an integer"]),
    ({"opt": {"amp": 1}}, ["opt.amp = 1", "expected true or false"]),
    ({"opt": {"max_minutes": "soon"}}, ["opt.max_minutes = 'soon'", 'a number or "none"']),
    ({"opt": {"schedule": "step"}}, ["opt.schedule = 'step'", "one of 'cosine', 'linear'"]),
    ({"net": {"act": "tanh"}}, ["net.act = 'tanh'", "one of 'sin', 'relu'"]),
    ({"net": {"widths": 5}}, ["net.widths = 5", "expected an array"]),
    ({"net": {"widths": [4, "x"]}}, ["net.widths[1] = 'x'", "expected an integer"]),
    ({"net": {"pair": [1]}}, ["net.pair = [1]", "an array of 2"]),
    ({"net": [1, 2, 3]}, ["net must be a table", "[1, 2, 3]"]),
    ({"net": {"extra": 3}}, ["net.extra = 3", "a table"]),
])
def test_wrong_keys_and_types_are_one_line_errors(data, words):
    msg = _error(C.from_dict, Root, data, source="run.toml")
    assert msg.startswith("run.toml: ")
    for w in words:
        assert w in msg, msg


def test_overrides_are_parsed_to_the_field_type():
    base = Root()
    cfg = C.apply_overrides(base, ["opt.lr=3e-4", "net.widths=512, 256,128", "opt.max_minutes=2",
                                   "opt.amp=no", "opt.schedule=linear", "opt.name=hello world",
                                   "opt.out=x/y", "opt.tags=a,b", "net.pair=[2, 0.25]", "seed=0x10",
                                   "net.extra={k = 'v'}", "opt.steps=20_000", "net.act='relu'",
                                   "opt.anything=1,x,2.5"])
    assert cfg.opt.lr == 3e-4 and cfg.net.widths == (512, 256, 128) and cfg.opt.max_minutes == 2.0
    assert cfg.opt.amp is False and cfg.opt.schedule is Schedule.LINEAR and cfg.opt.name == "hello world"
    assert cfg.opt.out == Path("x/y") and cfg.opt.tags == ["a", "b"] and cfg.net.pair == (2, 0.25)
    assert cfg.seed == 16 and cfg.net.extra == {"k": "v"} and cfg.opt.steps == 20_000 and cfg.net.act == "relu"
    assert cfg.opt.anything == (1, "x", 2.5)
    assert base == Root(), "overrides must not change the instance they start from"
    assert C.apply_overrides(Root(Opt(max_minutes=5.0)), ["opt.max_minutes=none"]).opt.max_minutes is None
    assert C.apply_overrides(base, ["net.widths="]).net.widths == ()


@pytest.mark.parametrize("item, words", [
    ("opt.lrr=1", ["--set: unknown setting 'opt.lrr'", "opt has:"]),
    ("opt.lr=abc", ["opt.lr = 'abc'", "expected a number"]),
    ("opt.steps=2.5", ["opt.steps = '2.5'", "expected an integer"]),
    ("opt.amp=maybe", ["opt.amp = 'maybe'", "true or false"]),
    ("net.widths=5,a", ["net.widths[1] = 'a'", "expected an integer"]),
    ("net.pair=1,2,3", ["net.pair = '1,2,3'", "expected 2 values"]),
    ("opt.schedule=step", ["opt.schedule = 'step'", "one of 'cosine', 'linear'"]),
    ("opt.lr.x=1", ["opt.lr is a value"]),
    ("opt", ["expected key=value"]),
    ("=3", ["expected key=value"]),
])
def test_bad_overrides_are_one_line_errors(item, words):
    msg = _error(C.apply_overrides, Root(), [item])
    for w in words:
        assert w in msg, msg


def test_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[opt]\nlr = 0.5\nsteps = 9\n")
    cfg = C.load(Root, path, ["opt.lr=0.25"])
    assert (cfg.opt.lr, cfg.opt.steps) == (0.25, 9)


def test_format_version_is_checked(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("format_version = 2\n[opt]\nlr = 0.5\n")
    msg = _error(C.load, Root, path, version=1)
    assert "format_version = 2" in msg and "version 1" in msg and str(path) in msg
    path.write_text("[opt]\nlr = 0.5\n")  # no version: read as the current one
    assert C.load(Root, path, version=1).opt.lr == 0.5
    path.write_text("format_version = 1\n")
    assert "unknown setting 'format_version'" in _error(C.load, Root, path)


def test_unreadable_files_are_one_line_errors(tmp_path):
    assert "config file not found" in _error(C.load, Root, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[opt\nlr = ")
    assert "invalid TOML" in _error(C.load, Root, bad)
    bad.write_bytes(b"\xff\xfe[opt]")
    assert "cannot read" in _error(C.load, Root, bad)


def test_the_run_config_round_trips():
    from locdiff.train import RunConfig

    cfg = C.apply_overrides(RunConfig(), ["model.widths=512,256,128", "train.max_minutes=3",
                                          "diffusion.smoothing=0.5", "train.amp=false"])
    back = C.from_dict(RunConfig, C.tomllib.loads(C.dumps(cfg)))
    assert back == cfg and back.model.widths == (512, 256, 128) and back.train.max_minutes == 3.0


@pytest.mark.parametrize("section, kwargs, message", [
    ("diffusion", dict(timesteps=0), r"diffusion.timesteps = 0: expected an integer in \[2, 100000\]"),
    # sizes a shared file could set to anything: they spun or took gigabytes before a message
    ("diffusion", dict(timesteps=10**9), r"diffusion.timesteps = 1000000000: expected an integer in \[2, 100000\]"),
    ("model", dict(bottleneck_depth=10**8), r"model.bottleneck_depth = 100000000: expected an integer in \[0, 64\]"),
    ("model", dict(cond_dim=10**12), r"model.cond_dim = 1000000000000: expected an integer in \[1, 65536\]"),
    ("model", dict(emb_widths=(16, 10**12)), r"model.emb_widths = \(16, 1000000000000\): expected a list"),
    ("diffusion", dict(p_uncond=2.0), r"diffusion.p_uncond = 2.0: expected a number in \[0, 1\)"),
    ("diffusion", dict(density_fraction=-1.0), r"diffusion.density_fraction = -1.0: expected a number in \(0, 1\]"),
    ("diffusion", dict(timestep_power=0.0), "diffusion.timestep_power = 0.0: expected a finite number > 0"),
    ("diffusion", dict(schedule="foo"), "diffusion.schedule = 'foo': expected one of 'cosine', 'linear'"),
    ("model", dict(widths=()), "model.widths = \\(\\): expected a non-empty list of integers in \\[1, 65536\\]"),
    ("model", dict(dropout=1.0), r"model.dropout = 1.0: expected a number in \[0, 1\)"),
])
def test_configs_built_in_python_check_their_ranges(section, kwargs, message):
    # A config built in Python is checked as a config file is, naming the setting.
    import doctest

    from locdiff import ranges
    from locdiff.diffusion import DiffusionConfig
    from locdiff.models import CSUNetConfig

    cls = DiffusionConfig if section == "diffusion" else CSUNetConfig
    with pytest.raises(ranges.SettingError, match=message):
        cls(**kwargs)
    assert doctest.testmod(ranges).failed == 0


def test_files_nested_past_the_parsers_depth_are_one_line_errors(tmp_path):
    # A shared config nested 100,000 deep raised RecursionError tracebacks.
    from locdiff.config import ConfigError, read_toml
    from locdiff.data import DataError
    from locdiff.run import read_config

    (tmp_path / "config.json").write_text('{"a": ' + "[" * 100_000 + "}")
    with pytest.raises(DataError, match="config.json: invalid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {"degree": ' + "9" * 5000 + "}}")  # past int()'s digits
    with pytest.raises(DataError, match="config.json: invalid JSON"):
        read_config(tmp_path)
    (tmp_path / "x.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="x.toml: invalid TOML \\(nested too deeply\\)"):
        read_toml(tmp_path / "x.toml")


def test_a_network_too_large_at_every_degree_is_named_as_such():
    # It was "--degree 4: expected an integer in [1, 0]", blaming the degree.
    import torch

    from locdiff.models import CSUNetConfig
    from locdiff.ranges import SettingError
    from locdiff.run import RunConfig
    from locdiff.settings import validate

    cfg = RunConfig(model=CSUNetConfig(degree=4, emb_dim=8, widths=(65536, 65536), cond_dim=65536))
    with pytest.raises(SettingError, match=r"model.widths = \[65536, 65536\]: expected a network whose training "
                                           r"fits at degree 1 .*needs more than the .* GiB"):
        validate(cfg, device=torch.device("cpu"))


def test_a_toml_file_with_a_byte_order_mark_is_read(tmp_path):
    from locdiff.config import read_toml

    (tmp_path / "x.toml").write_bytes(b"\xef\xbb\xbf[train]\nsteps = 5\n")
    assert read_toml(tmp_path / "x.toml") == {"train": {"steps": 5}}
