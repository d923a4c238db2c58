"""Typed dataclass trees built from YAML mappings and ``a.b.c=value`` overrides.

Generic machinery only (the run's tree lives in ``pretrain/config.py``, the model's section in
``models/``): every key is checked against the dataclass fields, every value against its
annotation, and an error names the full dotted key, what was wrong and what would be accepted.

Tagged unions: a field annotated with a :class:`Tagged` base (e.g. ``ffn: FFNConfig``) takes a
mapping whose tag key (``kind``, or ``family`` for the model) picks the concrete dataclass from
the base's ``variants()``; the other keys must be fields of that variant. A bare string is the
tag alone (``ffn: swiglu`` = ``ffn: {kind: swiglu}``).

Renamed keys: a dataclass may map old key names to their new dotted place in ``RENAMED``; using
an old name is an error that says where it went.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping

import yaml


class Tagged:
    """Base of a tagged union of config dataclasses. Subclasses that are the union's base set
    ``TAG`` (the key naming the variant) and implement ``variants()``; each variant is a
    dataclass with a field named ``TAG`` whose default is its own name."""

    TAG: typing.ClassVar[str] = "kind"
    UNION: typing.ClassVar[str] = "kind"  # what a variant is called in messages ("ffn kind")

    @classmethod
    def variants(cls) -> dict[str, type]:
        raise NotImplementedError

    @classmethod
    def is_union_base(cls) -> bool:
        return "variants" in cls.__dict__


def variant_name(obj: Any) -> str:
    return getattr(obj, type(obj).TAG)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and the fix."""


def from_dict(cls: type, values: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys."""
    values = dict(values or {})
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(_unknown_key_message(cls, unknown[0], fields, prefix))
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _unknown_key_message(cls: type, key: str, fields: dict, prefix: str) -> str:
    renamed = getattr(cls, "RENAMED", {})
    section = prefix.rstrip(".")
    if key in renamed:
        return f"'{prefix}{key}' has moved: it is now '{renamed[key]}'"
    close = difflib.get_close_matches(key, fields, n=1)
    if isinstance(cls, type) and issubclass(cls, Tagged):
        return (
            f"'{prefix}{key}' is not a field of {section} {cls.UNION} {getattr(cls, cls.TAG, '?')!r}; "
            f"its fields are {', '.join(fields)}" + (f" (did you mean '{prefix}{close[0]}'?)" if close else "")
        )
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
    return f"unknown config key '{prefix}{key}'{hint}"


def tagged_from_value(base: type, value: Any, key: str) -> Any:
    """The variant of tagged union ``base`` that ``value`` (a mapping with the tag, or the tag
    alone as a string) names, built from the rest of the mapping."""
    tag = base.TAG
    if isinstance(value, str):
        value = {tag: value}
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be a mapping with a '{tag}' (or just the {base.UNION} name), got {value!r}")
    variants = base.variants()
    name = value.get(tag)
    if name not in variants:
        what = f"{name!r} is unknown" if tag in value else f"needs a '{tag}'"
        raise ConfigError(f"'{key}.{tag}' {what}; choose one of {sorted(variants)}")
    return from_dict(variants[name], value, key + ".")


def coerce(annotation: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting the few safe cases (int → float,
    list → tuple, mapping → dataclass, "3e-4" → float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Tagged) and annotation.is_union_base():
        if isinstance(value, annotation):
            return value
        return tagged_from_value(annotation, value, key)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': {value!r} fits none of {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads exponent-only numbers such as 3e-4 as strings.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"'{key}' must be of type {annotation.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict, in order."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key.subkey=value (e.g. train.max_steps=50)")
        key, raw = override.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} has an empty part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({e})") from None
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def load_yaml(path) -> dict:
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded
