"""From the ``unlearn:`` config section to bound objects: the inner objective's forget loss and its retain term.

An unlearning *objective* is a registry loss that declares ``LossSpec.forget_as`` (``lifealign.losses``): GA, NPO,
SimNPO act on the negative response (the ``rejected`` side); GradDiff is GA on it plus a retain term on separate
retain sequences (``plugins.RetainPlugin``), unweighted as in U2A's ``u2a_gradiff.py``: the per-example U2A weights
multiply only the forget term, which is also the ``l_u`` whose gradient enters the impact scores (METHODS.md
ADDENDUM B.1: "GradDiff: its forget term"). (``u2a_gradiff.py``'s inner loop backpropagates the *unweighted* forget
mean, so its weights never reach the solve; we weight it, as U2A's formulation does.) A new unlearning loss is one
file + one registry line there.

U2A's code conventions applied here (docs/METHODS.md lists each with its option):

- **Length normalisation** (``unlearn.forget_reduction``, default ``mean``): a forget loss that takes a ``reduction``
  keyword (NPO) gets it, so the objective and the full-set baselines use the mean per-token log-likelihood as U2A's
  code does; ``unlearn.loss_args.reduction`` overrides it for the objective. A method's own ``loss: {name: npo}``
  keeps the loss function's default, the NPO paper's summed log-likelihood.
- **The parameter regulariser** (``unlearn.reg_objectives``, default ``[ga]``): ``reg_weight`` applies only to the
  listed objectives. U2A's ``u2a.py`` adds ``lamda * reg`` to GA's inner loss only; ``u2a_gradiff.py`` computes it
  for GradDiff but backpropagates ``GA + 0.3 KL`` without it; NPO's inner loss has none.
"""

from __future__ import annotations

import inspect
import math

from lifealign.config.schema import LossTerm, TrainSection
from lifealign.config.unlearn import UnlearnSection
from lifealign.losses import LOSSES, CombinedLoss, bind_loss, unlearning_objectives

__all__ = ["FORGET_SIDES", "forget_loss", "inner_lr", "inner_reg_weight", "steps_per_solve", "uses_retain"]

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


def _check_reg_objectives(section: UnlearnSection) -> None:
    objectives = unlearning_objectives()
    unknown = [name for name in section.reg_objectives if name not in objectives]
    if unknown:
        raise ValueError(
            f"unlearn.reg_objectives: unknown unlearning objective(s) {unknown}; available: {', '.join(objectives)}"
        )


def inner_reg_weight(section: UnlearnSection, objective: str) -> float:
    """``lambda_reg`` of ``objective``'s inner problem: ``section.reg_weight`` if it is in ``reg_objectives``, else 0."""
    _check_reg_objectives(section)
    return section.reg_weight if objective in section.reg_objectives else 0.0


def forget_loss(section: UnlearnSection, objective: str | None = None) -> CombinedLoss:
    """The bound forget loss of ``objective`` (default ``section.objective``) with ``section.loss_args``.

    A loss with a ``reduction`` keyword gets ``section.forget_reduction`` unless ``loss_args`` sets it. Problems are
    reported under ``unlearn.loss_args.<key>`` (and ``unlearn.reg_objectives``, checked here so that binding a
    config catches them). The args apply only when ``objective`` is the section's own (a baseline with another
    objective uses that loss's defaults, and the section's ``forget_reduction``).
    """
    _check_reg_objectives(section)
    name = objective or section.objective
    spec = _objective_spec(name)
    args = dict(section.loss_args) if name == section.objective else {}
    reserved = sorted({"name", "weight"} & set(args))
    if reserved:
        raise ValueError(f"unlearn.loss_args: {reserved} are not loss arguments (the objective picks the loss)")
    assert spec.forget_as in LOSSES
    if "reduction" in inspect.signature(LOSSES[spec.forget_as].fn).parameters:
        args = {"reduction": section.forget_reduction, **args}
    term = LossTerm(name=spec.forget_as, **args)
    return CombinedLoss([bind_loss(term, path="unlearn.loss_args")])


def inner_lr(section: UnlearnSection, train: TrainSection) -> float:
    return section.lr if section.lr is not None else train.lr


def steps_per_solve(section: UnlearnSection, train: TrainSection, n_selected: int, world: int = 1) -> int:
    """Optimizer steps of one inner solve: ``inner_max_steps`` or ``ceil(inner_epochs * |S| / global batch)``.

    The global batch is ``batch_size * grad_accum * world`` (``world`` = number of processes), as the loop counts
    a stage's steps (``training.loop.total_steps``): every rank draws its own micro-batches of each step, so one
    epoch over ``|S|`` examples takes ``world`` times fewer steps on ``world`` processes.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if section.inner_max_steps is not None:
        return section.inner_max_steps
    return max(1, math.ceil(section.inner_epochs * n_selected / (train.batch_size * train.grad_accum * world)))
