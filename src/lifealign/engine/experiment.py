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
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lifealign.config.schema import RunConfig
from lifealign.config.secrets import known_secrets, redact
from lifealign.data.records import TaskStream
from lifealign.data.sources import load_stream
from lifealign.engine.specs import bind_config
from lifealign.engine.stream import StreamRunner
from lifealign.evaluation.scorers import build_scorers as build_named_scorers
from lifealign.models.lora import lora_state
from lifealign.report.markdown import write_report
from lifealign.report.results import write_scores

logger = logging.getLogger(__name__)


class OutputDirError(RuntimeError):
    """The output folder cannot be written; raised before any model is loaded."""


def preflight_output_dir(run_dir: Path) -> None:
    """Fail fast (before loading a model) when ``run_dir`` cannot be created or written."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputDirError(f"output directory {run_dir} is not writable: {parent} is a file")
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"output directory {run_dir} is not writable: {exc.strerror or exc}") from None


def write_resolved_config(cfg: RunConfig, run_dir: Path) -> None:
    """``run_dir/config.yaml``: the resolved config, with secret-named keys and known secret values redacted."""
    clean = redact(cfg.model_dump(mode="json"), known_secrets(cfg))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(clean, sort_keys=False))


def _data_summary(stream: TaskStream) -> dict[str, Any]:
    return {
        t.name: {"train": len(t.train), "test": len(t.test), "kind": t.kind, "skipped": dict(t.skipped)} for t in stream
    }


def build_scorers(cfg: RunConfig) -> list[Any]:
    return build_named_scorers(cfg.eval.scorers)


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


def run_experiment(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
    strict_resume: bool = False,
    allow_config_change: bool = False,
    report: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every method of ``cfg`` over its task stream; returns (and writes) ``scores.json``'s content."""
    run_dir = Path(out_dir or cfg.output_dir)
    specs = bind_config(cfg)
    preflight_output_dir(run_dir)
    if not cfg.tasks:
        raise ValueError("tasks: the config lists no task")
    started = time.monotonic()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    stream = load_stream(cfg.tasks, cfg.data, seed=cfg.train.seed)
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        write_resolved_config(cfg, run_dir)
        (run_dir / "data_summary.json").write_text(json.dumps(_data_summary(stream), indent=2))
    model, tokenizer = load_base_with_adapter(cfg)
    model = accelerator.prepare(model)
    init_adapter = lora_state(accelerator.unwrap_model(model))
    scorers = build_scorers(cfg)
    all_scores: dict[str, dict[str, Any]] = {}
    reference_cache: dict = {}
    timings: dict[str, float] = {}
    for spec in specs:
        method_dir = run_dir if len(specs) == 1 else run_dir / spec.name
        method_dir.mkdir(parents=True, exist_ok=True)
        runner = StreamRunner(
            cfg, spec, stream, model, tokenizer, accelerator, method_dir, init_adapter, scorers, reference_cache
        )
        runner.start(resume, strict_resume, allow_config_change)
        all_scores[spec.name] = runner.run_stream()
        runner.close()
        timings[spec.name] = runner.run.elapsed
        if accelerator.is_main_process:
            (method_dir / "run_info.json").write_text(json.dumps(runner.run_info(), indent=2, default=str))
    if accelerator.is_main_process:
        write_scores(run_dir, all_scores)
        (run_dir / "timings.json").write_text(
            json.dumps({"methods": timings, "wall_seconds": time.monotonic() - started}, indent=2)
        )
        if report:
            write_report([run_dir], run_dir)
    accelerator.wait_for_everyone()
    return all_scores


def evaluate_adapter(cfg: RunConfig, adapter: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Score the base model (or base + a saved peft adapter) on every task of ``cfg`` with ``eval.scorers``.

    The reference for ``pref_acc`` is the base model (adapter disabled), as in training with ``reference: base``.
    """
    from lifealign.evaluation.scorers import evaluate_task
    from lifealign.evaluation.scorers.base import EvalContext
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora, load_adapter

    stream = load_stream(cfg.tasks, cfg.data, seed=cfg.train.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model = load_adapter(model, adapter) if adapter else attach_lora(model, cfg.model.lora)
    ctx = EvalContext(model=model, tokenizer=tokenizer, data=cfg.data, eval=cfg.eval)
    scorers = build_scorers(cfg)
    return {task.name: evaluate_task(ctx, task, scorers) for task in stream if task.test}
