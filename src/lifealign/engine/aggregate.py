"""From the per-item scores of one or more runs of a stream to ``scores.json`` and ``comparisons.json``.

- ``seed_summary``: one method's metric over several seeds of the same stream (same tasks, same order): the point
  values are the seed-averaged cell means, the intervals come from the hierarchical bootstrap (seeds, then items;
  ``lifealign.evaluation.stats.summarize_method``) and report both variance components.
- ``comparisons``: every sequential method against the baseline (``eval.baseline``, default SeqFT) and against
  LifeAlign when it is in the run: the paired difference in BWT / Last / AP with its interval and a bootstrap p-value
  over the shared items and seeds, Holm-corrected across every pair and metric of a score; and, per task, the
  smallest difference its test set can detect (80% power, α = 1 − ``eval.ci_level``) at the observed accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lifealign.config.schema import RunConfig
from lifealign.engine.items import task_arrays
from lifealign.evaluation.stats import (
    compare_to_baseline,
    holm,
    minimal_detectable_difference,
    paired_binary_mde,
    summarize_method,
    underpowered,
)

__all__ = ["COMPARED_METRICS", "comparisons", "seed_summary"]

Records = Sequence[Mapping[str, Any]]

COMPARED_METRICS = ("bleu4", "rouge_l", "judge", "rule", "pref_acc", "logp_acc", "logp_acc_norm", "reward_model")
"""Score metrics (not drift diagnostics) that get paired tests when a run has them."""
SECOND_REFERENCE = "lifealign"


def _conventions(cfg: RunConfig) -> dict[str, str]:
    conventions = cfg.eval.conventions
    return {"bwt": conventions.bwt, "forgetting": conventions.forgetting, "fwt": conventions.fwt}


def seed_summary(runs: Sequence[Records], metric: str, tasks: Sequence[str], cfg: RunConfig) -> dict[str, Any] | None:
    """``scores.json``'s entry of ``metric`` for one method over the seeds' item records (one list per seed)."""
    arrays = task_arrays(runs, metric, len(tasks))
    if arrays is None:
        return None
    items, initial = arrays
    out = summarize_method(
        items, initial, conventions=_conventions(cfg), n_boot=cfg.eval.n_boot, level=cfg.eval.ci_level
    )
    return {"tasks": list(tasks), **out}


def _rows(arrays: Mapping[str, tuple[list[np.ndarray], Any]], metric: str, cfg: RunConfig) -> list[dict[str, Any]]:
    """Every method against the baseline, then every other method against LifeAlign (the baseline–LifeAlign pair
    only once); Holm over all these rows of one score together."""
    alpha = 1 - cfg.eval.ci_level
    baseline = cfg.eval.baseline
    families = [(baseline, dict(arrays))]
    if SECOND_REFERENCE in arrays and SECOND_REFERENCE != baseline:
        families.append((SECOND_REFERENCE, {m: a for m, a in arrays.items() if m != baseline}))
    rows: list[dict[str, Any]] = []
    for reference, family in families:
        if len(family) < 2:
            continue
        rows += compare_to_baseline(
            {m: a[0] for m, a in family.items()},
            reference,
            initial={m: a[1] for m, a in family.items() if a[1] is not None},
            conventions=_conventions(cfg),
            alpha=alpha,
            n_boot=cfg.eval.n_boot,
        )
    for row, p_holm in zip(rows, holm([r["p"] for r in rows])):
        row.update(score=metric, p_holm=p_holm, significant=bool(p_holm < alpha))
        row["underpowered"] = underpowered(row["diff"], row["mde"], row["significant"])
    return rows


def _power(
    arrays: Mapping[str, tuple[list[np.ndarray], Any]], metric: str, tasks: Sequence[str], cfg: RunConfig, ref: str
) -> dict[str, dict[str, float]]:
    """Per task: items, the reference's final accuracy (0–100) and the paired MDE (0–100 points) at that accuracy."""
    items = arrays[ref][0]
    alpha = 1 - cfg.eval.ci_level
    out = {}
    for j, task in enumerate(tasks):
        final = items[j][:, -1, :]  # (S, n_j): the reference after the last task
        values = final[np.isfinite(final)]
        if values.size == 0:
            continue
        binary = bool(np.isin(values, (0.0, 50.0, 100.0)).all())
        mean = float(values.mean())
        n = items[j].shape[-1]
        if binary:
            mde = 100 * paired_binary_mde(min(max(mean / 100, 0.0), 1.0), n, alpha=alpha)
        else:  # the SD of two independent arms' item scores: a bound, as for binary scores
            mde = minimal_detectable_difference(float(np.sqrt(2) * values.std(ddof=1)), n, alpha=alpha)
        out[task] = {"n_items": n, "accuracy": mean, "mde": mde}
    return out


def comparisons(
    runs: Mapping[str, Sequence[Records]], tasks: Sequence[str], cfg: RunConfig, sequential: Sequence[str]
) -> dict[str, Any]:
    """``comparisons.json``: paired tests of the sequential methods in ``runs`` (method -> one record list per seed)
    against the baseline and LifeAlign, and the per-task power; empty rows without the baseline."""
    baseline = cfg.eval.baseline
    result: dict[str, Any] = {"baseline": baseline, "alpha": 1 - cfg.eval.ci_level, "rows": [], "power": {}}
    for metric in COMPARED_METRICS:
        arrays = {m: task_arrays(runs[m], metric, len(tasks)) for m in sequential if m in runs}
        arrays = {m: a for m, a in arrays.items() if a is not None}
        if baseline not in arrays or len(arrays) < 2:
            continue
        result["rows"] += _rows(arrays, metric, cfg)
        result["power"][metric] = _power(arrays, metric, tasks, cfg, baseline)
    return result
