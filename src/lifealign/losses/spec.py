"""The loss contract: pure functions on per-sequence log-probs, and the ``LossSpec`` that declares their needs.

Every loss has the signature ``fn(inputs: LossInputs, *, <hyper-parameters>) -> LossOutput`` and returns
*per-example* losses; the training loop applies per-example weights and reduces. The loop never branches on a
loss's name: it reads ``LossSpec.needs_reference`` and ``LossSpec.paired``.

Conventions for unpaired (unlearning) losses: the negative/forget response is ``rejected``; a retain/positive
response, when the loss uses one (GradDiff), is ``chosen``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch


@dataclass
class LossInputs:
    """Per-sequence quantities, each of shape ``(B,)``; log-probs are summed over response tokens."""

    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    """Number of response tokens of each chosen sequence (for length-normalised losses)."""
    rejected_tokens: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    def require(self, *names: str) -> tuple[torch.Tensor, ...]:
        """The named fields, in order; a ``ValueError`` naming every missing one if any is ``None``."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"loss inputs missing: {', '.join(missing)}")
        return tuple(getattr(self, n) for n in names)


@dataclass
class LossOutput:
    """Per-example losses ``(B,)`` and, for preference losses, the implicit rewards ``(B,)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None


LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registry entry: the function plus what it needs from the loop."""

    fn: LossFn
    needs_reference: bool
    """The loop must supply ``ref_chosen_logps``/``ref_rejected_logps``."""
    paired: bool
    """Uses both chosen and rejected of a pair (DPO family). False for SFT (chosen only) and GA/NPO (rejected only)."""
    uses: tuple[Literal["chosen", "rejected"], ...] = ("chosen", "rejected")
    """Which response sides the loss reads, so the loop only runs the forwards it needs."""
    forget_as: str | None = None
    """Set on unlearning losses: the registry loss applied to each forget (negative) response when this loss names
    an unlearning objective (U2A's inner problem, a negative-only task, a full-set baseline). Itself for GA, NPO and
    SimNPO; ``ga`` for GradDiff, whose retain part is a separate term on retain sequences (``retain_term``)."""
    retain_term: bool = False
    """As an unlearning objective, the loss also pulls the model toward retain sequences (GradDiff)."""


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i w_i * l_i / B`` (plain mean when ``weights`` is None); per-example weights as U2A and CPPO use."""
    if weights is None:
        return losses.mean()
    return (weights.to(losses.dtype) * losses).sum() / losses.numel()


@dataclass(frozen=True)
class BoundLoss:
    """A registry loss with checked hyper-parameters and its weight in the objective."""

    name: str
    spec: LossSpec
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, inputs: LossInputs) -> LossOutput:
        return self.spec.fn(inputs, **self.kwargs)
