"""Plain data (YAML, JSON) to typed dataclasses and back, with errors that name the key.

One implementation for the training config and the bundle manifest: unknown keys, missing keys and wrong types
are errors of the caller's class (``ConfigError``, ``BundleError``), never a KeyError or a TypeError from deep
inside. Torch-free, so the runtime parses manifests with it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from amoe_sdk.errors import AmoeError


def to_plain(obj: Any) -> Any:
    """A dataclass (nested) -> dicts, lists and scalars; ``global_`` fields are written as ``global``."""
    if dataclasses.is_dataclass(obj):
        return {plain_key(f.name): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def plain_key(name: str) -> str:
    # ``global`` is a Python keyword, so the field is ``global_``; files say ``global``.
    return name.rstrip("_")


def from_plain(cls: type, data: Any, origin: str, error: type[AmoeError], path: str = "") -> Any:
    """``data`` (a mapping) -> ``cls``. Messages read ``ORIGIN: KEY ...`` with ``origin`` the file (or "defaults")
    and KEY the dotted path below it (``train.steps``). Fields without a default are required."""
    at = f"{origin}: {path}" if path else origin
    if not isinstance(data, dict):
        raise error(f"{at}: expected a mapping for {cls.__name__}, got {type(data).__name__} {_short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {plain_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise error(f"{at}: unknown key(s) {unknown} in {cls.__name__}; known keys: {sorted(fields)}")
    missing = [
        _join(path, key) for key, f in fields.items()
        if key not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise error(f"{origin}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    kwargs = {}
    for key, value in data.items():
        f = fields[key]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = from_plain(hint, value, origin, error, _join(path, key))
        else:
            kwargs[f.name] = coerce(value, hint, origin, error, _join(path, key))
    return cls(**kwargs)


def coerce(value: Any, hint: Any, origin: str, error: type[AmoeError], path: str) -> Any:
    """``value`` checked against the type ``hint`` (int, float, str, bool, list[X], dict[K, V], Optional, Any)."""
    origin_type = typing.get_origin(hint)
    args = typing.get_args(hint)
    at = f"{origin}: {path}"
    if value is None and type(None) in args:
        return None
    if args and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        if dataclasses.is_dataclass(hint):
            return from_plain(hint, value, origin, error, path)
        origin_type, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_type is list:
        if not isinstance(value, (list, tuple)):
            raise error(f"{at}: expected a list, got {_short(value)}")
        return [coerce(v, args[0], origin, error, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin_type is dict:
        if not isinstance(value, dict):
            raise error(f"{at}: expected a mapping, got {_short(value)}")
        return {coerce(k, args[0], origin, error, path): coerce(v, args[1], origin, error, _join(path, str(k))) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise error(f"{at}: expected true or false, got {_short(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{at}: expected an integer, got {_short(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{at}: expected a number, got {_short(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise error(f"{at}: expected a string, got {_short(value)}")
        return value
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def in_range(value: float, low: float | None, high: float | None, low_open: bool = False) -> bool:
    """``value`` is finite and lies in [low, high] (``(low, high]`` with ``low_open``); None is unbounded."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return not ((low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high))


def describe_range(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return "any finite number"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
