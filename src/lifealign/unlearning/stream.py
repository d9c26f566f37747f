"""A negative-only task inside a ``lifealign run`` stream: the ``unlearn`` phase that ``StreamRunner`` calls.

``unlearn_stage(runner, task, index, ctx)`` trains through ``train_task`` with the runner's services (its
plugins, metrics and checkpoints), like ``StreamRunner._train_stage``, and stores its summary in
``runner.state.stage_results["t<i>:unlearn"]``. With ``unlearn.selection: u2a`` and preference pairs available
(``unlearn.preference``, or the task's own records that carry a chosen response) it runs U2A; otherwise it
unlearns every candidate with equal weights (``selection: all``). The reference of NPO and of the KL retain term is
the runner's (base model, or the previous task's policy with ``method.reference: previous``).

Resume: U2A's progress is committed into ``stage_results`` (and the starting adapter, the regulariser's anchor,
into the checkpoint's loop tensors) after every scoring, weight update and solve; a solve killed mid-way resumes
from the loop's mid-stage checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lifealign.data.records import Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.models.lora import lora_state
from lifealign.training.forward import compute_reference_logps, reference_policy
from lifealign.training.plugin import PluginContext
from lifealign.unlearning.config import FORGET_SIDES, OBJECTIVES, forget_loss, inner_lr, steps_per_solve
from lifealign.unlearning.data import reindex, stream_data, tokenize_side
from lifealign.unlearning.inner import InnerSolver, inner_plugins
from lifealign.unlearning.u2a import U2A, U2AInputs, U2AProgress
from lifealign.utils.jsonio import nan_to_null

__all__ = ["unlearn_stage"]

logger = logging.getLogger(__name__)

ANCHOR_PREFIX = "unlearn_anchor/"


def _stored_anchor(runner: Any) -> dict[str, torch.Tensor]:
    """The starting adapter saved with this stage's commits (read back from the newest checkpoint)."""
    ckpt = runner.checkpointer.latest()
    tensors = ckpt.tensors("loop") if ckpt is not None else {}
    anchor = {k[len(ANCHOR_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ANCHOR_PREFIX)}
    if not anchor:
        raise RuntimeError("resuming an unlearning stage whose starting adapter is not in the checkpoint")
    return anchor


def _train_records(runner: Any, task: Task, ctx: PluginContext) -> list:
    records = list(task.train)
    ctx.stage = "unlearn"
    for plugin in runner.plugins:
        records = plugin.train_data(ctx, records)
    return records


def unlearn_stage(runner: Any, task: Task, index: int, ctx: PluginContext) -> None:
    """Unlearn task ``index``'s negatives (U2A selection and weights, or all of them) through ``train_task``."""
    cfg, section = runner.cfg, runner.cfg.unlearn
    key = f"t{index}:unlearn"
    model = runner.acc.unwrap_model(runner.model)
    tok, pad_id = runner.tokenizer, runner.tokenizer.pad_token_id
    data = stream_data(task, _train_records(runner, task, ctx), runner.stream.tasks[:index], section, cfg.data)
    candidates = reindex(tokenize_side(data.candidates, tok, cfg.data, FORGET_SIDES))
    if not candidates:
        raise ValueError(f"task {task.name!r}, stage unlearn: no negative response to unlearn after tokenisation")
    objective = section.objective
    retain = (
        reindex(tokenize_side(data.retain, tok, cfg.data, ("chosen",))) if OBJECTIVES[objective].uses_retain else []
    )
    entry = runner.state.stage_results.get(key, {})
    anchor = _stored_anchor(runner) if entry else lora_state(model)
    anchor_tensors = {ANCHOR_PREFIX + k: v for k, v in anchor.items()}

    def save_checkpoint(loop_state: dict[str, Any], loop_tensors: dict[str, torch.Tensor], opt: Any) -> None:
        runner.mark_position(key, stage_step=loop_state["stage_step"])
        runner.save(loop_state, {**loop_tensors, **anchor_tensors}, opt)

    def commit(summary: dict[str, Any]) -> None:
        runner.state.stage_results[key] = summary
        runner.mark_position(key, committed=True)
        runner.save(None, anchor_tensors, None)

    solver = InnerSolver(
        model=runner.model,
        services=runner.services,
        ctx=ctx,
        task_index=index,
        lr=inner_lr(section, cfg.train),
        save_checkpoint=save_checkpoint,
        reference_state=runner.reference_state,
    )
    train = cfg.train

    def plugins(label: str) -> list:
        return inner_plugins(
            section,
            objective,
            anchor=anchor,
            retain=retain,
            pad_id=pad_id,
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=train.seed,
            reference_state=runner.reference_state,
            label=f"{task.name}/{label}",
        )

    loss = forget_loss(section)
    base = {"objective": objective, "examples": len(candidates), "candidates": len(data.candidates)}
    if section.selection == "u2a" and data.preference:
        summary = _run_u2a(
            runner,
            model,
            task,
            candidates,
            data.preference,
            loss,
            solver,
            plugins,
            entry,
            commit,
            lambda: runner.take_loop_resume(key),
        )
    else:
        if section.selection == "u2a":
            logger.warning(
                "task %r: no preference pairs for U2A's objective (set unlearn.preference); unlearning "
                "all %d negatives with equal weights",
                task.name,
                len(candidates),
            )
        if not entry:
            commit({"mode": "all", "started": True})
        outcome = solver.solve(
            task,
            candidates,
            loss,
            max_steps=steps_per_solve(section, train, len(candidates)),
            plugins=plugins("all"),
            resume=runner.take_loop_resume(key),
        )
        summary = {
            "mode": "all",
            "selected": len(candidates),
            "steps": outcome.steps,
            "stopped": outcome.stopped is not None,
            "events": [outcome.stopped] if outcome.stopped else [],
            **{f"last/{k}": v for k, v in outcome.metrics.items()},
        }
    runner.state.stage_results[key] = nan_to_null({**base, **summary})


def _run_u2a(
    runner: Any,
    model: torch.nn.Module,
    task: Task,
    candidates: list,
    preference_records: list,
    loss: Any,
    solver: InnerSolver,
    plugins: Any,
    entry: dict[str, Any],
    commit: Any,
    take_resume: Any,
) -> dict[str, Any]:
    cfg, section = runner.cfg, runner.cfg.unlearn
    pad_id = runner.tokenizer.pad_token_id
    preference = reindex(tokenize_pairs(preference_records, runner.tokenizer, cfg.data).examples)

    def reference() -> Any:
        return reference_policy(model, runner.reference_state)

    pref_ref = compute_reference_logps(
        model, preference, pad_id, ("chosen", "rejected"), reference, section.score_batch_size
    )
    cand_ref = None
    if loss.needs_reference:
        cand_ref = compute_reference_logps(model, candidates, pad_id, FORGET_SIDES, reference, section.score_batch_size)
    procedure = U2A(section, cfg.train, model, pad_id, loss, solver, plugins, task)
    progress = procedure.run(
        U2AInputs(candidates, preference, pref_ref, cand_ref),
        U2AProgress.from_json(entry.get("progress")),
        lambda p: commit({"mode": "u2a", "progress": p.to_json()}),
        resume_loop=take_resume,
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
