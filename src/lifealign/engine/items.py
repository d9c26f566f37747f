"""Per-item scores of every cell of every matrix, on disk, and the uncertainty computed from them.

A method's ``items.jsonl`` holds one line per evaluated cell: ``{"metric", "task", "task_index", "after_task",
"row", "ids", "values"[, "weights"]}`` with ``row`` the index of the task just learned (``null`` for the untrained
model), ``values[k]`` the score of held-out item ``ids[k]`` (``null`` when it failed) and ``weights`` where the cell is
a weighted mean (the drift ``kl``: response tokens). Every statistic of ``scores.json`` can be recomputed from it.

``uncertainty`` turns the lines of one metric (one run, or several seeds' runs of the same stream) into the arrays of
:func:`lifealign.evaluation.stats.summarize_method` (``(S, N, n_j)`` per task, NaN where not evaluated) and returns
its standard errors and intervals. A weighted metric enters as ``w_k v_k · n / Σw``, whose plain mean is the weighted
mean; its resamples keep the full sample's ``Σw`` (an approximation, stated here, for a diagnostic).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lifealign.evaluation.scorers.base import ItemScores
from lifealign.evaluation.stats import summarize_method

__all__ = ["ITEMS_FILE", "cell_record", "read_items", "task_arrays", "uncertainty"]

ITEMS_FILE = "items.jsonl"
INITIAL = "initial"


def cell_record(
    metric: str, task: str, task_index: int, row: int | None, after_task: str | None, items: ItemScores
) -> dict[str, Any]:
    """One line of ``items.jsonl``: the per-item values of ``metric`` on ``task`` after training task ``row``."""
    return {
        "metric": metric,
        "task": task,
        "task_index": task_index,
        "row": row,
        "after_task": after_task if row is not None else INITIAL,
        **items.to_dict(),
    }


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """Every line of an ``items.jsonl`` (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _values(record: Mapping[str, Any]) -> np.ndarray:
    v = np.array([math.nan if x is None else float(x) for x in record["values"]], dtype=np.float64)
    weights = record.get("weights")
    if weights is None:
        return v
    w = np.asarray(weights, dtype=np.float64)
    total = w[np.isfinite(v)].sum()
    return v * w * (np.isfinite(v).sum() / total) if total > 0 else v


def task_arrays(
    runs: Sequence[Iterable[Mapping[str, Any]]], metric: str, n_tasks: int
) -> tuple[list[np.ndarray], list[np.ndarray] | None] | None:
    """``(items, initial)`` for ``summarize_method``; None when some task has no item of ``metric``."""
    per_run = [[r for r in records if r["metric"] == metric] for records in runs]
    ids: dict[int, list[str]] = {}
    for records in per_run:
        for r in records:
            ids.setdefault(r["task_index"], list(r["ids"]))
    if sorted(ids) != list(range(n_tasks)):
        return None
    items = [np.full((len(runs), n_tasks, len(ids[j])), np.nan) for j in range(n_tasks)]
    initial = [np.full((len(runs), len(ids[j])), np.nan) for j in range(n_tasks)]
    has_initial = False
    for s, records in enumerate(per_run):
        for r in records:
            j = r["task_index"]
            if list(r["ids"]) != ids[j]:
                raise ValueError(f"{metric}: task {r['task']!r} was scored on different items in different cells")
            if r["row"] is None:
                initial[j][s] = _values(r)
                has_initial = True
            else:
                items[j][s, r["row"]] = _values(r)
    return items, (initial if has_initial else None)


def uncertainty(
    runs: Sequence[Iterable[Mapping[str, Any]]],
    metric: str,
    n_tasks: int,
    conventions: Mapping[str, str],
    *,
    n_boot: int,
    level: float,
    seed: int = 0,
) -> dict[str, Any]:
    """``summarize_method``'s uncertainty keys for ``metric`` (``*_se``, ``*_ci``, ``n_items``, ``n_seeds``, …) from
    the item lines of one or more runs of the same stream (one per seed); ``{}`` when a task has no items."""
    arrays = task_arrays(runs, metric, n_tasks)
    if arrays is None:
        return {}
    items, initial = arrays
    out = summarize_method(items, initial, conventions=conventions, n_boot=n_boot, level=level, seed=seed)
    return {k: v for k, v in out.items() if k.endswith(("_se", "_ci")) or k not in _POINTS}


_POINTS = {"matrix", "bwt", "last", "ap", "fwt", "forgetting", "initial"}
"""Point values come from the recorded cell means (``ScoreMatrix.summary``), not from the bootstrap's input."""
