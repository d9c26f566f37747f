"""The Markdown report: a methods × metrics summary table in the layout of the LifeAlign paper's Table 1 with every
BWT / Last / AP's interval, the paired tests and the power of the test sets (``comparisons.json``), the score
matrices with their standard errors, item counts, conventions, heatmaps and per-task curves, run information, and
the published reference numbers (never comparable; docs/REFERENCE.md).

It renders what the engine computed and computes no statistic itself. A ``scores.json`` without the uncertainty
keys (older runs) renders as before, without intervals. Everything that is not our own fixed text — method, metric
and task names, run information and above all model-generated text — goes through :func:`escape_markdown`, because
generated text is untrusted: it may contain table pipes, HTML/script, link syntax or terminal escape sequences
(RELIABILITY.md §4.8).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lifealign.report.comparisons import comparisons_section, power_section
from lifealign.report.format import (
    MISSING,
    escape_markdown,
    format_estimate,
    format_level,
    format_number,
    format_se,
    interval,
    is_number,
    markdown_table,
)
from lifealign.report.plots import plot_method_bars, plot_score_matrix, plot_task_curves
from lifealign.report.reference import ReferenceSetting, load_references, reference_section
from lifealign.report.results import collect_comparisons, collect_runs
from lifealign.utils.jsonio import atomic_write_text

__all__ = [
    "REPORT_FILE",
    "SCORE_METRICS",
    "escape_markdown",
    "format_number",
    "matrix_section",
    "render_report",
    "summary_table",
    "write_report",
]

REPORT_FILE = "report.md"
SCORE_METRICS = ("bleu4", "rouge_l", "judge", "rule", "pref_acc")
"""Metrics on a 0–100 scale, in the paper's column order: shown in the summary table and averaged into AVG.
Every other metric (``margin``, ``reward_model``, ``kl``, displacements, counts such as ``judge/n_failed``) is a
diagnostic: same BWT/Last/AP columns, its own table, never averaged with scores on another scale."""

STATS = ("bwt", "last", "ap")
STAT_LABELS = {"bwt": "BWT", "last": "Last", "ap": "AP"}

CONVENTION_TEXT = {
    ("bwt", "lifealign"): "BWT = mean of `m[N−1][j] − m[j][j]` over the first N−1 = {k} tasks (`lifealign`: the "
    "last task cannot have been forgotten yet)",
    ("bwt", "n_tasks"): "BWT = the sum of `m[N−1][j] − m[j][j]` divided by N = {n} (`n_tasks`: the last task adds 0)",
    ("forgetting", "chaudhry"): "forgetting = best score since the task was learned − final score (`chaudhry`)",
    ("forgetting", "final"): "forgetting = score just after learning − final score (`final`)",
    ("fwt", "untrained"): "FWT = score on a task just before learning it − the untrained model's (`untrained`)",
    ("fwt", "all_prior"): "FWT = mean over every stage before a task is learned of its score − the untrained "
    "model's (`all_prior`)",
}
"""What each convention of :data:`lifealign.evaluation.matrix.CONVENTIONS` means, in words."""
SCORER_CONVENTION_TEXT = {
    ("bleu4", "llamafactory"): "BLEU-4 as LLaMA-Factory computes it, the LifeAlign paper's (per-sentence nltk BLEU "
    "on characters, smoothing 3, ×100)",
    ("bleu4", "sacrebleu"): "sentence BLEU-4 of sacrebleu (13a tokenizer, exp smoothing), not the paper's",
    ("rouge_l", "llamafactory"): "ROUGE-L F of rouge-chinese on jieba words, the LifeAlign paper's",
    ("rouge_l", "rouge_score"): "ROUGE-L F1 of Google's rouge-score, not the paper's",
}
"""The text metrics' conventions (``summary["convention"]``), in words."""
FIXED_DEFINITIONS = "Last = mean final-row score; AP = mean over stages of the mean score on the tasks seen so far."


def _strict_mean(values: Sequence[float]) -> float:
    """Mean, NaN if empty or if any value is missing (an AVG over incomplete metrics would mislead)."""
    clean = [math.nan if v is None else float(v) for v in values]
    return sum(clean) / len(clean) if clean else math.nan


def _metric_order(scores: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for metrics in scores.values():
        seen += [m for m in metrics if m not in seen]
    return seen


def _seeds(by_metric: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> str:
    found = sorted({int(by_metric[m]["n_seeds"]) for m in metrics if is_number(by_metric.get(m, {}).get("n_seeds"))})
    return "/".join(str(n) for n in found) or MISSING


def summary_table(
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    metrics: Sequence[str],
    avg: bool,
    intervals: bool = True,
) -> list[str]:
    """Methods × (BWT, Last, AP) per metric, plus the mean over ``metrics`` (the paper's AVG) when ``avg``.

    With ``intervals`` a value is followed by its interval (``<stat>_ci``) where ``scores.json`` has one:
    ``-5.60 [-9.10, -2.00]``; AVG has none (no interval of the mean over metrics is recorded). A ``Seeds`` column is
    added when any summary records ``n_seeds``.
    """
    header = ["Method"] + [f"{escape_markdown(m)} {STAT_LABELS[s]}" for m in metrics for s in STATS]
    if avg:
        header += [f"AVG {STAT_LABELS[s]}" for s in STATS]
    with_seeds = any("n_seeds" in scores[method].get(m, {}) for method in scores for m in metrics)
    if with_seeds:
        header.append("Seeds")
    rows = []
    for method, by_metric in scores.items():
        row = [escape_markdown(method)]
        for m in metrics:
            summary = by_metric.get(m, {})
            row += [format_estimate(summary.get(s), summary.get(f"{s}_ci") if intervals else None) for s in STATS]
        if avg:
            row += [format_number(_strict_mean([by_metric.get(m, {}).get(s) for m in metrics])) for s in STATS]
        if with_seeds:
            row.append(_seeds(by_metric, metrics))
        rows.append(row)
    return markdown_table(header, rows)


def _has_intervals(summary: Mapping[str, Any]) -> bool:
    return any(interval(summary.get(f"{s}_ci")) is not None for s in (*STATS, "fwt")) or "matrix_se" in summary


def _bootstrap_text(summaries: Sequence[Mapping[str, Any]]) -> str:
    """How the intervals were made, from the summaries' ``level``, ``n_boot`` and ``n_seeds``."""
    levels = sorted({format_level(s.get("level")) for s in summaries})
    boots = sorted({int(s["n_boot"]) for s in summaries if is_number(s.get("n_boot"))})
    seeds = any(is_number(s.get("n_seeds")) and s["n_seeds"] > 1 for s in summaries)
    text = f"Brackets: {'/'.join(levels)} bootstrap percentile interval"
    if boots:
        text += f" ({'/'.join(str(b) for b in boots)} resamples)"
    text += (
        "; each resample draws every task's held-out items once and uses them in every row, so BWT is a paired "
        "difference"
    )
    return text + ("; seeds are resampled first (hierarchical)." if seeds else ".")


def _conventions_text(summaries: Sequence[Mapping[str, Any]], n_tasks: int | None) -> list[str]:
    """One line per metric convention in use; a warning when the summaries disagree."""
    lines = []
    for metric in ("bwt", "forgetting", "fwt"):
        names = sorted({str((s.get("conventions") or {}).get(metric)) for s in summaries if s.get("conventions")})
        if not names:
            continue
        texts = [
            CONVENTION_TEXT.get((metric, name), f"{metric}: `{escape_markdown(name)}`").format(
                k=MISSING if n_tasks is None else n_tasks - 1, n=MISSING if n_tasks is None else n_tasks
            )
            for name in names
        ]
        warn = "**Methods differ here, so their numbers do not compare:** " if len(names) > 1 else ""
        lines.append(warn + "; ".join(texts))
    return lines


def _summary_notes(scores: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str]) -> list[str]:
    summaries = [by[m] for by in scores.values() for m in metrics if m in by]
    if not summaries:
        return []
    lines = []
    with_ci = [s for s in summaries if _has_intervals(s)]
    if with_ci:
        lines.append(_bootstrap_text(with_ci) + " AVG has no interval.")
        if len(with_ci) < len(summaries):
            lines.append("A value without brackets has no recorded interval (a run from before per-item scores).")
    else:
        lines.append("No intervals: this scores.json predates per-item scores, so no uncertainty is shown.")
    sizes = {len(s.get("tasks") or s["matrix"]) for s in summaries}
    notes = _conventions_text(summaries, sizes.pop() if len(sizes) == 1 else None)
    for metric in metrics:
        names = {by[metric].get("convention") for by in scores.values() if metric in by} - {None}
        notes += [_scorer_convention(metric, {"convention": name}) for name in sorted(names, key=str)]
    lines.append("Conventions: " + "; ".join(n.rstrip(".") for n in notes if n) + ". " + FIXED_DEFINITIONS)
    return [item for line in lines for item in (line, "")]


def _column_header(name: str, n_items: Any, n_clusters: Any) -> str:
    if not is_number(n_items):
        return name
    clusters = f", {int(n_clusters)} clusters" if is_number(n_clusters) and n_clusters != n_items else ""
    return f"{name} (n={int(n_items)}{clusters})"


def _at(values: Any, *index: int) -> Any:
    """``values[i][j]...`` or ``None`` when absent or out of range."""
    for i in index:
        if not isinstance(values, list | tuple) or i >= len(values):
            return None
        values = values[i]
    return values


def _cell(value: Any, se: Any) -> str:
    text = format_number(value)
    return f"{text} ({format_se(se)})" if is_number(se) and text != MISSING else text


def _matrix_table(summary: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    matrix = summary["matrix"]
    n = len(matrix)
    n_items, n_clusters = summary.get("n_items"), summary.get("n_clusters")
    header = ["after \\ on"] + [_column_header(names[j], _at(n_items, j), _at(n_clusters, j)) for j in range(n)]
    se = summary.get("matrix_se")
    rows = []
    initial = summary.get("initial")
    if isinstance(initial, list) and any(is_number(v) for v in initial):
        rows.append(["untrained"] + [_cell(_at(initial, j), _at(summary.get("initial_se"), j)) for j in range(n)])
    rows += [
        [f"after {names[i]}"] + [_cell(v, _at(se, i, j)) for j, v in enumerate(row)] for i, row in enumerate(matrix)
    ]
    return markdown_table(header, rows)


def _variance_table(summary: Mapping[str, Any]) -> list[str]:
    """The seed and item variance components of BWT / Last / AP / FWT (and their SDs), if recorded."""
    components = summary.get("variance_components")
    if not isinstance(components, Mapping):
        return []
    stats = [
        s
        for s in (*STATS, "fwt")
        if isinstance(components.get(s), Mapping) and any(is_number(v) for v in components[s].values())
    ]
    if not stats:
        return []

    def cell(stat: str, part: str) -> str:
        v = components[stat].get(part)
        return f"{format_se(v)} (SD {format_se(math.sqrt(v))})" if is_number(v) and v >= 0 else MISSING

    labels = {"between_seeds": "between seeds (training randomness)", "within_seeds": "within seeds (test items)"}
    rows = [[label] + [cell(s, part) for s in stats] for part, label in labels.items()]
    header = ["variance (SD)"] + [STAT_LABELS.get(s, s.upper()) for s in stats]
    return ["", f"Variance components over {int(summary['n_seeds'])} seeds:", "", *markdown_table(header, rows)]


def _scorer_convention(metric: str, summary: Mapping[str, Any]) -> str:
    name = summary.get("convention")
    if not isinstance(name, str):
        return ""
    text = SCORER_CONVENTION_TEXT.get((metric, name), f"`{escape_markdown(name)}`")
    return f"Scorer convention: {text}."


def matrix_section(method: str, metric: str, summary: Mapping[str, Any], figures: Sequence[str | Path]) -> list[str]:
    """One metric of one method: the matrix as a table (each cell with its SE, each column with its item count),
    BWT/Last/AP/FWT and per-task forgetting with their intervals, conventions, variance components, figure links."""
    matrix = summary["matrix"]
    tasks = list(summary.get("tasks") or [f"T{k + 1}" for k in range(len(matrix))])
    names = [escape_markdown(t) for t in tasks]
    lines = [f"### {escape_markdown(method)} — {escape_markdown(metric)}", "", *_matrix_table(summary, names), ""]
    seeds = summary.get("n_seeds")
    if _has_intervals(summary):
        seed_text = f"; {int(seeds)} seed{'s' if seeds != 1 else ''}" if is_number(seeds) else ""
        boot = f" of {int(summary['n_boot'])} bootstrap resamples" if is_number(summary.get("n_boot")) else ""
        lines += [
            f"Cell: score (bootstrap SE); n = held-out items of the column's task{seed_text}. Brackets: "
            f"{format_level(summary.get('level'))} percentile intervals{boot}.",
            "",
        ]
    stats = " · ".join(
        f"{label} {format_estimate(summary.get(key), summary.get(f'{key}_ci'))}"
        for key, label in [*STAT_LABELS.items(), ("fwt", "FWT")]
    )
    lines.append(stats)
    forgetting = summary.get("forgetting") or []
    if isinstance(forgetting, list) and forgetting:
        ci = summary.get("forgetting_ci")
        parts = [f"{names[j]} {format_estimate(f, _at(ci, j))}" for j, f in enumerate(forgetting)]
        lines += ["", "Forgetting: " + ", ".join(parts)]
    notes = _conventions_text([summary], len(tasks)) + [_scorer_convention(metric, summary)]
    lines += ["", "Conventions: " + "; ".join(n.rstrip(".") for n in notes if n) + "."]
    if is_number(seeds) and seeds > 1:
        lines += _variance_table(summary)
    for fig in figures:
        lines += ["", f"![{escape_markdown(method)} {escape_markdown(metric)}]({Path(fig).as_posix()})"]
    return lines + [""]


def samples_section(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """Example generations (untrusted text, escaped): task, prompt, completion, reference."""
    keys = ["method", "task", "prompt", "completion", "reference"]
    present = [k for k in keys if any(k in s for s in samples)]
    rows = ([escape_markdown(s.get(k, "")) for k in present] for s in samples)
    return ["## Sample generations", "", *markdown_table(present, rows), ""]


def _figure_links(caption: str, paths: Sequence[str | Path]) -> list[str]:
    return [f"![{escape_markdown(caption)}]({Path(p).as_posix()})" for p in paths]


def render_report(
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    run_info: Mapping[str, Any],
    figures: Mapping[str, Sequence[str | Path]],
    avg_metrics: Sequence[str] | None = None,
    *,
    comparisons: Sequence[Mapping[str, Any]] = (),
    summary_figures: Mapping[str, Sequence[str | Path]] | None = None,
    references: Sequence[ReferenceSetting] | None = None,
) -> str:
    """The report as Markdown text.

    ``scores``: ``{method: {metric: summary}}`` as in ``scores.json`` (with or without the uncertainty keys).
    ``run_info``: shown as a list (the key ``samples``, a list of ``{method, task, prompt, completion, reference}``,
    becomes an escaped table). ``figures``: image paths relative to the report, keyed ``"<method>/<metric>"`` (shown
    with that matrix) or by any other caption (shown under "Other figures"). ``avg_metrics``: the metrics of the
    summary table, averaged into AVG (default: those of :data:`SCORE_METRICS` present); the others go to a
    "Diagnostics" table. ``comparisons``: ``comparisons.json`` payloads (one per run; a ``"source"`` key names the
    run when there are several) for the "Paired tests" and "Power" sections. ``summary_figures``: ``{metric: paths}``
    shown under the summary (the per-method BWT / Last bars). ``references``: published settings for the final
    "Reference (published; not comparable)" section; ``None`` leaves it out.
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
    lines += _summary_notes(scores, score_metrics)
    for metric, paths in (summary_figures or {}).items():
        lines += _figure_links(f"{metric} BWT and Last per method", paths) + [""]
    if diagnostics:
        lines += ["### Diagnostics", ""]
        lines += summary_table(scores, diagnostics, avg=False) + [""]
    lines += comparisons_section(comparisons)
    lines += power_section(comparisons)
    lines += _matrices_and_figures(scores, figures)
    if run_info.get("samples"):
        lines += samples_section(run_info["samples"])
    if references is not None:
        lines += reference_section(references)
    return "\n".join(lines).rstrip() + "\n"


def _matrices_and_figures(
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]], figures: Mapping[str, Sequence[str | Path]]
) -> list[str]:
    """Every method's score matrices with their figures, then the figures that belong to no matrix."""
    lines = ["## Score matrices", "", "Row: after training task i; column: evaluated on task j; – = not evaluated.", ""]
    for method, by_metric in scores.items():
        for metric, summary in by_metric.items():
            lines += matrix_section(method, metric, summary, figures.get(f"{method}/{metric}", []))
    matrix_keys = {f"{m}/{k}" for m, by in scores.items() for k in by}
    others = {caption: paths for caption, paths in figures.items() if caption not in matrix_keys}
    if others:
        lines += ["## Other figures", ""]
        for caption, paths in others.items():
            lines += _figure_links(caption, paths) + [""]
    return lines


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


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, references: bool = True) -> Path:
    """Collect ``scores.json`` (and ``comparisons.json`` where present) from ``run_dirs``, draw per method × metric
    a heatmap and task curves with error bars, and per score metric the BWT / Last bars of every method with their
    intervals, into ``out_dir``; write ``out_dir/report.md`` linking them and return its path.

    ``references`` (default on) appends the packaged published numbers as a separate "Reference (published; not
    comparable)" section (docs/REFERENCE.md).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = collect_runs(run_dirs)
    comparisons = collect_comparisons(run_dirs)
    figures: dict[str, list[str]] = {}
    taken: set[str] = set()
    for method, by_metric in scores.items():
        for metric, summary in by_metric.items():
            slug = _slug(f"{method}__{metric}", taken)
            title = f"{method} — {metric}"
            heatmap = plot_score_matrix(summary, title, out_dir / f"{slug}_matrix.png")
            curves = plot_task_curves(summary, title, out_dir / f"{slug}_curves.png", ylabel=metric)
            figures[f"{method}/{metric}"] = [heatmap.name, curves.name]
    summary_figures: dict[str, list[str]] = {}
    for metric in [m for m in SCORE_METRICS if m in _metric_order(scores)]:
        by_method = {method: by[metric] for method, by in scores.items() if metric in by}
        path = plot_method_bars(by_method, metric, out_dir / f"{_slug(f'methods__{metric}', taken)}_bwt_last.png")
        summary_figures[metric] = [path.name]
    run_info = {"runs": [str(Path(d)) for d in run_dirs], "methods": list(scores)}
    text = render_report(
        scores,
        run_info,
        figures,
        comparisons=comparisons,
        summary_figures=summary_figures,
        references=load_references() if references else None,
    )
    path = out_dir / REPORT_FILE
    atomic_write_text(path, text)
    return path
