"""``run_stream``: learn a stream of tasks with one continual method, evaluating every seen task after each one.

Per task ``i`` the phases are, in order: ``before`` (plugin ``before_task``), ``sft`` (optional), ``pref`` (or
``unlearn`` for negative-only tasks, via the unlearning module), ``after`` (plugin ``after_task``), ``eval`` (every
scorer on every seen task, filling row ``i`` of each score matrix). A checkpoint is committed after every phase
and every ``train.save_every`` steps inside a stage, so a killed run resumes at the phase and step where it
stopped and never redoes a finished evaluation. MTL (one joint stage) and STL (one fresh adapter per task) are
runners over the same loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lifealign.config.load import trajectory_hash
from lifealign.config.schema import LossTerm, MethodSection, RunConfig
from lifealign.data.records import PreferencePair, Task, TaskStream
from lifealign.data.tokenize import tokenize_pairs
from lifealign.evaluation.drift import DriftTracker, measure_drift
from lifealign.evaluation.matrix import ScoreMatrix
from lifealign.evaluation.scorers.base import EvalContext, Shard
from lifealign.losses import bind_losses
from lifealign.models.lora import load_lora_state, lora_state, save_adapter
from lifealign.training.checkpoint import Checkpointer, CheckpointError
from lifealign.training.faults import maybe_fault
from lifealign.training.loop import LoopServices, StagePlan, train_task
from lifealign.training.metrics import MetricsWriter
from lifealign.training.plugin import Plugin, PluginContext

logger = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run (no valid checkpoint, or the config changed)."""


@dataclass
class MethodRun:
    """Mutable state of one method's run over the stream; serialised into every checkpoint's ``state.json``."""

    done: list[str] = field(default_factory=list)
    """Finished phases, e.g. ``["t0:before", "t0:pref", "t0:after", "t0:eval"]``."""
    scores: dict[str, list[list[float | None]]] = field(default_factory=dict)
    initial: dict[str, list[float | None]] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)
    stage_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    """``DriftTracker`` state: each task's log-likelihoods when it was learned."""
    global_step: int = 0
    elapsed: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MethodRun:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def build_plugins(method: MethodSection) -> list[Plugin]:
    """Instantiate the method's plugins from the registry, in config order (errors name the key)."""
    from lifealign.continual import METHODS

    plugins = []
    for i, spec in enumerate(method.plugins):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in METHODS:
            raise ValueError(f"method.plugins.{i}.name: unknown plugin {name!r}; available: {sorted(METHODS)}")
        try:
            plugins.append(METHODS[name](**spec))
        except TypeError as exc:
            raise ValueError(f"method.plugins.{i} ({name}): {exc}") from None
    return plugins


def _nan_matrix(n: int) -> list[list[float | None]]:
    return [[None] * n for _ in range(n)]


def _finite_or_none(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


class StreamRunner:
    """Runs one method over a task stream inside ``method_dir`` (checkpoints, metrics, adapter)."""

    def __init__(
        self,
        cfg: RunConfig,
        method: MethodSection,
        stream: TaskStream,
        model: torch.nn.Module,
        tokenizer: Any,
        accelerator: Any,
        method_dir: Path,
        init_adapter: dict[str, torch.Tensor],
        scorers: list[Any],
        reference_cache: dict | None = None,
    ):
        self.cfg, self.method, self.stream = cfg, method, stream
        self.model, self.tokenizer, self.acc = model, tokenizer, accelerator
        self.dir = method_dir
        self.init_adapter = init_adapter
        self.scorers = scorers
        self.plugins = build_plugins(method)
        self.loss = bind_losses(method.loss, "method.loss")
        self.sft_loss = bind_losses([LossTerm(name="sft")], "sft")
        self.state = MethodRun()
        self.checkpointer = Checkpointer(method_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.metrics = MetricsWriter(
            method_dir / "metrics.jsonl",
            tensorboard_dir=method_dir / "tensorboard" if cfg.train.tensorboard else None,
            enabled=accelerator.is_main_process,
        )
        self.reference_state: dict[str, torch.Tensor] | None = None
        self.reference_cache = reference_cache if reference_cache is not None else {}
        self._loop_resume: dict[str, Any] | None = None
        self._position: dict[str, Any] = {}
        self._t0 = time.monotonic()

    # ----- checkpoints -------------------------------------------------------------------------------------
    def _plugin_tensors(self) -> tuple[dict[str, torch.Tensor], list[Any]]:
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for i, plugin in enumerate(self.plugins):
            state = plugin.state_dict()
            for k, v in state.get("tensors", {}).items():
                tensors[f"{i}.{k}"] = v
            metas.append(state.get("meta", {}))
        return tensors, metas

    def save(self, loop_state: dict[str, Any] | None = None, loop_tensors=None, optimizer_state=None) -> None:
        """Commit the run's whole position: adapter, plugins, runner state, loop state, metrics offset."""
        if not self.acc.is_main_process:
            return
        plugin_tensors, plugin_meta = self._plugin_tensors()
        self.state.global_step = self.services.global_step if hasattr(self, "services") else self.state.global_step
        self.state.elapsed += time.monotonic() - self._t0
        self._t0 = time.monotonic()
        state = {
            "config_hash": trajectory_hash(self.cfg, self.method),
            "method": self.method.name,
            "position": self._position,
            "run": self.state.to_json(),
            "plugins": plugin_meta,
            "loop": loop_state,
            "metrics_offset": self.metrics.offset,
        }
        tensors = {"adapter": lora_state(self.acc.unwrap_model(self.model)), "plugins": plugin_tensors}
        if self.reference_state is not None:
            tensors["reference"] = self.reference_state
        if loop_tensors:
            tensors["loop"] = loop_tensors
        self.checkpointer.save(state, {k: v for k, v in tensors.items() if v}, optimizer_state)

    def restore(self, strict: bool = False, allow_config_change: bool = False) -> bool:
        """Load the newest valid checkpoint; False when there is none."""
        self.checkpointer.clean_stale_tmp()
        ckpt = self.checkpointer.latest(strict=strict)
        if ckpt is None:
            return False
        st = ckpt.state
        if st.get("config_hash") != trajectory_hash(self.cfg, self.method) and not allow_config_change:
            raise ResumeError(
                f"{ckpt.path}: the run's config changed since this checkpoint (a trajectory-affecting key of "
                "model/data/tasks/method/train/sft/unlearn differs); resume with the same config or pass --allow-config-change"
            )
        load_lora_state(self.acc.unwrap_model(self.model), ckpt.tensors("adapter"))
        plugin_tensors = ckpt.tensors("plugins")
        for i, plugin in enumerate(self.plugins):
            prefix = f"{i}."
            plugin.load_state_dict(
                {
                    "tensors": {k[len(prefix) :]: v for k, v in plugin_tensors.items() if k.startswith(prefix)},
                    "meta": st["plugins"][i] if i < len(st["plugins"]) else {},
                }
            )
        ref = ckpt.tensors("reference")
        self.reference_state = ref or None
        self.state = MethodRun.from_json(st["run"])
        self.metrics.truncate_to(st["metrics_offset"])
        if st.get("loop"):
            loop = dict(st["loop"])
            loop["optimizer"] = ckpt.optimizer_state()
            loop["ref_logps"] = ckpt.tensors("loop").get("ref_logps")
            loop["phase"] = st["position"]["phase"]
            self._loop_resume = loop
        logger.info("resumed from %s (phases done: %s)", ckpt.path, ", ".join(self.state.done[-4:]) or "none")
        return True

    # ----- phases ------------------------------------------------------------------------------------------
    def _ctx(self, task: Task, index: int, seen: list[Task]) -> PluginContext:
        return PluginContext(
            model=self.acc.unwrap_model(self.model),
            tokenizer=self.tokenizer,
            task=task,
            task_index=index,
            seen_tasks=seen,
            config=self.cfg,
            extras={"loss": self.loss, "accelerator": self.acc},
        )

    def take_loop_resume(self, key: str) -> dict[str, Any] | None:
        """The restored mid-stage loop state if the checkpoint stopped inside phase ``key`` (handed out once)."""
        if self._loop_resume is not None and self._loop_resume.get("phase") == key:
            resume, self._loop_resume = self._loop_resume, None
            return resume
        return None

    def mark_position(self, key: str, **where: Any) -> None:
        """Record where inside phase ``key`` the next checkpoint is taken (``stage_step=…``, ``committed=True``)."""
        self._position = {"phase": key, **where}

    def _phase(self, key: str, fn: Callable[[], None]) -> None:
        """Run a phase unless a checkpoint says it is done; commit a checkpoint after it."""
        if key in self.state.done:
            return
        self.mark_position(key)
        fn()
        self.state.done.append(key)
        self.mark_position(key, finished=True)
        maybe_fault("phase", phase=key)
        self.save()
        maybe_fault("after_save", phase=key)

    def _train_stage(
        self, key: str, task: Task, index: int, stage: str, records: list[PreferencePair], ctx: PluginContext
    ) -> None:
        cfg = self.cfg
        loss = self.sft_loss if stage == "sft" else self.loss
        for plugin in self.plugins:
            ctx.stage = stage
            records = plugin.train_data(ctx, records)
        tokenized = tokenize_pairs(records, self.tokenizer, cfg.data, sides=loss.uses)
        if not tokenized.examples:
            raise ValueError(f"task {task.name!r}, stage {stage}: no trainable examples after tokenisation")
        lr = cfg.sft.lr if stage == "sft" else cfg.train.lr
        epochs = cfg.sft.epochs if stage == "sft" else cfg.train.epochs
        max_steps = cfg.sft.max_steps if stage == "sft" else cfg.train.max_steps
        plan = StagePlan(index, task, stage, loss, lr, epochs, max_steps, reference_state=self.reference_state)
        resume = self.take_loop_resume(key)

        def save_checkpoint(loop_state, loop_tensors, optimizer_state):
            self.mark_position(key, stage_step=loop_state["stage_step"])
            self.save(loop_state, loop_tensors, optimizer_state)

        self.services.save_checkpoint = save_checkpoint
        result = train_task(self.model, tokenized.examples, plan, self.services, ctx, resume=resume)
        self.state.stage_results[key] = {
            "steps": result.steps,
            "examples": len(tokenized.examples),
            "nonfinite_skipped": result.nonfinite_skipped,
            "tokenization": dict(tokenized.stats),
            **{k: _finite_or_none(v) for k, v in result.last_metrics.items()},
        }

    def _evaluate(self, row: int | None, tasks: list[tuple[int, Task]]) -> None:
        """Score ``tasks`` with every scorer; ``row=None`` fills the initial-model vector (for FWT)."""
        model = self.acc.unwrap_model(self.model)
        ctx = EvalContext(
            model=model,
            tokenizer=self.tokenizer,
            data=self.cfg.data,
            eval=self.cfg.eval,
            reference_cache=self.reference_cache,
            shard=Shard(self.acc.process_index, self.acc.num_processes),
        )
        n = len(self.stream)
        tracker = DriftTracker()
        tracker.load_state_dict(self.state.drift)
        learned = {j for j, _ in tasks} if self.method.runner == "mtl" else {row}
        for j, task in tasks:
            if not task.test:
                continue
            scores: dict[str, float] = {}
            with self.acc.autocast():  # evaluate in the run's precision (bf16 runs score under bf16 autocast)
                for scorer in self.scorers:
                    scores.update(scorer.score(ctx, task))
                if self.cfg.eval.drift and row is not None:
                    scores.update(measure_drift(ctx, task, tracker, just_learned=j in learned))
            for metric, value in scores.items():
                if row is None:
                    self.state.initial.setdefault(metric, [None] * n)[j] = _finite_or_none(value)
                else:
                    self.state.scores.setdefault(metric, _nan_matrix(n))[row][j] = _finite_or_none(value)
        self.state.drift = tracker.state_dict()
        if self.acc.is_main_process and row is not None:
            self.metrics.write(
                {
                    "event": "eval",
                    "method": self.method.name,
                    "after_task": self.stream[row].name,
                    "task_index": row,
                    "scores": {m: rows[row] for m, rows in self.state.scores.items()},
                }
            )

    def _eval_tasks(self, i: int) -> list[tuple[int, Task]]:
        if self.cfg.eval.on == "all":
            return list(enumerate(self.stream))
        return [(j, t) for j, t in enumerate(self.stream) if j <= i]

    # ----- runners -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, dict[str, Any]]:
        """Run the method's runner (sequential, MTL or STL) and return ``{metric: ScoreMatrix.summary()}``."""
        self.services = LoopServices(
            accelerator=self.acc,
            tokenizer=self.tokenizer,
            train_cfg=self.cfg.train,
            plugins=self.plugins,
            write_metrics=self.metrics.write,
            save_checkpoint=lambda *a: None,
            method_name=self.method.name,
            global_step=self.state.global_step,
        )
        if not self.state.done:
            load_lora_state(self.acc.unwrap_model(self.model), self.init_adapter)
        self._phase("initial:eval", lambda: self._evaluate(None, list(enumerate(self.stream))))
        runner = {"sequential": self._run_sequential, "mtl": self._run_mtl, "stl": self._run_stl}[self.method.runner]
        runner()
        self.state.elapsed += time.monotonic() - self._t0
        self._t0 = time.monotonic()
        if self.acc.is_main_process:
            save_adapter(self.acc.unwrap_model(self.model), self.dir / "adapter")
        self.metrics.close()
        return self.summaries()

    def _task_phases(self, i: int, task: Task, joint: list[Task] | None = None) -> None:
        seen = list(self.stream.tasks[: i + 1])
        ctx = self._ctx(task, i, seen)

        def before() -> None:
            self.reference_state = None
            if self.method.reference == "previous" and i > 0:
                self.reference_state = lora_state(self.acc.unwrap_model(self.model))
            for plugin in self.plugins:
                plugin.before_task(ctx)
            self.state.references[task.name] = self.method.reference if i > 0 else "base"

        self._phase(f"t{i}:before", before)
        records = list(task.train)
        if self.cfg.sft.enabled:
            sft_records = [r for r in records if r.chosen.strip()]
            self._phase(f"t{i}:sft", lambda: self._train_stage(f"t{i}:sft", task, i, "sft", sft_records, ctx))
        stage = "pref" if task.kind == "pairwise" else "unlearn"
        if stage == "unlearn":
            from lifealign.unlearning.stream import unlearn_stage

            self._phase(f"t{i}:unlearn", lambda: unlearn_stage(self, task, i, ctx))
        else:
            self._phase(f"t{i}:pref", lambda: self._train_stage(f"t{i}:pref", task, i, "pref", records, ctx))

        def after() -> None:
            for plugin in self.plugins:
                plugin.after_task(ctx)

        self._phase(f"t{i}:after", after)

    def _run_sequential(self) -> None:
        for i, task in enumerate(self.stream):
            self._task_phases(i, task)
            self._phase(f"t{i}:eval", lambda i=i: self._evaluate(i, self._eval_tasks(i)))

    def _run_mtl(self) -> None:
        """Multi-task learning: one joint stage over the union of all tasks' data, evaluated on every task."""
        last = len(self.stream) - 1
        joint = Task(
            name="mtl",
            train=[r for t in self.stream for r in t.train],
            test=[],
            kind="pairwise",
        )
        self._task_phases(last, joint)
        self._phase(f"t{last}:eval", lambda: self._evaluate(last, list(enumerate(self.stream))))

    def _run_stl(self) -> None:
        """Single-task learning: a fresh adapter per task, evaluated on its own task (the diagonal)."""
        for i, task in enumerate(self.stream):
            if f"t{i}:before" not in self.state.done:
                load_lora_state(self.acc.unwrap_model(self.model), self.init_adapter)
            self._task_phases(i, task)
            self._phase(f"t{i}:eval", lambda i=i, task=task: self._evaluate(i, [(i, task)]))

    def summaries(self) -> dict[str, dict[str, Any]]:
        """``{metric: {"matrix", "bwt", "last", "ap", "fwt", "forgetting", ...}}`` for this method."""
        out = {}
        names = self.stream.names
        for metric, rows in self.state.scores.items():
            matrix = ScoreMatrix(
                tasks=names,
                matrix=[[float("nan") if v is None else v for v in row] for row in rows],
                initial=[float("nan") if v is None else v for v in self.state.initial.get(metric, [])] or None,
            )
            out[metric] = matrix.summary()
            if self.method.runner == "stl":
                diag = [rows[i][i] for i in range(len(rows)) if rows[i][i] is not None]
                out[metric].update(bwt=None, ap=None, fwt=None, last=(sum(diag) / len(diag)) if diag else None)
        return out


def resume_or_start(runner: StreamRunner, resume: bool | str, strict: bool, allow_config_change: bool) -> None:
    """``resume=True``: a valid checkpoint must exist; ``"auto"``: resume if one exists, else start fresh."""
    if not resume:
        runner.checkpointer.clean_stale_tmp()
        return
    try:
        found = runner.restore(strict=strict, allow_config_change=allow_config_change)
    except CheckpointError as exc:
        raise ResumeError(str(exc)) from None
    if not found:
        if resume == "auto":
            logger.info("no checkpoint in %s: starting fresh", runner.checkpointer.root)
            return
        raise ResumeError(f"no valid checkpoint in {runner.checkpointer.root}")
