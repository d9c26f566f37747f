"""A training objective made of several weighted loss terms, e.g. ``fpo + 0.1 * sft``.

``total = sum_k w_k * weighted_mean(L_k, weights)``, as trl's list-valued ``loss_type`` with ``loss_weights``.
"""

from __future__ import annotations

from typing import Literal

import torch

from lifealign.losses.spec import BoundLoss, LossInputs, LossOutput, weighted_mean

__all__ = ["CombinedLoss"]


class CombinedLoss:
    """The sum of bound loss terms; declares the union of their needs so the loop runs only the forwards it must."""

    def __init__(self, terms: list[BoundLoss]) -> None:
        if not terms:
            raise ValueError("a loss needs at least one term")
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"loss terms must have distinct names, repeated: {', '.join(duplicates)}")
        self.terms = list(terms)

    @property
    def needs_reference(self) -> bool:
        """True when any term needs reference log-probs."""
        return any(t.spec.needs_reference for t in self.terms)

    @property
    def uses(self) -> tuple[Literal["chosen", "rejected"], ...]:
        """The response sides read by any term, in the order ``chosen``, ``rejected``."""
        sides = {side for t in self.terms for side in t.spec.uses}
        return tuple(side for side in ("chosen", "rejected") if side in sides)

    @property
    def paired(self) -> bool:
        """True when any term is a pairwise (DPO-family) loss."""
        return any(t.spec.paired for t in self.terms)

    def __call__(
        self, inputs: LossInputs, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], LossOutput]:
        """``(total, parts, primary)``.

        ``total`` is the scalar ``sum_k w_k * weighted_mean(L_k, weights)`` (``weights`` per example, ``(B,)``);
        ``parts[name]`` is each term's detached ``weighted_mean(L_k, weights)`` before its ``w_k``, for logging;
        ``primary`` is the output of the first term that reports rewards (else of the first term), for metrics.
        """
        outputs = [term(inputs) for term in self.terms]
        values = [weighted_mean(out.losses, weights) for out in outputs]
        total = torch.stack([term.weight * value for term, value in zip(self.terms, values)]).sum()
        parts = {term.name: value.detach() for term, value in zip(self.terms, values)}
        with_rewards = [o for o in outputs if o.chosen_rewards is not None or o.rejected_rewards is not None]
        return total, parts, (with_rewards or outputs)[0]
