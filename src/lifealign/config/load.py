"""YAML in, ``RunConfig`` out: strict keys, dotted overrides, and errors that name the key and its YAML line."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lifealign.config.base import nonfinite_keys
from lifealign.config.schema import MethodSection, RunConfig


class ConfigError(ValueError):
    """A config problem; the message names the file, the dotted key and (when known) the YAML line."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and remembers the line of every mapping key.

    Merge keys (``<<: *defaults``, ``<<: [*a, *b]``) work as the YAML merge-key spec says: explicit keys of the
    mapping override merged ones, and in a merge list earlier mappings override later ones (PyYAML's own merge lets
    the later win). Duplicates are checked among the keys written in the mapping itself, so a key repeated next to a
    merge is still an error.
    """


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _flatten_merges(node: yaml.MappingNode) -> None:
    """Replace the merge keys of ``node`` (in place) by the merged pairs, lowest precedence first."""
    merged: list[tuple[yaml.Node, yaml.Node]] = []
    explicit: list[tuple[yaml.Node, yaml.Node]] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            explicit.append((key_node, value_node))
            continue
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in reversed(sources):  # later mappings first, so earlier ones override them
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    "while merging a mapping",
                    node.start_mark,
                    f"'<<' needs mappings, got {source.id}",
                    source.start_mark,
                )
            _flatten_merges(source)
            merged.extend(source.value)
    node.value = merged + explicit


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = "<<" if key_node.tag == _MERGE_TAG else loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{loader.name}:{line}: duplicate key {key!r} (first at line {seen[key]})")
        seen[key] = line
    _flatten_merges(node)  # merged keys first, explicit keys last: later keys win in the dict below
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        lines[key] = seen.get(key, key_node.start_mark.line + 1)  # a merged key: the line where it is written
    mapping = loader.construct_mapping(node, deep=deep)
    loader.key_lines.setdefault(id(mapping), {}).update(lines)  # type: ignore[attr-defined]
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


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _read_config_text(path: Path) -> str:
    """The file's text, or a ``ConfigError`` that says what ``path`` is instead of a readable YAML file.

    Checked without opening anything that could block (a FIFO is never opened).
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise ConfigError(
                f"config file not found: {path} (a broken symbolic link to {os.readlink(path)})"
            ) from None
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"config path {path} is a directory, not a YAML file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        raise ConfigError(f"config path {path} is not a regular file ({kind})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Parse a YAML file with the strict loader; returns the mapping and the line of every key."""
    path = Path(path).expanduser()
    text = _read_config_text(path)
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


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    return f"{'null' if value is None else type(value).__name__} ({value!r})"


def _list_index(node: list, key: str, where: str, override: str, dotted: str) -> int:
    """The position ``key`` names in ``node`` (an existing item, or ``len(node)`` to append one)."""
    if not key.isdigit():
        raise ConfigError(
            f"override {override!r}: {where or 'the config'} is a list, so {key!r} must be an index "
            f"(0..{len(node) - 1} to change an item, {len(node)} to append one)"
            if node
            else f"override {override!r}: {where or 'the config'} is an empty list, so {key!r} must be 0 (to append)"
        )
    index = int(key)
    if index > len(node):
        raise ConfigError(
            f"override {override!r}: {dotted} is out of range: {where} is a list of {len(node)} item(s) "
            f"(indices 0..{len(node) - 1}; {len(node)} appends one)"
        )
    return index


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.0.c=value`` in place; the value is parsed as YAML (``1e-4`` → float, ``[a, b]`` → list).

    A list index may name an existing item or ``len(list)`` (append). An index past the end, a non-integer index
    into a list or a key below a scalar is a ``ConfigError`` naming the key and what is there. A component written
    as one mapping where a list of them is accepted (``loss: {name: dpo}``) is that list's only item, so both
    ``method.loss.name=fpo`` and ``method.loss.0.name=fpo`` set its name.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r}: empty key in {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {exc}") from None
    # Each container on the path is copied before it is changed: YAML aliases and merge keys share one object
    # between several places, and an override of one place must not change the others.
    node: Any = data
    parent: Any = None
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth])
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        fresh = ([] if keys[depth + 1].isdigit() else {}) if not last else value
        if _is_single_spec(node, key):  # `loss: {name: dpo}` is the one-item list `[{name: dpo}]`
            node = parent[keys[depth - 1] if isinstance(parent, dict) else int(keys[depth - 1])] = [node]
        parent = node
        if isinstance(node, list):
            index = _list_index(node, key, where, override, here)
            if index == len(node):
                node.append(fresh)
            elif last:
                node[index] = value
            elif node[index] is None:
                node[index] = fresh
            else:
                node[index] = copy.copy(node[index])
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            elif node.get(key) is None:
                node[key] = fresh
            else:
                node[key] = copy.copy(node[key])
            node = node[key]
        else:
            raise ConfigError(
                f"override {override!r}: cannot set {dotted!r}: {where} is {_describe(node)}, not a mapping"
            )


def _is_single_spec(node: Any, key: str) -> bool:
    """A component given as one mapping (``{name: ..., ...}``) where an index addresses it as a list's item."""
    return isinstance(node, dict) and key.isdigit() and key not in node and "name" in node


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
            message = err["msg"].removeprefix("Value error, ")
            messages.append(f"{where}: {dotted}: {message}{got_text}")
    return "invalid config:\n  " + "\n  ".join(messages)


def config_from_dict(
    data: dict[str, Any], source: str = "<config>", lines: dict[tuple, int] | None = None
) -> RunConfig:
    """Validate a plain mapping into a ``RunConfig`` (errors name the dotted key and line)."""
    try:
        return RunConfig.model_validate(data)  # lax mode parses "1e-5" for float fields
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, lines or {})) from None


def _check_finite(data: dict[str, Any], source: str, lines: dict[tuple, int]) -> None:
    """Every number must be finite, also inside untyped values (loss kwargs, plugin options)."""
    messages = []
    for key, value in nonfinite_keys(data):
        line = next((lines[key[:n]] for n in range(len(key), 0, -1) if key[:n] in lines), None)
        where = f"{source}:{line}" if line else source
        messages.append(f"{where}: {'.'.join(str(k) for k in key)}: must be a finite number (got {value})")
    if messages:
        raise ConfigError("invalid config:\n  " + "\n  ".join(messages))


def _check_one_method_key(data: dict[str, Any], source: str, lines: dict[tuple, int]) -> None:
    """``method`` and ``methods`` both set: one of them would be ignored, so neither is guessed."""
    if "method" in data and data.get("methods"):
        at = {k: f" (line {lines[(k,)]})" if (k,) in lines else "" for k in ("method", "methods")}
        raise ConfigError(
            f"{source}: both 'method'{at['method']} and 'methods'{at['methods']} are set; 'method' would be ignored. "
            "Keep 'method' for one method or 'methods' for a comparison, not both"
        )


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path``, apply dotted ``overrides`` (``train.lr=1e-4``) and validate."""
    data, lines = read_yaml(path)
    for override in overrides or []:
        apply_override(data, override)
    source = str(Path(path).expanduser())
    _check_one_method_key(data, source, lines)
    _check_finite(data, source, lines)
    return config_from_dict(data, source, lines)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what goes to ``run_dir/config.yaml``; without ``method`` when ``methods`` is
    set, so the file loads again)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


TRAJECTORY_KEYS = ("model", "data", "tasks", "method", "methods", "train", "sft", "unlearn")
"""Sections whose change alters the training trajectory; a resume refuses to continue when they differ."""

EXECUTION_ONLY_TRAIN_KEYS = ("save_every", "keep_checkpoints", "log_every", "tensorboard", "progress", "threads")
"""``train`` keys that change logging or speed, not the trajectory: a run may resume with other values."""

EXECUTION_ONLY_UNLEARN_KEYS = ("score_fused",)
"""``unlearn`` keys that change speed, not the trajectory: a run may resume with other values."""

SCORE_ONLY_EVAL_KEYS = ("batch_size", "n_boot", "ci_level", "baseline")
"""``eval`` keys that change speed or the summary statistics, not the scores of a cell: a run may resume with others."""


def trajectory_signature(cfg: RunConfig, method: MethodSection | None = None) -> dict[str, Any]:
    """The trajectory- and score-affecting part of the config, as JSON (``TRAJECTORY_KEYS`` plus ``eval``, without the
    execution-only keys): what a resumed run must share with the checkpoint it continues.

    With ``method``, it covers that one method instead of the whole ``methods`` list, so adding a method to a
    comparison keeps the finished methods' checkpoints valid.
    """
    dumped = cfg.model_dump(mode="json")
    dumped["train"] = {k: v for k, v in dumped["train"].items() if k not in EXECUTION_ONLY_TRAIN_KEYS}
    dumped["unlearn"] = {k: v for k, v in dumped["unlearn"].items() if k not in EXECUTION_ONLY_UNLEARN_KEYS}
    dumped["eval"] = {k: v for k, v in dumped["eval"].items() if k not in SCORE_ONLY_EVAL_KEYS}
    dumped.setdefault("method", cfg.method.model_dump(mode="json"))  # left out of dumps when ``methods`` is set
    if method is not None:
        dumped["method"] = method.model_dump(mode="json")
        dumped["methods"] = []
    return json.loads(json.dumps({k: dumped[k] for k in (*TRAJECTORY_KEYS, "eval")}, sort_keys=True))


def _changed_keys(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{path}.{k}" if path else k)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in _changed_keys(a, b, f"{path}.{i}")]
    return [] if old == new else [path]


def signature_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], int]:
    """``(changed dotted keys, tasks appended)`` between a checkpoint's signature and the config's.

    Appending tasks to the stream (``new["tasks"]`` starts with ``old["tasks"]``) is not a change: the run continues
    the stream with them. Anything else that differs is listed, e.g. ``["eval.max_examples", "train.lr"]``.
    """
    old_tasks, new_tasks = old.get("tasks", []), new.get("tasks", [])
    appended = len(new_tasks) - len(old_tasks) if new_tasks[: len(old_tasks)] == old_tasks else 0
    old = {**old, "tasks": old_tasks + new_tasks[len(old_tasks) :] if appended > 0 else old_tasks}
    return _changed_keys(old, new, ""), max(appended, 0)


def trajectory_hash(cfg: RunConfig, method: MethodSection | None = None) -> str:
    """sha256 of :func:`trajectory_signature` (a short name for a config's trajectory)."""
    return hashlib.sha256(json.dumps(trajectory_signature(cfg, method), sort_keys=True).encode()).hexdigest()
