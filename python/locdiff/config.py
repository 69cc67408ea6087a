"""Typed settings from TOML files, dicts and ``--set key.sub=value`` overrides, for any tree
of dataclasses, and the TOML text of a tree (``locdiff config --defaults``).

Values are checked against the fields' annotations: ``bool``, ``int``, ``float`` (an
integer is accepted), ``str``, ``Path``, ``Enum`` (by value or name), ``Literal``,
``X | None`` (TOML has no null: the string ``"none"`` stands for None), ``tuple[X, ...]``,
``tuple[X, Y]``, ``list[X]``, ``dict`` and nested dataclasses. An unknown key, a wrong type
or a format version other than the reader's raises :class:`ConfigError` with one line
naming the source, the key, the value and what was expected.

>>> cfg = load(RunConfig, "run.toml", ["train.lr=3e-4", "model.widths=512,256"], version=1)  # doctest: +SKIP
>>> print(dumps(RunConfig(), version=1))                                       # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import sys
import types
import typing
from pathlib import Path, PurePath

from locdiff.data.files import not_a_file
from locdiff.errors import DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, packaged for older Pythons
    import tomli as tomllib

VERSION_KEY = "format_version"
NONE = "none"


class ConfigError(DataError):
    """A setting is unknown, of the wrong type, or from another format version."""


# ---- reading ---------------------------------------------------------------------------------
def load(cls, path=None, overrides=(), *, version: int | None = None):
    """An instance of dataclass ``cls``: its defaults, updated by the TOML file ``path`` (if
    given), then by ``overrides`` (``"key.sub=value"`` strings, as ``--set`` takes them).

    ``version``: the format version this reader understands; a file whose top-level
    ``format_version`` differs is refused (a file without one is read as this version).
    """
    data = read_toml(path, version=version) if path is not None else {}
    source = str(path) if path is not None else "config"
    obj = from_dict(cls, data, source=source)
    return apply_overrides(obj, overrides)


def read_toml(path, *, version: int | None = None) -> dict:
    """The table of a TOML file, ``format_version`` checked against ``version`` and
    removed (when ``version`` is given)."""
    path = Path(path)
    what = not_a_file(path)
    if what is not None:
        raise ConfigError(f"{path}: {what}, not a regular file; give a TOML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))  # a byte-order mark, as some editors write
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML (nested too deeply)") from None
    return check_version(data, version, str(path)) if version is not None else data


def check_version(data: dict, version: int, source: str) -> dict:
    """``data`` without its ``format_version``, which must equal ``version`` if present."""
    data = dict(data)
    found = data.pop(VERSION_KEY, version)
    if isinstance(found, bool) or found != version:
        raise ConfigError(f"{source}: {VERSION_KEY} = {found!r}, but this locdiff reads format "
                          f"version {version}; write a new file with `locdiff config --defaults`")
    return data


def from_dict(cls, data, *, source: str = "config", prefix: str = ""):
    """Dataclass ``cls`` from a nested dict; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a table, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown setting {name!r}; {_known(cls, prefix)}")
        kwargs[key] = convert(value, hints[key], name, source)
    from locdiff.ranges import SettingError

    try:
        return cls(**kwargs)
    except SettingError as err:  # a range check of __post_init__: it names the setting itself
        raise SettingError(err.key, err.value, err.expected, source) from None
    except (TypeError, ValueError) as err:  # a __post_init__ check, or a field without default
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {err}") from None


def convert(value, tp, name: str, source: str):
    """``value`` (from TOML, JSON or a dict) as type ``tp``; :class:`ConfigError` if it is
    not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(what: str):
        return ConfigError(f"{source}: {name} = {_show(value)}: expected {what}")

    if tp is typing.Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == NONE)):
            return None
        errors = []
        for a in inner:
            try:
                return convert(value, a, name, source)
            except ConfigError as err:
                errors.append(err)
        if len(inner) == 1 and not _is_scalar(inner[0]):
            raise errors[0]  # the inner message names the element at fault
        raise bad(_expected(tp))
    if origin is typing.Literal:
        if value in args:
            return value
        raise bad(_expected(tp))
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return from_dict(tp, value, source=source, prefix=f"{name}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise bad(_expected(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise bad("a path (string)")
    if origin in (tuple, list) or tp in (tuple, list):
        return _sequence(value, tp, origin or tp, args, name, source, bad)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a table")
        vt = args[1] if len(args) == 2 else typing.Any
        return {str(k): convert(v, vt, f"{name}.{k}", source) for k, v in value.items()}
    raise ConfigError(f"{source}: {name}: settings of type {_type_name(tp)} are not supported")


def _sequence(value, tp, kind, args, name, source, bad):
    if not isinstance(value, (list, tuple)):
        raise bad(f"an array ({_type_name(tp)})")
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise bad(f"an array of {len(args)} ({_type_name(tp)})")
        items = [convert(v, a, f"{name}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
    else:
        et = args[0] if args else typing.Any
        items = [convert(v, et, f"{name}[{i}]", source) for i, v in enumerate(value)]
    return tuple(items) if kind is tuple else items


# ---- overrides -------------------------------------------------------------------------------
def apply_overrides(obj, overrides):
    """A copy of dataclass instance ``obj`` with each ``"a.b=value"`` applied in turn; the
    value is read as the field's type (see :func:`parse_value`)."""
    for item in overrides:
        obj = _override(obj, item)
    return obj


def _override(obj, item: str):
    source = "--set"
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
    path = key.split(".")
    chain = [obj]
    for i, part in enumerate(path):
        node = chain[-1]
        prefix = ".".join(path[:i])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{source}: {prefix} is a value, not a table of settings")
        names = {f.name for f in dataclasses.fields(node) if f.init}
        if part not in names:
            raise ConfigError(f"{source}: unknown setting {key!r}; {_known(type(node), prefix + '.' if prefix else '')}")
        if i < len(path) - 1:
            chain.append(getattr(node, part))
    tp = typing.get_type_hints(type(chain[-1]))[path[-1]]
    value = parse_value(raw.strip(), tp, key, source)
    # Rebuild from the leaf up, so `obj` and its defaults are left unchanged.
    from locdiff.ranges import SettingError

    for node, name in zip(reversed(chain), reversed(path)):
        try:
            value = dataclasses.replace(node, **{name: value})
        except SettingError as err:  # a range check: worded as the run's own check words it
            raise ConfigError(f"{source} {item.strip()}: expected {err.expected}") from None
        except (TypeError, ValueError) as err:  # a __post_init__ check, as from a config file
            raise ConfigError(f"{source} {item.strip()!r}: {err}") from None
    return value


def parse_value(raw: str, tp, name: str, source: str = "--set"):
    """The command-line text ``raw`` as type ``tp``: strings need no quotes, booleans are
    true/false (yes/no, on/off, 1/0), sequences are ``a,b,c`` or a TOML array, ``none``
    is None for optional settings, tables are TOML inline tables ``{k = v}``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in (NONE, "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return parse_value(raw, a, name, source)
            except ConfigError:
                if len(inner) == 1:
                    raise
        raise ConfigError(f"{source}: {name} = {raw!r}: expected {_expected(tp)}")
    if tp is bool:
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
        if raw.lower() in words:
            return words[raw.lower()]
        raise ConfigError(f"{source}: {name} = {raw!r}: expected true or false")
    if tp is str or (isinstance(tp, type) and issubclass(tp, PurePath)):
        return convert(_unquote(raw), tp, name, source)
    if origin is typing.Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        text = _unquote(raw)
        choices = args if origin is typing.Literal else [m.value for m in tp]
        match = [c for c in choices if str(c) == text]
        return convert(match[0] if match else text, tp, name, source)
    if (origin in (tuple, list) or tp in (tuple, list)) and not raw.startswith("["):
        # One element type (list[X], tuple[X, ...], bare tuple/list), or one type per place.
        et = typing.Any if not args else args[0] if origin is list or args[-1] is Ellipsis else None
        items = [s.strip() for s in raw.split(",")] if raw.strip() else []
        if et is not None:
            value = [parse_value(s, et, f"{name}[{i}]", source) for i, s in enumerate(items)]
        else:
            value = [parse_value(s, a, f"{name}[{i}]", source) for i, (s, a) in enumerate(zip(items, args))]
            if len(items) != len(args):
                raise ConfigError(f"{source}: {name} = {raw!r}: expected {len(args)} values ({_type_name(tp)})")
        return convert(value, tp, name, source)
    if tp in (int, float):
        try:
            value = float(raw) if tp is float else integer(raw)
        except ValueError:
            raise ConfigError(f"{source}: {name} = {raw!r}: expected {_expected(tp)}") from None
        return value
    try:
        value = _toml_value(raw)
    except ConfigError:
        if tp is typing.Any:
            return raw
        raise ConfigError(f"{source}: {name} = {raw!r}: expected {_type_name(tp)} as a TOML value") from None
    return convert(value, tp, name, source)


def _unquote(raw: str) -> str:
    """A quoted TOML string's text, any other text as is."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return _toml_value(raw)
    return raw


def integer(raw: str) -> int:
    """An integer written as a setting may be: ``20000``, ``20_000``, ``1e5``, ``0x10`` (the
    command line's integer flags read theirs the same way as ``--set``)."""
    try:
        return int(raw.replace("_", ""), 0)
    except ValueError:
        f = float(raw)
        if not f.is_integer():
            raise
        return int(f)


def _toml_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{raw!r} is not a TOML value") from None


# ---- writing ---------------------------------------------------------------------------------
def to_dict(obj) -> dict:
    """A dataclass tree as plain TOML/JSON values: tuples as lists, enums as their values,
    paths as strings; None stays None (:func:`dumps` writes ``"none"``)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def _plain(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, enum.Enum):
        return _plain(v.value)
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def dumps(obj, *, version: int | None = None, header: str | None = None) -> str:
    """TOML text of dataclass instance ``obj`` (every field, nested dataclasses as tables,
    each headed by the first sentence of its docstring), which :func:`load` reads back to
    an equal instance."""
    lines = [f"# {h}" for h in (header or "").splitlines()]
    if version is not None:
        lines.append(f"{VERSION_KEY} = {version}")
    _write_table(obj, to_dict(obj), [], lines)
    return "\n".join(lines).strip("\n") + "\n"


def _write_table(obj, data: dict, path: list[str], lines: list[str]) -> None:
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path:
        lines.append("")
        doc = _first_sentence(obj)
        if doc:
            lines.append(f"# {doc}")
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    for k, v in data.items():
        if k not in tables:
            lines.append(f"{_key(k)} = {_toml(v)}")
    for k, v in tables.items():
        child = getattr(obj, k, None) if obj is not None else None
        _write_table(child if dataclasses.is_dataclass(child) else None, v, path + [k], lines)


def _first_sentence(obj) -> str:
    doc = (type(obj).__doc__ or "") if dataclasses.is_dataclass(obj) else ""
    # dataclasses invent a signature docstring for undocumented classes; skip it.
    if not doc or doc.startswith(type(obj).__name__ + "("):
        return ""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", " ".join(doc.split())).replace("``", "")
    return re.split(r"\. |: ", text)[0].rstrip(".") + "."


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)


def _toml(v) -> str:
    if v is None:
        return json.dumps(NONE)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {type(v).__name__} value {v!r} as TOML")


# ---- messages --------------------------------------------------------------------------------
def _known(cls, prefix: str) -> str:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    where = prefix.rstrip(".") or "the top level"
    return f"{where} has: {', '.join(names)}"


def _is_scalar(tp) -> bool:
    return tp in (bool, int, float, str) or typing.get_origin(tp) is typing.Literal or \
        (isinstance(tp, type) and issubclass(tp, (enum.Enum, PurePath)))


def _expected(tp) -> str:
    """What a value of type ``tp`` looks like, for messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = " or ".join(_expected(a) for a in args if a is not type(None))
        return inner + (f' or "{NONE}"' if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp) or _type_name(tp)


def _type_name(tp) -> str:
    if tp is type(None):
        return "none"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
