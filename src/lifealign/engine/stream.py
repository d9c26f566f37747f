"""``StreamRunner``: learn a stream of tasks with one continual method, evaluating every seen task after each one.

Per task ``i`` the phases of the method's :class:`~lifealign.engine.run.Run` are, in order: ``t<i>:before`` (plugin
``before_task``), ``t<i>:sft`` (optional), ``t<i>:pref`` (or ``t<i>:unlearn`` for a negative-only task), ``t<i>:after``
(plugin ``after_task``) and ``t<i>:eval`` (every scorer on every seen task, filling row ``i`` of each score matrix),
after an ``initial:eval`` of the untrained model (FWT's baseline). The run commits after every phase and every
``train.save_every`` steps inside a stage, so a killed run resumes at the phase and step where it stopped and never
redoes a finished evaluation. MTL (one joint stage over every task's data) and STL (a fresh adapter per task) run
the same phases.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lifealign.config.load import trajectory_signature
from lifealign.config.schema import RunConfig
from lifealign.data.records import PreferencePair, Task, TaskStream
from lifealign.engine.items import ITEMS_FILE, cell_record, read_items, uncertainty
from lifealign.engine.parts import AdapterPart, PluginStates
from lifealign.engine.run import JsonPart, Run, TensorPart
from lifealign.engine.specs import MethodSpec, sft_loss
from lifealign.engine.stages import UnlearnTask, train_stage, unlearn_stage
from lifealign.evaluation.drift import DriftTracker, measure_drift_with_items
from lifealign.evaluation.matrix import ScoreMatrix
from lifealign.evaluation.scorers import evaluate_task_with_items
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Shard, check_failures
from lifealign.models.lora import load_lora_state, lora_state, save_adapter
from lifealign.training.forward import adapter_swapped
from lifealign.training.loop import StageContext
from lifealign.training.metrics import MetricsWriter
from lifealign.training.plugin import PluginContext

__all__ = ["MethodRun", "StreamRunner"]

logger = logging.getLogger(__name__)


@dataclass
class MethodRun:
    """What one method's run has measured so far; a JSON part of every checkpoint."""

    scores: dict[str, list[list[float | None]]] = field(default_factory=dict)
    initial: dict[str, list[float | None]] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)
    stage_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    """``DriftTracker`` state: each task's log-likelihoods when it was learned."""
    n_tasks: int = 0
    """Tasks of the stream the matrices were sized for (a resumed run may append tasks)."""

    def grow(self, n: int) -> None:
        """Pad every matrix and initial vector to ``n`` tasks (``None`` = not evaluated)."""
        for metric, rows in self.scores.items():
            self.scores[metric] = [row + [None] * (n - len(row)) for row in rows] + _nan_matrix(n)[len(rows) :]
        for metric, vector in self.initial.items():
            self.initial[metric] = vector + [None] * (n - len(vector))
        self.n_tasks = n

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def load_json(self, d: dict[str, Any]) -> None:
        for k in self.__dataclass_fields__:
            if k in d:
                setattr(self, k, d[k])


def _nan_matrix(n: int) -> list[list[float | None]]:
    return [[None] * n for _ in range(n)]


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


class StreamRunner:
    """Runs one method over a task stream inside ``method_dir`` (checkpoints, metrics, adapter, run_info)."""

    def __init__(
        self,
        cfg: RunConfig,
        method: MethodSpec,
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
        self.acc, self.dir, self.init_adapter, self.scorers = accelerator, method_dir, init_adapter, scorers
        self.plugins = method.build_plugins()
        self.state = MethodRun()
        self.reference = TensorPart()
        """The ``previous`` reference policy's adapter state (None = the base model)."""
        self.reference_cache = reference_cache if reference_cache is not None else {}
        self.metrics = MetricsWriter(
            method_dir / "metrics.jsonl",
            tensorboard_dir=method_dir / "tensorboard" if cfg.train.tensorboard else None,
            enabled=accelerator.is_main_process,
        )
        self.items = MetricsWriter(method_dir / ITEMS_FILE, enabled=accelerator.is_main_process)
        """Per-item scores of every evaluated cell (``engine/items.py``)."""
        self.run = Run(
            method_dir,
            trajectory_signature(cfg, method.section),
            is_main=accelerator.is_main_process,
            keep=cfg.train.keep_checkpoints,
            metrics=self.metrics,
        )
        self.run.register_log("items", self.items)
        self.stage = StageContext(
            model=model,
            tokenizer=tokenizer,
            accelerator=accelerator,
            train=cfg.train,
            data=cfg.data,
            loss=method.loss,
            plugins=self.plugins,
            metrics=self.metrics.write,
            commit=self.run.commit,
            take_resume=self.run.take_resume,
            method_name=method.name,
            steps=self.run.steps,
            layout=method.layout(cfg.train.pair_layout),
            pack_tokens=cfg.train.pack_tokens,
        )
        self.sft_loss = sft_loss()
        self.run.register("runner", JsonPart(self.state.to_json, self.state.load_json))
        self.run.register("adapter", AdapterPart(self.stage.unwrapped))
        self.run.register("plugins", PluginStates(self.plugins))
        self.run.register("reference", self.reference)

    # ----- the run -----------------------------------------------------------------------------------------------
    def start(self, resume: bool | str, strict: bool = False, allow_config_change: bool = False) -> None:
        """Resume from the newest valid checkpoint (see ``Run.restore``), or start from the shared initial adapter.

        A checkpoint of a shorter stream whose tasks the config extends continues with the appended tasks: the
        matrices grow, the finished rows are kept, and the untrained model's row is completed for the new tasks.
        """
        if not self.run.restore(resume, strict, allow_config_change):
            load_lora_state(self.stage.unwrapped, self.init_adapter)
        self.state.grow(len(self.stream))

    def run_stream(self) -> dict[str, dict[str, Any]]:
        """The method's runner (sequential, MTL or STL); returns ``{metric: ScoreMatrix.summary()}``."""
        self.run.phase("initial:eval", lambda: self._evaluate(None, list(enumerate(self.stream))))
        missing = [(j, t) for j, t in enumerate(self.stream) if t.test and self._initial_missing(j)]
        if missing:  # tasks appended to a finished stream: the untrained model's scores on them (FWT's baseline)
            self.run.phase(f"initial:eval:{missing[0][0]}-{missing[-1][0]}", lambda: self._evaluate_initial(missing))
        runner = {"sequential": self._run_sequential, "mtl": self._run_mtl, "stl": self._run_stl}
        runner[self.method.section.runner]()
        if self.acc.is_main_process:
            save_adapter(self.stage.unwrapped, self.dir / "adapter")
        self.metrics.close()
        self.items.close()
        return self.summaries()

    def close(self) -> None:
        """Release what the plugins attached to the shared model (O-LoRA, L2P hooks)."""
        for plugin in self.plugins:
            plugin.close()

    def run_info(self) -> dict[str, Any]:
        """``run_info.json``: reference per task, stage summaries, time, and every plugin's report."""
        return {
            "references": self.state.references,
            "stages": self.state.stage_results,
            "elapsed_seconds": self.run.elapsed,
            "layout": self.stage.layout,
            "memory": {p.name: p.report() for p in self.plugins},
        }

    # ----- phases of a task ----------------------------------------------------------------------------------------
    def _plugin_ctx(self, task: Task, index: int) -> PluginContext:
        return PluginContext(
            model=self.stage.unwrapped,
            tokenizer=self.stage.tokenizer,
            task=task,
            task_index=index,
            seen_tasks=list(self.stream.tasks[: index + 1]),
            n_tasks=len(self.stream),
            loss=self.method.loss,
            data=self.cfg.data,
            autocast=self.acc.autocast,
            rank=self.acc.process_index,
            world_size=self.acc.num_processes,
            layout=self.stage.layout,
            pack_tokens=self.stage.pack_tokens,
        )

    def _before(self, ctx: PluginContext) -> None:
        i = ctx.task_index
        self.reference.tensors = None
        if self.method.section.reference == "previous" and i > 0:
            self.reference.tensors = lora_state(self.stage.unwrapped)
        for plugin in self.plugins:
            plugin.before_task(ctx)
        self.state.references[ctx.task.name] = self.method.section.reference if i > 0 else "base"

    def _skip_sft(self, ctx: PluginContext) -> None:
        """A negative-only task has no chosen responses to imitate: its SFT stage is skipped, logged and recorded
        (training it on the replay buffer alone, or on nothing, is not what ``sft.enabled`` asks for)."""
        reason = "negative-only task: no chosen responses to imitate"
        logger.info("task %r: SFT stage skipped (%s)", ctx.task.name, reason)
        self.state.stage_results[f"t{ctx.task_index}:sft"] = {"skipped": reason, "steps": 0}

    def _after(self, ctx: PluginContext) -> None:
        for plugin in self.plugins:
            plugin.after_task(ctx)

    def _stage_context(self) -> StageContext:
        return replace(self.stage, reference_state=self.reference.tensors)

    def _train(self, ctx: PluginContext, name: str, records: list[PreferencePair]) -> None:
        loss = self.sft_loss if name == "sft" else self.method.loss
        summary = train_stage(self.cfg, self._stage_context(), ctx, name, loss, records)
        self.state.stage_results[f"t{ctx.task_index}:{name}"] = summary

    def _unlearn(self, ctx: PluginContext) -> None:
        key = f"t{ctx.task_index}:unlearn"
        anchor = TensorPart()
        restored = self.run.register("unlearn_anchor", anchor)
        entry = self.state.stage_results.get(key, {})
        if entry and not restored:
            raise RuntimeError(f"{key}: resuming an unlearning stage whose starting adapter is not in the checkpoint")
        if not restored:
            anchor.tensors = lora_state(self.stage.unwrapped)

        def record(summary: dict[str, Any]) -> None:
            self.state.stage_results[key] = summary
            self.run.commit()

        job = UnlearnTask(ctx.task, self.stream.tasks[: ctx.task_index], entry, anchor.tensors or {}, record)
        try:
            self.state.stage_results[key] = unlearn_stage(self.cfg, self._stage_context(), ctx, job)
        finally:
            self.run.unregister("unlearn_anchor")

    def _task_phases(self, i: int, task: Task) -> None:
        ctx = self._plugin_ctx(task, i)
        self.run.phase(f"t{i}:before", lambda: self._before(ctx))
        records = list(task.train)
        if self.cfg.sft.enabled and task.kind == "negative":
            self.run.phase(f"t{i}:sft", lambda: self._skip_sft(ctx))
        elif self.cfg.sft.enabled:
            sft_records = [r for r in records if r.chosen.strip()]
            self.run.phase(f"t{i}:sft", lambda: self._train(ctx, "sft", sft_records))
        if task.kind == "pairwise":
            self.run.phase(f"t{i}:pref", lambda: self._train(ctx, "pref", records))
        else:
            self.run.phase(f"t{i}:unlearn", lambda: self._unlearn(ctx))
        self.run.phase(f"t{i}:after", lambda: self._after(ctx))

    def _run_sequential(self) -> None:
        for i, task in enumerate(self.stream):
            self._task_phases(i, task)
            self.run.phase(f"t{i}:eval", lambda i=i: self._evaluate(i, self._eval_tasks(i)))

    def _run_mtl(self) -> None:
        """Multi-task learning: one joint stage over the union of all tasks' data, evaluated on every task."""
        last = len(self.stream) - 1
        joint = Task(name="mtl", train=[r for t in self.stream for r in t.train], test=[], kind="pairwise")
        self._task_phases(last, joint)
        self.run.phase(f"t{last}:eval", lambda: self._evaluate(last, list(enumerate(self.stream))))

    def _run_stl(self) -> None:
        """Single-task learning: a fresh adapter per task, evaluated on its own task (the diagonal)."""
        for i, task in enumerate(self.stream):
            if f"t{i}:before" not in self.run.done:
                load_lora_state(self.stage.unwrapped, self.init_adapter)
            self._task_phases(i, task)
            self.run.phase(f"t{i}:eval", lambda i=i, task=task: self._evaluate(i, [(i, task)]))

    # ----- evaluation ------------------------------------------------------------------------------------------------
    def _initial_missing(self, j: int) -> bool:
        return bool(self.state.initial) and all(vector[j] is None for vector in self.state.initial.values())

    def _evaluate_initial(self, tasks: list[tuple[int, Task]]) -> None:
        """Score ``tasks`` with the initial adapter swapped in (the untrained model), then restore the current one."""
        with adapter_swapped(self.stage.unwrapped, self.init_adapter):
            self._evaluate(None, tasks)

    def _eval_tasks(self, i: int) -> list[tuple[int, Task]]:
        if self.cfg.eval.on == "all":
            return list(enumerate(self.stream))
        return [(j, t) for j, t in enumerate(self.stream) if j <= i]

    def _evaluate(self, row: int | None, tasks: list[tuple[int, Task]]) -> None:
        """Score ``tasks`` with every scorer (``row=None``: the initial model, FWT's baseline); per-item values go to
        ``items.jsonl``. A metric that failed on every item of a task is an error once all are written."""
        ctx = EvalContext(
            model=self.stage.unwrapped,
            tokenizer=self.stage.tokenizer,
            data=self.cfg.data,
            eval=self.cfg.eval,
            reference_cache=self.reference_cache,
            shard=Shard(self.acc.process_index, self.acc.num_processes),
            layout=self.stage.layout,
            pack_tokens=self.stage.pack_tokens,
        )
        tracker = DriftTracker()
        tracker.load_state_dict(self.state.drift)
        learned = {j for j, _ in tasks} if self.method.section.runner == "mtl" else {row}
        evaluated: list[tuple[Task, dict[str, ItemScores]]] = []
        after = f"after {self.stream[row].name}" if row is not None else "untrained"
        bar = tqdm(
            tasks,
            desc=f"{self.method.name} eval ({after})",
            disable=True if not (self.cfg.train.progress and self.acc.is_main_process) else None,
            leave=False,
        )
        for j, task in bar:
            if not task.test:
                continue
            with self.acc.autocast():  # evaluate in the run's precision (bf16 runs score under bf16 autocast)
                scores, items = evaluate_task_with_items(ctx, task, self.scorers)
                if self.cfg.eval.drift and row is not None:
                    drift, drift_items = measure_drift_with_items(ctx, task, tracker, just_learned=j in learned)
                    scores, items = {**scores, **drift}, {**items, **drift_items}
            self._record(row, j, task, scores, items)
            evaluated.append((task, items))
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
        for task, items in evaluated:
            for metric, values in items.items():
                check_failures(task.name, metric, values)

    def _record(
        self, row: int | None, j: int, task: Task, scores: dict[str, float], items: dict[str, ItemScores]
    ) -> None:
        n = len(self.stream)
        for metric, value in scores.items():
            if row is None:
                self.state.initial.setdefault(metric, [None] * n)[j] = _finite_or_none(value)
            else:
                self.state.scores.setdefault(metric, _nan_matrix(n))[row][j] = _finite_or_none(value)
        after = self.stream[row].name if row is not None else None
        for metric, values in items.items():
            self.items.write(cell_record(metric, task.name, j, row, after, values))

    def summaries(self) -> dict[str, dict[str, Any]]:
        """``{metric: {"matrix", "bwt", "last", "ap", "fwt", "forgetting", ..., "*_se", "*_ci", "n_items"}}``."""
        conventions = self.cfg.eval.conventions.model_dump()
        items = read_items(self.dir / ITEMS_FILE) if self.acc.is_main_process else []
        out = {}
        for metric, rows in self.state.scores.items():
            matrix = ScoreMatrix(
                tasks=self.stream.names,
                matrix=[[float("nan") if v is None else v for v in row] for row in rows],
                initial=[float("nan") if v is None else v for v in self.state.initial.get(metric, [])] or None,
            )
            summary = matrix.summary(conventions={k: conventions[k] for k in ("bwt", "forgetting", "fwt")})
            if self.method.section.runner == "stl":
                diag = [rows[i][i] for i in range(len(rows)) if rows[i][i] is not None]
                summary.update(bwt=None, ap=None, fwt=None, last=(sum(diag) / len(diag)) if diag else None)
            elif items:
                summary.update(self._uncertainty(items, metric, summary["conventions"]))
            if metric in conventions:
                summary["convention"] = conventions[metric]
            out[metric] = summary
        return out

    def _uncertainty(self, items: list[dict[str, Any]], metric: str, conventions: dict[str, str]) -> dict[str, Any]:
        ev = self.cfg.eval
        return uncertainty([items], metric, len(self.stream), conventions, n_boot=ev.n_boot, level=ev.ci_level)
