"""``scores.json``: the results file every run writes and the report reads.

Shape (strict JSON, ``null`` where a value is undefined or was not evaluated)::

    {"<method>": {"<metric>": {"tasks": [...], "matrix": [[...]], "bwt": x, "last": y, "ap": z, "fwt": w,
                               "forgetting": [...]}}}

where each ``{"matrix", ...}`` block is :meth:`lifealign.evaluation.matrix.ScoreMatrix.summary`. On reading,
``null`` becomes ``NaN`` so the values are plain floats again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lifealign.utils.jsonio import atomic_write_text, nan_to_null, null_to_nan

__all__ = [
    "SCORES_FILE",
    "Scores",
    "atomic_write_text",
    "collect_runs",
    "find_score_files",
    "read_scores",
    "write_scores",
]

SCORES_FILE = "scores.json"

Scores = dict[str, dict[str, dict[str, Any]]]
"""``{method: {metric: summary}}``."""


def _check_shape(scores: Mapping[str, Any], source: str) -> None:
    for method, metrics in scores.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{source}: scores[{method!r}] must be an object of metrics")
        for metric, summary in metrics.items():
            if not isinstance(summary, Mapping) or "matrix" not in summary:
                raise ValueError(f"{source}: scores[{method!r}][{metric!r}] must be a summary with a 'matrix'")


def write_scores(run_dir: str | Path, scores: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Path:
    """Write ``run_dir/scores.json`` atomically (NaN/inf as ``null``); returns its path."""
    _check_shape(scores, "write_scores")
    path = Path(run_dir) / SCORES_FILE
    atomic_write_text(path, json.dumps(nan_to_null(scores), allow_nan=False, indent=1) + "\n")
    return path


def read_scores(path: str | Path) -> Scores:
    """Read a ``scores.json`` (file or the run directory holding it); ``null`` values come back as NaN."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    with path.open(encoding="utf-8") as f:
        raw = json.load(f)  # lenient: also accepts NaN literals written by other tools
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{method: {{metric: summary}}}}")
    _check_shape(raw, str(path))
    return {method: {metric: null_to_nan(s) for metric, s in metrics.items()} for method, metrics in raw.items()}


def find_score_files(run_dir: str | Path) -> list[Path]:
    """``run_dir/scores.json`` if present, else the ``scores.json`` of its immediate sub-folders (one per method)."""
    run_dir = Path(run_dir)
    if (run_dir / SCORES_FILE).is_file():
        return [run_dir / SCORES_FILE]
    return sorted(p for p in run_dir.glob(f"*/{SCORES_FILE}") if p.is_file())


def collect_runs(run_dirs: Iterable[str | Path]) -> Scores:
    """Merge the scores of several runs into one ``{method: {metric: summary}}``.

    A method name seen in two runs keeps the first as is and gets ``"<method>@<run folder>"`` for the others, so
    nothing is silently overwritten. A directory without any ``scores.json`` is an error.
    """
    merged: Scores = {}
    for run_dir in run_dirs:
        files = find_score_files(run_dir)
        if not files:
            raise FileNotFoundError(f"no {SCORES_FILE} in {run_dir} or its sub-folders")
        for path in files:
            for method, metrics in read_scores(path).items():
                key = method
                if key in merged:
                    key = f"{method}@{path.parent.name}"
                    suffix = 2
                    while key in merged:
                        key, suffix = f"{method}@{path.parent.name}#{suffix}", suffix + 1
                merged[key] = metrics
    return merged
