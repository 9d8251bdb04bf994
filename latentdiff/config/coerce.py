"""Plain dicts (from YAML or JSON) <-> typed config dataclasses, and strict dotted overrides.

``from_dict(cls, data)`` converts each value to its annotated type (``ValueError`` naming the key otherwise) and
refuses unknown keys; ``apply_overrides(data, ["a.b=1"])`` sets existing keys only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp, value, where: str):
    """Convert a YAML value to the annotated type, or raise ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "4e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a plain dict; unknown keys are errors."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"valid keys: {sorted(types_)}")
    kwargs = {k: _coerce(types_[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place.

    The dotted path must already exist in ``data`` (after defaults are filled in); unknown keys are errors.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"override {item!r}: unknown key {'.'.join(keys[: i + 1])!r}")
            if i == len(keys) - 1:
                node[key] = yaml.safe_load(raw)
            else:
                node = node[key]
    return data
