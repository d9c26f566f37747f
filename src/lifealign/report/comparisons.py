"""The report's paired tests and power sections, rendered from ``comparisons.json`` (written by the engine).

A row of ``comparisons.json`` is :func:`lifealign.evaluation.stats.compare_to_baseline`'s (``method, baseline,
metric, diff, se, ci, p, mde, p_holm, significant, underpowered``) plus ``score``, the score metric it compares
(``metric`` is ``bwt``/``last``/``ap``). Nothing is recomputed here: significance, Holm's adjustment and the
underpowered flag are shown as the engine decided them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lifealign.report.format import (
    MISSING,
    escape_markdown,
    format_estimate,
    format_level,
    format_number,
    format_p,
    is_number,
    markdown_table,
)

__all__ = ["SIGNIFICANT_MARK", "comparison_verdict", "comparisons_section", "power_section", "underpowered_rows"]

SIGNIFICANT_MARK = "✓"
METRIC_LABELS = {"bwt": "BWT", "last": "Last", "ap": "AP", "fwt": "FWT"}
_METRIC_ORDER = {m: k for k, m in enumerate(METRIC_LABELS)}
_NO_SCORE = "(score not named)"


def _alpha(payload: Mapping[str, Any]) -> float:
    alpha = payload.get("alpha")
    return float(alpha) if is_number(alpha) and 0 < alpha < 1 else 0.05


def _score(row: Mapping[str, Any]) -> str:
    return str(row.get("score") or _NO_SCORE)


def comparison_verdict(row: Mapping[str, Any]) -> str:
    """``✓ significant``, ``underpowered: MDE 12.30 > |Δ| 4.00``, ``not significant`` or ``–`` (no test)."""
    if row.get("significant") is True:
        return f"{SIGNIFICANT_MARK} significant"
    if row.get("underpowered") is True:
        return (
            f"underpowered: MDE {format_number(row.get('mde'))} > \\|Δ\\| "
            f"{format_number(abs(row['diff']) if is_number(row.get('diff')) else None)}"
        )
    return "not significant" if is_number(row.get("p")) else MISSING


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """Rows by (score, reference), in order of first appearance."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((_score(row), str(row.get("baseline", ""))), []).append(row)
    return groups


def _row_cells(row: Mapping[str, Any]) -> list[str]:
    metric = str(row.get("metric", ""))
    return [
        escape_markdown(row.get("method", "")),
        escape_markdown(METRIC_LABELS.get(metric, metric)),
        format_estimate(row.get("diff"), row.get("ci")),
        format_p(row.get("p")),
        format_p(row.get("p_holm")),
        format_number(row.get("mde")),
        comparison_verdict(row),
    ]


def _family_sizes(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Per score, how many rows carry a p-value (the engine's Holm family is every row of one score)."""
    sizes: dict[str, int] = {}
    for row in rows:
        if is_number(row.get("p")):
            sizes[_score(row)] = sizes.get(_score(row), 0) + 1
    return sizes


def comparisons_section(payloads: Sequence[Mapping[str, Any]]) -> list[str]:
    """``## Paired tests``: per score metric and reference method, every method's Δ in BWT / Last / AP with its
    interval, p, Holm-adjusted p, MDE and a verdict (significant, underpowered). Empty without any row."""
    if not any(p.get("rows") for p in payloads):
        return []
    alpha = _alpha(payloads[0])
    level = format_level(1 - alpha)
    lines = [
        "## Paired tests",
        "",
        f"Δ = method − reference, on the same held-out items (and seeds): a paired bootstrap difference with its "
        f"{level} interval and a two-sided bootstrap p-value; Holm's adjustment runs over every comparison of the "
        f"same score. {SIGNIFICANT_MARK} = Holm p < {alpha:g}. MDE = the difference the comparison detects with 80% "
        f'power at α = {alpha:g}; *underpowered* = not significant and \\|Δ\\| < MDE, so "no difference" is not a '
        "finding there, only a test too small to tell.",
        "",
    ]
    for payload in payloads:
        if len(payloads) > 1:
            lines += [f"Run `{escape_markdown(payload.get('source', ''))}`:", ""]
        rows = list(payload.get("rows") or [])
        sizes = _family_sizes(rows)
        first = {}
        for k, row in enumerate(rows):
            first.setdefault(row.get("method"), k)
        for (score, reference), group in _groups(rows).items():
            group = sorted(group, key=lambda r: (first[r.get("method")], _METRIC_ORDER.get(str(r.get("metric")), 9)))
            lines += [f"### {escape_markdown(score)} — against {escape_markdown(reference)}", ""]
            header = ["Method", "Metric", f"Δ [{level} CI]", "p", "Holm p", "MDE", "Verdict"]
            lines += markdown_table(header, (_row_cells(r) for r in group))
            lines += ["", f"Holm family: the {sizes.get(score, 0)} tests of {escape_markdown(score)}.", ""]
    return lines


def underpowered_rows(payloads: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every row the engine flagged underpowered."""
    return [r for p in payloads for r in (p.get("rows") or []) if r.get("underpowered") is True]


def _power_table(by_task: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = []
    for task, entry in by_task.items():
        n = entry.get("n_items")
        rows.append(
            [
                escape_markdown(task),
                str(int(n)) if is_number(n) else MISSING,
                format_number(entry.get("accuracy"), 1),
                format_number(entry.get("mde"), 1),
            ]
        )
    return markdown_table(["Task", "items", "observed score", "MDE (points)"], rows)


def power_section(payloads: Sequence[Mapping[str, Any]]) -> list[str]:
    """``## Power``: per score metric and task, the smallest difference its test set can detect, then every
    underpowered comparison. Empty when no payload has power figures or rows."""
    has_power = any(p.get("power") for p in payloads)
    flagged = underpowered_rows(payloads)
    if not has_power and not any(p.get("rows") for p in payloads):
        return []
    alpha = _alpha(payloads[0]) if payloads else 0.05
    lines = ["## Power", ""]
    if has_power:
        lines += [
            "The smallest difference each task's test set can detect: a paired comparison of two methods on that "
            f"task at 80% power and α = {alpha:g}, at the observed score (0–100; for a 0/1 score such as "
            "preference accuracy, the binomial variance at that accuracy). BWT, Last and AP average over tasks, so "
            "their MDE (Paired tests, column MDE) is smaller than one task's.",
            "",
        ]
        for payload in payloads:
            for score, by_task in (payload.get("power") or {}).items():
                source = f" (run `{escape_markdown(payload.get('source', ''))}`)" if len(payloads) > 1 else ""
                lines += [f"### {escape_markdown(score)}{source}", "", *_power_table(by_task), ""]
    total = sum(len(p.get("rows") or []) for p in payloads)
    if not total:
        return lines
    if not flagged:
        lines += [f"No underpowered comparison among the {total}.", ""]
        return lines
    lines += [f"**Underpowered comparisons** ({len(flagged)} of {total}): not significant, and \\|Δ\\| < MDE.", ""]
    for r in flagged:
        metric = METRIC_LABELS.get(str(r.get("metric")), str(r.get("metric")))
        lines.append(
            f"- {escape_markdown(r.get('method', ''))} vs {escape_markdown(r.get('baseline', ''))}, "
            f"{escape_markdown(_score(r))} {escape_markdown(metric)}: Δ {format_number(r.get('diff'))}, "
            f"MDE {format_number(r.get('mde'))}"
        )
    return lines + [""]
