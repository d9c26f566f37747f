"""The plugin contract: a continual method hooks into the one loop at a small, fixed set of named points.

Hooks, in the order the run and ``train_task`` call them for each task:

1. ``before_task(ctx)``                      the run, before any stage of task ``ctx.task_index``
2. ``train_data(ctx, records) -> records``  the run, per stage: the records to train on (Replay mixes its buffer)
3. ``before_stage(ctx)``                     ``train_task``, after the optimizer is built (``ctx.stage`` is
   ``sft``/``pref``/``unlearn``)
4. ``extra_loss(ctx, batch, out) -> Tensor | None``  every micro-batch; the returned term is added and logged
   as ``loss/<plugin name>``
5. ``stop_request(ctx, batch, out) -> event | None``  every micro-batch, before its backward; an event ends the
   stage there without that step's update, on every rank (U2A's forget-NLL stop rule)
6. ``after_backward(ctx)``                   every optimizer step, after gradients are accumulated and before
   clipping (gradient edits: GEM/A-GEM projection)
7. ``after_stage(ctx)``                      ``train_task``, after the last step of the stage, or the stopping one
   (SLMC consolidation)
8. ``after_task(ctx)``                       the run, after the last stage of the task (buffer update, Fisher)

Besides the hooks, a plugin declares:

- ``state_dict``/``load_state_dict``: everything needed to resume exactly (tensors to safetensors, the rest JSON);
- ``report() -> dict``: JSON-able diagnostics the run writes to ``run_info.json`` (buffer sizes, Fisher statistics,
  SLMC kept energy, ...);
- ``close()``: release what the plugin attached to the shared model (forward hooks, extra modules), called by the
  run when the method is finished, before the next method starts on the same model.

Every hook is a no-op by default; a method overrides only what it needs. A plugin reads the run only through
:class:`PluginContext`, whose fields are all typed; it writes nothing into it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from lifealign.config.schema import DataSection
from lifealign.data.records import PreferencePair, Task

if TYPE_CHECKING:
    from lifealign.losses.combine import CombinedLoss


TrainingStage = Literal["sft", "pref"]
"""A stage that trains on a task's records with the method's loss (plugins list the ones they act in)."""
TRAINING_STAGES: tuple[TrainingStage, ...] = ("sft", "pref")


def _no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class PluginContext:
    """What a hook may read: the model, the tokenizer, the current task and stage, the method's loss, the run's
    tokenisation policy and precision, and this process's place among the ranks."""

    model: torch.nn.Module
    """The (unwrapped) peft model being trained."""
    tokenizer: Any
    task: Task
    task_index: int
    stage: str = "pref"
    seen_tasks: list[Task] = field(default_factory=list)
    """Tasks ``0..task_index`` of the stream."""
    n_tasks: int = 1
    """Number of tasks in the stream (a plugin may skip work after the last one)."""
    optimizer: torch.optim.Optimizer | None = None
    """The current stage's optimizer (set by ``train_task``)."""
    loss: CombinedLoss | None = None
    """The method's bound loss (EWC's Fisher, GEM's memory gradients and CPPO's per-example terms use it)."""
    data: DataSection = field(default_factory=DataSection)
    """Tokenisation policy, for plugins that tokenise records of their own (EWC samples, GEM memory)."""
    autocast: Callable[[], contextlib.AbstractContextManager] = _no_autocast
    """The run's mixed-precision context (``accelerator.autocast``)."""
    rank: int = 0
    world_size: int = 1
    layout: str = "concat"
    """The run's batch layout (``train.pair_layout``), for plugins that batch examples of their own."""
    pack_tokens: int | None = None


class Plugin:
    """Base class: every hook is a no-op."""

    name: str = "plugin"
    plain_rows_only: ClassVar[bool] = False
    """True for a plugin that reads or hooks plain ``prompt | response`` rows (L2P's prefix hook, CPPO's
    functional forward): its method then runs the ``concat`` layout."""

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

    def report(self) -> dict[str, Any]:
        """JSON-able diagnostics for ``run_info.json`` (empty by default)."""
        return {}

    def close(self) -> None:
        """Release hooks or modules attached to the shared model (nothing by default)."""
