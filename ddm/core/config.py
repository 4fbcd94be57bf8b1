"""Typed configuration: dataclasses loaded from YAML with dotted command-line overrides.

A config is a tree of dataclasses. ``load(Cls, "spec.yaml", ["train.lr=3e-4"])`` reads the YAML,
applies the overrides, converts every value to its annotated type and runs each dataclass's
``__post_init__`` validation. Any problem is a ``ValueError`` that names the dotted field, so a
bad config fails at load time rather than hours into a run. ``to_dict`` gives the JSON-ready
resolved config that is saved next to every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists), ready for JSON or YAML."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``; ValueError naming ``where`` if it can't."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config field '{where}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field '{where}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config field '{where}' must be a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if key_tp is str:  # YAML reads `2: x` with an int key; the CLI's `field.2=x` with a string one
            value = {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value.items()}
        return {
            _convert(k, key_tp, f"{where} key {k!r}"): _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config field '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"config field '{where}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config field '{where}' must be a number, got {value!r}")
        if not math.isfinite(value):  # no setting of ddm means anything at NaN or infinity
            raise ValueError(f"config field '{where}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config field '{where}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at '{where}'")  # a programming error, not user input


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a dict, checking field names and types recursively.

    A class with an ``upgrade_fields(data) -> data`` static method gets to rename fields of older
    formats first (configs saved by earlier versions keep loading).
    """
    if hasattr(cls, "upgrade_fields"):
        data = cls.upgrade_fields(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown config field '{name}'; {cls.__name__} has: {', '.join(fields)}")
    kwargs = {}
    for k, v in data.items():
        default = _default(fields[k])
        if isinstance(v, dict) and dataclasses.is_dataclass(default):
            v = deep_merge(to_dict(default), v)  # a partial section keeps the parent's other defaults
        kwargs[k] = _convert(v, hints[k], f"{where}.{k}" if where else k)
    try:
        return cls(**kwargs)
    except ValueError as e:
        if not where or str(e).startswith(f"config field '{where}"):
            raise
        raise ValueError(f"config field '{where}': {e}") from e


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` merged into a copy of ``base``; nested dicts merge key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_value(text: str) -> Any:
    """An override value, parsed as YAML so "3", "1e-4", "true", "[1, 2]" get their types."""
    # YAML 1.1 reads "1e-4" as a string; a float() try first keeps scientific notation numeric.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (a new dict; the input is untouched)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like dotted.field=value")
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, sha256: str = "") -> T:
    """Load ``cls`` from a YAML file (or its defaults when ``path`` is None) plus overrides; with
    ``sha256``, only if the file's bytes have that digest."""
    data: dict = {}
    if path is not None:
        path = str(path)
        if "://" in path:  # a config in the store (jobs submitted to islands read theirs from there)
            import fsspec  # a tenth of a second to import: not for every command's start

            try:
                with fsspec.open(path, "r") as f:
                    text = f.read()
            except FileNotFoundError as e:
                raise ValueError(f"config file {path!r} does not exist") from e
        else:
            if not Path(path).is_file():
                raise ValueError(f"config file {path!r} does not exist")
            text = Path(path).read_text()
        if sha256 and hashlib.sha256(text.encode()).hexdigest() != sha256:
            raise ValueError(
                f"config file {path!r} is not the one this job was submitted with (sha256 {sha256[:12]}…): "
                "someone changed it in the store since; submit the job again (`ddm resume`)"
            )
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    return from_dict(cls, apply_overrides(data, overrides or []))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
