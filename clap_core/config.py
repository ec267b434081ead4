"""Typed dataclass configs loaded from YAML, with dotted `key=value` overrides.

    cfg = load_config(PretrainConfig, "pretrain.yaml", ["train.lr=3e-4", "model.embed_dim=256"])

Every key is checked against the dataclass: an unknown key or a value of the wrong type raises
`ConfigError` naming the full dotted key (and a close match when there is one). Nested dataclasses,
`Optional`, `Literal`, `list[...]`, `tuple[...]` and `dict[...]` fields are supported.

A dataclass may declare `__variants__ = {"kind_field": {"value": SubDataclass, ...}}` to pick the
dataclass of a nested section from one of its own keys (a registry, not string matching on content).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, missing or has the wrong type; the message names the dotted key."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the path and the problem in one line."""


# ---------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict, checking every key and value type."""
    data = {} if data is None else data
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    _reject_unknown_keys(data, fields, prefix)
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and _has_no_default(f)]
    if missing:
        raise ConfigError(f"missing required config key '{_join(prefix, missing[0])}'")
    return cls(**kwargs)


def _reject_unknown_keys(data: dict, fields: dict, prefix: str) -> None:
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{_join(prefix, key)}'{hint}; valid keys: {valid}")


def _has_no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against type `tp` (converting YAML lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _coerce_dataclass(tp, value, key)
    if origin in (list, tuple):
        return _coerce_sequence(tp, origin, args, value, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(tp, value, key)


def _coerce_union(args: tuple, value: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(arg, value, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} fits none of {args}")


def _coerce_dataclass(tp: type, value: Any, key: str) -> Any:
    if isinstance(value, tp):
        return value
    variants = getattr(tp, "__variants__", None)
    if variants and isinstance(value, dict):
        (kind_field, registry), = variants.items()
        kind = value.get(kind_field, getattr(tp, kind_field, None))
        if kind not in registry:
            raise ConfigError(f"config key '{_join(key, kind_field)}' must be one of {sorted(registry)}, got {kind!r}")
        return from_dict(registry[kind], value, key)
    return from_dict(tp, value, key)


def _coerce_sequence(tp: Any, origin: type, args: tuple, value: Any, key: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"config key '{key}' must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; users write it that way, so accept it.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be float, got {value!r}") from None
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got bool {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# YAML files and command-line overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003). The value is parsed as YAML ('[1,2]', 'null', 'true')."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (dotted keys for nested sections)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a copy of `data` with each dotted `key=value` override set."""
    data = json.loads(json.dumps(data)) if data else {}
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], source: str | Path | dict | None = None, overrides: list[str] | None = None) -> T:
    """Load dataclass `cls` from a YAML path or dict (or defaults when None), then apply overrides."""
    data = read_yaml(source) if isinstance(source, (str, Path)) else dict(source or {})
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict of YAML/JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a resolved config, for manifests and run folders."""
    text = json.dumps(to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
