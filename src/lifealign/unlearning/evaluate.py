"""Evaluation of an unlearned policy against the original model (the reference: adapter disabled).

On held-out pairs: preference accuracy of the implicit reward (``pref_acc``, 0-100; the original scores 50, every
pair a tie) and the alignment objective ``J`` = mean DPO loss with beta = ``unlearn.dpo_beta`` (the original scores
ln 2; ``delta_J = J - ln 2`` < 0 is better). Each comes with its per-pair values (:class:`UnlearnEval`), the items
every interval and paired test is computed from. Forgetting: ``forget_nll``, the token-weighted mean NLL of the forget
candidates' responses (higher = more unlearned). Utility: ``retain_nll`` on retain sequences (lower = better).
Generation scorers configured in ``eval.scorers`` (ROUGE-L, BLEU-4, judge, ...) run on the held-out pairs too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.collate import collate_pairs
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Scorer, Shard, eval_mode
from lifealign.evaluation.scorers.preference import implicit_reward_items, pair_logps, sharded_pair_logps
from lifealign.losses import LOSSES, LossInputs
from lifealign.models.lora import reference_context
from lifealign.training.forward import batch_logps

__all__ = [
    "ITEM_METRICS",
    "EvalSets",
    "UnlearnEval",
    "evaluate_unlearning",
    "heldout_items",
    "mean_token_nll",
    "pooled_nll",
    "prepare_eval_sets",
    "token_nll_rows",
]

LN2 = math.log(2.0)
ITEM_METRICS = ("pref_acc", "J", "delta_J", "margin")
"""The metrics that are means over the held-out pairs, and so have per-pair values."""


@dataclass
class EvalSets:
    """Tokenised evaluation sets and the reference log-probs of the held-out pairs ``(n,)`` each."""

    test: list[dict[str, Any]]
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]]
    task: Task
    """The held-out pairs as a task, for the generation scorers."""


def prepare_eval_sets(
    model: nn.Module,
    tokenizer: Any,
    data: DataSection,
    test: Sequence[PreferencePair],
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    *,
    limit: int | None,
    batch_size: int,
) -> EvalSets:
    """Tokenise the first ``limit`` held-out pairs and take the original model's log-probs on them once."""
    records = list(test[:limit] if limit else test)
    examples = tokenize_pairs(records, tokenizer, data).examples if records else []
    with eval_mode(model), reference_context(model):
        ref = pair_logps(model, examples, tokenizer.pad_token_id, batch_size=batch_size)
    return EvalSets(
        test=examples,
        ref_chosen=ref.chosen,
        ref_rejected=ref.rejected,
        forget=forget[:limit] if limit else forget,
        retain=retain[:limit] if limit else retain,
        task=Task(name="heldout", train=[], test=records),
    )


@torch.no_grad()
def token_nll_rows(
    model: nn.Module, examples: Sequence[dict[str, Any]], side: str, pad_id: int, batch_size: int = 8
) -> list[tuple[float, float]]:
    """Per example ``(-log pi(y), |y|)`` for the response of ``side``."""
    rows: list[tuple[float, float]] = []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = collate_pairs(list(examples[start : start + batch_size]), pad_id, sides=(side,))
            out = batch_logps(model, batch)
            rows += zip((-out[f"{side}_logps"].float()).tolist(), out[f"{side}_tokens"].float().tolist(), strict=True)
    return rows


def pooled_nll(rows: Sequence[tuple[float, float]]) -> float:
    """``sum nll / sum tokens`` over ``rows`` from :func:`token_nll_rows` (NaN when there are no tokens)."""
    tokens = sum(n for _, n in rows)
    return sum(nll for nll, _ in rows) / tokens if tokens else math.nan


def mean_token_nll(
    model: nn.Module, examples: Sequence[dict[str, Any]], side: str, pad_id: int, batch_size: int = 8
) -> float:
    """``-sum log pi(y) / sum |y|`` over the responses of ``side`` (NaN when there are none)."""
    return pooled_nll(token_nll_rows(model, examples, side, pad_id, batch_size))


@dataclass
class UnlearnEval:
    """One evaluation: ``metrics`` (the table's row) and, per held-out pair, the values they are means of."""

    metrics: dict[str, float]
    items: dict[str, ItemScores]
    """``pref_acc`` (100 / 50 / 0: win, tie, loss), ``J`` (the pair's DPO loss), ``delta_J`` (``J_i - ln 2``) and
    ``margin`` per held-out pair, in the order of ``EvalSets.test``; ``metrics[m]`` is the mean of ``items[m]``."""


def heldout_items(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    ids: Sequence[str],
    beta: float,
) -> dict[str, ItemScores]:
    """Per pair ``i`` with implicit rewards ``r = beta (log pi - log pi_ref)``: ``pref_acc_i = 100 · 1[r_c > r_r]``
    (50 on a tie), ``margin_i = r_c - r_r``, ``J_i = -log sigmoid(margin_i)`` (DPO's loss, ``LOSSES["dpo"]``) and
    ``delta_J_i = J_i - ln 2``; all inputs ``(n,)``."""
    wins, margins = implicit_reward_items(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    inputs = LossInputs(
        chosen_logps=policy_chosen,
        rejected_logps=policy_rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )
    losses = LOSSES["dpo"].fn(inputs, beta=beta).losses.double()  # (n,)
    values = {"pref_acc": wins, "J": losses, "delta_J": losses - LN2, "margin": margins}
    return {name: ItemScores(list(ids), v.tolist()) for name, v in values.items()}


def evaluate_unlearning(
    model: nn.Module,
    tokenizer: Any,
    sets: EvalSets,
    *,
    beta: float,
    data: DataSection,
    eval_cfg: EvalSection,
    scorers: Sequence[Scorer] = (),
    shard: Shard | None = None,
) -> UnlearnEval:
    """``pref_acc``, ``J``, ``delta_J``, ``margin`` (with their per-pair values), ``forget_nll``, ``retain_nll`` and
    every extra scorer's keys.

    With ``shard`` (several processes) each rank scores its slice of every set and the results are gathered, so all
    ranks return the same metrics.
    """
    pad_id = tokenizer.pad_token_id
    ctx = EvalContext(model=model, tokenizer=tokenizer, data=data, eval=eval_cfg, shard=shard or Shard())
    with eval_mode(model):
        policy = sharded_pair_logps(ctx, sets.test)
    metrics: dict[str, float] = {}
    items: dict[str, ItemScores] = {}
    if sets.test:
        ids = [str(ex["id"]) for ex in sets.test]
        items = heldout_items(policy.chosen, policy.rejected, sets.ref_chosen, sets.ref_rejected, ids, beta)
        metrics.update({name: items[name].mean() for name in ITEM_METRICS})
    for key, examples, side in (("forget_nll", sets.forget, "rejected"), ("retain_nll", sets.retain, "chosen")):
        rows = ctx.map_sharded(
            examples, lambda part, side=side: token_nll_rows(model, part, side, pad_id, eval_cfg.batch_size)
        )
        metrics[key] = pooled_nll(rows)
    extra = [s for s in scorers if s.name != "pref_acc"]
    if extra and sets.task.test:
        for scorer in extra:
            for key, value in scorer.score(ctx, sets.task).items():
                metrics[key] = float(value)
    return UnlearnEval(metrics, items)
