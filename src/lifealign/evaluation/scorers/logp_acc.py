"""Likelihood preference accuracy: does the policy itself give the chosen response a higher likelihood?

Unlike ``pref_acc`` (the implicit reward ``β(log π − log π_ref)``, a tie on every pair when the policy is the
reference), this needs no reference and means the same for a base model, a fresh adapter and a trained one. Over
the held-out pairs ``(x, y_c, y_r)``, with ``ℓ(y) = Σ_t log π(y_t | x, y_<t)`` summed over the ``|y|`` response
tokens:

    logp_acc      = 100 · mean( 1[ℓ(y_c) > ℓ(y_r)]             + ½ · 1[ℓ(y_c) = ℓ(y_r)] )              (raw)
    logp_acc_norm = 100 · mean( 1[ℓ(y_c)/|y_c| > ℓ(y_r)/|y_r|] + ½ · 1[ℓ(y_c)/|y_c| = ℓ(y_r)/|y_r|] )  (per token)

The raw form favours the shorter response (every token costs log-probability); the per-token mean removes most of
that bias, so report both. It reads the policy log-probs that ``pref_acc`` and drift already computed this pass
(``policy_pair_logps``), so it costs no extra forward. Items: per pair 100 · (win + ½ tie), NaN for the normalised
value of a pair with an empty response.
"""

from __future__ import annotations

import torch

from lifealign.data.records import Task
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Scorer
from lifealign.evaluation.scorers.preference import policy_pair_logps

__all__ = ["LogpAccuracy", "likelihood_wins"]


def _wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``100 · (1[c > r] + ½ · 1[c = r])`` elementwise; NaN where either side is NaN."""
    wins = 100.0 * ((chosen > rejected).double() + 0.5 * (chosen == rejected).double())
    return torch.where(chosen.isnan() | rejected.isnan(), torch.full_like(wins, float("nan")), wins)


def likelihood_wins(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair ``(raw, length-normalised)`` wins ×100, both ``(n,)`` fp64, from summed log-probs and token counts.

    The normalised comparison of a pair with a zero-length side is NaN (``0/0``): it has no per-token mean.
    """
    chosen, rejected = chosen_logps.double(), rejected_logps.double()
    chosen_mean = chosen / chosen_tokens.double()  # 0 tokens -> 0/0 = NaN
    rejected_mean = rejected / rejected_tokens.double()
    return _wins(chosen, rejected), _wins(chosen_mean, rejected_mean)


class LogpAccuracy(Scorer):
    """``logp_acc`` and ``logp_acc_norm`` (0–100): how often the policy's likelihood prefers the chosen response."""

    name = "logp_acc"
    needs_generation = False

    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        policy = policy_pair_logps(ctx, task)
        if policy.chosen_tokens is None or policy.rejected_tokens is None:
            raise ValueError(f"cached policy log-probs of task {task.name!r} have no response token counts")
        raw, norm = likelihood_wins(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens)
        return {
            self.name: ItemScores(list(policy.ids), raw.tolist()),
            "logp_acc_norm": ItemScores(list(policy.ids), norm.tolist()),
        }
