"""``rule``: the synthetic suite's own preference rules applied to greedy generations (0–100).

Each synthetic task (``lifealign.data.synthetic``) has a ``rule(prompt, response) -> [0, 1]`` that says how much a
response has the task's preferred style (sign-off, ALL CAPS, polite apology, refusal). The scorer is

    rule = 100 · (1/n) Σ_i rule_task(prompt_i, completion_i)

over the greedy completions of the first ``eval.generation_examples`` test prompts, the same cached generation pass
that ``rouge_l`` and ``bleu4`` read (items: ``100 · rule_task(prompt_i, completion_i)``). A task that is not from
the synthetic suite has no rule: no items, and the score is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lifealign.data.records import Prompt, Task
from lifealign.data.synthetic import SYNTHETIC_TASKS
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Scorer, task_generations

__all__ = ["RuleScorer", "prompt_text", "rule_items", "rule_score", "synthetic_name"]


def prompt_text(prompt: Prompt) -> str:
    """The text a rule reads: the prompt itself, or the content of the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    user_turns = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return user_turns[-1] if user_turns else ""


def _rule_values(task_name: str, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
    """``[rule_task(prompt_i, response_i)]`` in [0, 1] with the rule of synthetic task ``task_name``."""
    if task_name not in SYNTHETIC_TASKS:
        raise ValueError(f"no rule for task {task_name!r}; synthetic tasks are {sorted(SYNTHETIC_TASKS)}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rule = SYNTHETIC_TASKS[task_name].rule
    return [rule(prompt_text(p), r) for p, r in zip(prompts, responses)]


def rule_items(task_name: str, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
    """``[100 · rule_task(prompt_i, response_i)]``: the per-response values whose mean is :func:`rule_score`."""
    return [100.0 * v for v in _rule_values(task_name, prompts, responses)]


def rule_score(task_name: str, prompts: Sequence[Prompt], responses: Sequence[str]) -> float:
    """``100 · mean_i rule_task(prompt_i, response_i)`` with the rule of synthetic task ``task_name``; NaN if empty."""
    values = _rule_values(task_name, prompts, responses)
    return 100.0 * sum(values) / len(values) if values else math.nan


def synthetic_name(task: Task) -> str | None:
    """Which synthetic task ``task`` is: its name, else the ``<name>`` of its ``synthetic/<name>/...`` record ids.

    The loader renames a ``synthetic:<name>`` task's records to the configured task name but keeps their ids.
    """
    if task.name in SYNTHETIC_TASKS:
        return task.name
    for record in (*task.test, *task.train):
        parts = record.id.split("/")
        if len(parts) >= 2 and parts[0] == "synthetic" and parts[1] in SYNTHETIC_TASKS:
            return parts[1]
    return None


class RuleScorer(Scorer):
    """``rule``: mean rule score (0–100) of greedy completions; NaN (no items) outside the synthetic suite."""

    name = "rule"
    needs_generation = True

    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        name = synthetic_name(task)
        if name is None:
            return {self.name: ItemScores([], [])}
        gens = task_generations(ctx, task)
        return {self.name: ItemScores(list(gens.ids), rule_items(name, gens.prompts, gens.completions))}
