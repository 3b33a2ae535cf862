"""Typed configs: dataclasses loaded from YAML with clear errors for unknown or ill-typed keys."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields."""
    where = where or cls.__name__
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where) if len(options) == 1 else value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return origin(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint in (int, float, str, bool) and not isinstance(value, hint)) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`values` (a nested mapping, changed in place) with `key.sub=value` overrides, each value
    parsed as YAML ("3e-4" -> 0.0003, "[a, b]" -> a list; anything unparsable stays a string)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override expects key=value, got {override!r}")
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
        node[leaf] = _parse_value(text)
    return values


def _parse_value(text: str):
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:  # e.g. a prompt "{instruction} <image>": a plain string
        return text
    if isinstance(value, str):  # YAML reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
