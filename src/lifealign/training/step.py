"""One forward-and-loss step on a collated batch: the loop's step, and the loss that plugins evaluate on stored data.

``forward_loss`` runs the policy forward (``batch_logps``, under the run's autocast), assembles ``LossInputs`` with
the given reference log-probs and applies the method's ``CombinedLoss`` with optional per-example weights. The
training loop adds the plugins' terms on top; EWC's Fisher and GEM's memory gradients call it on their own samples,
so the three agree on what "the method's loss" is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lifealign.losses.combine import CombinedLoss
from lifealign.losses.spec import LossInputs, LossOutput
from lifealign.training.forward import batch_logps, loss_inputs

__all__ = ["StepOutputs", "forward_loss"]


@dataclass
class StepOutputs:
    """What one step computed: the weighted total, each term's part, the rewards-reporting term's output, and the
    policy log-probs and loss inputs the plugins read."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    primary: LossOutput
    policy: dict[str, torch.Tensor]
    inputs: LossInputs


def forward_loss(
    model: torch.nn.Module,
    batch: dict[str, Any],
    loss: CombinedLoss,
    reference: torch.Tensor | None,
    weights: torch.Tensor | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> StepOutputs:
    """``loss`` on one batch: ``total = Σ_k w_k · weighted_mean(L_k, weights)`` (``CombinedLoss``).

    ``reference``: ``(B, len(loss.uses))`` reference log-probs, or None when the loss needs none. The policy forward
    runs under ``autocast``; the loss itself in fp32 (log-probs are fp32, ``losses.logps``).
    """
    with autocast():
        policy = batch_logps(model, batch)
    inputs = loss_inputs(policy, reference, loss.uses)
    total, parts, primary = loss(inputs, weights=weights)
    return StepOutputs(total, parts, primary, policy, inputs)
