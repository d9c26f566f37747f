"""Rehearsal storage: a fixed-capacity first-in-first-out buffer of preference pairs (LifeAlign FPO, METHODS.md §1.2).

Paper: "After training, 20% of the new task data are randomly sampled and added to the buffer, removing the oldest
samples if the buffer is full." The defaults follow that wording: ``selection="random"``, ``eviction="oldest"``.

The authors' code (``BaseCLTrainer._manage_replay_buffer``) differs, and is available as options:

- ``selection="first"``: the first ``int(0.2 · len)`` rows of the task (``select(range(n))``), not a random sample;
- ``eviction="newest"``: on overflow it keeps the first ``replay_buffer_size`` rows, i.e. the *oldest* samples stay
  and the newest are dropped (the opposite of the paper's wording).

Both take ``n = max(1, floor(fraction · len(records)))`` records from a non-empty task. The code's ``int(0.2 · len)``
is the floor; the minimum of one is ours, so that a tiny demo task still leaves something to replay.

A random selection draws from ``random.Random(f"{seed}:{task_index}")``: reproducible across processes and
independent of every other RNG in the run. The state (``state_dict``) is plain JSON: every record with its fields
and its content hash, which ``load_state_dict`` verifies so that a resumed run replays exactly the same pairs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from lifealign.data.records import PreferencePair
from lifealign.utils.kwargs import check_range, typed

__all__ = ["BufferEntry", "FIFOBuffer", "record_from_json", "record_to_json"]

Selection = Literal["random", "first"]
Eviction = Literal["oldest", "newest"]


@dataclass(frozen=True)
class BufferEntry:
    """One stored record and the task it came from."""

    record: PreferencePair
    task_index: int
    task_name: str = ""


def record_to_json(record: PreferencePair) -> dict[str, Any]:
    """All fields of ``record`` plus its ``hash`` (sha256 of prompt, chosen, rejected)."""
    return {
        "prompt": record.prompt,
        "chosen": record.chosen,
        "rejected": record.rejected,
        "task": record.task,
        "id": record.id,
        "hash": record.content_hash(),
    }


def record_from_json(data: dict[str, Any], where: str = "record") -> PreferencePair:
    """Inverse of :func:`record_to_json`; raises ``ValueError`` naming ``where`` when the content hash differs."""
    try:
        record = PreferencePair(
            prompt=data["prompt"],
            chosen=data["chosen"],
            rejected=data["rejected"],
            task=data.get("task", ""),
            id=data.get("id", ""),
        )
        expected = data["hash"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where}: malformed record ({exc!r})") from None
    if record.content_hash() != expected:
        raise ValueError(f"{where}: content hash mismatch (stored {expected[:12]}…, got {record.content_hash()[:12]}…)")
    return record


def n_selected(n_records: int, fraction: float) -> int:
    """``max(1, floor(fraction · n_records))`` for a non-empty task, else 0."""
    if n_records == 0:
        return 0
    return min(n_records, max(1, math.floor(fraction * n_records)))


def select_records(
    records: list[PreferencePair], fraction: float, selection: str, seed: int, task_index: int
) -> list[PreferencePair]:
    """The records of one task that join the buffer, in their task order.

    ``random``: a uniform sample without replacement from ``random.Random(f"{seed}:{task_index}")``;
    ``first``: the first ``n`` records (the authors' code).
    """
    n = n_selected(len(records), fraction)
    if selection == "first":
        return list(records[:n])
    rng = random.Random(f"{seed}:{task_index}")
    return [records[i] for i in sorted(rng.sample(range(len(records)), n))]


class FIFOBuffer:
    """A fixed-capacity buffer filled with a ``fraction`` of every finished task.

    Entries are kept in insertion order (oldest first). When adding overflows ``capacity``:
    ``eviction="oldest"`` drops from the front (paper), ``eviction="newest"`` keeps the first ``capacity`` entries
    and drops the overflow (authors' code).
    """

    def __init__(
        self,
        capacity: int,
        fraction: float = 0.2,
        seed: int = 0,
        selection: Selection = "random",
        eviction: Eviction = "oldest",
    ):
        self.capacity = check_range("capacity", typed("capacity", capacity, int), low=1)
        self.fraction = check_range("fraction", typed("fraction", fraction, float), low=0, high=1, low_open=True)
        self.seed = typed("seed", seed, int)
        self.selection = typed("selection", selection, Selection)
        self.eviction = typed("eviction", eviction, Eviction)
        self.entries: list[BufferEntry] = []
        self.tasks_added: list[int] = []
        """Task indices already offered to the buffer (even if eviction later removed all their records)."""

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def records(self) -> list[PreferencePair]:
        """The stored records, oldest first."""
        return [e.record for e in self.entries]

    def add_task(self, records: list[PreferencePair], task_index: int, task_name: str = "") -> list[PreferencePair]:
        """Select ``fraction`` of ``records`` (see :func:`select_records`), append, evict; returns the selected ones.

        Raises ``ValueError`` if ``task_index`` was already added: adding twice would double-count a task.
        """
        if task_index in self.tasks_added:
            raise ValueError(f"task {task_index} ({task_name!r}) was already added to the buffer")
        chosen = select_records(records, self.fraction, self.selection, self.seed, task_index)
        merged = self.entries + [BufferEntry(r, task_index, task_name) for r in chosen]
        overflow = max(0, len(merged) - self.capacity)
        self.entries = merged[overflow:] if self.eviction == "oldest" else merged[: self.capacity]
        self.tasks_added.append(task_index)
        return chosen

    def per_task(self) -> list[dict[str, Any]]:
        """``[{"task_index", "task", "records"}]``: how many stored records each added task still has."""
        counts = {i: 0 for i in self.tasks_added}
        names: dict[int, str] = {}
        for e in self.entries:
            counts[e.task_index] = counts.get(e.task_index, 0) + 1
            names[e.task_index] = e.task_name
        return [{"task_index": i, "task": names.get(i, ""), "records": counts[i]} for i in sorted(counts)]

    def settings(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "fraction": self.fraction,
            "seed": self.seed,
            "selection": self.selection,
            "eviction": self.eviction,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the settings, the task indices added, and every entry (record fields + content hash)."""
        return {
            "settings": self.settings(),
            "tasks_added": list(self.tasks_added),
            "entries": [
                {"task_index": e.task_index, "task_name": e.task_name, "record": record_to_json(e.record)}
                for e in self.entries
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; every record's hash is checked and the settings must match.

        Nothing changes unless the whole state is valid.
        """
        saved = state.get("settings", {})
        for key, value in self.settings().items():
            if key in saved and saved[key] != value:
                raise ValueError(f"buffer {key}: the checkpoint has {saved[key]!r} but this buffer has {value!r}")
        entries = [
            BufferEntry(record_from_json(e["record"], where=f"buffer entry {k}"), int(e["task_index"]), e["task_name"])
            for k, e in enumerate(state.get("entries", []))
        ]
        if len(entries) > self.capacity:
            raise ValueError(f"buffer: the checkpoint holds {len(entries)} records, more than capacity {self.capacity}")
        self.entries = entries
        self.tasks_added = [int(i) for i in state.get("tasks_added", [])]
