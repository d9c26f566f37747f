"""Hinge preference loss (SLiC-HF, Zhao et al. 2023, with the DPO log-ratio margin, as trl's ``hinge``)."""

from __future__ import annotations

import torch

from lifealign.losses.dpo import check_beta, logratio_margin, pair_rewards
from lifealign.losses.spec import LossInputs, LossOutput

__all__ = ["hinge_loss"]


def hinge_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossOutput:
    """``L = max(0, 1 - beta d)`` per pair, shape ``(B,)``; ``1/beta`` is the margin ``d`` must reach."""
    check_beta(beta)
    losses = torch.relu(1 - beta * logratio_margin(inputs))
    return LossOutput(losses, *pair_rewards(inputs, beta))
