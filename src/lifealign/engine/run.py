"""One run: named phases, atomic commits, verified resume, and the hand-off of a mid-stage loop state.

Both ``lifealign run`` (every method's stream, ``stream.py``) and ``lifealign unlearn`` (``unlearn.py``) are a
sequence of phases on one :class:`Run`. A phase runs unless the restored checkpoint says it is done, and a checkpoint
is committed when it ends. Inside a training stage the loop commits every ``train.save_every`` steps with its own
share (``LoopCheckpoint``), which a resumed run hands back, once, to the stage it belongs to (``take_resume``).

What a checkpoint holds is assembled from *parts* registered on the run, each ``Stateful`` (``state_dict`` /
``load_state_dict`` with ``{"tensors": {...}, "meta": <JSON>}``): the adapter, the plugins, the reference policy, the
owner's JSON state, ... Layout of ``checkpoints/ckpt-<seq>/`` (written atomically by ``Checkpointer``)::

    state.json            the config's signature, done phases, position, step count, elapsed time, each part's meta,
                          the loop's JSON state (inside a stage), the offset of every append-only log
                          (metrics.jsonl, items.jsonl): a resumed run truncates what came after the commit
    <part>.safetensors    each part's tensors (only parts that have some)
    loop.safetensors      the loop's tensors (cached reference log-probs)
    optimizer.pt          the loop's optimizer state (inside a stage)

A part registered after :meth:`Run.restore` found a checkpoint is loaded from it at registration, once per name (a
part that comes and goes, such as an unlearning stage's anchor, is restored only by the stage that saved it). A
checkpoint written under another trajectory- or score-affecting config is refused (``ResumeError`` naming every key
that differs, ``config.load.signature_changes``), unless allowed; tasks appended to the stream are not a change (the
run continues the stream with them: ``Run.appended_tasks``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from lifealign.config.load import signature_changes
from lifealign.training.checkpoint import Checkpoint, Checkpointer, CheckpointError
from lifealign.training.faults import maybe_fault
from lifealign.training.loop import LoopCheckpoint, StepCounter
from lifealign.training.metrics import MetricsWriter
from lifealign.utils.jsonio import nan_to_null

__all__ = ["JsonPart", "ResumeError", "Run", "Stateful", "TensorPart"]

logger = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run (no valid checkpoint, or the config changed)."""


class Stateful(Protocol):
    """Anything a checkpoint carries: ``{"tensors": {name: Tensor}, "meta": <JSON-able>}`` out and back in."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class JsonPart:
    """A part that is plain JSON, read and written through two callables (the owner's state object)."""

    def __init__(self, get: Callable[[], dict[str, Any]], set: Callable[[dict[str, Any]], None]):
        self._get, self._set = get, set

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {}, "meta": self._get()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(state.get("meta") or {})


class TensorPart:
    """A part that is a flat dict of tensors (a reference adapter state, an anchor); ``None`` = nothing held."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None):
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": dict(self.tensors or {}), "meta": {"held": self.tensors is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        held = (state.get("meta") or {}).get("held", bool(state.get("tensors")))
        self.tensors = dict(state.get("tensors") or {}) if held else None


LOOP = "loop"


class Run:
    """The phases of one run folder and its checkpoints; only the main process writes."""

    def __init__(self, directory: Path, signature: dict[str, Any], *, is_main: bool, keep: int, metrics: MetricsWriter):
        self.checkpointer = Checkpointer(Path(directory) / "checkpoints", keep=keep)
        self.signature = signature
        """``config.load.trajectory_signature``: what a resumed run must share with its checkpoint."""
        self.appended_tasks = 0
        """Tasks the config appends to the stream of the restored checkpoint (an extended stream)."""
        self.is_main = is_main
        self.logs: dict[str, MetricsWriter] = {"metrics": metrics}
        """Append-only JSONL files whose offsets each checkpoint records."""
        self.done: list[str] = []
        """Finished phases, e.g. ``["initial:eval", "t0:before", "t0:pref", "t0:after", "t0:eval"]``."""
        self.steps = StepCounter()
        self.parts: dict[str, Stateful] = {}
        self.position: dict[str, Any] = {}
        self._restored: Checkpoint | None = None
        self._loaded: set[str] = set()
        self._loop_resume: dict[str, Any] | None = None
        self._elapsed = 0.0
        self._t0 = time.monotonic()

    # ----- resume ------------------------------------------------------------------------------------------------
    def restore(self, resume: bool | str, strict: bool = False, allow_config_change: bool = False) -> bool:
        """``resume=True``: a valid checkpoint must exist; ``"auto"``: resume if one exists; ``False``: start fresh.

        Restores the run's own state (done phases, steps, time, metrics offset, a mid-stage loop state) and keeps the
        checkpoint for the parts registered afterwards. Returns whether a checkpoint was restored.
        """
        self.checkpointer.clean_stale_tmp()
        if not resume:
            return False
        try:
            ckpt = self.checkpointer.latest(strict=strict)
        except CheckpointError as exc:
            raise ResumeError(str(exc)) from None
        if ckpt is None:
            if resume == "auto":
                logger.info("no checkpoint in %s: starting fresh", self.checkpointer.root)
                return False
            raise ResumeError(f"no valid checkpoint in {self.checkpointer.root}")
        st = ckpt.state
        changes, self.appended_tasks = signature_changes(st["signature"], self.signature)
        if changes and not allow_config_change:
            raise ResumeError(
                f"{ckpt.path}: the config changed since this checkpoint: {', '.join(changes)} differ. Resume with the "
                "same config (appending tasks to the stream is allowed), or pass --allow-config-change"
            )
        self._restored = ckpt
        self.done = list(st["done"])
        self.position = dict(st["position"])
        self.steps.value = int(st["steps"])
        self._elapsed = float(st["elapsed"])
        for name, log in self.logs.items():
            log.truncate_to(st["logs"].get(name, 0))
        if st.get(LOOP):
            tensors = ckpt.tensors(LOOP)
            self._loop_resume = {
                **st[LOOP],
                "optimizer": ckpt.optimizer_state(),
                "ref_logps": tensors.get("ref_logps"),
                "phase": self.position["phase"],
            }
        for name, part in self.parts.items():
            self._load(name, part)
        logger.info("resumed from %s (phases done: %s)", ckpt.path, ", ".join(self.done[-4:]) or "none")
        return True

    def register_log(self, name: str, log: MetricsWriter) -> None:
        """Record ``log``'s offset in every checkpoint (and truncate it on resume). Register before ``restore``."""
        self.logs[name] = log

    def register(self, name: str, part: Stateful) -> bool:
        """Carry ``part`` in every checkpoint from now on; returns True when it was loaded from the restored one."""
        self.parts[name] = part
        return self._load(name, part)

    def unregister(self, name: str) -> None:
        self.parts.pop(name, None)

    def _load(self, name: str, part: Stateful) -> bool:
        ckpt = self._restored
        if ckpt is None or name in self._loaded or name not in ckpt.state.get("parts", {}):
            return False
        part.load_state_dict({"tensors": ckpt.tensors(name), "meta": ckpt.state["parts"][name]})
        self._loaded.add(name)
        return True

    @property
    def restored(self) -> bool:
        return self._restored is not None

    @property
    def elapsed(self) -> float:
        """Seconds spent in this run, over every resumed session."""
        return self._elapsed + (time.monotonic() - self._t0)

    # ----- phases --------------------------------------------------------------------------------------------------
    @property
    def phase_key(self) -> str:
        """The phase running now (or the last one that ran)."""
        return str(self.position.get("phase", ""))

    def phase(self, key: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` unless a checkpoint says phase ``key`` is done; commit a checkpoint after it."""
        if key in self.done:
            return
        self.position = {"phase": key}
        fn()
        self.done.append(key)
        self.position = {"phase": key, "finished": True}
        maybe_fault("phase", phase=key)
        self.commit()
        maybe_fault("after_save", phase=key)

    def take_resume(self) -> dict[str, Any] | None:
        """The restored mid-stage loop state if the checkpoint stopped inside the current phase (handed out once)."""
        if self._loop_resume is not None and self._loop_resume.get("phase") == self.phase_key:
            resume, self._loop_resume = self._loop_resume, None
            return resume
        return None

    def commit(self, loop: LoopCheckpoint | None = None) -> None:
        """Commit the run's whole position: every part, the run's state and, inside a stage, the loop's share."""
        if loop is not None:
            self.position = {"phase": self.phase_key, "stage_step": loop.state["stage_step"]}
        if not self.is_main:
            return
        states = {name: part.state_dict() for name, part in self.parts.items()}
        state = {
            "signature": self.signature,
            "done": list(self.done),
            "position": dict(self.position),
            "steps": self.steps.value,
            "elapsed": self.elapsed,
            "parts": {name: s.get("meta", {}) for name, s in states.items()},
            LOOP: loop.state if loop is not None else None,
            "logs": {name: log.offset for name, log in self.logs.items()},
        }
        tensors = {name: s.get("tensors", {}) for name, s in states.items()}
        if loop is not None:
            tensors[LOOP] = loop.tensors
        self.checkpointer.save(
            nan_to_null(state), {k: v for k, v in tensors.items() if v}, loop.optimizer if loop is not None else None
        )
