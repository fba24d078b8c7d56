"""Configuration files: YAML read as YAML 1.2 reads numbers, ``extends: other.yaml`` (relative to the file)
inherits and overrides another file, ``--set section.key=value`` overrides one value. The result is a plain
mapping of sections that :func:`neurofm.config.validate` checks and fills."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from neurofm.errors import NeurofmError


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``2E5`` as floats (YAML 1.2), not as strings (PyYAML's 1.1)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise NeurofmError(f"config {path} extends itself in a cycle; remove the circular 'extends'")
    if not path.is_file():
        raise NeurofmError(f"config file {path} does not exist; pass an existing YAML file with --config")
    try:
        loaded = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise NeurofmError(
            f"config {path} is not valid YAML ({str(error).splitlines()[0]}); fix the syntax"
        ) from None
    if not isinstance(loaded, dict):
        raise NeurofmError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
    base = loaded.pop("extends", None)
    if base is None:
        return loaded
    return deep_merge(read_yaml(path.parent / base, (*seen, path)), loaded)


# Mappings that are data, not settings: an override replaces them whole instead of merging into them
# (a label mapping {a: x} must not inherit the keys of the default mapping).
REPLACED_WHOLE = {"label_mapping", "space"}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` onto ``base`` (dicts merge, everything else replaces; the
    mappings named in ``REPLACED_WHOLE`` are replaced whole)."""
    merged = dict(base)
    for key, value in override.items():
        if key not in REPLACED_WHOLE and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value as YAML) into (["section", "key"], value)."""
    if "=" not in text:
        raise NeurofmError(f"--set {text!r} is not of the form section.key=value; e.g. --set train.epochs=5")
    dotted, _, raw = text.partition("=")
    keys = [part for part in dotted.strip().split(".") if part]
    if len(keys) < 2:
        raise NeurofmError(f"--set {text!r} must name a section and a key, e.g. --set train.epochs=5")
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError:
        value = raw
    return keys, value


def set_path(config: dict[str, Any], keys: list[str], value: Any) -> None:
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise NeurofmError(f"cannot set {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value
