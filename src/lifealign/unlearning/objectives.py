"""From the ``unlearn:`` config section to bound objects: the inner objective's forget loss and its retain term.

An unlearning *objective* is a registry loss that declares ``LossSpec.forget_as`` (``lifealign.losses``): GA, NPO,
SimNPO act on the negative response (the ``rejected`` side); GradDiff is GA on it plus a retain term on separate
retain sequences (``plugins.RetainPlugin``), unweighted as in U2A's ``u2a_gradiff.py``: the per-example U2A weights
multiply only the forget term, which is also the ``l_u`` whose gradient enters the impact scores (METHODS.md
ADDENDUM B.1: "GradDiff: its forget term"). A new unlearning loss is one file + one registry line there.
"""

from __future__ import annotations

import math

from lifealign.config.schema import LossTerm, TrainSection
from lifealign.config.unlearn import UnlearnSection
from lifealign.losses import LOSSES, CombinedLoss, bind_loss, unlearning_objectives

__all__ = ["FORGET_SIDES", "forget_loss", "inner_lr", "steps_per_solve", "uses_retain"]

FORGET_SIDES = ("rejected",)
"""Unlearning losses read the negative response as ``rejected`` (losses/spec.py)."""


def _objective_spec(name: str, path: str = "unlearn.objective"):
    objectives = unlearning_objectives()
    if name not in objectives:
        raise ValueError(f"{path}: unknown unlearning objective {name!r}; available: {', '.join(objectives)}")
    return objectives[name]


def uses_retain(objective: str) -> bool:
    """Whether ``objective`` adds a retain term on retain sequences (GradDiff)."""
    return _objective_spec(objective).retain_term


def forget_loss(section: UnlearnSection, objective: str | None = None) -> CombinedLoss:
    """The bound forget loss of ``objective`` (default ``section.objective``) with ``section.loss_args``.

    Problems are reported under ``unlearn.loss_args.<key>``. The args apply only when ``objective`` is the
    section's own (a baseline with another objective uses that loss's defaults).
    """
    name = objective or section.objective
    spec = _objective_spec(name)
    args = dict(section.loss_args) if name == section.objective else {}
    reserved = sorted({"name", "weight"} & set(args))
    if reserved:
        raise ValueError(f"unlearn.loss_args: {reserved} are not loss arguments (the objective picks the loss)")
    assert spec.forget_as in LOSSES
    term = LossTerm(name=spec.forget_as, **args)
    return CombinedLoss([bind_loss(term, path="unlearn.loss_args")])


def inner_lr(section: UnlearnSection, train: TrainSection) -> float:
    return section.lr if section.lr is not None else train.lr


def steps_per_solve(section: UnlearnSection, train: TrainSection, n_selected: int, world: int = 1) -> int:
    """Optimizer steps of one inner solve: ``inner_max_steps`` or ``ceil(inner_epochs * |S| / global batch)``."""
    if section.inner_max_steps is not None:
        return section.inner_max_steps
    return max(1, math.ceil(section.inner_epochs * n_selected / (train.batch_size * train.grad_accum * world)))
