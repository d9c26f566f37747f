"""Focalized Preference Optimization (LifeAlign, Eqs. 1-3): the binary focal loss on the DPO probability."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lifealign.losses.dpo import check_beta, logratio_margin, pair_rewards
from lifealign.losses.spec import LossInputs, LossOutput

__all__ = ["fpo_loss"]


def fpo_loss(inputs: LossInputs, *, beta: float = 0.1, gamma: float = 2.0, detach_weight: bool = False) -> LossOutput:
    """``L = -(1 - sigma(r))^gamma * log sigma(r)`` with ``r = beta d`` (Eq. 1), per pair, shape ``(B,)``.

    ``gamma = 2`` is the paper's (and the authors' hard-coded) exponent; ``gamma = 0`` is DPO. The focal weight
    ``(1 - sigma(r))^gamma`` down-weights well-learned pairs (r > 0); it is 0.25 at r = 0. The authors' code lets
    gradients flow through the weight (``detach_weight=False``): then dL/dr at r = 0 is ``-0.25 (0.5 + ln 2)``,
    about 0.60 of DPO's ``-0.5``; with the weight detached it is exactly 0.25 of DPO's.
    """
    check_beta(beta)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    r = beta * logratio_margin(inputs)
    # (1 - sigma(r))^gamma = exp(gamma * log sigma(-r)): stable for large |r|.
    weight = torch.exp(gamma * F.logsigmoid(-r))
    if detach_weight:
        weight = weight.detach()
    losses = -weight * F.logsigmoid(r)
    return LossOutput(losses, *pair_rewards(inputs, beta))
