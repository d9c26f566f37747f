"""Loss registry: one line per loss, and binding of a config ``LossTerm`` to a checked, callable term.

A config names a loss and its hyper-parameters, e.g. ``loss: [{name: fpo, beta: 0.1}, {name: sft, weight: 0.1}]``.
``bind_loss`` checks the name, that every key is a keyword-only parameter of the function with a value of the
right type, and the function's own range checks, reporting every problem of a term in one error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lifealign.losses.combine import CombinedLoss
from lifealign.losses.dpo import dpo_loss
from lifealign.losses.fpo import fpo_loss
from lifealign.losses.hinge import hinge_loss
from lifealign.losses.ipo import ipo_loss
from lifealign.losses.logps import implicit_reward, sequence_logps, token_logps
from lifealign.losses.sft import sft_loss
from lifealign.losses.spec import BoundLoss, LossInputs, LossOutput, LossSpec, weighted_mean
from lifealign.losses.unlearn import ga_loss, grad_diff_loss, npo_loss, simnpo_loss
from lifealign.utils.kwargs import bind_kwargs

if TYPE_CHECKING:
    from lifealign.config.schema import LossTerm

__all__ = [
    "LOSSES",
    "BoundLoss",
    "CombinedLoss",
    "LossInputs",
    "LossOutput",
    "LossSpec",
    "bind_loss",
    "bind_losses",
    "unlearning_objectives",
    "implicit_reward",
    "sequence_logps",
    "token_logps",
    "weighted_mean",
]

_PAIR = ("chosen", "rejected")
_FORGET = ("rejected",)

LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, needs_reference=True, paired=True, uses=_PAIR),
    "ipo": LossSpec(ipo_loss, needs_reference=True, paired=True, uses=_PAIR),
    "hinge": LossSpec(hinge_loss, needs_reference=True, paired=True, uses=_PAIR),
    "fpo": LossSpec(fpo_loss, needs_reference=True, paired=True, uses=_PAIR),
    "sft": LossSpec(sft_loss, needs_reference=False, paired=False, uses=("chosen",)),
    "ga": LossSpec(ga_loss, needs_reference=False, paired=False, uses=_FORGET, forget_as="ga"),
    "grad_diff": LossSpec(
        grad_diff_loss, needs_reference=False, paired=False, uses=_PAIR, forget_as="ga", retain_term=True
    ),
    "npo": LossSpec(npo_loss, needs_reference=True, paired=False, uses=_FORGET, forget_as="npo"),
    "simnpo": LossSpec(simnpo_loss, needs_reference=False, paired=False, uses=_FORGET, forget_as="simnpo"),
}


def _dry_run_error(spec: LossSpec, kwargs: dict[str, Any]) -> str | None:
    """The loss's own range check (e.g. ``beta must be > 0``) on a one-example input, so it fails at bind time."""
    one = torch.ones(1)
    dummy = LossInputs(
        chosen_logps=-one,
        rejected_logps=-2 * one,
        chosen_tokens=one,
        rejected_tokens=one,
        ref_chosen_logps=-one,
        ref_rejected_logps=-one,
    )
    try:
        spec.fn(dummy, **kwargs)
    except ValueError as err:
        return str(err)
    return None


def bind_loss(term: LossTerm, path: str = "loss") -> BoundLoss:
    """Check ``term`` against ``LOSSES`` and the function's signature; ``ValueError`` listing every problem.

    Each problem is named by its key path, ``<path>.<key>`` (``loss.gamma``), with the numeric coercion of
    ``lifealign.utils.kwargs``. Range checks are the losses' own (``ValueError`` whose message starts with the
    parameter name), run once on a one-example dummy input.
    """
    if term.name not in LOSSES:
        raise ValueError(f"{path}.name: unknown loss {term.name!r}; available: {', '.join(sorted(LOSSES))}")
    spec = LOSSES[term.name]
    errors: list[str] = []
    if not (math.isfinite(term.weight) and term.weight >= 0):
        errors.append(f"{path}.weight: must be a finite number >= 0, got {term.weight}")
    kwargs, problems = bind_kwargs(spec.fn, term.kwargs, path, f"loss {term.name!r}", keyword_only=True)
    errors += problems
    if not errors and (message := _dry_run_error(spec, kwargs)):
        # Range errors raised by the losses start with the parameter's name: "beta must be > 0, got 0".
        errors.append(f"{path}.{message}")
    if errors:
        raise ValueError(f"invalid loss {term.name!r}:\n  " + "\n  ".join(errors))
    return BoundLoss(term.name, spec, float(term.weight), kwargs)


def bind_losses(terms: Sequence[LossTerm], path: str = "method.loss") -> CombinedLoss:
    """Bind every term (problems of all terms reported together, as ``<path>.<i>.<key>``) into a ``CombinedLoss``."""
    bound: list[BoundLoss] = []
    errors: list[str] = []
    for i, term in enumerate(terms):
        try:
            bound.append(bind_loss(term, path=f"{path}.{i}"))
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError("\n".join(errors))
    return CombinedLoss(bound)


def unlearning_objectives() -> dict[str, LossSpec]:
    """The losses that name an unlearning objective (``LossSpec.forget_as`` set), in registry order."""
    return {name: spec for name, spec in LOSSES.items() if spec.forget_as is not None}
