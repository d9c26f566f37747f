"""Published reference numbers (LifeAlign's Table 1, the 2026 replication) and their "not comparable" table.

The numbers live in ``reference_results.yaml`` beside this module, one entry per *setting* (source, model, tasks,
metric, scale, seeds), each with its rows (method, BWT, Last, optionally AP) as published. They are printed as a
separate table at the end of ``report.md`` for orientation only: a different model, task set, metric and scale, one
run without an interval; never comparable to a CPU-scale run (docs/REFERENCE.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lifealign.report.format import escape_markdown, format_number, is_number, markdown_table

__all__ = [
    "REFERENCE_FILE",
    "ReferenceRow",
    "ReferenceSetting",
    "load_references",
    "reference_section",
]

REFERENCE_FILE = "reference_results.yaml"
REFERENCE_TITLE = "Reference (published; not comparable)"
_SETTING_KEYS = ("id", "source", "model", "tasks", "metric", "scale", "seeds")
_STATS = (("bwt", "BWT"), ("last", "Last"), ("ap", "AP"))


@dataclass(frozen=True)
class ReferenceRow:
    """One method's published numbers (``None`` where the source prints "–")."""

    method: str
    bwt: float | None
    last: float | None
    ap: float | None = None


@dataclass(frozen=True)
class ReferenceSetting:
    """Where a group of published numbers comes from and what they measure."""

    id: str
    source: str
    model: str
    tasks: str
    metric: str
    scale: str
    seeds: str
    rows: tuple[ReferenceRow, ...]
    decimals: int = 2
    """Decimals as published."""
    note: str = ""


def _value(row: Mapping[str, Any], key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if not is_number(value):
        raise ValueError(f"{where}.{key}: expected a number or null, got {value!r}")
    return float(value)


def _setting(raw: Any, k: int, source: str) -> ReferenceSetting:
    where = f"{source}: settings[{k}]"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    missing = [key for key in (*_SETTING_KEYS, "rows") if key not in raw]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    rows = []
    for i, row in enumerate(raw["rows"] or []):
        if not isinstance(row, Mapping) or "method" not in row:
            raise ValueError(f"{where}.rows[{i}]: expected a mapping with a 'method'")
        at = f"{where}.rows[{i}]"
        rows.append(
            ReferenceRow(str(row["method"]), _value(row, "bwt", at), _value(row, "last", at), _value(row, "ap", at))
        )
    return ReferenceSetting(
        **{key: str(raw[key]) for key in _SETTING_KEYS},
        rows=tuple(rows),
        decimals=int(raw.get("decimals", 2)),
        note=str(raw.get("note", "")),
    )


def load_references(path: str | Path | None = None) -> list[ReferenceSetting]:
    """The reference settings of ``path`` (default: the packaged ``reference_results.yaml``), checked: every
    setting names its source, model, tasks, metric, scale and seeds; values are numbers or ``null``."""
    if path is None:
        text = resources.files("lifealign.report").joinpath(REFERENCE_FILE).read_text(encoding="utf-8")
        source = REFERENCE_FILE
    else:
        text, source = Path(path).read_text(encoding="utf-8"), str(path)
    raw = yaml.safe_load(text) or {}
    settings = raw.get("settings") if isinstance(raw, Mapping) else None
    if not isinstance(settings, list):
        raise ValueError(f"{source}: expected a mapping with a list 'settings'")
    return [_setting(s, k, source) for k, s in enumerate(settings)]


def reference_section(settings: Sequence[ReferenceSetting]) -> list[str]:
    """``## Reference (published; not comparable)``: one table per setting, the setting written above it."""
    lines = [
        f"## {REFERENCE_TITLE}",
        "",
        "Published numbers, for orientation only. Each comes from another model, task set, metric or scale, and from "
        "a single run without an interval: **never comparable** to this run's numbers, and their rankings are not "
        "evidence about this run's methods (docs/REFERENCE.md).",
        "",
    ]
    for s in settings:
        stats = [(key, label) for key, label in _STATS if any(getattr(r, key) is not None for r in s.rows)]
        setting = f"model {s.model}; tasks: {s.tasks}; metric: {s.metric}, scale {s.scale}; seeds: {s.seeds}"
        lines += [f"**{escape_markdown(s.source)}** — {escape_markdown(setting)}."]
        if s.note:
            lines += ["", escape_markdown(s.note) + "."]
        rows = (
            [escape_markdown(r.method)] + [format_number(getattr(r, k), s.decimals) for k, _ in stats] for r in s.rows
        )
        lines += ["", *markdown_table(["Method"] + [label for _, label in stats], rows), ""]
    return lines
