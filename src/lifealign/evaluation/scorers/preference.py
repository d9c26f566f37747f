"""Implicit-reward preference accuracy and margin on held-out pairs (no generation).

With the DPO implicit reward ``r(x, y) = β (log π(y|x) − log π_ref(y|x))`` (LifeAlign Eq. 1; trl's
``rewards/accuracies`` and ``rewards/margins``), over the held-out pairs ``(x, y_c, y_r)``:

    pref_acc = 100 · mean( 1[r_c > r_r] + ½ · 1[r_c = r_r] )
    margin   = mean( r_c − r_r )

Log-probs are summed over response tokens. ``β > 0`` rescales the rewards, so it changes ``margin`` but never the
accuracy. A fresh adapter (policy = reference) scores exactly 50 (every pair is a tie), which says nothing about
the model: ``logp_acc`` (``scorers/logp_acc.py``) is the accuracy that is meaningful for any model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lifealign.data.collate import collate
from lifealign.data.records import Task
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, PairLogps, Scorer, eval_mode, task_examples
from lifealign.training.forward import batch_logps

_PAIR_KEYS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")

__all__ = [
    "PreferenceAccuracy",
    "implicit_reward_items",
    "pair_logps",
    "policy_pair_logps",
    "preference_accuracy",
    "reference_pair_logps",
    "sharded_pair_logps",
]


def _wins_and_margins(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair ``1[r_c > r_r] + ½ · 1[r_c = r_r]`` and ``r_c − r_r`` of the implicit rewards, ``(n,)`` fp64."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    r_chosen = beta * (policy_chosen.double() - ref_chosen.double())
    r_rejected = beta * (policy_rejected.double() - ref_rejected.double())
    wins = (r_chosen > r_rejected).double() + 0.5 * (r_chosen == r_rejected).double()
    return wins, r_chosen - r_rejected


def implicit_reward_items(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair ``(100 · (1[r_c > r_r] + ½ · 1[r_c = r_r]), r_c − r_r)``, both ``(n,)`` fp64; all inputs ``(n,)``."""
    wins, margins = _wins_and_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return 100.0 * wins, margins


def preference_accuracy(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[float, float]:
    """``(accuracy ×100, mean margin)`` of the implicit rewards ``β(logπ − logπ_ref)``; all inputs ``(n,)``.

    Ties count one half. NaN for ``n = 0``.
    """
    wins, margins = _wins_and_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if wins.numel() == 0:
        return math.nan, math.nan
    return 100.0 * wins.mean().item(), margins.mean().item()


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    pad_id: int,
    *,
    batch_size: int,
    layout: str = "concat",
    pack_tokens: int | None = None,
) -> PairLogps:
    """Summed response log-probs (and response token counts) of both sides of every example, one forward per batch
    of ``batch_size`` pairs laid out as ``layout`` (``data.collate``; ``concat``: chosen rows then rejected rows)."""
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in _PAIR_KEYS}
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, layout=layout, pack_tokens=pack_tokens)
        logps = batch_logps(model, batch)  # the LM head runs only on response positions
        for key in ("chosen_logps", "rejected_logps"):
            parts[key].append(logps[key].float().cpu())
        for key in ("chosen_tokens", "rejected_tokens"):
            parts[key].append(logps[key].long().cpu())
    joined = {
        key: torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long if "tokens" in key else torch.float32)
        for key, chunks in parts.items()
    }
    return PairLogps(
        ids=[str(e["id"]) for e in examples],
        chosen=joined["chosen_logps"],
        rejected=joined["rejected_logps"],
        chosen_tokens=joined["chosen_tokens"],
        rejected_tokens=joined["rejected_tokens"],
    )


def sharded_pair_logps(ctx: EvalContext, examples: list[dict[str, Any]]) -> PairLogps:
    """:func:`pair_logps` of ``ctx.model`` as it is now, each rank on its slice of ``examples``, gathered on all."""

    def rows(part: list[dict[str, Any]]) -> list[tuple[float, float, int, int]]:
        lp = pair_logps(
            ctx.model,
            part,
            ctx.tokenizer.pad_token_id,
            batch_size=ctx.eval.batch_size,
            layout=ctx.layout,
            pack_tokens=ctx.pack_tokens,
        )
        columns = (lp.chosen.tolist(), lp.rejected.tolist(), lp.chosen_tokens.tolist(), lp.rejected_tokens.tolist())
        return list(zip(*columns, strict=True))

    pairs = ctx.map_sharded(examples, rows)
    return PairLogps(
        ids=[str(e["id"]) for e in examples],
        chosen=torch.tensor([row[0] for row in pairs], dtype=torch.float32),
        rejected=torch.tensor([row[1] for row in pairs], dtype=torch.float32),
        chosen_tokens=torch.tensor([row[2] for row in pairs], dtype=torch.long),
        rejected_tokens=torch.tensor([row[3] for row in pairs], dtype=torch.long),
    )


def policy_pair_logps(ctx: EvalContext, task: Task) -> PairLogps:
    """The current policy's log-probs on the task's held-out pairs, computed once per evaluation pass."""
    if task.name not in ctx.policy_cache:
        with eval_mode(ctx.model):
            ctx.policy_cache[task.name] = sharded_pair_logps(ctx, task_examples(ctx, task))
    return ctx.policy_cache[task.name]


def reference_pair_logps(ctx: EvalContext, task: Task) -> PairLogps:
    """The reference's log-probs on the same pairs, cached under ``(ctx.reference_key, task)`` across passes."""
    examples = task_examples(ctx, task)
    key = (ctx.reference_key, task.name)
    cached = ctx.reference_cache.get(key)
    if cached is None or cached.ids != [str(e["id"]) for e in examples]:
        with eval_mode(ctx.model), ctx.reference_policy():
            cached = sharded_pair_logps(ctx, examples)
        ctx.reference_cache[key] = cached
    return cached


class PreferenceAccuracy(Scorer):
    """``pref_acc`` (0–100) and ``margin`` (reward units) of the implicit reward on ``eval.max_examples`` pairs.

    Items: per pair ``100 · (win + ½ tie)`` and ``r_c − r_r``, whose means are ``pref_acc`` and ``margin``.
    """

    name = "pref_acc"
    needs_generation = False

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = beta

    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        policy = policy_pair_logps(ctx, task)
        reference = reference_pair_logps(ctx, task)
        wins, margins = implicit_reward_items(
            policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=self.beta
        )
        return {
            self.name: ItemScores(list(policy.ids), wins.tolist()),
            "margin": ItemScores(list(policy.ids), margins.tolist()),
        }
