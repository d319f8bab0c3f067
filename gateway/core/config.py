"""Settings from plain data (a parsed TOML file) into the policy dataclasses, every error naming its key.

Nested tables become nested dataclasses; unknown keys are refused with the allowed ones listed; settings
whose names end in ``_s`` take seconds as a number or a duration such as ``"30min"``, ``"24h"`` or ``"7d"``.
The policies' own checks (a window that ends before it starts, a retry budget that leaves no room for a
field order) come back with the table they were found in.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping

from .policy import PolicyError


class ConfigError(ValueError):
    pass


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, None: 1, "min": 60, "h": 3600, "d": 86400}


def build(cls, data, path: str, base=None):
    """An instance of the dataclass ``cls`` from ``data``; ``path`` names it in errors (``trips.window``).

    A table sets only what it names: the rest comes from ``base`` (the defaults, when not given), so a file
    can change one retry setting without restating the policy around it. The first error is raised; see
    :func:`build_all` for every error at once.
    """
    errors: list[ConfigError] = []
    result = build_all(cls, data, path, errors, base)
    if errors:
        raise errors[0]
    return result


def build_all(cls, data, path: str, errors: list, base=None):
    """As :func:`build`, but every error is appended to ``errors`` (each setting checked on its own, nested
    tables too) and ``None`` comes back when there was any."""
    if not isinstance(data, Mapping):
        errors.append(ConfigError(f"{path}: expected a table of settings, got {_shown(data)}"))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    before = len(errors)
    for name in sorted(set(data) - set(fields)):
        errors.append(ConfigError(f"{_join(path, name)}: unknown setting; allowed here: {', '.join(fields)}"))
    if base is None:
        base = _default(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        try:
            kwargs[name] = _value(hints[name], value, _join(path, name), getattr(base, name, None), errors=errors)
        except ConfigError as exc:
            errors.append(exc)
        except _Invalid:  # a nested table: its errors are in the list already
            pass
    if len(errors) > before:
        return None
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (PolicyError, ValueError, TypeError) as exc:
        errors.append(exc if isinstance(exc, ConfigError) else ConfigError(f"{path or 'settings'}: {exc}"))
        return None


class _Invalid(Exception):
    """A nested table whose errors are already in the list."""


def _default(cls):
    try:
        return cls()
    except TypeError:  # required fields: the table must give them all
        return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shown(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _value(hint, v, path: str, base=None, duration: bool | None = None, *, errors: list):
    """``v`` as ``hint``; ``base`` is what it replaces (merged into, for tables); durations are allowed for
    settings named ``*_s`` and the items of their lists and tables. A nested table's errors are all appended
    to ``errors`` (and :class:`_Invalid` leaves the setting out)."""
    if duration is None:
        duration = path.rsplit(".", 1)[-1].endswith("_s")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _value(inner[0], v, path, base, duration, errors=errors)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if v not in allowed or type(v) is bool:
            raise ConfigError(f"{path}: {_shown(v)} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return v
    if dataclasses.is_dataclass(hint):
        before = len(errors)
        result = build_all(hint, v, path, errors, base)
        if len(errors) > before:
            raise _Invalid
        return result
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_shown(v)}")
        item = typing.get_args(hint)[0]
        return tuple(_value(item, x, f"{path}[{i}]", None, duration, errors=errors) for i, x in enumerate(v))
    if origin is dict:
        if not isinstance(v, Mapping):
            raise ConfigError(f"{path}: expected a table, got {_shown(v)}")
        _, val_t = typing.get_args(hint)
        merged = dict(base or {})
        for k, x in v.items():
            merged[str(k)] = _value(val_t, x, f"{path}.{k}", merged.get(str(k)), duration, errors=errors)
        return merged
    if hint is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{path}: expected true or false, got {_shown(v)}")
        return v
    if hint in (int, float):
        if duration and isinstance(v, str):
            v = _seconds(v, path)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_shown(v)}")
        if hint is int:
            if v != int(v):
                raise ConfigError(f"{path}: expected a whole number, got {v!r}")
            return int(v)
        return float(v)
    if hint is str:
        if not isinstance(v, str):
            raise ConfigError(f"{path}: expected text, got {_shown(v)}")
        return v
    raise ConfigError(f"{path}: cannot be set from a file")


def _seconds(text: str, path: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{path}: {text!r} is not a duration; write seconds, or a number with ms, s, min, h or d "
                          f"(for example \"30min\", \"24h\")")
    return float(m.group(1)) * _UNIT_S[m.group(2)]
