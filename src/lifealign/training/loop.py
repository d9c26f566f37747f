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

from lifealign.config.schema import DataSection, TrainSection
from lifealign.data.collate import collate
from lifealign.data.records import Task
from lifealign.losses.combine import CombinedLoss
from lifealign.training.faults import maybe_fault
from lifealign.training.forward import batch_logps, compute_reference_logps, reference_policy
from lifealign.training.interrupt import RunInterrupted, stop_requested
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.training.step import forward_loss

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
class LoopCheckpoint:
    """The loop's share of a mid-stage checkpoint: its JSON state, tensors (cached reference log-probs) and the
    optimizer state; the run adds adapter, plugin and run state when it commits."""

    state: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None


@dataclass
class StepCounter:
    """The run's optimizer-step count across stages (``global_step`` in metrics); shared by reference."""

    value: int = 0


def _no_resume() -> dict[str, Any] | None:
    return None


@dataclass
class StageContext:
    """What a stage gets from the run around it: the model and its accelerator, the method's bound loss and plugins,
    the reference policy, the data and training sections, metrics, and the run's ``commit`` / ``take_resume``.

    ``commit(loop)`` commits the whole run (the run adds adapter, plugin and run state to the loop's share);
    ``take_resume()`` hands out, once, the loop state of a checkpoint taken inside this stage (None otherwise).
    """

    model: torch.nn.Module
    """The model as the accelerator prepared it (wrapped under DDP/FSDP)."""
    tokenizer: Any
    accelerator: Any
    train: TrainSection
    data: DataSection
    loss: CombinedLoss
    """The method's loss (the preference and unlearning stages train it; plugins read it)."""
    plugins: list[Plugin]
    metrics: Callable[[dict[str, Any]], None]
    commit: Callable[[LoopCheckpoint | None], None]
    take_resume: Callable[[], dict[str, Any] | None] = _no_resume
    reference_state: dict[str, torch.Tensor] | None = None
    """Adapter state of the ``previous`` reference policy; None = the base model (adapter disabled)."""
    method_name: str = ""
    steps: StepCounter = field(default_factory=StepCounter)
    layout: str = "concat"
    """How batches of pairs are laid out (``data.collate.LAYOUTS``); the run picks ``train.pair_layout`` unless a
    plugin needs plain rows."""
    pack_tokens: int | None = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        return self.accelerator.autocast


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
    """trl's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/<side> and
    logits/<side> (the mean logit over the vocabulary and the micro-batch's response tokens)."""
    for side in ("chosen", "rejected"):
        if f"{side}_logps" in policy:
            means.add(f"logps/{side}", policy[f"{side}_logps"])
        if f"{side}_logits_sum" in policy:
            tokens = policy[f"{side}_tokens"].sum().clamp_min(1)
            means.add(f"logits/{side}", policy[f"{side}_logits_sum"].sum() / tokens)
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


@dataclass
class _StageState:
    """The loop's mutable state within one stage (what a mid-stage checkpoint saves)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int
    seed: int
    start_step: int = 0
    skipped: int = 0
    consecutive: int = 0
    ref_logps: torch.Tensor | None = None

    def checkpoint(self, step: int) -> LoopCheckpoint:
        state = {
            "stage_step": step,
            "nonfinite_skipped": self.skipped,
            "consecutive_nonfinite": self.consecutive,
            "scheduler": self.scheduler.state_dict(),
            "total_steps": self.steps,
        }
        tensors = {"ref_logps": self.ref_logps} if self.ref_logps is not None else {}
        return LoopCheckpoint(state, tensors, self.optimizer.state_dict())


def _start_stage(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    plan: StagePlan,
    stage: StageContext,
    resume: dict[str, Any] | None,
) -> _StageState:
    """AdamW + cosine schedule with warm-up for the stage's steps, restored from ``resume``; the cached reference
    log-probs (computed once per stage, or taken from the checkpoint)."""
    acc, cfg = stage.accelerator, stage.train
    params = [p for p in model.parameters() if p.requires_grad]
    steps = total_steps(len(examples), plan.epochs, plan.max_steps, cfg.batch_size, cfg.grad_accum, acc.num_processes)
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    state = _StageState(optimizer, scheduler, steps, stage_seed(cfg.seed, plan.task_index, plan.stage))
    if resume is not None:
        state.start_step, state.skipped = resume["stage_step"], resume["nonfinite_skipped"]
        state.consecutive = resume.get("consecutive_nonfinite", 0)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state.ref_logps = resume.get("ref_logps")
    if plan.loss.needs_reference and cfg.cache_reference and state.ref_logps is None:
        state.ref_logps = compute_reference_logps(
            stage.unwrapped,
            examples,
            stage.tokenizer.pad_token_id,
            plan.loss.uses,
            lambda: reference_policy(stage.unwrapped, plan.reference_state),
            cfg.batch_size,
            acc.autocast,
            layout=stage.layout,
            pack_tokens=stage.pack_tokens,
        )
    return state


def _reference_rows(
    stage: StageContext, plan: StagePlan, state: _StageState, batch: dict[str, Any], idx: list[int]
) -> torch.Tensor | None:
    """``(B, len(sides))`` reference log-probs of a micro-batch: cached rows, or a no-grad forward of the reference.

    The uncached forward runs before the policy forward: a swapped-in reference adapter must not alter saved tensors.
    """
    if not plan.loss.needs_reference:
        return None
    if state.ref_logps is not None:
        return state.ref_logps[idx]
    model = stage.unwrapped
    with torch.no_grad(), reference_policy(model, plan.reference_state), stage.accelerator.autocast():
        r = batch_logps(model, batch)
    return torch.stack([r[f"{s}_logps"].float() for s in plan.loss.uses], dim=1)


@dataclass
class _StepOutcome:
    means: _Means
    finite: bool = True
    stop_event: dict[str, Any] | None = None


def _accumulate(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    plan: StagePlan,
    stage: StageContext,
    ctx: PluginContext,
    state: _StageState,
    step: int,
    stoppers: list[Plugin],
) -> _StepOutcome:
    """The ``grad_accum`` micro-batches of one optimizer step: loss (+ plugin terms), stop requests, backward."""
    acc, cfg = stage.accelerator, stage.train
    out = _StepOutcome(_Means())
    for a in range(cfg.grad_accum):
        idx = micro_batch_indices(
            len(examples), state.seed, step, a, cfg.grad_accum, cfg.batch_size, acc.process_index, acc.num_processes
        )
        chunk = [examples[i] for i in idx]
        batch = collate(chunk, stage.tokenizer.pad_token_id, plan.loss.uses, stage.layout, stage.pack_tokens)
        sync = acc.no_sync(model) if a < cfg.grad_accum - 1 else contextlib.nullcontext()
        with sync:
            ref = _reference_rows(stage, plan, state, batch, idx)
            weights = plan.example_weights[idx] if plan.example_weights is not None else None
            result = forward_loss(model, batch, plan.loss, ref, weights, acc.autocast)
            total, parts = result.total, result.parts
            for plugin in stage.plugins:
                term = plugin.extra_loss(ctx, batch, {"policy": result.policy, "inputs": result.inputs, "loss": total})
                if term is not None:
                    total = total + term
                    parts[f"loss/{plugin.name}"] = term
            if stoppers:
                outputs = {"policy": result.policy, "inputs": result.inputs, "loss": total}
                out.stop_event = _stop_event(acc, stoppers, ctx, batch, outputs)
                if out.stop_event is not None:
                    return out
            if maybe_fault("loss", task=plan.task_index, stage=plan.stage, step=step):
                total = total * float("nan")
            out.means.add("loss", total)
            if not torch.isfinite(total):
                out.finite = False
                break
            acc.backward(total / cfg.grad_accum)
        for key, value in parts.items():
            out.means.add(key if key.startswith("loss/") else f"loss/{key}", value)
        _record_pair_metrics(out.means, result.primary, result.policy)
    return out


def _edit_and_clip(
    model: torch.nn.Module, stage: StageContext, ctx: PluginContext, finite: bool
) -> tuple[bool, torch.Tensor]:
    """Agree on finiteness across ranks; then the plugins' gradient edits and clipping with a finite-norm check."""
    acc, cfg = stage.accelerator, stage.train
    finite = _all_ranks_true(acc, finite)
    grad_norm = torch.tensor(float("nan"))
    if not finite:
        return False, grad_norm
    for plugin in stage.plugins:
        plugin.after_backward(ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.max_grad_norm is not None:
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = _grad_norm(params)
    return _all_ranks_true(acc, bool(torch.isfinite(torch.as_tensor(grad_norm)).item())), grad_norm


def _step_record(
    stage: StageContext,
    plan: StagePlan,
    state: _StageState,
    step: int,
    finite: bool,
    lr: float,
    grad_norm: Any,
    n_examples: int,
) -> dict[str, Any]:
    cfg, acc = stage.train, stage.accelerator
    examples_seen = (step + 1) * cfg.batch_size * cfg.grad_accum * acc.num_processes
    return {
        "event": "step" if finite else "nonfinite_skipped",
        "method": stage.method_name,
        "task": plan.task.name,
        "task_index": plan.task_index,
        "stage": plan.stage,
        "step": step + 1,
        "global_step": stage.steps.value,
        "learning_rate": lr,
        "grad_norm": float(grad_norm),
        "epoch": examples_seen / max(n_examples, 1),
        "nonfinite_skipped": state.skipped,
    }


def train_task(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    plan: StagePlan,
    stage: StageContext,
    ctx: PluginContext,
    resume: dict[str, Any] | None = None,
) -> StageResult:
    """Train one stage of one task; ``resume`` is the loop state of a checkpoint taken inside this stage.

    Each optimizer step: ``grad_accum`` micro-batches → policy log-probs (chosen+rejected in one forward) →
    ``CombinedLoss`` (+ plugin ``extra_loss`` terms) → non-finite check → backward; then plugin
    ``after_backward`` (gradient edits) → gradient clipping and a finite-norm check → AdamW + cosine schedule.
    A non-finite loss or gradient skips the update entirely (no optimizer or scheduler step) and is counted.
    """
    acc, cfg = stage.accelerator, stage.train
    state = _start_stage(model, examples, plan, stage, resume)
    ctx.optimizer, ctx.stage = state.optimizer, plan.stage
    for plugin in stage.plugins:
        plugin.before_stage(ctx)
    stoppers = _stoppers(stage.plugins)
    stop_event: dict[str, Any] | None = None
    model.train()
    bar = tqdm(
        range(state.start_step, state.steps),
        initial=state.start_step,
        total=state.steps,
        desc=f"{stage.method_name + ' ' if stage.method_name else ''}{plan.task.name}/{plan.stage}",
        disable=True if not (cfg.progress and acc.is_main_process) else None,  # None: off when not a terminal
        leave=False,
    )
    metrics: dict[str, float] = {}
    for step in bar:
        maybe_fault("step", task=plan.task_index, stage=plan.stage, step=step, seed=cfg.seed)
        state.optimizer.zero_grad(set_to_none=True)
        outcome = _accumulate(model, examples, plan, stage, ctx, state, step, stoppers)
        if outcome.stop_event is not None:
            stop_event = outcome.stop_event
            state.optimizer.zero_grad(set_to_none=True)  # the micro-batches already backpropagated are not applied
            break
        finite, grad_norm = _edit_and_clip(model, stage, ctx, outcome.finite)
        lr_used = state.scheduler.get_last_lr()[0]
        if finite:
            state.optimizer.step()
            state.scheduler.step()
            state.consecutive = 0
        else:
            state.optimizer.zero_grad(set_to_none=True)
            state.skipped += 1
            state.consecutive += 1
            logger.warning(
                "non-finite loss or gradient at %s/%s step %d: update skipped", plan.task.name, plan.stage, step
            )
        stage.steps.value += 1
        metrics = outcome.means.result()
        if acc.is_main_process and ((step + 1) % cfg.log_every == 0 or not finite or step + 1 == state.steps):
            record = _step_record(stage, plan, state, step, finite, lr_used, grad_norm, len(examples))
            stage.metrics({**record, **metrics})
        bar.set_postfix(
            loss=f"{metrics.get('loss', float('nan')):.4f}",
            acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
        )
        if state.consecutive >= cfg.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss for {state.consecutive} consecutive steps at task {plan.task.name!r} "
                f"(index {plan.task_index}), stage {plan.stage}, step {step + 1}; the last committed checkpoint "
                "is intact — lower train.lr or check the data"
            )
        signum = stop_requested()
        if signum is not None and step + 1 < state.steps:
            stage.commit(state.checkpoint(step + 1))
            raise RunInterrupted(signum, f"at task {plan.task.name!r}, stage {plan.stage}, step {step + 1}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < state.steps:
            stage.commit(state.checkpoint(step + 1))
    bar.close()
    for plugin in stage.plugins:
        plugin.after_stage(ctx)
    ran = step if stop_event is not None else state.steps
    return StageResult(steps=ran, nonfinite_skipped=state.skipped, last_metrics=metrics, stopped=stop_event)
