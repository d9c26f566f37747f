"""The stages a run calls for a task: SFT and preference training, and the unlearning of a negative-only task.

Each stage gets the run's :class:`~lifealign.training.loop.StageContext` (model, accelerator, the method's loss and
plugins, reference policy, ``commit``/``take_resume``) and the task's :class:`PluginContext`, and returns the
JSON summary the run records under ``stage_results["t<i>:<stage>"]``.

``unlearn_stage`` (``kind: negative`` tasks of ``lifealign run``): with ``unlearn.selection: u2a`` and preference
pairs available (``unlearn.preference``, or the task's own records that carry a chosen response) it runs U2A;
otherwise it unlearns every candidate with equal weights (``selection: all``). The reference of NPO and of the KL
retain term is the stage's (base model, or the previous task's policy with ``method.reference: previous``). Its
progress is recorded after every scoring, weight update and solve (``record``) and committed with the run; the
starting adapter (the regulariser's anchor) is the caller's to keep across a resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lifealign.config.schema import RunConfig
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.losses import CombinedLoss
from lifealign.training.forward import compute_reference_logps, reference_policy
from lifealign.training.loop import StageContext, StagePlan, train_task
from lifealign.training.plugin import PluginContext
from lifealign.unlearning.data import reindex, stream_data, tokenize_side
from lifealign.unlearning.inner import InnerSolver, SolveOutcome, inner_plugins
from lifealign.unlearning.objectives import FORGET_SIDES, forget_loss, inner_lr, steps_per_solve, uses_retain
from lifealign.unlearning.u2a import U2A, U2AInputs, U2AProgress
from lifealign.utils.jsonio import nan_to_null

__all__ = ["mixed_records", "solve_summary", "train_stage", "unlearn_stage"]

logger = logging.getLogger(__name__)


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def solve_summary(outcome: SolveOutcome) -> dict[str, Any]:
    """A solve's steps, whether it ended before its planned steps, its stop events and the steps of the epochs that
    ``stop_scope: epoch`` left early."""
    return {
        "steps": outcome.steps,
        "stopped": outcome.steps + outcome.skipped_steps < outcome.planned_steps,
        "stop_events": len(outcome.events),
        "skipped_steps": outcome.skipped_steps,
    }


def mixed_records(stage: StageContext, ctx: PluginContext, name: str, records: list[PreferencePair]) -> list:
    """The records stage ``name`` trains on: each plugin's ``train_data`` in order (Replay mixes its buffer in)."""
    ctx.stage = name
    for plugin in stage.plugins:
        records = plugin.train_data(ctx, records)
    return records


def train_stage(
    cfg: RunConfig,
    stage: StageContext,
    ctx: PluginContext,
    name: str,
    loss: CombinedLoss,
    records: list[PreferencePair],
) -> dict[str, Any]:
    """SFT (``name="sft"``) or preference training of task ``ctx.task`` through ``train_task``; its summary."""
    records = mixed_records(stage, ctx, name, records)
    tokenized = tokenize_pairs(records, stage.tokenizer, cfg.data, sides=loss.uses)
    if not tokenized.examples:
        raise ValueError(f"task {ctx.task.name!r}, stage {name}: no trainable examples after tokenisation")
    section = cfg.sft if name == "sft" else cfg.train
    plan = StagePlan(
        ctx.task_index,
        ctx.task,
        name,
        loss,
        section.lr,
        section.epochs,
        section.max_steps,
        reference_state=stage.reference_state,
    )
    result = train_task(stage.model, tokenized.examples, plan, stage, ctx, resume=stage.take_resume())
    return {
        "steps": result.steps,
        "examples": len(tokenized.examples),
        "nonfinite_skipped": result.nonfinite_skipped,
        "tokenization": dict(tokenized.stats),
        **{k: _finite_or_none(v) for k, v in result.last_metrics.items()},
    }


@dataclass
class UnlearnTask:
    """What the unlearning stage of one negative-only task works with."""

    task: Task
    earlier: Sequence[Task]
    """The tasks before it (their chosen responses are the last-resort retain sequences)."""
    entry: dict[str, Any]
    """The stage's recorded summary so far (empty on a fresh stage; U2A's progress on a resumed one)."""
    anchor: dict[str, torch.Tensor]
    """The adapter the stage started from (the regulariser's anchor)."""
    record: Callable[[dict[str, Any]], None]
    """Record (and commit) the stage's summary so far."""


def unlearn_stage(cfg: RunConfig, stage: StageContext, ctx: PluginContext, job: UnlearnTask) -> dict[str, Any]:
    """Unlearn the task's negatives (U2A selection and weights, or all of them) through ``train_task``."""
    section, task, model = cfg.unlearn, job.task, stage.unwrapped
    tok, pad_id = stage.tokenizer, stage.tokenizer.pad_token_id
    records = mixed_records(stage, ctx, "unlearn", list(task.train))
    data = stream_data(task, records, job.earlier, section, cfg.data)
    candidates = reindex(tokenize_side(data.candidates, tok, cfg.data, FORGET_SIDES))
    if not candidates:
        raise ValueError(f"task {task.name!r}, stage unlearn: no negative response to unlearn after tokenisation")
    objective = section.objective
    retain = reindex(tokenize_side(data.retain, tok, cfg.data, ("chosen",))) if uses_retain(objective) else []
    solver = InnerSolver(stage=stage, ctx=ctx, task_index=ctx.task_index, lr=inner_lr(section, cfg.train))
    train = cfg.train

    def plugins(label: str) -> list:
        return inner_plugins(
            section,
            objective,
            anchor=job.anchor,
            retain=retain,
            pad_id=pad_id,
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=train.seed,
            reference_state=stage.reference_state,
            label=f"{task.name}/{label}",
        )

    loss = forget_loss(section)
    base = {"objective": objective, "examples": len(candidates), "candidates": len(data.candidates)}
    if section.selection == "u2a" and data.preference:
        summary = _u2a(cfg, stage, model, task, candidates, data.preference, loss, solver, plugins, job)
    else:
        if section.selection == "u2a":
            logger.warning(
                "task %r: no preference pairs for U2A's objective (set unlearn.preference); unlearning "
                "all %d negatives with equal weights",
                task.name,
                len(candidates),
            )
        if not job.entry:
            job.record({"mode": "all", "started": True})
        steps = steps_per_solve(section, train, len(candidates), solver.world)
        outcome = solver.solve(
            task, candidates, loss, max_steps=steps, plugins=plugins("all"), resume=stage.take_resume()
        )
        summary = {
            "mode": "all",
            "selected": len(candidates),
            **solve_summary(outcome),
            "events": list(outcome.events),
            **{f"last/{k}": v for k, v in outcome.metrics.items()},
        }
    return nan_to_null({**base, **summary})


def _u2a(
    cfg: RunConfig,
    stage: StageContext,
    model: torch.nn.Module,
    task: Task,
    candidates: list[dict[str, Any]],
    preference_records: list[PreferencePair],
    loss: CombinedLoss,
    solver: InnerSolver,
    plugins: Callable[[str], list],
    job: UnlearnTask,
) -> dict[str, Any]:
    section = cfg.unlearn
    pad_id = stage.tokenizer.pad_token_id
    preference = reindex(tokenize_pairs(preference_records, stage.tokenizer, cfg.data).examples)

    def reference() -> Any:
        return reference_policy(model, stage.reference_state)

    batch = section.score_batch_size
    pref_ref = compute_reference_logps(model, preference, pad_id, ("chosen", "rejected"), reference, batch)
    cand_ref = None
    if loss.needs_reference:
        cand_ref = compute_reference_logps(model, candidates, pad_id, FORGET_SIDES, reference, batch)
    procedure = U2A(section, cfg.train, model, pad_id, loss, solver, plugins, task)
    progress = procedure.run(
        U2AInputs(candidates, preference, pref_ref, cand_ref),
        U2AProgress.from_json(job.entry.get("progress")),
        lambda p: job.record({"mode": "u2a", "progress": p.to_json()}),
        resume_loop=stage.take_resume,
    )
    return {
        "mode": "u2a",
        "preference_pairs": len(preference),
        "selected": len(progress.selected),
        "steps": sum((r.get("solve") or {}).get("steps", 0) for r in progress.rounds),
        "stopped": progress.stopped,
        "events": progress.events,
        "progress": progress.to_json(),
    }
