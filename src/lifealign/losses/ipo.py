"""IPO (Azar et al. 2024, Eq. 17) as trl 1.16 computes it: on per-token average log-ratios."""

from __future__ import annotations

from lifealign.losses.dpo import check_beta, pair_rewards
from lifealign.losses.spec import LossInputs, LossOutput

__all__ = ["ipo_loss"]


def ipo_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """``L = (h - 1/(2 beta))^2`` with ``h = (logp_w - ref_w)/|y_w| - (logp_l - ref_l)/|y_l|``, shape ``(B,)``.

    ``beta`` is the paper's regulariser tau. The per-token averaging (``|y|`` = response tokens, at least 1) follows
    trl's ``loss_type="ipo"``, which says the IPO authors confirmed it; the rewards stay the summed
    ``beta * (logp - ref_logp)`` as trl logs them.
    """
    check_beta(beta)
    chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected = inputs.require(
        "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens"
    )
    h = (chosen - ref_chosen) / n_chosen.clamp(min=1) - (rejected - ref_rejected) / n_rejected.clamp(min=1)
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOutput(losses, *pair_rewards(inputs, beta))
