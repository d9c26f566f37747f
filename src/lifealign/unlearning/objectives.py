"""From the ``unlearn:`` config section to bound objects: the inner objective's forget loss and its retain term.

An inner *objective* is a registry loss applied to the negative response (the ``rejected`` side) plus, for
GradDiff, a retain term on separate retain sequences (``plugins.RetainPlugin``), unweighted as in U2A's
``u2a_gradiff.py``: the per-example U2A weights multiply only the forget term, which is also the ``l_u`` whose
gradient enters the impact scores (METHODS.md ADDENDUM B.1: "GradDiff: its forget term").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lifealign.config.schema import LossTerm, TrainSection
from lifealign.config.unlearn import UnlearnSection
from lifealign.losses import CombinedLoss, bind_loss

__all__ = ["FORGET_SIDES", "OBJECTIVES", "Objective", "forget_loss", "inner_lr", "steps_per_solve"]

FORGET_SIDES = ("rejected",)
"""Unlearning losses read the negative response as ``rejected`` (losses/spec.py)."""


@dataclass(frozen=True)
class Objective:
    """An inner unlearning objective: which registry loss acts on the forget response, and whether it has a retain
    term."""

    forget_loss: str
    uses_retain: bool


OBJECTIVES: dict[str, Objective] = {
    "ga": Objective("ga", uses_retain=False),
    "grad_diff": Objective("ga", uses_retain=True),
    "npo": Objective("npo", uses_retain=False),
    "simnpo": Objective("simnpo", uses_retain=False),
}


def forget_loss(section: UnlearnSection, objective: str | None = None) -> CombinedLoss:
    """The bound forget loss of ``objective`` (default ``section.objective``) with ``section.loss_args``.

    Problems are reported under ``unlearn.loss_args.<key>``. The args apply only when ``objective`` is the
    section's own (a baseline with another objective uses that loss's defaults).
    """
    name = objective or section.objective
    args = dict(section.loss_args) if name == section.objective else {}
    reserved = sorted({"name", "weight"} & set(args))
    if reserved:
        raise ValueError(f"unlearn.loss_args: {reserved} are not loss arguments (the objective picks the loss)")
    term = LossTerm(name=OBJECTIVES[name].forget_loss, **args)
    return CombinedLoss([bind_loss(term, path="unlearn.loss_args")])


def inner_lr(section: UnlearnSection, train: TrainSection) -> float:
    return section.lr if section.lr is not None else train.lr


def steps_per_solve(section: UnlearnSection, train: TrainSection, n_selected: int, world: int = 1) -> int:
    """Optimizer steps of one inner solve: ``inner_max_steps`` or ``ceil(inner_epochs * |S| / global batch)``."""
    if section.inner_max_steps is not None:
        return section.inner_max_steps
    return max(1, math.ceil(section.inner_epochs * n_selected / (train.batch_size * train.grad_accum * world)))
