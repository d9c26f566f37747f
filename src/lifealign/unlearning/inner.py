"""One weighted inner solve = one ``train_task`` stage ``unlearn`` with per-example weights and extra plugins.

``minimise  mean_b (w_b * l_u(x_b)) + [c * retain term] + lambda_reg * mean_p ||theta_p - theta_0,p||^2``

The forget loss is a registry loss on the ``rejected`` side; the retain term, the regulariser and the stop rule are
plugins appended to the run's own plugins for this stage only. A stop (the guard's ``stop_request``) ends the
stage early inside the loop, on every rank: the caller gets the structured event (also written to
``metrics.jsonl``) and the plugins' ``after_stage`` still runs, as it would have at the end of the stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lifealign.config.unlearn import UnlearnSection
from lifealign.data.records import Task
from lifealign.losses import CombinedLoss
from lifealign.training.loop import LoopCheckpoint, StageContext, StagePlan, StageResult, train_task
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.unlearning.objectives import uses_retain
from lifealign.unlearning.plugins import AnchorPlugin, ForgetNLLGuard, RetainPlugin

__all__ = ["InnerSolver", "SolveOutcome", "inner_plugins"]


@dataclass
class SolveOutcome:
    """What one inner solve did: planned steps, steps actually taken, the stop event if any, last metrics."""

    planned_steps: int
    steps: int
    stopped: dict[str, Any] | None = None
    nonfinite_skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def inner_plugins(
    section: UnlearnSection,
    objective: str,
    *,
    anchor: dict[str, torch.Tensor],
    retain: Sequence[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    reference_state: dict[str, torch.Tensor] | None,
    label: str,
    with_guard: bool = True,
) -> list[Plugin]:
    """The plugins of one objective: anchor (``reg_weight``), retain term (GradDiff), stop rule (if bounded)."""
    plugins: list[Plugin] = []
    if section.reg_weight > 0:
        plugins.append(AnchorPlugin(anchor, section.reg_weight))
    if uses_retain(objective):
        if not retain:
            raise ValueError(f"{label}: objective {objective!r} needs retain sequences (set unlearn.retain_data)")
        plugins.append(
            RetainPlugin(
                retain,
                pad_id=pad_id,
                mode=section.retain,
                weight=section.retain_weight,
                batch_size=batch_size,
                grad_accum=grad_accum,
                seed=seed,
                reference_state=reference_state,
            )
        )
    if with_guard and section.max_forget_nll is not None:
        plugins.append(ForgetNLLGuard(section.max_forget_nll, section.stop_patience, label=label))
    return plugins


STAGE_PLUGINS = "stage_plugins"
"""Key of the stage-only plugins' JSON state (e.g. the stop rule's counter) inside a mid-stage loop checkpoint."""


def stage_plugin_states(plugins: Sequence[Plugin]) -> dict[str, dict[str, Any]]:
    """``{plugin name: state_dict()["meta"]}`` of the stage plugins that carry state; they keep no tensors."""
    states = {p.name: p.state_dict() for p in plugins}
    if any(state["tensors"] for state in states.values()):
        raise ValueError("a stage-only plugin keeps tensor state, which mid-stage checkpoints do not carry")
    return {name: state["meta"] for name, state in states.items() if state["meta"]}


def restore_stage_plugins(plugins: Sequence[Plugin], resume: dict[str, Any] | None) -> None:
    """Give each stage plugin the state a mid-stage checkpoint saved for it (nothing on a fresh stage)."""
    saved = (resume or {}).get(STAGE_PLUGINS) or {}
    for plugin in plugins:
        if plugin.name in saved:
            plugin.load_state_dict({"tensors": {}, "meta": saved[plugin.name]})


@dataclass
class InnerSolver:
    """Runs inner solves through ``train_task`` in the run's stage context (metrics, commits, plugins).

    ``stage.commit`` receives each mid-solve checkpoint with the stage-only plugins' state added to the loop's;
    ``stage.reference_state`` is the reference of NPO and of the KL retain term.
    """

    stage: StageContext
    ctx: PluginContext
    task_index: int
    lr: float

    def solve(
        self,
        task: Task,
        examples: list[dict[str, Any]],
        loss: CombinedLoss,
        *,
        max_steps: int,
        plugins: Sequence[Plugin] = (),
        weights: torch.Tensor | None = None,
        resume: dict[str, Any] | None = None,
    ) -> SolveOutcome:
        """Train ``max_steps`` optimizer steps on ``examples`` (``index`` = position) with per-example ``weights``."""
        plan = StagePlan(
            self.task_index,
            task,
            "unlearn",
            loss,
            self.lr,
            epochs=1.0,
            max_steps=max_steps,
            example_weights=weights,
            reference_state=self.stage.reference_state,
        )
        restore_stage_plugins(plugins, resume)
        commit = self.stage.commit

        def commit_with_plugins(loop: LoopCheckpoint | None) -> None:
            if loop is not None:
                loop = replace(loop, state={**loop.state, STAGE_PLUGINS: stage_plugin_states(plugins)})
            commit(loop)

        # The stage's own plugins and commit wrapper apply to this solve only; the step counter stays the run's.
        stage = replace(self.stage, plugins=[*self.stage.plugins, *plugins], commit=commit_with_plugins)
        result: StageResult = train_task(stage.model, examples, plan, stage, self.ctx, resume=resume)
        if result.stopped is not None:
            event = {
                **result.stopped,
                "method": stage.method_name,
                "task": task.name,
                "global_step": stage.steps.value,
            }
            stage.metrics(event)
            return SolveOutcome(planned_steps=max_steps, steps=result.steps, stopped=event)
        return SolveOutcome(
            planned_steps=max_steps,
            steps=result.steps,
            nonfinite_skipped=result.nonfinite_skipped,
            metrics=dict(result.last_metrics),
        )
