"""One weighted inner solve = one ``train_task`` stage ``unlearn`` with per-example weights and extra plugins.

``minimise  mean_b (w_b * l_u(x_b)) + [c * retain term] + lambda_reg * mean_p ||theta_p - theta_0,p||^2``

Each solve is a stage with its own AdamW and cosine schedule over its planned steps (warm-up ``train.warmup_ratio``).
U2A's code keeps one AdamW and one cosine schedule (no warm-up, horizon ``max_unlearn_steps = 100``, after which
transformers' cosine rises again) for the whole run, across solves and rounds (docs/METHODS.md, "cosine horizon").

The forget loss is a registry loss on the ``rejected`` side; the retain term, the regulariser (for the objectives
in ``unlearn.reg_objectives``) and the stop rule are plugins appended to the run's own plugins for this stage only.
A stop (the guard's ``stop_request``) ends the loop early inside the stage, on every rank, before that step's
update; the plugins' ``after_stage`` still runs, as it would have at the end of the stage, and the structured event
goes to ``metrics.jsonl`` and to the caller.

What a stop ends is the event's ``scope`` (``unlearn.stop_scope``). ``solve`` or ``run``: the solve ends there
(``SolveOutcome.stopped``; U2A decides whether later rounds run). ``epoch`` (U2A's code, whose ``break`` leaves only
the loop over one epoch's batches): the rest of the current epoch is skipped and the solve continues with the next
epoch, in a new ``train_task`` call that carries the optimizer state, the schedule position (the cosine schedule
advances only with the steps taken, as the code's ``lr_scheduler.step()``), the non-finite count and the stage
plugins' state (the stop rule's count of consecutive micro-batches above the bound carries over, as in the code).
Epoch ``e`` is the steps ``[ceil(e n / G), ceil((e + 1) n / G))`` of the solve, ``n`` examples and ``G`` the global
batch (``batch_size * grad_accum * world``): the steps whose data window starts in that pass over the examples
(``training.loop.micro_batch_indices``). The steps skipped are recorded in each event (``skipped_steps``) and carried
in mid-solve checkpoints, so a resumed solve reports the same steps and events as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lifealign.config.unlearn import UnlearnSection
from lifealign.data.records import Task
from lifealign.losses import CombinedLoss
from lifealign.training.loop import LoopCheckpoint, StageContext, StagePlan, StageResult, train_task
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.unlearning.objectives import inner_reg_weight, uses_retain
from lifealign.unlearning.plugins import AnchorPlugin, ForgetNLLGuard, RetainPlugin, optimizer_steps_taken

__all__ = ["InnerSolver", "SolveOutcome", "continuation", "inner_plugins", "next_epoch_start"]


@dataclass
class SolveOutcome:
    """What one inner solve did: planned steps, steps actually taken, the stop event if any, last metrics."""

    planned_steps: int
    steps: int
    """Optimizer steps taken (the planned ones less those a stop ended or skipped)."""
    stopped: dict[str, Any] | None = None
    """The last stop event (None if the stop rule never fired); every one is in ``events``."""
    nonfinite_skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    """Every stop event of the solve, in order (several with ``stop_scope: epoch``)."""
    skipped_steps: int = 0
    """Steps of epochs left early (``stop_scope: epoch``)."""

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
    """The plugins of one objective: anchor (``reg_weight`` if ``objective`` is in ``reg_objectives``), retain term
    (GradDiff), stop rule (if bounded, with ``stop_scope``)."""
    plugins: list[Plugin] = []
    weight = inner_reg_weight(section, objective)
    if weight > 0:
        plugins.append(AnchorPlugin(anchor, weight))
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
        plugins.append(
            ForgetNLLGuard(section.max_forget_nll, section.stop_patience, label=label, scope=section.stop_scope)
        )
    return plugins


STAGE_PLUGINS = "stage_plugins"
"""Key of the stage-only plugins' JSON state (e.g. the stop rule's counter) inside a mid-stage loop checkpoint."""
SOLVE_EVENTS = "solve_events"
"""Key of the solve's stop events so far (``stop_scope: epoch``) inside a mid-stage loop checkpoint."""


def next_epoch_start(step: int, n_examples: int, global_batch: int) -> int:
    """The first step of the epoch after the one step ``step`` belongs to: ``ceil((floor(step G / n) + 1) n / G)``.

    Step ``k`` reads examples ``[k G, (k + 1) G)`` of the concatenated per-epoch permutations, so it belongs to epoch
    ``floor(k G / n)``; epoch ``e`` starts at the first step whose window starts at or after ``e n``.
    """
    epoch = step * global_batch // n_examples
    return math.ceil((epoch + 1) * n_examples / global_batch)


def continuation(optimizer: torch.optim.Optimizer, stage_step: int, nonfinite_skipped: int) -> dict[str, Any]:
    """The loop state (``train_task``'s ``resume``) that continues a stage at ``stage_step`` with ``optimizer``'s
    state: AdamW's moments and step count, and the LR schedule where the steps taken left it.

    The loop steps the schedule exactly when it steps the optimizer, so the schedule position is AdamW's step count
    ``m``; the stage rebuilds the same schedule (same planned steps and warm-up) and loads ``last_epoch = m``.
    """
    taken = optimizer_steps_taken(optimizer)
    return {
        "stage_step": stage_step,
        "nonfinite_skipped": nonfinite_skipped,
        "consecutive_nonfinite": 0,
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": {
            "last_epoch": taken,
            "_step_count": taken + 1,
            "_last_lr": [group["lr"] for group in optimizer.param_groups],
            "lr_lambdas": [None] * len(optimizer.param_groups),
        },
    }


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

    @property
    def world(self) -> int:
        """The number of processes (``steps_per_solve`` counts optimizer steps on the global batch)."""
        return int(self.stage.accelerator.num_processes)

    def _solve_stage(self, plugins: Sequence[Plugin], events: list[dict[str, Any]]) -> StageContext:
        """The run's stage context with this solve's own plugins appended and a commit that also saves their state
        and the solve's stop events (the step counter stays the run's)."""
        commit = self.stage.commit

        def commit_with_plugins(loop: LoopCheckpoint | None) -> None:
            if loop is not None:
                extra = {STAGE_PLUGINS: stage_plugin_states(plugins), SOLVE_EVENTS: copy.deepcopy(events)}
                loop = replace(loop, state={**loop.state, **extra})
            commit(loop)

        return replace(self.stage, plugins=[*self.stage.plugins, *plugins], commit=commit_with_plugins)

    def _next_epoch(self, event: dict[str, Any], stopped_at: int, n_examples: int, max_steps: int) -> int | None:
        """Where the solve continues after a stop: the next epoch's first step for scope ``epoch`` (recorded in the
        event as ``skipped_steps``), None for a stop that ends the solve."""
        if event.get("scope") != "epoch":
            return None
        train = self.stage.train
        global_batch = train.batch_size * train.grad_accum * self.world
        start = min(next_epoch_start(stopped_at, n_examples, global_batch), max_steps)
        event["skipped_steps"] = start - stopped_at
        return start

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
        """Train ``max_steps`` optimizer steps on ``examples`` (``index`` = position) with per-example ``weights``;
        a stop ends the solve or, with scope ``epoch``, the current epoch of it (see the module docstring)."""
        plan = StagePlan(self.task_index, task, "unlearn", loss, self.lr, epochs=1.0, max_steps=max_steps,
                         example_weights=weights, reference_state=self.stage.reference_state)  # fmt: skip
        restore_stage_plugins(plugins, resume)
        events: list[dict[str, Any]] = [dict(e) for e in (resume or {}).get(SOLVE_EVENTS, [])]
        stage = self._solve_stage(plugins, events)
        metrics: dict[str, float] = {}
        while True:
            result: StageResult = train_task(stage.model, examples, plan, stage, self.ctx, resume=resume)
            metrics = dict(result.last_metrics) or metrics
            position = result.steps
            if result.stopped is None:
                break
            event = {**result.stopped, "method": stage.method_name, "task": task.name, "global_step": stage.steps.value}
            events.append(event)
            start = self._next_epoch(event, result.steps, len(examples), max_steps)
            stage.metrics(event)
            if start is None or start >= max_steps:
                position = max_steps if start is not None else position
                break
            # The next epoch continues this solve: its plugins keep their state (the stop rule's count).
            restore_stage_plugins(plugins, {STAGE_PLUGINS: stage_plugin_states(plugins)})
            assert self.ctx.optimizer is not None
            resume = continuation(self.ctx.optimizer, start, result.nonfinite_skipped)
        skipped = sum(int(e.get("skipped_steps", 0)) for e in events)
        return SolveOutcome(
            planned_steps=max_steps,
            steps=position - skipped,
            stopped=events[-1] if events else None,
            nonfinite_skipped=result.nonfinite_skipped,
            metrics=metrics,
            events=events,
            skipped_steps=skipped,
        )
