"""PNG plots for the report: score-matrix heatmaps, per-task curves, and generic bar / histogram helpers.

Figures are drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure``), never through
``pyplot``: no global backend or figure registry, so plotting works headless and leaks nothing between calls.

Readability rules:

- Heatmaps of 0–100 metrics (:data:`PERCENT_METRICS`: ``pref_acc``, ``logp_acc``, ``rouge_l``, ``bleu4``, ``judge``,
  ``rule``, ...) use a fixed 0–100 colour scale, so the colours of two methods or runs compare directly. Other
  quantities (``margin``, ``kl``, displacements) are scaled to their own finite range.
- Cell labels: one decimal for 0–100 metrics, 3 significant digits otherwise (a KL of 0.0123 reads ``0.0123``,
  not ``0.01``).
- Legends stand outside the axes, to the right, so they never cover a line.
- Uncertainty is drawn from what ``scores.json`` holds (``matrix_ci``, ``bwt_ci``, ...): an error bar spans the
  interval itself (``lo`` to ``hi``, not ``value ± se``), so a percentile interval that is not symmetric around
  the value is drawn as it is. A value without an interval (older runs) is drawn without a bar.

``score_matrix_figure`` / ``task_curves_figure`` build the figures (for tests and notebooks); ``plot_*`` save PNGs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "PERCENT_METRICS",
    "format_cell",
    "is_percent_metric",
    "method_bars_figure",
    "plot_bar",
    "plot_histogram",
    "plot_method_bars",
    "plot_score_matrix",
    "plot_task_curves",
    "score_matrix_figure",
    "task_curves_figure",
]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _matrix(summary: Mapping[str, Any]) -> np.ndarray:
    return np.array([[math.nan if v is None else float(v) for v in row] for row in summary["matrix"]], dtype=float)


def _task_names(summary: Mapping[str, Any], n: int) -> list[str]:
    return list(summary.get("tasks") or [f"T{k + 1}" for k in range(n)])


PERCENT_METRICS = frozenset({"pref_acc", "logp_acc", "logp_acc_norm", "rouge_l", "bleu4", "judge", "rule"})
"""Metrics on a 0–100 scale: their heatmaps share the fixed colour scale 0–100."""


def is_percent_metric(metric: str | None) -> bool:
    """Whether ``metric`` (e.g. ``pref_acc``) is on the 0–100 scale."""
    return metric in PERCENT_METRICS


def format_cell(value: float, percent: bool) -> str:
    """A cell label: ``55.0`` for a 0–100 metric, 3 significant digits otherwise (``0.0123``, ``-1.5``, ``250``)."""
    return f"{value:.1f}" if percent else f"{value:.3g}"


def _metric_from_title(title: str) -> str:
    """The report titles figures ``"<method> — <metric>"``; the metric is the last part."""
    return title.rsplit(" — ", 1)[-1].strip()


def score_matrix_figure(summary: Mapping[str, Any], title: str, metric: str | None = None) -> Figure:
    """The heatmap of :func:`plot_score_matrix` as a ``Figure``; ``metric`` defaults to the end of ``title``."""
    metric = _metric_from_title(title) if metric is None else metric
    percent = is_percent_metric(metric)
    m = _matrix(summary)
    n = m.shape[0]
    tasks = _task_names(summary, n)
    fig = _new_figure(1.6 + 0.9 * max(n, 2), 1.2 + 0.7 * max(n, 2))
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    if percent:
        vmin, vmax = 0.0, 100.0
    else:
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        vmax = vmax if vmax > vmin else vmin + 1.0
    image = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, shrink=0.8)
    midpoint = (vmin + vmax) / 2
    for i in range(n):
        for j in range(n):
            if math.isfinite(m[i, j]):
                color = "black" if m[i, j] > midpoint else "white"
                ax.text(j, i, format_cell(m[i, j], percent), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n), tasks, rotation=30, ha="right")
    ax.set_yticks(range(n), [f"after {t}" for t in tasks])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("trained through task")
    ax.set_title(title)
    return fig


def plot_score_matrix(summary: Mapping[str, Any], title: str, path: str | Path, metric: str | None = None) -> Path:
    """Heatmap of ``m[i][j]`` (row = after training task i, column = test task j), each cell annotated.

    Unevaluated cells (NaN, the upper triangle for ``eval.on: seen``) are left blank, as in the paper's figure. A
    0–100 ``metric`` (default: the end of ``title``, ``"<method> — <metric>"``) gets the fixed 0–100 colour scale.
    """
    return _save(score_matrix_figure(summary, title, metric), path)


_STAT_TITLES = {"bwt": "BWT", "last": "Last", "ap": "AP", "fwt": "FWT"}


def _level_text(summary: Mapping[str, Any]) -> str:
    """``95%`` from the summary's ``level`` (95% when absent)."""
    level = summary.get("level")
    return f"{100 * level:g}%" if isinstance(level, float) and 0 < level < 1 else "95%"


def _intervals(ci: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """``ci`` (nested lists ``shape + (2,)``, ``null``/NaN allowed) as a float array; ``None`` if absent or
    malformed (an older ``scores.json``)."""
    if not isinstance(ci, list | tuple):
        return None
    try:
        a = np.array(ci, dtype=float)  # None -> NaN
    except (TypeError, ValueError):
        return None
    return a if a.shape == shape + (2,) else None


def _interval_bars(ax: Any, x: Sequence[float], ci: np.ndarray, **kwargs: Any) -> None:
    """Error bars spanning ``ci[k] = (lo, hi)`` at ``x[k]``, skipping undefined intervals."""
    keep = [k for k in range(len(x)) if np.isfinite(ci[k]).all()]
    if not keep:
        return
    lo, hi = ci[keep, 0], ci[keep, 1]
    xs = [x[k] for k in keep]
    ax.errorbar(xs, (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none", capsize=3, elinewidth=1.0, **kwargs)


def task_curves_figure(summary: Mapping[str, Any], title: str, ylabel: str = "score") -> Figure:
    """The curves of :func:`plot_task_curves` as a ``Figure``; the legend stands outside the axes, on the right.

    With ``matrix_ci`` in ``summary`` each point carries its interval as an error bar; the tasks are shifted a
    little apart on the x axis so their bars do not overlap.
    """
    m = _matrix(summary)
    n = m.shape[0]
    tasks = _task_names(summary, n)
    ci = _intervals(summary.get("matrix_ci"), (n, n))
    fig = _new_figure(6.0 + 0.12 * max((len(t) for t in tasks), default=0), 3.8)
    ax = fig.add_subplot()
    spread = min(0.08, 0.4 / max(n, 1))
    for j, task in enumerate(tasks):
        stages = [i for i in range(n) if math.isfinite(m[i, j])]
        if not stages:
            continue
        x = [i + (j - (n - 1) / 2) * spread for i in stages] if ci is not None else stages
        (line,) = ax.plot(x, [m[i, j] for i in stages], marker="o", label=task)
        if ci is not None:
            _interval_bars(ax, x, ci[stages, j], color=line.get_color(), alpha=0.8)
    ax.set_xticks(range(n), [f"after {t}" for t in tasks], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title if ci is None else f"{title} ({_level_text(summary)} intervals)")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def plot_task_curves(summary: Mapping[str, Any], title: str, path: str | Path, ylabel: str = "score") -> Path:
    """One line per task ``j``: its score ``m[i][j]`` after each training stage ``i`` where it was evaluated."""
    return _save(task_curves_figure(summary, title, ylabel), path)


def method_bars_figure(
    summaries: Mapping[str, Mapping[str, Any]], metric: str, stats: Sequence[str] = ("bwt", "last")
) -> Figure:
    """One panel per statistic in ``stats`` (BWT, Last): a bar per method (``summaries``: ``{method: summary}`` of
    ``metric``) with its interval (``<stat>_ci``) as an error bar; an undefined value (MTL's BWT) has no bar."""
    methods = list(summaries)
    width = max(3.0, 0.55 * len(methods) + 1.5)
    fig = _new_figure(width * len(stats), 3.8)
    for k, stat in enumerate(stats):
        ax = fig.add_subplot(1, len(stats), k + 1)
        values = [summaries[m].get(stat) for m in methods]
        values = [float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan for v in values]
        ax.bar(range(len(methods)), [0.0 if math.isnan(v) else v for v in values], color="tab:blue", alpha=0.75)
        for i in [i for i, v in enumerate(values) if math.isnan(v)]:
            ax.text(i, 0.0, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
        bounds = np.full((len(methods), 2), math.nan)
        for i, method in enumerate(methods):
            pair = _intervals(summaries[method].get(f"{stat}_ci"), ())
            if pair is not None and math.isfinite(values[i]):
                bounds[i] = pair
        _interval_bars(ax, list(range(len(methods))), bounds, color="black")
        ax.axhline(0.0, color="black", linewidth=0.6)
        rotate = len(methods) > 3
        ax.set_xticks(range(len(methods)), methods, rotation=30 if rotate else 0, ha="right" if rotate else "center")
        ax.set_title(_STAT_TITLES.get(stat, stat))
        ax.grid(axis="y", alpha=0.3)
    first = next(iter(summaries.values()), {})
    fig.suptitle(f"{metric}: per method, with {_level_text(first)} intervals")
    return fig


def plot_method_bars(
    summaries: Mapping[str, Mapping[str, Any]], metric: str, path: str | Path, stats: Sequence[str] = ("bwt", "last")
) -> Path:
    """Save :func:`method_bars_figure` as a PNG."""
    return _save(method_bars_figure(summaries, metric, stats), path)


def plot_bar(labels: Sequence[str], values: Sequence[float], title: str, path: str | Path, ylabel: str = "") -> Path:
    """A labelled bar chart (e.g. SLMC kept energy per layer, or a metric per method); NaN bars are left empty."""
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels but {len(values)} values")
    fig = _new_figure(max(4.0, 0.5 * len(labels) + 2.0), 3.6)
    ax = fig.add_subplot()
    heights = [0.0 if not math.isfinite(v) else float(v) for v in values]
    bars = ax.bar(range(len(labels)), heights, color="tab:blue")
    ax.bar_label(bars, labels=["" if not math.isfinite(v) else f"{v:.3g}" for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), list(labels), rotation=45 if len(labels) > 6 else 0, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_histogram(values: Sequence[float], title: str, path: str | Path, bins: int = 30, xlabel: str = "") -> Path:
    """A histogram of the finite ``values`` (e.g. U2A per-example impact scores), with a line at zero if in range."""
    data = np.array([v for v in values if math.isfinite(v)], dtype=float)
    fig = _new_figure(5.5, 3.6)
    ax = fig.add_subplot()
    ax.hist(data, bins=bins, color="tab:orange", edgecolor="black", linewidth=0.3)
    if data.size and data.min() < 0 < data.max():
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(f"{title} (n={data.size})")
    return _save(fig, path)
