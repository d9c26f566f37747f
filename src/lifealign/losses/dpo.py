"""DPO (Rafailov et al. 2023), sigmoid form, with optional conservative label smoothing (cDPO).

Shared pieces of the DPO family also live here: the log-ratio margin ``d`` and the implicit rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lifealign.losses.logps import implicit_reward
from lifealign.losses.spec import LossInputs, LossOutput

__all__ = ["dpo_loss", "logratio_margin", "pair_rewards"]


def logratio_margin(inputs: LossInputs) -> torch.Tensor:
    """``d = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``, shape ``(B,)``."""
    chosen, rejected, ref_chosen, ref_rejected = inputs.require(
        "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"
    )
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def pair_rewards(inputs: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached implicit rewards ``beta * (logp - ref_logp)`` of the chosen and rejected responses, each ``(B,)``."""
    chosen, rejected, ref_chosen, ref_rejected = inputs.require(
        "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"
    )
    return (
        implicit_reward(chosen, ref_chosen, beta).detach(),
        implicit_reward(rejected, ref_rejected, beta).detach(),
    )


def check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def dpo_loss(inputs: LossInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """``L = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)`` per pair, shape ``(B,)``.

    ``d`` is the log-ratio margin (``logratio_margin``), log-probs summed over response tokens. ``eps`` =
    ``label_smoothing`` is the conservative-DPO flip probability (trl's ``sigmoid`` loss before 1.0; trl 1.16 keeps
    this form only in ``aot``); ``eps = 0`` is plain DPO, ``-log sigma(beta d)``, whose value at ``d = 0`` is ln 2.
    """
    check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * logratio_margin(inputs)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, *pair_rewards(inputs, beta))
