"""``lifealign unlearn``'s outputs: ``results.json``, ``report.md`` and its figures (impact-score histogram, weights,
the alignment objective per method).

The selected subset is described against the whole candidate pool: score statistics, response length and the
original model's NLL of the response (do the selected negatives differ from the rest?), and the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lifealign.report.markdown import escape_markdown, format_number
from lifealign.report.plots import plot_bar, plot_histogram
from lifealign.unlearning.selection import weight_stats
from lifealign.unlearning.u2a import score_stats
from lifealign.utils.jsonio import atomic_write_text, nan_to_null

__all__ = ["RESULTS_FILE", "TABLE_COLUMNS", "render_unlearn_report", "selection_summary", "write_unlearn_outputs"]

RESULTS_FILE = "results.json"
TABLE_COLUMNS = ("pref_acc", "J", "delta_J", "margin", "forget_nll", "retain_nll", "steps", "stopped")


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


def table_lines(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    extra = sorted({k for row in table.values() for k in row if k not in TABLE_COLUMNS and k != "skipped"})
    columns = [*TABLE_COLUMNS, *extra]
    lines = ["| method | " + " | ".join(escape_markdown(c) for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for method, row in table.items():
        if "skipped" in row:
            cells = [f"skipped: {escape_markdown(row['skipped'])}"] + [""] * (len(columns) - 1)
        else:
            cells = [_cell(row.get(c)) for c in columns]
        lines.append(f"| {escape_markdown(method)} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return format_number(value, 3)


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
