"""The scorer registry: a stable lowercase name -> a ``Scorer`` class (one file + one line per scorer).

``eval.scorers: [pref_acc, rouge_l, bleu4]`` picks entries by name; every key returned by a scorer (its main metric
and extras such as ``margin``) gets its own score matrix. ``CONVENTIONS`` lists, for the scorers that can compute
their metric more than one way, the accepted ``convention`` names (the first is the default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lifealign.data.records import Task
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Scorer, ScorerError, check_failures
from lifealign.evaluation.scorers.generation import BLEU_CONVENTIONS, ROUGE_CONVENTIONS, Bleu4, RougeL
from lifealign.evaluation.scorers.judge import JudgeScorer
from lifealign.evaluation.scorers.logp_acc import LogpAccuracy
from lifealign.evaluation.scorers.preference import PreferenceAccuracy
from lifealign.evaluation.scorers.reward_model import RewardModelScorer
from lifealign.evaluation.scorers.rule import RuleScorer

__all__ = [
    "CONVENTIONS",
    "SCORERS",
    "EvalContext",
    "ItemScores",
    "Scorer",
    "ScorerError",
    "build_scorers",
    "check_failures",
    "evaluate_task",
    "evaluate_task_items",
    "evaluate_task_with_items",
]

SCORERS: dict[str, type[Scorer]] = {
    "pref_acc": PreferenceAccuracy,
    "logp_acc": LogpAccuracy,
    "rouge_l": RougeL,
    "bleu4": Bleu4,
    "judge": JudgeScorer,
    "reward_model": RewardModelScorer,
    "rule": RuleScorer,
}

CONVENTIONS: dict[str, tuple[str, ...]] = {"bleu4": BLEU_CONVENTIONS, "rouge_l": ROUGE_CONVENTIONS}
"""Scorer name -> the ``convention`` values it accepts (first = default); a config validates against this."""


def build_scorers(names: Sequence[str], conventions: Mapping[str, str] | None = None) -> list[Scorer]:
    """Instantiate the named scorers in order; an unknown name is an error listing the known ones.

    ``conventions`` (scorer name -> convention, e.g. ``{"bleu4": "sacrebleu"}``) overrides a scorer's default way
    of computing its metric; a name without conventions or an unknown convention is an error.
    """
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown} in eval.scorers; known: {sorted(SCORERS)}")
    conventions = dict(conventions or {})
    for name, convention in conventions.items():
        if name not in CONVENTIONS:
            raise ValueError(f"scorer {name!r} has no conventions; scorers with conventions: {sorted(CONVENTIONS)}")
        if convention not in CONVENTIONS[name]:
            raise ValueError(f"unknown convention {convention!r} for scorer {name!r}; known: {list(CONVENTIONS[name])}")
    return [SCORERS[n](convention=conventions[n]) if n in conventions else SCORERS[n]() for n in names]


def evaluate_task_with_items(
    ctx: EvalContext, task: Task, scorers: Sequence[Scorer]
) -> tuple[dict[str, float], dict[str, ItemScores]]:
    """Run every scorer once on ``task``: ``(scores, items)``, the merged ``score`` and ``score_items`` outputs.

    Two scorers reporting the same key is an error.
    """
    scores: dict[str, float] = {}
    items: dict[str, ItemScores] = {}
    for scorer in scorers:
        scorer_items = scorer.score_items(ctx, task)
        for key, values in scorer_items.items():
            if key in items:
                raise ValueError(f"metric {key!r} reported twice (scorer {scorer.name!r})")
            items[key] = values
        for key, value in scorer.summarize(scorer_items).items():
            if key in scores:
                raise ValueError(f"metric {key!r} reported twice (scorer {scorer.name!r})")
            scores[key] = float(value)
    return scores, items


def evaluate_task(ctx: EvalContext, task: Task, scorers: Sequence[Scorer]) -> dict[str, float]:
    """Run every scorer on ``task`` and merge their outputs; two scorers reporting the same key is an error."""
    return evaluate_task_with_items(ctx, task, scorers)[0]


def evaluate_task_items(ctx: EvalContext, task: Task, scorers: Sequence[Scorer]) -> dict[str, ItemScores]:
    """Every scorer's per-item values on ``task``, merged (metric -> items); a duplicate key is an error."""
    return evaluate_task_with_items(ctx, task, scorers)[1]
