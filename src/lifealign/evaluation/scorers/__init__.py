"""The scorer registry: a stable lowercase name -> a ``Scorer`` class (one file + one line per scorer).

``eval.scorers: [pref_acc, rouge_l, bleu4]`` picks entries by name; every key returned by a scorer (its main metric
and extras such as ``margin``) gets its own score matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

from lifealign.data.records import Task
from lifealign.evaluation.scorers.base import EvalContext, Scorer
from lifealign.evaluation.scorers.generation import Bleu4, RougeL
from lifealign.evaluation.scorers.judge import JudgeScorer
from lifealign.evaluation.scorers.preference import PreferenceAccuracy
from lifealign.evaluation.scorers.reward_model import RewardModelScorer
from lifealign.evaluation.scorers.rule import RuleScorer

__all__ = ["SCORERS", "EvalContext", "Scorer", "build_scorers", "evaluate_task"]

SCORERS: dict[str, type[Scorer]] = {
    "pref_acc": PreferenceAccuracy,
    "rouge_l": RougeL,
    "bleu4": Bleu4,
    "judge": JudgeScorer,
    "reward_model": RewardModelScorer,
    "rule": RuleScorer,
}


def build_scorers(names: Sequence[str]) -> list[Scorer]:
    """Instantiate the named scorers in order; an unknown name is an error listing the known ones."""
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown} in eval.scorers; known: {sorted(SCORERS)}")
    return [SCORERS[n]() for n in names]


def evaluate_task(ctx: EvalContext, task: Task, scorers: Sequence[Scorer]) -> dict[str, float]:
    """Run every scorer on ``task`` and merge their outputs; two scorers reporting the same key is an error."""
    merged: dict[str, float] = {}
    for scorer in scorers:
        for key, value in scorer.score(ctx, task).items():
            if key in merged:
                raise ValueError(f"metric {key!r} reported twice (scorer {scorer.name!r})")
            merged[key] = float(value)
    return merged
