"""The inner solve: epochs left early by an epoch-scoped stop (U2A's code), the schedule carried across, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from lifealign.config import RunConfig
from lifealign.config.unlearn import UnlearnSection
from lifealign.data.records import PreferencePair, Task
from lifealign.models.lora import load_lora_state, lora_state
from lifealign.training.loop import StageContext
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.unlearning.inner import InnerSolver, continuation, next_epoch_start
from lifealign.unlearning.objectives import forget_loss
from lifealign.unlearning.plugins import ForgetNLLGuard, optimizer_steps_taken

N_EXAMPLES, BATCH, PLANNED = 8, 2, 8
"""8 examples in batches of 2 on one process: an epoch is 4 steps; a solve of 8 steps is 2 epochs."""


@pytest.mark.parametrize(
    ("step", "n", "global_batch", "expected"),
    [
        # n = 10, G = 4: windows [0,4) [4,8) [8,12) | [12,16) [16,20) | [20,24) ...: epoch 1 starts at step 3
        (0, 10, 4, 3),
        (2, 10, 4, 3),  # the window [8, 12) starts in epoch 0
        (3, 10, 4, 5),  # epoch 1 (12 // 10); epoch 2 starts at ceil(20 / 4) = 5
        (5, 10, 4, 8),  # epoch 2 (20 // 10); epoch 3 at ceil(30 / 4) = 8
        (1, 8, 2, 4),
        (4, 8, 2, 8),
        (0, 4, 8, 1),  # a step longer than an epoch: the next epoch is the next step
    ],
)
def test_next_epoch_start(step, n, global_batch, expected):
    assert next_epoch_start(step, n, global_batch) == expected


def test_a_continuation_carries_adamw_and_the_cosine_schedule_exactly():
    """Oracle: the same optimizer and schedule stepped 10 times without a break. After 4 steps, a fresh AdamW and a
    fresh schedule (same construction) loaded from ``continuation`` give the same 6 remaining learning rates and
    parameters."""

    def build(param):
        opt = torch.optim.AdamW([param], lr=1e-2)
        return opt, get_cosine_schedule_with_warmup(opt, 2, 10)

    def train(param, opt, sched, steps, lrs):
        for k in range(len(lrs), len(lrs) + steps):  # the k-th update's gradient, wherever the run was split
            lrs.append(sched.get_last_lr()[0])
            opt.zero_grad()
            (param * torch.tensor([1.0, -2.0]) * (k + 1)).sum().backward()
            opt.step()
            sched.step()

    whole, lrs_whole = torch.nn.Parameter(torch.tensor([0.5, 0.5])), []
    train(whole, *build(whole), 10, lrs_whole)
    parted, lrs_parted = torch.nn.Parameter(torch.tensor([0.5, 0.5])), []
    opt, sched = build(parted)
    train(parted, opt, sched, 4, lrs_parted)
    state = continuation(opt, stage_step=7, nonfinite_skipped=0)
    assert state["stage_step"] == 7 and state["scheduler"]["last_epoch"] == 4
    opt2, sched2 = build(parted)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    train(parted, opt2, sched2, 6, lrs_parted)
    assert lrs_parted == lrs_whole
    assert torch.equal(parted.detach(), whole.detach())


# ----- a solve on the tiny model --------------------------------------------------------------------------------


class _StopOnce(Plugin):
    """Asks once for an epoch-scoped stop, at the micro-batch after ``after_updates`` optimizer updates."""

    name = "stop_once"

    def __init__(self, after_updates: int):
        self.after_updates, self.fired = after_updates, False

    def stop_request(self, ctx, batch, outputs):
        if self.fired or optimizer_steps_taken(ctx.optimizer) != self.after_updates:
            return None
        self.fired = True
        return {"event": "unlearn_stopped", "reason": "test", "scope": "epoch"}


def _solve(model, tokenizer, plugins, resume=None, save_every=100):
    """One GA solve of ``PLANNED`` steps over ``N_EXAMPLES`` forget responses; ``(outcome, step records, commits)``."""
    from lifealign.data.tokenize import tokenize_pairs

    section = UnlearnSection(objective="ga")
    train = RunConfig().train.model_copy(
        update={"lr": 1e-2, "batch_size": BATCH, "grad_accum": 1, "save_every": save_every, "progress": False}
    )
    records = [PreferencePair(f"Question {i}?", "", f"A bad answer number {i}.", id=str(i)) for i in range(N_EXAMPLES)]
    examples = tokenize_pairs(records, tokenizer, RunConfig().data, sides=("rejected",)).examples
    examples = [dict(ex, index=i) for i, ex in enumerate(examples)]
    assert len(examples) == N_EXAMPLES
    loss = forget_loss(section)
    logged, commits = [], []

    def commit(loop):
        if loop is not None:
            commits.append(
                ({**copy.deepcopy(loop.state), "optimizer": copy.deepcopy(loop.optimizer)}, lora_state(model))
            )

    stage = StageContext(
        model=model,
        tokenizer=tokenizer,
        accelerator=Accelerator(cpu=True),
        train=train,
        data=RunConfig().data,
        loss=loss,
        plugins=[],
        metrics=logged.append,
        commit=commit,
        method_name="u2a",
    )
    task = Task("forget", [])
    ctx = PluginContext(model=model, tokenizer=tokenizer, task=task, task_index=0, stage="unlearn")
    solver = InnerSolver(stage=stage, ctx=ctx, task_index=0, lr=train.lr)
    outcome = solver.solve(task, examples, loss, max_steps=PLANNED, plugins=plugins, resume=resume)
    return outcome, [r for r in logged if r.get("event") == "step"], commits, ctx


def _cosine_lrs(n: int) -> list[float]:
    """The loop's schedule for a stage of ``PLANNED`` steps (warm-up ``int(0.1 * 8) = 0``), over ``n`` updates."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, int(0.1 * PLANNED), PLANNED)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_an_epoch_scoped_stop_skips_the_rest_of_that_epoch_only(lora_factory):
    """Stop asked at step 1 (after one update): steps 1-3, the rest of epoch 0, are skipped; epoch 1 (steps 4-7)
    runs. Steps taken 0, 4, 5, 6, 7 (logged 1, 5, 6, 7, 8); the schedule advances with the 5 updates only."""
    model, tokenizer = lora_factory()
    outcome, steps, _, ctx = _solve(model, tokenizer, [_StopOnce(after_updates=1)])
    assert [r["step"] for r in steps] == [1, 5, 6, 7, 8]
    assert [r["learning_rate"] for r in steps] == pytest.approx(_cosine_lrs(5), rel=1e-12)
    assert (outcome.planned_steps, outcome.steps, outcome.skipped_steps) == (8, 5, 3)
    assert [(e["reason"], e["skipped_steps"]) for e in outcome.events] == [("test", 3)]
    assert outcome.stopped == outcome.events[-1]
    assert optimizer_steps_taken(ctx.optimizer) == 5


def test_a_solve_resumed_after_an_epoch_skip_ends_as_an_uninterrupted_one(lora_factory):
    """A mid-solve checkpoint after the skip (stage step 6) carries the event and the optimizer: resuming from it
    (weights as they were then, fresh plugins) gives the same final weights, steps and events."""
    model, tokenizer = lora_factory()
    start = lora_state(model)
    clean, _, commits, _ = _solve(model, tokenizer, [_StopOnce(after_updates=1)], save_every=1)
    final = lora_state(model)
    (state, weights) = next((s, w) for s, w in commits if s["stage_step"] == 6)
    assert [e["skipped_steps"] for e in state["solve_events"]] == [3]
    load_lora_state(model, weights)
    resumed, steps, _, _ = _solve(model, tokenizer, [_StopOnce(after_updates=1)], resume=state)
    assert [r["step"] for r in steps] == [7, 8]
    assert (resumed.steps, resumed.skipped_steps, resumed.events) == (clean.steps, clean.skipped_steps, clean.events)
    after = lora_state(model)
    assert all(torch.equal(after[k], final[k]) for k in final)
    assert any(not torch.equal(start[k], final[k]) for k in final)


@pytest.mark.parametrize(("scope", "taken", "skipped"), [("epoch", 1, [3, 4]), ("solve", 1, [])])
def test_the_forget_nll_guard_keeps_its_count_into_the_next_epoch(lora_factory, scope, taken, skipped):
    """Bound 1e-3 (always exceeded), patience 2. Step 0: count 1, update; step 1: count 2, stop before its update.
    ``epoch``: skip to step 4, where the carried count (3) stops at once (skip to 8, the end): 1 step taken (2 if
    the count restarted at the epoch). ``solve``: the solve ends at step 1: 1 step taken, nothing skipped."""
    model, tokenizer = lora_factory()
    guard = ForgetNLLGuard(1e-3, patience=2, label="x", scope=scope)
    outcome, steps, _, _ = _solve(model, tokenizer, [guard])
    assert outcome.steps == taken and [r["step"] for r in steps] == [1]
    assert [e.get("skipped_steps") for e in outcome.events] == (skipped or [None])
    assert all(e["scope"] == scope and e["reason"] == "forget_nll_above_bound" for e in outcome.events)
