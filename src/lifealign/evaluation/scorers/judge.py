"""``judge``: an LLM judge rates each greedy generation against the task's chosen answer (METHODS.md §D.2).

Score = ``10 × mean`` of the judge's 1–10 integers over the generations it could score (0–100), plus
``judge/n_scored`` and ``judge/n_failed``; failures by reason are logged and kept in ``last_results``. Items: per
generation ``10 × score``, NaN where the judge gave no valid score (with the failures counted by reason), so
``check_failures`` raises when the judge scored nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from lifealign.data.records import Task
from lifealign.evaluation.judge import JudgeClient, JudgeItem, JudgeResults, JudgeSection, prompt_as_text
from lifealign.evaluation.scorers.base import EvalContext, Generations, ItemScores, Scorer, task_generations

__all__ = ["JudgeScorer", "judge_items", "judge_section_from"]

log = logging.getLogger(__name__)


def judge_items(task: str, gens: Generations) -> list[JudgeItem]:
    """One item per generation: (task, prompt as text, generated completion, chosen answer as the reference)."""
    return [
        JudgeItem(task=task, prompt=prompt_as_text(prompt), response=completion, reference=reference)
        for prompt, completion, reference in zip(gens.prompts, gens.completions, gens.references, strict=True)
    ]


def judge_section_from(eval_section: Any) -> JudgeSection:
    """The ``judge`` sub-section of the eval config (a ``JudgeSection`` or a plain mapping), or a clear error."""
    section = getattr(eval_section, "judge", None)
    if section is None:
        raise ValueError("the 'judge' scorer needs an eval.judge section with at least base_url and model")
    return section if isinstance(section, JudgeSection) else JudgeSection.model_validate(section)


class JudgeScorer(Scorer):
    """LLM-judge score of the generations; the client is built once (from ``cfg`` or ``ctx.eval.judge``)."""

    name = "judge"
    needs_generation = True

    def __init__(self, cfg: JudgeSection | None = None, client: JudgeClient | None = None) -> None:
        self._cfg = cfg
        self._client = client
        self.last_results: dict[str, JudgeResults] = {}
        """The full per-item results of the latest ``score`` call of each task (for reports and debugging)."""

    def client(self, ctx: EvalContext) -> JudgeClient:
        if self._client is None:
            self._client = JudgeClient(self._cfg if self._cfg is not None else judge_section_from(ctx.eval))
        return self._client

    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        gens = task_generations(ctx, task)
        items = judge_items(task.name, gens)
        if not items:
            return {self.name: ItemScores([], [])}
        results = ctx.on_main(lambda: self.client(ctx).score_many(items))  # paid calls: once, on rank 0
        self.last_results[task.name] = results
        if results.n_failed:
            log.warning(
                "judge on %s: %d of %d items failed %s", task.name, results.n_failed, len(items), results.failures
            )
        values = [10.0 * s if s is not None else math.nan for s in results.scores]
        return {self.name: ItemScores(list(gens.ids), values, failures=results.failures)}

    def summarize(self, items: Mapping[str, ItemScores]) -> dict[str, float]:
        """The mean judge score plus ``judge/n_scored`` and ``judge/n_failed`` (item counts)."""
        judged = items[self.name]
        return {
            **super().summarize(items),
            "judge/n_scored": float(judged.n_scored),
            "judge/n_failed": float(judged.n_failed),
        }
