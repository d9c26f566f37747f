"""The Markdown report: a methods × metrics summary table in the layout of the LifeAlign paper's Table 1, the score
matrices with their heatmaps and per-task curves, and run information.

Everything that is not our own fixed text — method, metric and task names, run information and above all
model-generated text — goes through :func:`escape_markdown`, because generated text is untrusted: it may contain
table pipes, HTML/script, link syntax or terminal escape sequences (RELIABILITY.md §4.8).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lifealign.report.plots import plot_score_matrix, plot_task_curves
from lifealign.report.results import collect_runs
from lifealign.utils.jsonio import atomic_write_text

__all__ = [
    "REPORT_FILE",
    "SCORE_METRICS",
    "escape_markdown",
    "format_number",
    "render_report",
    "write_report",
]

REPORT_FILE = "report.md"
SCORE_METRICS = ("bleu4", "rouge_l", "judge", "rule", "pref_acc")
"""Metrics on a 0–100 scale, in the paper's column order: shown in the summary table and averaged into AVG.
Every other metric (``margin``, ``reward_model``, ``kl``, displacements, counts such as ``judge/n_failed``) is a
diagnostic: same BWT/Last/AP columns, its own table, never averaged with scores on another scale."""

STATS = ("bwt", "last", "ap")
STAT_LABELS = {"bwt": "BWT", "last": "Last", "ap": "AP"}

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MD_SPECIAL = re.compile(r"([|`*_\[\]#!~])")


def escape_markdown(text: Any) -> str:
    """Make arbitrary text inert inside Markdown, including table cells.

    Terminal escape sequences and control characters are removed; ``&``, ``<``, ``>`` become HTML entities (no
    raw HTML); Markdown syntax characters (``\\ | ` * _ [ ] # ! ~``) are backslash-escaped; newlines become
    ``<br>`` so a multi-line completion stays in its table cell.
    """
    s = _CONTROL.sub("", _ANSI_ESCAPE.sub("", str(text))).replace("\r\n", "\n").replace("\r", "\n")
    s = s.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return s.replace("\t", " ").replace("\n", "<br>")


def format_number(value: Any, digits: int = 2) -> str:
    """``f"{value:.2f}"``; ``–`` for a missing or non-finite value."""
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _strict_mean(values: Sequence[float]) -> float:
    """Mean, NaN if empty or if any value is missing (an AVG over incomplete metrics would mislead)."""
    clean = [math.nan if v is None else float(v) for v in values]
    return sum(clean) / len(clean) if clean else math.nan


def _metric_order(scores: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for metrics in scores.values():
        seen += [m for m in metrics if m not in seen]
    return seen


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def summary_table(
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str], avg: bool
) -> list[str]:
    """Methods × (BWT, Last, AP) per metric, plus the mean over ``metrics`` (the paper's AVG) when ``avg``."""
    header = ["Method"] + [f"{escape_markdown(m)} {STAT_LABELS[s]}" for m in metrics for s in STATS]
    if avg:
        header += [f"AVG {STAT_LABELS[s]}" for s in STATS]
    rows = []
    for method, by_metric in scores.items():
        row = [escape_markdown(method)]
        row += [format_number(by_metric.get(m, {}).get(s)) for m in metrics for s in STATS]
        if avg:
            row += [format_number(_strict_mean([by_metric.get(m, {}).get(s) for m in metrics])) for s in STATS]
        rows.append(row)
    return _table(header, rows)


def matrix_section(method: str, metric: str, summary: Mapping[str, Any], figures: Sequence[str | Path]) -> list[str]:
    """One metric of one method: the matrix as a table, its BWT/Last/AP/FWT, per-task forgetting, figure links."""
    matrix = summary["matrix"]
    tasks = list(summary.get("tasks") or [f"T{k + 1}" for k in range(len(matrix))])
    names = [escape_markdown(t) for t in tasks]
    lines = [f"### {escape_markdown(method)} — {escape_markdown(metric)}", ""]
    lines += _table(
        ["after \\ on"] + names,
        ([f"after {names[i]}"] + [format_number(v) for v in row] for i, row in enumerate(matrix)),
    )
    stats = " · ".join(
        f"{label} {format_number(summary.get(key))}" for key, label in [*STAT_LABELS.items(), ("fwt", "FWT")]
    )
    lines += ["", stats]
    forgetting = summary.get("forgetting") or []
    if forgetting:
        lines += ["", "Forgetting: " + ", ".join(f"{names[j]} {format_number(f)}" for j, f in enumerate(forgetting))]
    for fig in figures:
        lines += ["", f"![{escape_markdown(method)} {escape_markdown(metric)}]({Path(fig).as_posix()})"]
    return lines + [""]


def samples_section(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """Example generations (untrusted text, escaped): task, prompt, completion, reference."""
    keys = ["method", "task", "prompt", "completion", "reference"]
    present = [k for k in keys if any(k in s for s in samples)]
    rows = ([escape_markdown(s.get(k, "")) for k in present] for s in samples)
    return ["## Sample generations", "", *_table(present, rows), ""]


def render_report(
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    run_info: Mapping[str, Any],
    figures: Mapping[str, Sequence[str | Path]],
    avg_metrics: Sequence[str] | None = None,
) -> str:
    """The report as Markdown text.

    ``scores``: ``{method: {metric: ScoreMatrix.summary()}}``. ``run_info``: shown as a list (the key
    ``samples``, a list of ``{method, task, prompt, completion, reference}``, becomes an escaped table).
    ``figures``: image paths relative to the report, keyed ``"<method>/<metric>"`` (shown with that matrix) or by
    any other caption (shown under "Other figures"). ``avg_metrics``: the metrics of the summary table, averaged
    into AVG (default: those of :data:`SCORE_METRICS` present); the others go to a "Diagnostics" table.
    """
    metrics = _metric_order(scores)
    if avg_metrics is None:
        score_metrics = [m for m in SCORE_METRICS if m in metrics]
    else:
        score_metrics = [m for m in avg_metrics if m in metrics]
    diagnostics = [m for m in metrics if m not in score_metrics]
    lines = ["# lifealign report", ""]
    info = {k: v for k, v in run_info.items() if k != "samples"}
    if info:
        lines += ["## Run", ""]
        lines += [f"- **{escape_markdown(k)}**: {escape_markdown(_as_text(v))}" for k, v in info.items()]
        lines.append("")
    lines += ["## Summary", "", "BWT / Last / AP on the 0–100 scale of each metric (LifeAlign Table 1 layout).", ""]
    lines += summary_table(scores, score_metrics, avg=len(score_metrics) > 1) + [""]
    if diagnostics:
        lines += ["### Diagnostics", ""]
        lines += summary_table(scores, diagnostics, avg=False) + [""]
    lines += [
        "## Score matrices",
        "",
        "Row: after training task i; column: evaluated on task j; – = not evaluated.",
        "",
    ]
    for method, by_metric in scores.items():
        for metric, summary in by_metric.items():
            lines += matrix_section(method, metric, summary, figures.get(f"{method}/{metric}", []))
    matrix_keys = {f"{m}/{k}" for m, by in scores.items() for k in by}
    others = {caption: paths for caption, paths in figures.items() if caption not in matrix_keys}
    if others:
        lines += ["## Other figures", ""]
        for caption, paths in others.items():
            lines += [f"![{escape_markdown(caption)}]({Path(p).as_posix()})" for p in paths] + [""]
    if run_info.get("samples"):
        lines += samples_section(run_info["samples"])
    return "\n".join(lines).rstrip() + "\n"


def _as_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _slug(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique version of ``name``."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "x"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}_{k}", k + 1
    taken.add(slug)
    return slug


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Collect ``scores.json`` from ``run_dirs``, draw a heatmap and task curves per method × metric into
    ``out_dir``, and write ``out_dir/report.md`` linking them; returns the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = collect_runs(run_dirs)
    figures: dict[str, list[str]] = {}
    taken: set[str] = set()
    for method, by_metric in scores.items():
        for metric, summary in by_metric.items():
            slug = _slug(f"{method}__{metric}", taken)
            title = f"{method} — {metric}"
            heatmap = plot_score_matrix(summary, title, out_dir / f"{slug}_matrix.png")
            curves = plot_task_curves(summary, title, out_dir / f"{slug}_curves.png", ylabel=metric)
            figures[f"{method}/{metric}"] = [heatmap.name, curves.name]
    run_info = {"runs": [str(Path(d)) for d in run_dirs], "methods": list(scores)}
    path = out_dir / REPORT_FILE
    atomic_write_text(path, render_report(scores, run_info, figures))
    return path
