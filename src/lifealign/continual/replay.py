"""Experience replay (the rehearsal half of LifeAlign's FPO, METHODS.md §1.2): mix a buffer of earlier tasks' pairs
into every new task's training data.

Per stage in ``stages`` there is one :class:`~lifealign.continual.buffers.FIFOBuffer`: the authors' code keeps an
SFT buffer and a preference buffer, each filled from the data of its own stage. Hook use:

- ``train_data`` (per stage): ``current records + buffer records`` (a buffer record whose content hash equals a
  current record's is dropped: the first copy is kept, RELIABILITY D10), shuffled with
  ``random.Random(f"{seed}:{task_index}:{stage}")``. With an empty buffer the records are returned unchanged, so
  task 0 trains on exactly what a plugin-free run would. It also remembers (by content hash) which of the task's
  records the stage trained on.
- ``after_task``: each stage's buffer receives ``fraction`` of the records that stage trained on (taken from
  ``ctx.task.train`` in task order; a stage that did not run this task adds nothing, so negative-only records of an
  unlearning task never enter the preference buffer).

The buffer is filled *after* the task, as in the paper; the code appends the new rows when the task starts but does
not mix them into that task's data again, which trains on the same pairs.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from lifealign.continual.buffers import Eviction, FIFOBuffer, Selection
from lifealign.data.records import PreferencePair
from lifealign.training.plugin import TRAINING_STAGES, Plugin, PluginContext, TrainingStage
from lifealign.utils.kwargs import check_distinct, check_range

__all__ = ["ReplayPlugin", "mix_with_buffer"]

logger = logging.getLogger(__name__)


def mix_with_buffer(
    records: list[PreferencePair], replayed: list[PreferencePair], rng: random.Random
) -> tuple[list[PreferencePair], int]:
    """``shuffle(records + replayed)`` without content-hash duplicates (first copy kept); returns (mixed, dropped).

    When ``replayed`` is empty the records come back unchanged and unshuffled.
    """
    if not replayed:
        return list(records), 0
    seen = {r.content_hash() for r in records}
    extra = []
    for r in replayed:
        h = r.content_hash()
        if h not in seen:
            seen.add(h)
            extra.append(r)
    mixed = list(records) + extra
    rng.shuffle(mixed)
    return mixed, len(replayed) - len(extra)


class ReplayPlugin(Plugin):
    """Replay with one FIFO buffer per stage; constructor kwargs are the YAML keys of ``{name: replay, ...}``."""

    name = "replay"

    def __init__(
        self,
        *,
        buffer_size: int = 3000,
        fraction: float = 0.2,
        selection: Selection = "random",
        eviction: Eviction = "oldest",
        stages: tuple[TrainingStage, ...] = TRAINING_STAGES,
        seed: int = 0,
    ):
        check_range("buffer_size", buffer_size, low=1)
        check_range("fraction", fraction, low=0, high=1, low_open=True)
        self.stages = check_distinct("stages", stages)
        self.seed = seed
        self.buffers: dict[str, FIFOBuffer] = {
            stage: FIFOBuffer(buffer_size, fraction, seed=self.seed, selection=selection, eviction=eviction)
            for stage in self.stages
        }
        self.mixes: dict[str, dict[str, int]] = {}
        self._pending_task: int | None = None
        self._pending: dict[str, list[str]] = {}
        """Per stage, the content hashes of the current task's records that stage trained on."""

    def train_data(self, ctx: PluginContext, records: list[PreferencePair]) -> list[PreferencePair]:
        if ctx.stage not in self.buffers:
            return records
        if self._pending_task != ctx.task_index:
            self._pending_task, self._pending = ctx.task_index, {}
        self._pending[ctx.stage] = [r.content_hash() for r in records]
        replayed = self.buffers[ctx.stage].records
        rng = random.Random(f"{self.seed}:{ctx.task_index}:{ctx.stage}")
        mixed, dropped = mix_with_buffer(records, replayed, rng)
        self.mixes[ctx.stage] = {
            "task_index": ctx.task_index,
            "current": len(records),
            "replayed": len(replayed) - dropped,
            "duplicates_dropped": dropped,
        }
        return mixed

    def after_task(self, ctx: PluginContext) -> None:
        pending = self._pending if self._pending_task == ctx.task_index else {}
        for stage, buffer in self.buffers.items():
            if stage not in pending:
                continue
            if ctx.task_index in buffer.tasks_added:
                logger.warning("replay: task %d already in the %s buffer; not added twice", ctx.task_index, stage)
                continue
            buffer.add_task(stage_records(ctx.task.train, pending[stage]), ctx.task_index, ctx.task.name)
        self._pending_task, self._pending = None, {}

    def report(self) -> dict[str, Any]:
        """Per stage: ``{"size", "capacity", "per_task": [{"task_index", "task", "records"}], "last_mix"}``, the last
        mix being the latest ``train_data`` call's counts (current records, replayed, duplicates dropped)."""
        return {
            stage: {"size": len(b), "capacity": b.capacity, "per_task": b.per_task(), "last_mix": self.mixes.get(stage)}
            for stage, b in self.buffers.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {},
            "meta": {
                "buffers": {stage: b.state_dict() for stage, b in self.buffers.items()},
                "pending_task": self._pending_task,
                "pending": {stage: list(h) for stage, h in self._pending.items()},
                "mixes": dict(self.mixes),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state.get("meta", {})
        saved = meta.get("buffers", {})
        if set(saved) != set(self.buffers):
            raise ValueError(
                f"replay stages: the checkpoint has {sorted(saved)} but this plugin has {list(self.stages)}"
            )
        for stage, buffer in self.buffers.items():
            buffer.load_state_dict(saved[stage])
        self._pending_task = meta.get("pending_task")
        self._pending = {stage: list(h) for stage, h in meta.get("pending", {}).items()}
        self.mixes = {stage: dict(m) for stage, m in meta.get("mixes", {}).items()}


def stage_records(task_records: list[PreferencePair], hashes: list[str]) -> list[PreferencePair]:
    """The records of ``task_records`` whose content hash is in ``hashes``, in task order, each content once."""
    wanted, out = set(hashes), []
    for r in task_records:
        h = r.content_hash()
        if h in wanted:
            wanted.discard(h)
            out.append(r)
    return out
