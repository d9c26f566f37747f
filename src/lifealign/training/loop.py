"""The one training loop: every stage of every method (SFT, preference, unlearning) runs through ``train_task``.

It reads the loss's declared needs (``CombinedLoss.needs_reference``, ``.uses``) and the plugins' hooks; it never
branches on a loss or method name. Data order is a pure function of (seed, task, stage, step), so a resumed stage
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from lifealign.config.schema import TrainSection
from lifealign.data.collate import collate_pairs
from lifealign.data.records import Task
from lifealign.losses.combine import CombinedLoss
from lifealign.training.faults import maybe_fault
from lifealign.training.forward import batch_logps, compute_reference_logps, loss_inputs, reference_policy
from lifealign.training.interrupt import RunInterrupted, stop_requested
from lifealign.training.plugin import Plugin, PluginContext

logger = logging.getLogger(__name__)

STAGE_SALT = {"sft": 1, "pref": 2, "unlearn": 3, "mtl": 4}


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive_nonfinite`` skipped steps in a row; the message names task, stage, step."""


@dataclass
class StagePlan:
    """What one stage trains: a task's examples, the objective and the budget."""

    task_index: int
    task: Task
    stage: str
    loss: CombinedLoss
    lr: float
    epochs: float
    max_steps: int | None = None
    example_weights: torch.Tensor | None = None
    """Per-example loss weights ``(n,)`` indexed like the examples (U2A)."""
    reference_state: dict[str, torch.Tensor] | None = None
    """Adapter state of the ``previous`` reference policy; None = the base model (adapter disabled)."""


@dataclass
class StageResult:
    steps: int
    """Optimizer steps the stage ran: the planned number, or fewer when a plugin stopped it."""
    nonfinite_skipped: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None
    """The event of the plugin that ended the stage early (``Plugin.stop_request``), else None."""


@dataclass
class LoopServices:
    """What the loop needs from the run around it: the accelerator, plugins, metrics, and a checkpoint callback."""

    accelerator: Any
    tokenizer: Any
    train_cfg: TrainSection
    plugins: list[Plugin]
    write_metrics: Callable[[dict[str, Any]], None]
    save_checkpoint: Callable[[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]], None]
    """``save_checkpoint(loop_state, loop_tensors, optimizer_state)``: the runner adds adapter and plugin state."""
    method_name: str = ""
    global_step: int = 0


def total_steps(
    n_examples: int, epochs: float, max_steps: int | None, micro_batch: int, grad_accum: int, world: int
) -> int:
    """Optimizer steps of a stage: ``max_steps`` or ``ceil(epochs * n / (micro_batch * grad_accum * world))``."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * n_examples / (micro_batch * grad_accum * world)))


def micro_batch_indices(
    n: int, seed: int, step: int, accum: int, grad_accum: int, micro_batch: int, rank: int, world: int
) -> list[int]:
    """Example indices of one micro-batch: a window over concatenated per-epoch permutations (seeded)."""
    start = ((step * grad_accum + accum) * world + rank) * micro_batch
    out: list[int] = []
    pos = start
    while len(out) < micro_batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(micro_batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def stage_seed(base_seed: int, task_index: int, stage: str) -> int:
    return base_seed * 1000 + task_index * 10 + STAGE_SALT.get(stage, 0)


def _stoppers(plugins: list[Plugin]) -> list[Plugin]:
    """The plugins that implement ``stop_request`` (none in most runs: then no per-micro-batch check at all)."""
    return [p for p in plugins if getattr(type(p), "stop_request", Plugin.stop_request) is not Plugin.stop_request]


def _stop_event(
    acc: Any, stoppers: list[Plugin], ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]
) -> dict[str, Any] | None:
    """The first stop request of this micro-batch, agreed across ranks: every rank stops when any rank asks, so no
    rank enters a backward whose gradient all-reduce the others skip (the lowest asking rank's event wins)."""
    event = None
    for plugin in stoppers:
        event = plugin.stop_request(ctx, batch, outputs)
        if event is not None:
            break
    if acc.num_processes == 1:
        return event
    events: list[Any] = [None] * acc.num_processes
    torch.distributed.all_gather_object(events, event)
    return next((e for e in events if e is not None), None)


class _Means:
    """Running means of scalar metrics over the micro-batches of one step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        v = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
        self.sums[key] = self.sums.get(key, 0.0) + v
        self.counts[key] = self.counts.get(key, 0) + 1

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _record_pair_metrics(means: _Means, out: Any, policy: dict[str, torch.Tensor]) -> None:
    """trl's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/<side>."""
    for side in ("chosen", "rejected"):
        if f"{side}_logps" in policy:
            means.add(f"logps/{side}", policy[f"{side}_logps"])
    if out is not None and out.chosen_rewards is not None and out.rejected_rewards is not None:
        means.add("rewards/chosen", out.chosen_rewards)
        means.add("rewards/rejected", out.rejected_rewards)
        means.add("rewards/margins", out.chosen_rewards - out.rejected_rewards)
        means.add("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards).float())


def _all_ranks_true(accelerator: Any, flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == accelerator.num_processes)


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def train_task(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    plan: StagePlan,
    services: LoopServices,
    ctx: PluginContext,
    resume: dict[str, Any] | None = None,
) -> StageResult:
    """Train one stage of one task; ``resume`` is the loop state of a checkpoint taken inside this stage.

    Each optimizer step: ``grad_accum`` micro-batches → policy log-probs (chosen+rejected in one forward) →
    ``CombinedLoss`` (+ plugin ``extra_loss`` terms) → non-finite check → backward; then plugin
    ``after_backward`` (gradient edits) → gradient clipping and a finite-norm check → AdamW + cosine schedule.
    A non-finite loss or gradient skips the update entirely (no optimizer or scheduler step) and is counted.
    """
    acc, cfg = services.accelerator, services.train_cfg
    pad_id = services.tokenizer.pad_token_id
    sides = plan.loss.uses
    params = [p for p in model.parameters() if p.requires_grad]
    steps = total_steps(len(examples), plan.epochs, plan.max_steps, cfg.batch_size, cfg.grad_accum, acc.num_processes)
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    seed = stage_seed(cfg.seed, plan.task_index, plan.stage)
    ctx.optimizer, ctx.stage = optimizer, plan.stage

    def reference() -> contextlib.AbstractContextManager:
        return reference_policy(acc.unwrap_model(model), plan.reference_state)

    start_step, skipped, consecutive = 0, 0, 0
    ref_logps: torch.Tensor | None = None
    if resume is not None:
        start_step, skipped = resume["stage_step"], resume["nonfinite_skipped"]
        consecutive = resume.get("consecutive_nonfinite", 0)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        ref_logps = resume.get("ref_logps")
    if plan.loss.needs_reference and cfg.cache_reference and ref_logps is None:
        ref_logps = compute_reference_logps(
            acc.unwrap_model(model), examples, pad_id, sides, reference, cfg.batch_size, acc.autocast
        )
    for plugin in services.plugins:
        plugin.before_stage(ctx)

    def checkpoint(step: int) -> None:
        state = {
            "stage_step": step,
            "nonfinite_skipped": skipped,
            "consecutive_nonfinite": consecutive,
            "scheduler": scheduler.state_dict(),
            "total_steps": steps,
        }
        tensors = {"ref_logps": ref_logps} if ref_logps is not None else {}
        services.save_checkpoint(state, tensors, optimizer.state_dict())

    stoppers = _stoppers(services.plugins)
    stop_event: dict[str, Any] | None = None
    model.train()
    bar = tqdm(
        range(start_step, steps),
        initial=start_step,
        total=steps,
        desc=f"{plan.task.name}/{plan.stage}",
        disable=not (cfg.progress and acc.is_main_process),
        leave=False,
    )
    metrics: dict[str, float] = {}
    for step in bar:
        maybe_fault("step", task=plan.task_index, stage=plan.stage, step=step)
        optimizer.zero_grad(set_to_none=True)
        means, finite = _Means(), True
        for a in range(cfg.grad_accum):
            idx = micro_batch_indices(
                len(examples), seed, step, a, cfg.grad_accum, cfg.batch_size, acc.process_index, acc.num_processes
            )
            batch = collate_pairs([examples[i] for i in idx], pad_id, sides=sides)
            sync = acc.no_sync(model) if a < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                ref = None
                if plan.loss.needs_reference:
                    if ref_logps is not None:
                        ref = ref_logps[idx]
                    else:  # before the policy forward: a swapped-in reference adapter must not alter saved tensors
                        with torch.no_grad(), reference(), acc.autocast():
                            r = batch_logps(acc.unwrap_model(model), batch)
                        ref = torch.stack([r[f"{s}_logps"].float() for s in sides], dim=1)
                with acc.autocast():
                    policy = batch_logps(model, batch)
                inputs = loss_inputs(policy, ref, sides)
                weights = plan.example_weights[idx] if plan.example_weights is not None else None
                total, parts, primary = plan.loss(inputs, weights=weights)
                for plugin in services.plugins:
                    term = plugin.extra_loss(ctx, batch, {"policy": policy, "inputs": inputs, "loss": total})
                    if term is not None:
                        total = total + term
                        parts[f"loss/{plugin.name}"] = term
                if stoppers:
                    outputs = {"policy": policy, "inputs": inputs, "loss": total}
                    stop_event = _stop_event(acc, stoppers, ctx, batch, outputs)
                    if stop_event is not None:
                        break
                if maybe_fault("loss", task=plan.task_index, stage=plan.stage, step=step):
                    total = total * float("nan")
                means.add("loss", total)
                if not torch.isfinite(total):
                    finite = False
                    break
                acc.backward(total / cfg.grad_accum)
            for key, value in parts.items():
                means.add(key if key.startswith("loss/") else f"loss/{key}", value)
            _record_pair_metrics(means, primary, policy)
        if stop_event is not None:
            optimizer.zero_grad(set_to_none=True)  # the micro-batches already backpropagated are not applied
            break
        finite = _all_ranks_true(acc, finite)
        grad_norm = torch.tensor(float("nan"))
        if finite:
            for plugin in services.plugins:
                plugin.after_backward(ctx)
            if cfg.max_grad_norm is not None:
                grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grad_norm = _grad_norm(params)
            finite = _all_ranks_true(acc, bool(torch.isfinite(torch.as_tensor(grad_norm)).item()))
        lr_used = scheduler.get_last_lr()[0]
        if finite:
            optimizer.step()
            scheduler.step()
            consecutive = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            consecutive += 1
            logger.warning(
                "non-finite loss or gradient at %s/%s step %d: update skipped", plan.task.name, plan.stage, step
            )
        services.global_step += 1
        metrics = means.result()
        record = {
            "event": "step" if finite else "nonfinite_skipped",
            "method": services.method_name,
            "task": plan.task.name,
            "task_index": plan.task_index,
            "stage": plan.stage,
            "step": step + 1,
            "global_step": services.global_step,
            "learning_rate": lr_used,
            "grad_norm": float(grad_norm),
            "nonfinite_skipped": skipped,
            **metrics,
        }
        if acc.is_main_process and ((step + 1) % cfg.log_every == 0 or not finite or step + 1 == steps):
            services.write_metrics(record)
        bar.set_postfix(
            loss=f"{metrics.get('loss', float('nan')):.4f}",
            acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
        )
        if consecutive >= cfg.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss for {consecutive} consecutive steps at task {plan.task.name!r} "
                f"(index {plan.task_index}), stage {plan.stage}, step {step + 1}; the last committed checkpoint "
                "is intact — lower train.lr or check the data"
            )
        signum = stop_requested()
        if signum is not None and step + 1 < steps:
            checkpoint(step + 1)
            raise RunInterrupted(signum, f"at task {plan.task.name!r}, stage {plan.stage}, step {step + 1}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
    bar.close()
    for plugin in services.plugins:
        plugin.after_stage(ctx)
    ran = step if stop_event is not None else steps
    return StageResult(steps=ran, nonfinite_skipped=skipped, last_metrics=metrics, stopped=stop_event)
