"""The whole job behind ``lifealign run`` and ``lifealign train``: config → data + model → methods → scores → report.

Output folder layout (``run_dir``)::

    config.yaml          the resolved config (secrets redacted)
    data_summary.json    records read / skipped by reason per task
    scores.json          {"<method>": {"<metric>": {"matrix", "bwt", "last", "ap", "fwt", ...}}}
    report.md, *.png     tables and heatmaps
    <method>/            metrics.jsonl, checkpoints/, adapter/ (peft format), run_info.json
                         (with a single method these live directly in run_dir)
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from lifealign.config.load import signature_changes, trajectory_signature
from lifealign.config.schema import RunConfig
from lifealign.config.secrets import known_secrets, redact
from lifealign.data.records import TaskStream
from lifealign.data.sources import load_stream
from lifealign.engine.aggregate import comparisons, seed_summary
from lifealign.engine.items import ITEMS_FILE, read_items
from lifealign.engine.run import ResumeError
from lifealign.engine.rundir import claim_run_dir
from lifealign.engine.specs import bind_config
from lifealign.engine.stream import StreamRunner
from lifealign.evaluation.scorers import build_scorers as build_named_scorers
from lifealign.models.lora import lora_state
from lifealign.report.markdown import write_report
from lifealign.report.results import COMPARISONS_FILE, write_scores
from lifealign.training.checkpoint import Checkpointer
from lifealign.utils.jsonio import nan_to_null

logger = logging.getLogger(__name__)


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def write_resolved_config(cfg: RunConfig, run_dir: Path) -> None:
    """``run_dir/config.yaml``: the resolved config, with secret-named keys and known secret values redacted."""
    clean = redact(cfg.model_dump(mode="json"), known_secrets(cfg))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(clean, sort_keys=False))


def _data_summary(stream: TaskStream) -> dict[str, Any]:
    return {
        t.name: {"train": len(t.train), "test": len(t.test), "kind": t.kind, "skipped": dict(t.skipped)} for t in stream
    }


def build_scorers(cfg: RunConfig) -> list[Any]:
    """The scorers of ``eval.scorers``, with the text metrics' conventions of ``eval.conventions``."""
    conventions = cfg.eval.conventions
    return build_named_scorers(
        cfg.eval.scorers, conventions={"bleu4": conventions.bleu4, "rouge_l": conventions.rouge_l}
    )


def make_accelerator(cfg: RunConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # On a machine without CUDA, processes started by torchrun / `accelerate launch --multi_gpu` form a gloo group.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def load_base_with_adapter(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    """The base model + a freshly initialised LoRA adapter (seeded, so every method starts from the same one)."""
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(model, cfg.model.lora)
    return model, tokenizer


@dataclass(frozen=True)
class StreamRun:
    """One run of the stream inside the run folder: its sub-folder (``""``, ``seed-<s>``, ``order-<k>/seed-<s>``),
    its config (seed and task order applied) and the order it belongs to."""

    folder: str
    cfg: RunConfig
    order: int = 0


def task_orders(cfg: RunConfig, k: int) -> list[list[str]]:
    """``k`` task orders: the config's own, then the ones named in ``orders:``, then seeded permutations."""
    names = [t.name for t in cfg.tasks]
    orders = [names] + [list(o) for o in cfg.orders if list(o) != names]
    rng = random.Random(f"orders:{cfg.train.seed}")
    while len(orders) < k:
        candidate = rng.sample(names, len(names))
        if candidate not in orders or len(orders) >= math.factorial(len(names)):
            orders.append(candidate)
    return orders[:k]


def plan_runs(cfg: RunConfig, seeds: Sequence[int] | None = None, orders: int | None = None) -> list[StreamRun]:
    """The runs of ``lifealign run CONFIG [--seeds 1,2,3] [--orders K]``: one per (order, seed)."""
    if not seeds and (orders or 1) == 1:
        return [StreamRun("", cfg)]
    seeds = list(seeds or [cfg.train.seed])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: repeated seed in {seeds}")
    by_name = {t.name: t for t in cfg.tasks}
    runs = []
    for k, order in enumerate(task_orders(cfg, orders or 1)):
        for seed in seeds:
            folder = f"seed-{seed}" if (orders or 1) == 1 else f"order-{k}/seed-{seed}"
            update = {"tasks": [by_name[n] for n in order], "train": cfg.train.model_copy(update={"seed": seed})}
            runs.append(StreamRun(folder, cfg.model_copy(update=update), k))
    return runs


@dataclass
class StreamResult:
    """What one run of the stream left: per method its scores, its folder and its runner (sequential/MTL/STL)."""

    scores: dict[str, dict[str, Any]]
    dirs: dict[str, Path]
    runners: dict[str, str]
    timings: dict[str, float]


def _run_stream(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool | str,
    strict_resume: bool,
    allow_config_change: bool,
    methods: Sequence[str] | None = None,
) -> StreamResult:
    """Every method of ``cfg`` (or those named in ``methods``) over its stream in ``run_dir``; writes the run's files
    but no report. A config of several methods keeps one folder per method even when ``methods`` names one, so a
    method run alone resumes and is aggregated like one run with the others."""
    every = bind_config(cfg)
    specs = [spec for spec in every if not methods or spec.name in methods]
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    stream = load_stream(cfg.tasks, cfg.data, seed=cfg.train.seed)
    accelerator = make_accelerator(cfg)
    method_dirs = {spec.name: run_dir if len(every) == 1 else run_dir / spec.name for spec in specs}
    check_resumable(cfg, specs, method_dirs, resume, allow_config_change)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_resolved_config(cfg, run_dir)
        (run_dir / "data_summary.json").write_text(json.dumps(_data_summary(stream), indent=2))
    model, tokenizer = load_base_with_adapter(cfg)
    model = accelerator.prepare(model)
    init_adapter = lora_state(accelerator.unwrap_model(model))
    scorers = build_scorers(cfg)
    result = StreamResult({}, method_dirs, {s.name: s.section.runner for s in specs}, {})
    reference_cache: dict = {}
    for spec in specs:
        method_dir = method_dirs[spec.name]
        method_dir.mkdir(parents=True, exist_ok=True)
        runner = StreamRunner(
            cfg, spec, stream, model, tokenizer, accelerator, method_dir, init_adapter, scorers, reference_cache
        )
        runner.start(resume, strict_resume, allow_config_change)
        result.scores[spec.name] = runner.run_stream()
        runner.close()
        result.timings[spec.name] = runner.run.elapsed
        if accelerator.is_main_process:
            (method_dir / "run_info.json").write_text(json.dumps(runner.run_info(), indent=2, default=str))
    if accelerator.is_main_process:
        write_scores(run_dir, result.scores)
    accelerator.wait_for_everyone()
    return result


def check_resumable(
    cfg: RunConfig, specs: Sequence[Any], method_dirs: Mapping[str, Path], resume: bool | str, allow_change: bool
) -> None:
    """Refuse a resume whose config differs from a method's checkpoint before anything is written, naming the keys."""
    if not resume or allow_change:
        return
    for spec in specs:
        ckpt = Checkpointer(method_dirs[spec.name] / "checkpoints").latest()
        if ckpt is None:
            continue
        changes, _ = signature_changes(ckpt.state["signature"], trajectory_signature(cfg, spec.section))
        if changes:
            raise ResumeError(
                f"{spec.name}: the config changed since {ckpt.path}: {', '.join(changes)} differ. Resume with the "
                "same config (appending tasks to the stream is allowed), or pass --allow-config-change"
            )


def _items(result: StreamResult, method: str) -> list[dict[str, Any]]:
    return read_items(result.dirs[method] / ITEMS_FILE)


def _seed_scores(results: Sequence[StreamResult], cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Per method and metric, the hierarchical (seeds, then items) summary of one order's runs."""
    tasks = [t.name for t in cfg.tasks]
    out: dict[str, dict[str, Any]] = {}
    for method in results[0].scores:
        runs = [_items(r, method) for r in results]
        out[method] = {}
        for metric in results[0].scores[method]:
            summary = seed_summary(runs, metric, tasks, cfg)
            if summary is None:
                continue
            if results[0].runners[method] == "stl":
                diag = [v for v in (summary["matrix"][i][i] for i in range(len(tasks))) if math.isfinite(v)]
                summary.update(bwt=None, ap=None, fwt=None, last=sum(diag) / len(diag) if diag else None)
                for key in ("bwt", "ap", "fwt", "last"):
                    summary.pop(f"{key}_se", None), summary.pop(f"{key}_ci", None)
            out[method][metric] = summary
    return out


def _comparisons(results: Sequence[StreamResult], cfg: RunConfig) -> dict[str, Any]:
    first = results[0]
    sequential = [m for m, runner in first.runners.items() if runner == "sequential"]
    runs = {m: [_items(r, m) for r in results] for m in sequential}
    return comparisons(runs, [t.name for t in cfg.tasks], cfg, sequential)


def _across_orders(per_order: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of each method's BWT / Last / AP over task orders, with the between-order SE and a t interval."""
    out: dict[str, Any] = {}
    for method, metrics in per_order[0].items():
        for metric in metrics:
            entry = {}
            for key in ("bwt", "last", "ap"):
                values = [o[method][metric].get(key) for o in per_order if metric in o.get(method, {})]
                values = [v for v in values if v is not None and math.isfinite(v)]
                if len(values) < 2:
                    continue
                mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
                t = _T975.get(len(values) - 1, 1.96)
                entry.update({key: mean, f"{key}_se": se, f"{key}_ci": [mean - t * se, mean + t * se]})
            out.setdefault(method, {})[metric] = {**entry, "n_orders": len(per_order)}
    return out


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95% Student-t quantiles for the across-order interval (few orders)."""


def run_experiment(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
    strict_resume: bool = False,
    allow_config_change: bool = False,
    report: bool = True,
    seeds: Sequence[int] | None = None,
    orders: int | None = None,
    overwrite: bool = False,
    methods: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every method of ``cfg`` over its task stream — once, or once per seed (``seeds``) and task order
    (``orders``), each in its own resumable folder — and write ``scores.json`` (intervals from the per-item scores,
    hierarchical over seeds), ``comparisons.json`` (paired tests, power) and the report; returns ``scores.json``.
    ``methods``: run and report only these of the config's methods (each still in its own folder)."""
    run_dir = Path(out_dir or cfg.output_dir)
    names = [spec.name for spec in bind_config(cfg)]
    unknown = sorted(set(methods or ()) - set(names))
    if unknown:
        raise ValueError(f"methods: {unknown} not in the config, which has {names}")
    if not cfg.tasks:
        raise ValueError("tasks: the config lists no task")
    runs = plan_runs(cfg, seeds, orders)
    with claim_run_dir(run_dir, resume=resume, overwrite=overwrite):
        started = time.monotonic()
        nested = any(r.folder for r in runs)  # seed-<s>/, order-<k>/seed-<s>/: even one seed is in a sub-folder
        sub_resume: bool | str = "auto" if resume and nested else resume
        if nested and _is_main():  # the folder is a run from now on (a kill before the end can be resumed)
            write_resolved_config(cfg, run_dir)
        results = [
            _run_stream(r.cfg, run_dir / r.folder, sub_resume, strict_resume, allow_config_change, methods)
            for r in runs
        ]
        by_order = [[res for res, r in zip(results, runs) if r.order == k] for k in sorted({r.order for r in runs})]
        if len(runs) == 1:
            scores = results[0].scores
        else:
            per_order = [_seed_scores(group, runs[i * len(group)].cfg) for i, group in enumerate(by_order)]
            scores = per_order[0]
        if _is_main():
            if len(runs) > 1:
                write_scores(run_dir, scores)
            if len(by_order) > 1:
                payload = {"orders": task_orders(cfg, len(by_order)), "scores": _across_orders(per_order)}
                (run_dir / "orders.json").write_text(json.dumps(nan_to_null(payload), indent=1, allow_nan=False))
            (run_dir / COMPARISONS_FILE).write_text(
                json.dumps(nan_to_null(_comparisons(by_order[0], runs[0].cfg)), indent=1, allow_nan=False)
            )
            timings = {f"{r.folder}/{m}".strip("/"): t for res, r in zip(results, runs) for m, t in res.timings.items()}
            (run_dir / "timings.json").write_text(
                json.dumps({"methods": timings, "wall_seconds": time.monotonic() - started}, indent=2)
            )
            if report:
                write_report([run_dir], run_dir)
    return scores


LIKELIHOOD_SCORER = "logp_acc"
"""Added to every ``lifealign eval``: meaningful without a trained adapter, unlike the implicit-reward ``pref_acc``."""


def evaluate_adapter(cfg: RunConfig, adapter: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Score the base model (or base + a saved peft adapter) on every task of ``cfg``: ``{task: {"scores": {metric:
    value}, "n": {metric: items}}}``.

    The scorers are ``eval.scorers`` plus ``logp_acc`` (log π(chosen) > log π(rejected), raw and per token), which
    is meaningful for a model without an adapter. ``pref_acc`` is the implicit reward against the base model
    (adapter disabled): for the base model itself every pair ties and it is 50 by construction.
    """
    from lifealign.evaluation.scorers import evaluate_task_with_items
    from lifealign.evaluation.scorers.base import EvalContext
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora, check_adapter_dir, load_adapter

    if adapter:
        check_adapter_dir(adapter)
    stream = load_stream(cfg.tasks, cfg.data, seed=cfg.train.seed)
    if not any(task.test for task in stream):
        raise ValueError("lifealign eval: no task of the config has held-out pairs (tasks[].test) to score")
    names = list(dict.fromkeys([*cfg.eval.scorers, LIKELIHOOD_SCORER]))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"scorers": names})})
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model = load_adapter(model, adapter) if adapter else attach_lora(model, cfg.model.lora)
    ctx = EvalContext(
        model=model,
        tokenizer=tokenizer,
        data=cfg.data,
        eval=cfg.eval,
        layout=cfg.train.pair_layout,
        pack_tokens=cfg.train.pack_tokens,
    )
    scorers = build_scorers(cfg)
    out = {}
    for task in stream:
        if task.test:
            scores, items = evaluate_task_with_items(ctx, task, scorers)
            out[task.name] = {"scores": scores, "n": {m: items[m].n_scored for m in scores if m in items}}
    return out
