"""Baselines that ``lifealign unlearn`` runs under U2A's budget (same optimizer steps, lr, batch size, start).

A baseline is a name -> a function that builds its training job from the shared context (``baseline_job``):

- every unlearning objective (``ga``, ``grad_diff``, ``npo``, ``simnpo``, ...): unlearning on the *full* candidate
  set with equal weights (the U2A paper's GA / GradDiff / NPO rows), with the same regulariser, retain term and stop
  rule as U2A;
- ``random``: a random subset of U2A's size with equal weights and U2A's objective (is the selection doing work?);
- ``topk``: U2A's initial top-k with equal weights and no re-weighting (are the weights doing work?);
- ``dpo``: DPO (beta = ``unlearn.dpo_beta``) on the preference pairs, the positive-data alternative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lifealign.config.schema import LossTerm
from lifealign.config.unlearn import UnlearnSection
from lifealign.losses import CombinedLoss, bind_losses, unlearning_objectives
from lifealign.unlearning.objectives import forget_loss
from lifealign.unlearning.selection import random_subset

__all__ = ["SELECTION_BASELINES", "BaselineContext", "BaselineJob", "baseline_job", "baseline_names"]


@dataclass
class BaselineContext:
    """What a baseline may use: the config, the tokenised candidates and pairs, U2A's selection, a seed."""

    section: UnlearnSection
    candidates: list[dict[str, Any]]
    preference: list[dict[str, Any]]
    u2a_selected: list[int]
    seed: int


@dataclass
class BaselineJob:
    """One baseline's stage: examples (``index`` = position), loss, the unlearning objective for the plugins
    (None: no unlearning plugins, e.g. DPO), and the candidate indices it trains on (None: not candidates)."""

    examples: list[dict[str, Any]]
    loss: CombinedLoss
    objective: str | None
    selected: list[int] | None

    @property
    def empty(self) -> bool:
        return not self.examples


def _subset(ctx: BaselineContext, idx: list[int]) -> list[dict[str, Any]]:
    return [dict(ctx.candidates[i], index=j) for j, i in enumerate(idx)]


def full_set_job(objective: str, ctx: BaselineContext) -> BaselineJob:
    """Unlearning of every candidate with equal weights under ``objective`` (its registry loss's defaults)."""
    idx = list(range(len(ctx.candidates)))
    return BaselineJob(_subset(ctx, idx), forget_loss(ctx.section, objective), objective, idx)


def random_job(ctx: BaselineContext) -> BaselineJob:
    idx = random_subset(len(ctx.candidates), len(ctx.u2a_selected), ctx.seed)
    return BaselineJob(_subset(ctx, idx), forget_loss(ctx.section), ctx.section.objective, idx)


def topk_job(ctx: BaselineContext) -> BaselineJob:
    idx = list(ctx.u2a_selected)
    return BaselineJob(_subset(ctx, idx), forget_loss(ctx.section), ctx.section.objective, idx)


def dpo_job(ctx: BaselineContext) -> BaselineJob:
    loss = bind_losses([LossTerm(name="dpo", beta=ctx.section.dpo_beta)], "unlearn.dpo")
    return BaselineJob([dict(ex, index=j) for j, ex in enumerate(ctx.preference)], loss, None, None)


SELECTION_BASELINES: dict[str, Callable[[BaselineContext], BaselineJob]] = {
    "random": random_job,
    "topk": topk_job,
    "dpo": dpo_job,
}
"""The baselines that are not a full-set unlearning objective (every objective is one, by its loss name)."""


def baseline_names() -> list[str]:
    """Every name ``unlearn.baselines`` accepts: each unlearning objective (full set), then the selection ones."""
    return [*unlearning_objectives(), *SELECTION_BASELINES]


def baseline_job(name: str, ctx: BaselineContext) -> BaselineJob:
    """The training job of baseline ``name``; ``ValueError`` listing the known names for an unknown one."""
    if name in SELECTION_BASELINES:
        return SELECTION_BASELINES[name](ctx)
    if name in unlearning_objectives():
        return full_set_job(name, ctx)
    raise ValueError(f"unlearn.baselines: unknown baseline {name!r}; available: {', '.join(baseline_names())}")
