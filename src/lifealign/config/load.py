"""YAML in, ``RunConfig`` out: strict keys, dotted overrides, and errors that name the key and its YAML line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lifealign.config.schema import MethodSection, RunConfig


class ConfigError(ValueError):
    """A config problem; the message names the file, the dotted key and (when known) the YAML line."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and remembers the line of every mapping key."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{loader.name}:{line}: duplicate key {key!r} (first at line {seen[key]})")
        seen[key] = line
    mapping = loader.construct_mapping(node, deep=deep)
    loader.key_lines.setdefault(id(mapping), {}).update(seen)  # type: ignore[attr-defined]
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(data: Any, lines_by_id: dict[int, dict[Any, int]], prefix: tuple = ()) -> dict[tuple, int]:
    """Flatten the loader's per-mapping key lines into ``{("train", "lr"): 12, ...}``."""
    out: dict[tuple, int] = {}
    if isinstance(data, dict):
        for key, line in lines_by_id.get(id(data), {}).items():
            out[prefix + (key,)] = line
        for key, value in data.items():
            out.update(_key_lines(value, lines_by_id, prefix + (key,)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out.update(_key_lines(value, lines_by_id, prefix + (i,)))
    return out


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Parse a YAML file with the strict loader; returns the mapping and the line of every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    loader = _StrictLoader(text)
    loader.name = str(path)
    loader.key_lines = {}  # type: ignore[attr-defined]
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data, _key_lines(data, loader.key_lines)  # type: ignore[attr-defined]


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.0.c=value`` in place; the value is parsed as YAML (``1e-4`` → float, ``[a, b]`` → list)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            index = int(key)
            if index == len(node):
                node.append([] if nxt.isdigit() else {})
            node = node[index]
            continue
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    else:
        node[last] = value


def _format_validation_error(exc: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    messages = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{source}:{line}" if line else source
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            messages.append(f"{where}: unknown key '{dotted}'")
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            messages.append(f"{where}: {dotted}: {err['msg']}{got_text}")
    return "invalid config:\n  " + "\n  ".join(messages)


def config_from_dict(
    data: dict[str, Any], source: str = "<config>", lines: dict[tuple, int] | None = None
) -> RunConfig:
    """Validate a plain mapping into a ``RunConfig`` (errors name the dotted key and line)."""
    try:
        return RunConfig.model_validate(data)  # lax mode parses "1e-5" for float fields
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, lines or {})) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path``, apply dotted ``overrides`` (``train.lr=1e-4``) and validate."""
    data, lines = read_yaml(path)
    for override in overrides or []:
        apply_override(data, override)
    return config_from_dict(data, str(path), lines)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what goes to ``run_dir/config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


TRAJECTORY_KEYS = ("model", "data", "tasks", "method", "methods", "train", "sft", "unlearn")
"""Sections whose change alters the training trajectory; a resume refuses to continue when they differ."""

EXECUTION_ONLY_TRAIN_KEYS = ("save_every", "keep_checkpoints", "log_every", "tensorboard", "progress", "threads")
"""``train`` keys that change logging or speed, not the trajectory: a run may resume with other values."""


def trajectory_hash(cfg: RunConfig, method: MethodSection | None = None) -> str:
    """sha256 of the trajectory-affecting part of the config (logging and execution keys may change on resume).

    With ``method``, the hash covers that one method instead of the whole ``methods`` list, so adding a method to a
    comparison does not invalidate the finished methods' checkpoints.
    """
    dumped = cfg.model_dump(mode="json")
    train = dict(dumped["train"])
    for key in EXECUTION_ONLY_TRAIN_KEYS:
        train.pop(key, None)
    dumped["train"] = train
    if method is not None:
        dumped["method"] = method.model_dump(mode="json")
        dumped["methods"] = []
    payload = json.dumps({k: dumped[k] for k in TRAJECTORY_KEYS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
