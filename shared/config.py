"""The one typed, validated config both stages read: loading, overrides, errors, description.

A run is described by one YAML file with the sections `model`, `data`, `buckets`, `upscale`, `cache`,
`train` and `deepspeed`, plus dotted command-line overrides (`train.lr=1e-5`). Every field is declared
in `config_schema.py` with its type, bounds and a description; unknown keys, wrong types and impossible
values are rejected before any work starts with a single line naming the key path (`ConfigError`).
Credentials are refused wherever they appear (`secrets.py`), and never echoed in an error.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config_schema import (
    FAMILIES,
    BucketsConfig,
    CacheConfig,
    ComputeDtype,
    Config,
    DataConfig,
    EmaConfig,
    Family,
    LoraSection,
    MetadataFilter,
    ModelConfig,
    SourceConfig,
    StoreDtype,
    TimestepBiasConfig,
    TrainConfig,
    UpscaleConfig,
    credential_in_config,
)
from .secrets import credential_error, redact_tree

__all__ = [
    "FAMILIES", "BucketsConfig", "CacheConfig", "ComputeDtype", "Config", "ConfigError", "DataConfig", "EmaConfig",
    "Family", "LoraSection", "MetadataFilter", "ModelConfig", "SourceConfig", "StoreDtype", "TimestepBiasConfig",
    "TrainConfig", "UpscaleConfig", "config_to_dict", "describe_config", "load_config", "parse_overrides",
    "printable_config",
]


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key path and what was expected."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[: i + 1])} is not a valid list index")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is not a section")
        node = node.setdefault(part, {})
        if node is None:
            node = tree[part] = {}
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {dotted}: cannot set {last} here")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Split `key.path=value` strings; values are parsed as YAML scalars (`1e-5`, `true`, `[1, 2]`)."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.lr=1e-5")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
        pairs.append((key, value))
    return pairs


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section a validation error points into, for did-you-mean hints."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for arg in (*getattr(ann, "__args__", ()), ann):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
                break
        else:
            return []
    return list(getattr(current, "model_fields", {}))


def _format_error(exc: ValidationError, source: str) -> str:
    # A misspelt required key shows up twice: as missing and as unknown. Name the misspelling.
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(Config, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        msg = f"unknown key; {hint}"
    elif kind == "missing":
        msg = "required key is missing"
    else:
        got = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        if kind != "value_error" and not isinstance(got, dict | list):
            msg += f", got {got!r}"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config error in {source}: {path}: {msg}{more}"


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply dotted overrides and validate it.

    Raises `ConfigError` with one line naming the file, the key path and what was expected.
    """
    tree: dict[str, Any] = {}
    source = str(path) if path is not None else "<overrides>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass --config with a YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config error in {p}{where}: not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error in {p}: the top level must be a mapping of sections")
        tree = loaded or {}
    return config_from_tree(tree, overrides, source)


def config_from_tree(tree: dict[str, Any], overrides: list[str] | None, source: str) -> Config:
    """Validate a config tree (e.g. a checkpoint's snapshot) after dotted `overrides`; errors as `load_config`'s."""
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
        source = f"{source} + overrides" if "overrides" not in source else source
    where, in_url = credential_in_config(tree)
    if where:
        raise ConfigError(f"config error in {source}: {credential_error(where, in_url=in_url)}")
    try:
        return Config.model_validate(tree, strict=False)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def describe_config() -> str:
    """Every key with its type, default and description: the text behind `--help-config`."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            sub = next(
                (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
                None,
            )
            if sub is not None and getattr(ann, "__origin__", None) is list:
                lines.append(f"{key}: list of entries — {field.description or ''}".rstrip(" —"))
                walk(sub, f"{key}[].")
            elif sub is not None:
                lines.append(f"{key}:")
                walk(sub, f"{key}.")
            else:
                tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
                default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
                lines.append(f"  {key} ({tname}; {default}): {field.description or ''}")

    walk(Config, "")
    return "\n".join(lines)


def config_to_dict(config: Config) -> dict[str, Any]:
    """A plain, JSON-able snapshot (for checkpoints and the cache fingerprint)."""
    return config.model_dump(mode="json")


def printable_config(config: Config) -> dict[str, Any]:
    """The snapshot with anything that could be a credential redacted: what `latentforge config` prints."""
    return redact_tree(config_to_dict(config))
