"""``lifealign unlearn``'s outputs: ``results.json``, ``report.md`` and its figures (impact-score histogram, weights,
the alignment objective per method).

The selected subset is described against the whole candidate pool: score statistics, response length and the
original model's NLL of the response (do the selected negatives differ from the rest?), and the weights.

The table shows each held-out metric with its 95% interval (``<metric>_ci``) and, in each baseline's row, U2A's paired
difference against it (``vs_u2a``: U2A − row, interval, Holm-adjusted p, ✓ when significant); the paired tests
section lists ``results["comparisons"]`` in full. Nothing is computed here (``engine/unlearn.py`` does it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lifealign.report.comparisons import SIGNIFICANT_MARK, comparison_verdict
from lifealign.report.format import format_estimate, format_level, format_p
from lifealign.report.markdown import escape_markdown, format_number
from lifealign.report.plots import plot_bar, plot_histogram
from lifealign.unlearning.selection import weight_stats
from lifealign.unlearning.u2a import score_stats
from lifealign.utils.jsonio import atomic_write_text, nan_to_null

__all__ = [
    "RESULTS_FILE",
    "TABLE_COLUMNS",
    "comparison_lines",
    "render_unlearn_report",
    "selection_summary",
    "table_lines",
    "write_unlearn_outputs",
]

RESULTS_FILE = "results.json"
TABLE_COLUMNS = ("pref_acc", "J", "delta_J", "margin", "forget_nll", "retain_nll", "steps", "stopped")
VS_U2A = "vs_u2a"
COMPARED_LABELS = ("pref_acc", "delta_J")
NOT_COLUMNS = ("skipped", VS_U2A, "variance_components")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def selection_summary(
    scores: Sequence[float],
    selected: Sequence[int],
    weights: Sequence[float],
    n_tokens: Sequence[int],
    initial_nll: Sequence[float],
) -> dict[str, Any]:
    """Statistics of the selected subset vs all candidates (scores, response tokens, original NLL, weights)."""
    s = torch.tensor(list(scores), dtype=torch.float64)
    sel = list(selected)
    return {
        "candidates": len(scores),
        "selected": len(sel),
        "selected_fraction": len(sel) / len(scores) if len(scores) else math.nan,
        "scores_all": score_stats(s),
        "scores_selected": score_stats(s[sel]) if sel else {"n": 0},
        "response_tokens_all": _mean([float(t) for t in n_tokens]),
        "response_tokens_selected": _mean([float(n_tokens[i]) for i in sel]),
        "original_nll_all": _mean(list(initial_nll)),
        "original_nll_selected": _mean([initial_nll[i] for i in sel]),
        "weights": weight_stats(torch.tensor(list(weights), dtype=torch.float64)),
    }


def _is_column(key: str) -> bool:
    return key not in NOT_COLUMNS and not key.endswith(("_se", "_ci"))


def table_lines(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The table: a metric with an interval shows ``value [lo, hi]``; with ``vs_u2a`` in some row, one column per
    compared metric: U2A − that row, its interval, the Holm-adjusted p and ✓ when significant."""
    extra = sorted({k for row in table.values() for k in row if k not in TABLE_COLUMNS and _is_column(k)})
    columns = [*TABLE_COLUMNS, *extra]
    compared = [m for m in COMPARED_LABELS if any(m in row.get(VS_U2A, {}) for row in table.values())]
    header = [escape_markdown(c) for c in columns] + [f"U2A − row: {escape_markdown(m)}" for m in compared]
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for method, row in table.items():
        if "skipped" in row:
            cells = [f"skipped: {escape_markdown(row['skipped'])}"] + [""] * (len(header) - 1)
        else:
            cells = [_cell(row.get(c), row.get(f"{c}_ci")) for c in columns]
            cells += [_test_cell(row.get(VS_U2A, {}).get(m)) for m in compared]
        lines.append(f"| {escape_markdown(method)} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: Any, ci: Any = None) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return format_estimate(value, ci, 3)


def _test_cell(test: Mapping[str, Any] | None) -> str:
    if not test:
        return ""
    mark = f" {SIGNIFICANT_MARK}" if test.get("significant") else ""
    return f"{format_estimate(test.get('diff'), test.get('ci'), 3)} p_holm {format_p(test.get('p_holm'))}{mark}"


def comparison_lines(comparisons: Sequence[Mapping[str, Any]], level: float = 0.95) -> list[str]:
    """The paired tests of U2A against each baseline, one row per (baseline, metric)."""
    if not comparisons:
        return []
    shown = format_level(level)
    lines = [
        f"| baseline | metric | U2A − baseline | {shown} CI | p | p (Holm) | MDE (80% power) | MDE, pairs only | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {escape_markdown(c.get('baseline'))} | {escape_markdown(c.get('metric'))} "
            f"| {format_number(c.get('diff'), 3)} | {_ci(c.get('ci') or [None, None])} "
            f"| {format_p(c.get('p'))} | {format_p(c.get('p_holm'))} | {format_number(c.get('mde'), 3)} "
            f"| {format_number(c.get('mde_items'), 3)} | {comparison_verdict(c)} |"
        )
    return lines


def _ci(ci: Sequence[Any]) -> str:
    return "[" + ", ".join(format_number(v, 3) for v in ci) + "]"


def _dict_lines(d: Mapping[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in d.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}- {escape_markdown(key)}:")
            lines += _dict_lines(value, indent + "  ")
        else:
            shown = _cell(value) if isinstance(value, int | float) else escape_markdown(value)
            lines.append(f"{indent}- {escape_markdown(key)}: {shown}")
    return lines


def render_unlearn_report(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """The Markdown report of one ``lifealign unlearn`` run."""
    u2a = results.get("u2a", {})
    lines = [
        "# U2A: unlearning to align",
        "",
        f"Objective `{escape_markdown(results.get('objective', ''))}`, budget {results.get('budget')} optimizer "
        "steps per method (same lr, batch size and starting adapter). J is the DPO loss (beta "
        f"{format_number(results.get('dpo_beta'), 2)}) on held-out pairs against the original model, which scores "
        "J = ln 2 and pref_acc = 50; delta_J < 0 is better alignment. forget_nll is the mean per-token NLL of the "
        "forget candidates (higher = more unlearned), retain_nll that of the retain sequences (lower = utility kept).",
        "",
        "## U2A vs baselines",
        "",
        *table_lines(results.get("table", {})),
        "",
        *_statistics_lines(results),
        "## Data",
        "",
        *_dict_lines(results.get("data", {})),
        "",
        "## Impact scores and the selected subset",
        "",
        "Sign convention: s_i = <H^-1 grad J, grad l_u(x_i)> with l_u the minimised unlearning loss, so "
        "dJ/dw_i = -s_i and unlearning x_i lowers J iff s_i > 0 (top-k of positive scores; weights grow with "
        f"exp(+eta s_i), `weight_sign: {escape_markdown(results.get('weight_sign', 'paper'))}`).",
        "",
    ]
    for name in ("impact_scores", "weights", "delta_J"):
        if name in figures:
            lines += [f"![{name}]({figures[name]})", ""]
    lines += [*_dict_lines(u2a.get("selection", {})), ""]
    rounds = u2a.get("rounds", [])
    if rounds:
        lines += [
            "## Rounds",
            "",
            "| round | J on D_pa | grad norm | scores > 0 | steps | stopped |",
            "|---|---|---|---|---|---|",
        ]
        for r in rounds:
            solve = r.get("solve") or {}
            lines.append(
                f"| {r.get('round')} | {format_number(r.get('objective'), 4)} | {format_number(r.get('grad_norm'), 4)} "
                f"| {format_number((r.get('scores') or {}).get('positive_fraction'), 2)} | {solve.get('steps', '–')} "
                f"| {'yes' if solve.get('stopped') else 'no'} |"
            )
        lines.append("")
    events = u2a.get("events", []) + results.get("baseline_events", [])
    if events:
        lines += ["## Events", ""] + [f"- `{escape_markdown(json.dumps(e, default=str))}`" for e in events] + [""]
    return "\n".join(lines)


def _statistics_lines(results: Mapping[str, Any]) -> list[str]:
    stats = results.get("statistics")
    if not stats:
        return []
    level = stats.get("level", 0.95)
    seeds = stats.get("n_seeds", 1)
    lines = [
        f"Intervals: {format_level(level)} {escape_markdown(stats.get('method', 'bootstrap'))} "
        f"({stats.get('n_items')} held-out pairs, {seeds} seed{'s' if seeds != 1 else ''}, "
        f"{stats.get('n_boot')} resamples). The per-pair values are in items.jsonl.",
        "",
    ]
    rows = comparison_lines(results.get("comparisons", []), level)
    if rows:
        lines += [
            "## Paired tests: U2A vs each baseline",
            "",
            "The same held-out pairs (and seeds) for both methods; the difference's interval and bootstrap p-value "
            "come from resampling pairs (and seeds) jointly, Holm's correction runs over all rows together. MDE: the "
            "difference the test detects with 80% power at α = 1 − level (2.8 SE); MDE, pairs only: the same from "
            "the SD of the per-pair differences. A difference that is not significant and smaller than the MDE "
            "is not evidence of no difference.",
            "",
            *rows,
            "",
        ]
    return lines


def write_unlearn_outputs(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json``, the figures and ``report.md`` into ``run_dir``; returns the report's path."""
    figures: dict[str, str] = {}
    scores = results.get("scores", {}).get("values", [])
    if scores:
        plot_histogram(scores, "U2A impact scores", run_dir / "impact_scores.png", xlabel="s_i (dJ/dw_i = -s_i)")
        figures["impact_scores"] = "impact_scores.png"
    weights = results.get("u2a", {}).get("weights", [])
    if weights:
        plot_histogram(weights, "U2A weights of the selected set", run_dir / "weights.png", xlabel="w_i (mean 1)")
        figures["weights"] = "weights.png"
    table = results.get("table", {})
    rows = [(m, r["delta_J"]) for m, r in table.items() if isinstance(r.get("delta_J"), int | float)]
    if rows:
        plot_bar(
            [m for m, _ in rows],
            [v for _, v in rows],
            "delta J on held-out pairs (lower is better)",
            run_dir / "delta_J.png",
            ylabel="J - ln 2",
        )
        figures["delta_J"] = "delta_J.png"
    atomic_write_text(run_dir / RESULTS_FILE, json.dumps(nan_to_null(results), indent=2, allow_nan=False))
    report = run_dir / "report.md"
    atomic_write_text(report, render_unlearn_report(results, figures))
    return report
