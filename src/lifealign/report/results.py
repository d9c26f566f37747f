"""``scores.json``: the results file every run writes and the report reads.

Shape (strict JSON, ``null`` where a value is undefined or was not evaluated)::

    {"<method>": {"<metric>": {"tasks": [...], "matrix": [[...]], "bwt": x, "last": y, "ap": z, "fwt": w,
                               "forgetting": [...]}}}

where each ``{"matrix", ...}`` block is :meth:`lifealign.evaluation.matrix.ScoreMatrix.summary`, merged (in
runs that keep per-item scores) with :func:`lifealign.evaluation.stats.summarize_method`'s uncertainty: ``*_se``,
``*_ci``, ``n_items``, ``n_seeds``, ``level``, ``n_boot``, ``variance_components``. On reading, ``null`` becomes
``NaN`` so the values are plain floats again.

``comparisons.json`` (beside ``scores.json``; absent in older runs) holds the paired tests and the per-task power::

    {"baseline": "seqft", "alpha": 0.05,
     "rows": [{"score", "method", "baseline", "metric", "diff", "se", "ci", "p", "p_holm", "mde",
               "significant", "underpowered"}, ...],
     "power": {"<score>": {"<task>": {"n_items": n, "accuracy": 0-100, "mde": 0-100 points}}}}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lifealign.utils.jsonio import atomic_write_text, nan_to_null, null_to_nan

__all__ = [
    "COMPARISONS_FILE",
    "SCORES_FILE",
    "Scores",
    "ScoresFileError",
    "atomic_write_text",
    "collect_comparisons",
    "collect_runs",
    "find_score_files",
    "read_comparisons",
    "read_scores",
    "write_scores",
]

SCORES_FILE = "scores.json"
COMPARISONS_FILE = "comparisons.json"
"""Paired tests against the baseline (and LifeAlign) and the per-task power, written by the engine."""

Scores = dict[str, dict[str, dict[str, Any]]]
"""``{method: {metric: summary}}``."""


class ScoresFileError(ValueError):
    """A ``scores.json`` that cannot be used; the message names the file and the problem."""


def _is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _check_matrix(matrix: Any, where: str) -> None:
    """A square list of rows of numbers or ``null``."""
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        raise ScoresFileError(f"{where}['matrix'] must be a list of rows")
    for i, row in enumerate(matrix):
        if len(row) != len(matrix):
            raise ScoresFileError(f"{where}['matrix'] must be square; row {i} has {len(row)} of {len(matrix)} cells")
        if not all(_is_number_or_null(v) for v in row):
            raise ScoresFileError(f"{where}['matrix'] row {i} must hold numbers or null, got {row!r}")


def _check_shape(scores: Mapping[str, Any], source: str) -> None:
    for method, metrics in scores.items():
        if not isinstance(metrics, Mapping):
            raise ScoresFileError(f"{source}: scores[{method!r}] must be an object of metrics")
        for metric, summary in metrics.items():
            if not isinstance(summary, Mapping) or "matrix" not in summary:
                raise ScoresFileError(f"{source}: scores[{method!r}][{metric!r}] must be a summary with a 'matrix'")


def write_scores(run_dir: str | Path, scores: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Path:
    """Write ``run_dir/scores.json`` atomically (NaN/inf as ``null``); returns its path."""
    _check_shape(scores, "write_scores")
    path = Path(run_dir) / SCORES_FILE
    atomic_write_text(path, json.dumps(nan_to_null(scores), allow_nan=False, indent=1) + "\n")
    return path


def _load_json(path: Path) -> Any:
    """The decoded file; a ``ScoresFileError`` naming the file for an empty, truncated, non-UTF-8 or invalid one."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScoresFileError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise ScoresFileError(f"{path}: the file is empty (the run may have been stopped while writing it)")
    try:
        return json.loads(text)  # lenient: also accepts NaN literals written by other tools
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or _open_brackets(text) > 0:
            raise ScoresFileError(
                f"{path}: truncated JSON (the file ends at line {text.count(chr(10)) + 1} with "
                f"{_open_brackets(text)} bracket(s) open; the run may have been stopped while writing it)"
            ) from None
        raise ScoresFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (col {e.colno})") from None
    except RecursionError:
        raise ScoresFileError(f"{path}: JSON nests too deeply") from None


def _open_brackets(text: str) -> int:
    """How many ``{`` / ``[`` (outside strings) are still open at the end of ``text``: > 0 means it was cut off."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return depth


def read_scores(path: str | Path) -> Scores:
    """Read a ``scores.json`` (file or the run directory holding it); ``null`` values come back as NaN.

    A missing file is ``FileNotFoundError``; an unusable one (empty, truncated, invalid JSON, wrong shape) is a
    ``ScoresFileError`` that names the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise ScoresFileError(f"{path}: expected a JSON object {{method: {{metric: summary}}}}")
    _check_shape(raw, str(path))
    for method, metrics in raw.items():
        for metric, summary in metrics.items():
            _check_matrix(summary["matrix"], f"{path}: scores[{method!r}][{metric!r}]")
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


def _check_comparisons(raw: Any, path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ScoresFileError(f"{path}: expected a JSON object {{baseline, alpha, rows, power}}")
    rows = raw.get("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ScoresFileError(f"{path}: 'rows' must be a list of objects")
    power = raw.get("power", {})
    if not isinstance(power, dict) or not all(
        isinstance(tasks, dict) and all(isinstance(v, dict) for v in tasks.values()) for tasks in power.values()
    ):
        raise ScoresFileError(f"{path}: 'power' must be {{score: {{task: {{n_items, accuracy, mde}}}}}}")
    return {**raw, "rows": rows, "power": power}


def read_comparisons(path: str | Path) -> dict[str, Any] | None:
    """Read a ``comparisons.json`` (file or the run directory holding it); ``None`` when there is none (runs made
    before paired tests existed). Values are as written (``null`` stays ``None``); an unusable file is a
    ``ScoresFileError`` naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / COMPARISONS_FILE
    if not path.is_file():
        return None
    return _check_comparisons(_load_json(path), path)


def collect_comparisons(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The ``comparisons.json`` of each run folder that has one, each with ``"source"`` (the folder) added."""
    found = []
    for run_dir in run_dirs:
        payload = read_comparisons(run_dir)
        if payload is not None:
            found.append({**payload, "source": str(Path(run_dir))})
    return found
