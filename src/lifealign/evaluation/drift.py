"""Drift diagnostics: how far the policy has moved from the reference, and from itself when a task was learned.

- **KL to the reference** on a task's held-out prompts, teacher-forced on the chosen responses: at every response
  position ``t`` (the logits at ``t−1`` predict token ``t``) the full-distribution
  ``KL_t = Σ_v p_t(v) (log p_t(v) − log q_t(v))`` with ``p = π(·|x, y_<t)``, ``q = π_ref(·|x, y_<t)``, averaged
  over all response tokens of all pairs (token-weighted).
- **Log-likelihood displacement** of task ``j``: ``mean_n (log π_now(y_c|x) − log π_j(y_c|x))`` and the same for
  ``y_r``, where ``π_j`` is the policy right after task ``j`` was learned (summed response log-probs). A DPO-style
  run typically pushes both down ("likelihood displacement"); forgetting shows as the chosen side falling back.

The tensor functions are pure; :class:`DriftTracker` keeps the at-learning log-likelihoods and
:func:`measure_drift` runs one task through a :class:`~lifealign.evaluation.scorers.base.EvalContext`.

Per item (:func:`measure_drift_items`), aligned with the held-out pairs by record id:

- ``kl``: pair i's per-token KL, ``KL_sum_i / n_i``, with **weight** ``n_i`` (its response tokens), so the weighted
  mean ``Σ n_i (KL_sum_i / n_i) / Σ n_i = Σ KL_sum_i / Σ n_i`` is the token-weighted ``kl`` above (equal up to
  floating-point rounding); a pair without response tokens has value 0 and weight 0.
- ``chosen_displacement`` / ``rejected_displacement``: ``log π_now(y|x) − log π_j(y|x)`` of each pair present both
  now and at learning (the ids say which); no items when the task's at-learning values were never recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lifealign.data.collate import collate_pairs
from lifealign.data.records import Task
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, PairLogps, eval_mode, task_examples
from lifealign.evaluation.scorers.preference import policy_pair_logps
from lifealign.losses.logps import CHUNK_ELEMENTS, sum_scored
from lifealign.training.forward import scored_logits

__all__ = [
    "DriftTracker",
    "displacement_items",
    "kl_items",
    "kl_rows",
    "kl_to_reference",
    "mean_displacement",
    "measure_drift",
    "measure_drift_items",
    "measure_drift_with_items",
    "rows_kl",
    "token_kl",
]


def rows_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax z_i ‖ softmax z_ref_i) = Σ_v p_i(v) (log p_i(v) − log q_i(v))`` per row: ``(M, V)`` twice ->
    ``(M,)`` fp32, in chunks of at most ``CHUNK_ELEMENTS`` logits, so the fp32 temporaries stay bounded."""
    rows = max(1, CHUNK_ELEMENTS // max(1, policy_logits.shape[-1]))
    parts = []
    for pol, ref in zip(policy_logits.split(rows), ref_logits.split(rows)):
        log_p = torch.log_softmax(pol.float(), dim=-1)
        log_q = torch.log_softmax(ref.float(), dim=-1)
        parts.append((log_p.exp() * (log_p - log_q)).sum(dim=-1))
    return torch.cat(parts) if parts else policy_logits.new_zeros(0, dtype=torch.float32)


def token_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed KL(π‖π_ref) over response positions, and the number of positions.

    ``policy_logits``/``ref_logits (N, T, V)``, ``completion_mask (N, T)`` (1 on response tokens) ->
    ``(kl_sum (N,) fp32, n_tokens (N,))``, ``kl_sum[i] = Σ_{t≥1, mask[i,t]=1} KL(softmax z[i,t−1] ‖ softmax
    z_ref[i,t−1])``; only the scored positions are normalised (:func:`rows_kl`).
    """
    scored = completion_mask[:, 1:].bool()  # (N, T-1): position t-1 predicts response token t
    kl = rows_kl(policy_logits[:, :-1][scored], ref_logits[:, :-1][scored])
    return sum_scored(kl, scored), scored.sum(dim=-1)


@torch.no_grad()
def kl_rows(ctx: EvalContext, examples: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """Per example ``(Σ_t KL_t, n_tokens)`` of ``KL(π‖π_ref)`` over its chosen response, in input order.

    Both policies' LM heads run on the response positions only (``scored_logits``). Each rank scores its slice of
    ``examples`` (``ctx.map_sharded``); the per-example rows are gathered.
    """
    device = ctx.resolved_device()

    def per_example(part: list[dict[str, Any]]) -> list[tuple[float, int]]:
        rows: list[tuple[float, int]] = []
        for start in range(0, len(part), ctx.eval.batch_size):
            batch = collate_pairs(
                part[start : start + ctx.eval.batch_size], ctx.tokenizer.pad_token_id, sides=("chosen",)
            )
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            scored = batch["completion_mask"].to(device)[:, 1:].bool()
            policy_logits = scored_logits(ctx.model, ids, mask, scored)
            with ctx.reference_policy():
                ref_logits = scored_logits(ctx.model, ids, mask, scored)
            kl_sum = sum_scored(rows_kl(policy_logits, ref_logits), scored)
            rows += zip(kl_sum.tolist(), scored.sum(dim=-1).tolist(), strict=True)
        return rows

    with eval_mode(ctx.model):
        return ctx.map_sharded(examples, per_example)


def _pooled_kl(rows: list[tuple[float, int]]) -> float:
    count = sum(n for _, n in rows)
    return sum(kl for kl, _ in rows) / count if count else math.nan


def kl_to_reference(ctx: EvalContext, examples: list[dict[str, Any]]) -> float:
    """Token-weighted mean ``KL(π‖π_ref)`` over the chosen responses of ``examples``; NaN if there are none."""
    return _pooled_kl(kl_rows(ctx, examples))


def kl_items(ids: list[str], rows: list[tuple[float, int]]) -> ItemScores:
    """Per-pair per-token KL ``KL_sum_i / n_i`` weighted by ``n_i`` (0 with weight 0 for a pair without tokens)."""
    return ItemScores(list(ids), [kl / n if n else 0.0 for kl, n in rows], weights=[float(n) for _, n in rows])


def _matched(now: PairLogps, then: PairLogps) -> tuple[list[int], list[int]]:
    """Positions of the pairs both cover: by position when the id lists are equal, otherwise by id."""
    if now.ids == then.ids:
        return list(range(len(now.ids))), list(range(len(now.ids)))
    then_pos = {pid: k for k, pid in enumerate(then.ids)}
    matched = [(k, then_pos[pid]) for k, pid in enumerate(now.ids) if pid in then_pos]
    return [a for a, _ in matched], [b for _, b in matched]


def displacement_items(now: PairLogps, then: PairLogps) -> dict[str, ItemScores]:
    """Per matched pair ``chosen_now − chosen_then`` and ``rejected_now − rejected_then`` (ids of ``now``)."""
    idx_now, idx_then = _matched(now, then)
    ids = [now.ids[k] for k in idx_now]
    d_chosen = now.chosen[idx_now].double() - then.chosen[idx_then].double()
    d_rejected = now.rejected[idx_now].double() - then.rejected[idx_then].double()
    return {
        "chosen_displacement": ItemScores(ids, d_chosen.tolist()),
        "rejected_displacement": ItemScores(list(ids), d_rejected.tolist()),
    }


def mean_displacement(now: PairLogps, then: PairLogps) -> tuple[float, float]:
    """``(mean(chosen_now − chosen_then), mean(rejected_now − rejected_then))`` over the pairs both cover.

    Pairs are matched by position when the id lists are equal, otherwise by id; NaN if nothing matches.
    """
    idx_now, idx_then = _matched(now, then)
    if not idx_now:
        return math.nan, math.nan
    d_chosen = now.chosen[idx_now].double() - then.chosen[idx_then].double()
    d_rejected = now.rejected[idx_now].double() - then.rejected[idx_then].double()
    return d_chosen.mean().item(), d_rejected.mean().item()


@dataclass
class DriftTracker:
    """Summed chosen/rejected log-likelihoods of each task's held-out pairs at the time the task was learned."""

    at_learning: dict[str, PairLogps] = field(default_factory=dict)

    def record(self, task: str, logps: PairLogps) -> None:
        """Remember ``logps`` as task ``task``'s at-learning values (a later call overwrites, e.g. on re-training)."""
        self.at_learning[task] = PairLogps(
            list(logps.ids), logps.chosen.detach().clone(), logps.rejected.detach().clone()
        )

    def displacement(self, task: str, now: PairLogps) -> dict[str, float]:
        """``{"chosen_displacement", "rejected_displacement"}`` since ``task`` was learned (NaN if never recorded)."""
        then = self.at_learning.get(task)
        chosen, rejected = mean_displacement(now, then) if then is not None else (math.nan, math.nan)
        return {"chosen_displacement": chosen, "rejected_displacement": rejected}

    def displacement_items(self, task: str, now: PairLogps) -> dict[str, ItemScores]:
        """Per-pair :meth:`displacement` (no items if ``task`` was never recorded)."""
        then = self.at_learning.get(task)
        if then is None:
            return {key: ItemScores([], []) for key in ("chosen_displacement", "rejected_displacement")}
        return displacement_items(now, then)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (floats as lists) for exact resume."""
        return {
            name: {"ids": lp.ids, "chosen": lp.chosen.tolist(), "rejected": lp.rejected.tolist()}
            for name, lp in self.at_learning.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.at_learning = {
            name: PairLogps(
                list(v["ids"]),
                torch.tensor(v["chosen"], dtype=torch.float32),
                torch.tensor(v["rejected"], dtype=torch.float32),
            )
            for name, v in state.items()
        }


def measure_drift_with_items(
    ctx: EvalContext, task: Task, tracker: DriftTracker, *, just_learned: bool
) -> tuple[dict[str, float], dict[str, ItemScores]]:
    """``(measure_drift values, measure_drift_items values)`` from one pass over the task (call this for both)."""
    now = policy_pair_logps(ctx, task)
    if just_learned:
        tracker.record(task.name, now)
    examples = task_examples(ctx, task)
    rows = kl_rows(ctx, examples)
    scores = {"kl": _pooled_kl(rows), **tracker.displacement(task.name, now)}
    items = {"kl": kl_items([str(e["id"]) for e in examples], rows), **tracker.displacement_items(task.name, now)}
    return scores, items


def measure_drift(ctx: EvalContext, task: Task, tracker: DriftTracker, *, just_learned: bool) -> dict[str, float]:
    """``{"kl", "chosen_displacement", "rejected_displacement"}`` for ``task`` under the current policy.

    ``just_learned=True`` (the task was trained in this stage) first records the current log-likelihoods as the
    task's at-learning values, so its displacement is 0 now and measured against them later.
    """
    return measure_drift_with_items(ctx, task, tracker, just_learned=just_learned)[0]


def measure_drift_items(
    ctx: EvalContext, task: Task, tracker: DriftTracker, *, just_learned: bool
) -> dict[str, ItemScores]:
    """Per-pair values of every :func:`measure_drift` metric (module docstring); their ``mean()`` are its values,
    up to floating-point rounding. ``kl`` carries weights (response tokens). ``just_learned`` as in
    :func:`measure_drift`."""
    return measure_drift_with_items(ctx, task, tracker, just_learned=just_learned)[1]
