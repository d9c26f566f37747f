"""The plugin contract: a continual method hooks into the one loop at a small, fixed set of named points.

Hooks, in the order the stream runner and ``train_task`` call them for each task:

1. ``before_task(ctx)``                      the runner, before any stage of task ``ctx.task_index``
2. ``train_data(ctx, records) -> records``  the runner, per stage: the records to train on (Replay mixes its buffer)
3. ``before_stage(ctx)``                     ``train_task``, after the optimizer is built (``ctx.stage`` is ``sft``/``pref``)
4. ``extra_loss(ctx, batch, out) -> Tensor | None``  every micro-batch; the returned term is added and logged
   as ``loss/<plugin name>``
5. ``stop_request(ctx, batch, out) -> event | None``  every micro-batch, before its backward; an event ends the
   stage there without that step's update, on every rank (U2A's forget-NLL stop rule)
6. ``after_backward(ctx)``                   every optimizer step, after gradients are accumulated and before
   clipping (gradient edits: GEM/A-GEM projection)
7. ``after_stage(ctx)``                      ``train_task``, after the last step of the stage, or the stopping one
   (SLMC consolidation)
8. ``after_task(ctx)``                       the runner, after the last stage of the task (buffer update, Fisher)

``state_dict``/``load_state_dict`` make a plugin resumable: tensors go to safetensors, the rest to JSON.
Every hook is a no-op by default; a method overrides only what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lifealign.data.records import PreferencePair, Task


@dataclass
class PluginContext:
    """What a hook may read: the model, the tokenizer, the current task and stage, and the loop's knobs."""

    model: torch.nn.Module
    tokenizer: Any
    task: Task
    task_index: int
    stage: str = "pref"
    seen_tasks: list[Task] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    config: Any = None
    rng: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    """Free-form values a runner passes to plugins (e.g. the loss callable for Fisher estimation)."""


class Plugin:
    """Base class: every hook is a no-op."""

    name: str = "plugin"

    def before_task(self, ctx: PluginContext) -> None:
        pass

    def train_data(self, ctx: PluginContext, records: list[PreferencePair]) -> list[PreferencePair]:
        return records

    def before_stage(self, ctx: PluginContext) -> None:
        pass

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> torch.Tensor | None:
        return None

    def stop_request(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any] | None:
        """Asked for every micro-batch after its loss, before its backward: a returned event (JSON-able) ends the
        stage there, with no update for that step, on every rank; ``StageResult.stopped`` carries the event."""
        return None

    def after_backward(self, ctx: PluginContext) -> None:
        pass

    def after_stage(self, ctx: PluginContext) -> None:
        pass

    def after_task(self, ctx: PluginContext) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": {name: Tensor}, "meta": <JSON-able>}``: everything needed to resume exactly."""
        return {"tensors": {}, "meta": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
