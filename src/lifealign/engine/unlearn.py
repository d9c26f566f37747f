"""``lifealign unlearn``: U2A and its baselines on one pool, evaluated against the original model, resumable.

Phases, each committed to an atomic checkpoint (``checkpoints/``) when it ends::

    original        (optional) SFT on positives' chosen + negatives' rejected, merged: the original model
    eval:original   the original model's row of the table (the adapter is the identity)
    u2a             score -> select -> [solve -> re-score -> re-weight] ... (sub-commits after each)
    eval:u2a
    <baseline>      from the same starting adapter, the same number of optimizer steps as U2A planned
    eval:<baseline>

Inside a solve the loop's own mid-stage checkpoints (every ``train.save_every`` steps) make a killed run resume at
the step where it stopped. ``--resume`` refuses a checkpoint written under another config (``ResumeError``). The
original-model SFT is not checkpointed mid-way: a run killed during it redoes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from lifealign.config.load import trajectory_hash
from lifealign.config.schema import LossTerm, RunConfig
from lifealign.continual.runner import ResumeError
from lifealign.data.records import Task
from lifealign.data.sources import load_stream
from lifealign.data.tokenize import tokenize_pairs
from lifealign.evaluation.scorers.base import Shard
from lifealign.losses import bind_losses
from lifealign.models.lora import attach_lora, load_lora_state, lora_state, reference_context, save_adapter
from lifealign.pipeline import build_scorers, make_accelerator, preflight_output_dir, write_resolved_config
from lifealign.report.unlearn import selection_summary, write_unlearn_outputs
from lifealign.training.checkpoint import Checkpoint, Checkpointer
from lifealign.training.forward import compute_reference_logps
from lifealign.training.loop import LoopServices, StagePlan, train_task
from lifealign.training.metrics import MetricsWriter
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.unlearning.baselines import BASELINES, BaselineContext
from lifealign.unlearning.config import FORGET_SIDES, forget_loss, inner_lr
from lifealign.unlearning.data import U2AData, pool_data, reindex, tokenize_side
from lifealign.unlearning.evaluate import evaluate_unlearning, prepare_eval_sets
from lifealign.unlearning.inner import InnerSolver, inner_plugins
from lifealign.unlearning.selection import choose_k
from lifealign.unlearning.u2a import U2A, U2AInputs, U2AProgress, u2a_budget
from lifealign.utils.jsonio import nan_to_null

logger = logging.getLogger(__name__)

__all__ = ["UnlearnRun", "config_hash"]

PAIR = ("chosen", "rejected")


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the trajectory-affecting config plus the ``unlearn`` and ``eval`` sections."""
    extra = json.dumps(
        {"unlearn": cfg.unlearn.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json")}, sort_keys=True
    )
    return hashlib.sha256((trajectory_hash(cfg) + extra).encode()).hexdigest()


class UnlearnRun:
    """One ``lifealign unlearn`` run in ``run_dir``."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool | str = False):
        self.cfg, self.section, self.dir, self.resume = cfg, cfg.unlearn, Path(run_dir), resume
        self.hash = config_hash(cfg)
        self.state: dict[str, Any] = {
            "done": [],
            "started": [],
            "progress": {},
            "results": {},
            "stages": {},
            "events": [],
            "global_step": 0,
        }
        self.position: dict[str, Any] = {}
        self.model: torch.nn.Module | None = None
        self.original_state: dict[str, torch.Tensor] = {}
        self._loop_resume: dict[str, Any] | None = None

    # ----- setup -------------------------------------------------------------------------------------------------
    def _load_data(self) -> U2AData:
        if len(self.cfg.tasks) != 1:
            raise ValueError(
                f"lifealign unlearn takes exactly one task (the pool); the config lists {len(self.cfg.tasks)}"
            )
        self.task = load_stream(self.cfg.tasks, self.cfg.data)[0]
        data = pool_data(self.task, self.section, self.cfg.data)
        if not data.candidates or not data.preference:
            raise ValueError(
                f"task {self.task.name!r}: U2A needs forget candidates and preference pairs, got "
                f"{data.sizes()} (check unlearn.pa_ratio / negative_ratio / forget_ratio)"
            )
        if not data.test:
            raise ValueError(f"task {self.task.name!r}: the evaluation needs held-out pairs (tasks.0.test)")
        return data

    def _restore(self) -> Checkpoint | None:
        if not self.resume:
            self.checkpointer.clean_stale_tmp()
            return None
        self.checkpointer.clean_stale_tmp()
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            if self.resume == "auto":
                return None
            raise ResumeError(f"no valid checkpoint in {self.checkpointer.root}")
        if ckpt.state.get("config_hash") != self.hash:
            raise ResumeError(f"{ckpt.path}: the config changed since this checkpoint; resume with the same config")
        return ckpt

    def _original_model(self, base: torch.nn.Module, ckpt: Checkpoint | None) -> torch.nn.Module:
        """The base itself, or the base + an SFT LoRA merged in (U2A's LLaMA-Factory SFT + ``merge.py``)."""
        steps = self.section.original_sft_steps
        if steps == 0:
            return base
        torch.manual_seed(self.cfg.train.seed + 1)
        peft = attach_lora(base, self.cfg.model.lora)
        saved = ckpt.tensors("original") if ckpt is not None else {}
        if saved:
            load_lora_state(peft, saved)
        else:
            examples = reindex(tokenize_side(self.data.original, self.tokenizer, self.cfg.data, ("chosen",)))
            plan = StagePlan(
                0,
                Task("original", []),
                "sft",
                bind_losses([LossTerm(name="sft")], "sft"),
                self.section.original_sft_lr,
                1.0,
                max_steps=steps,
            )
            services = self._services("original")
            ctx = PluginContext(model=peft, tokenizer=self.tokenizer, task=plan.task, task_index=0, config=self.cfg)
            train_task(peft, examples, plan, services, ctx)
            self.state["global_step"] = services.global_step
        self.original_state = lora_state(peft)
        if "original" not in self.state["done"]:
            self.state["done"].append("original")
            self._save()
        return peft.merge_and_unload()

    def _services(self, method: str) -> LoopServices:
        return LoopServices(
            accelerator=self.acc,
            tokenizer=self.tokenizer,
            train_cfg=self.cfg.train,
            plugins=[],
            write_metrics=self.metrics.write,
            save_checkpoint=lambda *a: None,
            method_name=method,
            global_step=self.state["global_step"],
        )

    def _setup(self) -> None:
        from lifealign.models.load import load_model_and_tokenizer

        cfg = self.cfg
        self.data = self._load_data()
        self.acc = make_accelerator(cfg)
        self.checkpointer = Checkpointer(self.dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        ckpt = self._restore()
        self.metrics = MetricsWriter(self.dir / "metrics.jsonl", enabled=self.acc.is_main_process)
        self.metrics.truncate_to(ckpt.state["metrics_offset"] if ckpt is not None else 0)
        if ckpt is not None:
            self.state = ckpt.state["run"]
        if self.acc.is_main_process:
            write_resolved_config(cfg, self.dir)
            (self.dir / "data_summary.json").write_text(
                json.dumps({"task": self.task.name, **self.data.sizes(), "skipped": self.task.skipped}, indent=2)
            )
        base, self.tokenizer = load_model_and_tokenizer(cfg.model)
        base = self._original_model(base, ckpt)
        torch.manual_seed(cfg.train.seed)
        model = attach_lora(base, cfg.model.lora)
        self.init_adapter = lora_state(model)
        self.model = self.acc.prepare(model)
        self.unwrapped = self.acc.unwrap_model(self.model)
        if ckpt is not None:
            load_lora_state(self.unwrapped, ckpt.tensors("adapter"))
            if ckpt.state.get("loop"):
                self._loop_resume = {
                    **ckpt.state["loop"],
                    "optimizer": ckpt.optimizer_state(),
                    "ref_logps": ckpt.tensors("loop").get("ref_logps"),
                    "phase": ckpt.state["position"]["phase"],
                }
        self._prepare_sets()

    def _prepare_sets(self) -> None:
        cfg, tok, model = self.cfg, self.tokenizer, self.unwrapped
        self.pad_id = tok.pad_token_id
        self.candidates = reindex(tokenize_side(self.data.candidates, tok, cfg.data, FORGET_SIDES))
        self.preference = reindex(tokenize_pairs(self.data.preference, tok, cfg.data).examples)
        self.retain = reindex(tokenize_side(self.data.retain, tok, cfg.data, ("chosen",)))
        bs = self.section.score_batch_size
        self.pref_ref = compute_reference_logps(
            model, self.preference, self.pad_id, PAIR, lambda: reference_context(model), bs
        )
        self.cand_ref = compute_reference_logps(
            model, self.candidates, self.pad_id, FORGET_SIDES, lambda: reference_context(model), bs
        )
        self.eval_sets = prepare_eval_sets(
            model,
            tok,
            cfg.data,
            self.data.test,
            self.candidates,
            self.retain,
            limit=cfg.eval.max_examples,
            batch_size=cfg.eval.batch_size,
        )
        self.scorers = build_scorers(cfg)
        self.ctx = PluginContext(
            model=model,
            tokenizer=tok,
            task=self.task,
            task_index=0,
            stage="unlearn",
            config=cfg,
            extras={"accelerator": self.acc},
        )

    # ----- checkpoints and phases --------------------------------------------------------------------------------
    def _save(
        self,
        loop_state: dict[str, Any] | None = None,
        loop_tensors: dict[str, torch.Tensor] | None = None,
        optimizer_state: dict[str, Any] | None = None,
    ) -> None:
        if not self.acc.is_main_process:
            return
        state = {
            "config_hash": self.hash,
            "position": self.position,
            "run": self.state,
            "loop": loop_state,
            "metrics_offset": self.metrics.offset,
        }
        tensors = {
            "adapter": lora_state(self.unwrapped) if self.model is not None else {},
            "original": self.original_state,
            "loop": loop_tensors or {},
        }
        self.checkpointer.save(nan_to_null(state), {k: v for k, v in tensors.items() if v}, optimizer_state)

    def _phase(self, key: str, fn: Any) -> None:
        if key in self.state["done"]:
            return
        self.position = {"phase": key}
        fn()
        self.state["done"].append(key)
        self.position = {"phase": key, "finished": True}
        self._save()

    def _start(self, method: str) -> None:
        """A method starts from the shared initial adapter (unless a checkpoint of this method was restored)."""
        if method not in self.state["started"]:
            load_lora_state(self.unwrapped, self.init_adapter)
            self.state["started"].append(method)

    def _take_loop_resume(self, phase: str) -> dict[str, Any] | None:
        if self._loop_resume is not None and self._loop_resume.get("phase") == phase:
            resume, self._loop_resume = self._loop_resume, None
            return resume
        return None

    def _solver(self, method: str) -> InnerSolver:
        services = self._services(method)

        def save_checkpoint(loop_state: dict[str, Any], loop_tensors: dict[str, torch.Tensor], opt: Any) -> None:
            self.state["global_step"] = services.global_step
            self.position = {"phase": method, "stage_step": loop_state["stage_step"]}
            self._save(loop_state, loop_tensors, opt)

        return InnerSolver(
            model=self.model,
            services=services,
            ctx=self.ctx,
            task_index=0,
            lr=inner_lr(self.section, self.cfg.train),
            save_checkpoint=save_checkpoint,
        )

    def _plugins(self, objective: str, label: str) -> list[Plugin]:
        train = self.cfg.train
        return inner_plugins(
            self.section,
            objective,
            anchor=self.init_adapter,
            retain=self.retain,
            pad_id=self.pad_id,
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=train.seed,
            reference_state=None,
            label=label,
        )

    # ----- methods -----------------------------------------------------------------------------------------------
    def _run_u2a(self) -> None:
        self._start("u2a")
        loss = forget_loss(self.section)
        solver = self._solver("u2a")
        procedure = U2A(
            self.section,
            self.cfg.train,
            self.unwrapped,
            self.pad_id,
            loss,
            solver,
            plugins=lambda label: self._plugins(self.section.objective, f"u2a/{label}"),
            task=Task("u2a", []),
        )
        inputs = U2AInputs(
            self.candidates, self.preference, self.pref_ref, self.cand_ref if loss.needs_reference else None
        )

        def commit(progress: U2AProgress) -> None:
            self.state["progress"]["u2a"] = progress.to_json()
            self.state["global_step"] = solver.services.global_step
            self._save()

        progress = procedure.run(
            inputs,
            U2AProgress.from_json(self.state["progress"].get("u2a")),
            commit,
            resume_loop=lambda: self._take_loop_resume("u2a"),
        )
        n_selected = len(progress.selected) or choose_k(len(self.candidates), self.section.k, self.section.k_fraction)
        self.state["budget"] = u2a_budget(self.section, self.cfg.train, n_selected)
        self.state["stages"]["u2a"] = {
            "steps": sum((r.get("solve") or {}).get("steps", 0) for r in progress.rounds),
            "stopped": progress.stopped,
        }

    def _run_baseline(self, name: str) -> None:
        self._start(name)
        job = BASELINES[name](
            BaselineContext(
                self.section,
                self.candidates,
                self.preference,
                self.state["progress"]["u2a"]["selected"],
                self.cfg.train.seed,
            )
        )
        if job.empty:
            self.state["results"][name] = {"skipped": "U2A selected no candidate, so there is no subset of its size"}
            return
        plugins = self._plugins(job.objective, name) if job.objective else []
        outcome = self._solver(name).solve(
            Task(name, []),
            job.examples,
            job.loss,
            max_steps=self.state["budget"],
            plugins=plugins,
            resume=self._take_loop_resume(name),
        )
        self.state["stages"][name] = {
            "steps": outcome.steps,
            "stopped": outcome.stopped is not None,
            "examples": len(job.examples),
        }
        if outcome.stopped is not None:
            self.state["events"].append(outcome.stopped)

    def _evaluate(self, name: str) -> None:
        if "skipped" in self.state["results"].get(name, {}):
            return
        if name == "original":
            self._start(name)
        metrics = evaluate_unlearning(
            self.unwrapped,
            self.tokenizer,
            self.eval_sets,
            beta=self.section.dpo_beta,
            data=self.cfg.data,
            eval_cfg=self.cfg.eval,
            scorers=self.scorers,
            shard=Shard(self.acc.process_index, self.acc.num_processes),
        )
        stage = self.state["stages"].get(name, {"steps": 0, "stopped": False})
        self.state["results"][name] = {**metrics, "steps": stage["steps"], "stopped": stage["stopped"]}
        self.metrics.write({"event": "eval", "method": name, **metrics})
        if name == "u2a" and self.acc.is_main_process:
            save_adapter(self.unwrapped, self.dir / "adapter")

    # ----- the run -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        preflight_output_dir(self.dir)
        self._setup()
        self._phase("eval:original", lambda: self._evaluate("original"))
        self._phase("u2a", self._run_u2a)
        self._phase("eval:u2a", lambda: self._evaluate("u2a"))
        for name in self.section.baselines:
            self._phase(name, lambda name=name: self._run_baseline(name))
            self._phase(f"eval:{name}", lambda name=name: self._evaluate(name))
        results = self.results()
        if self.acc.is_main_process:
            write_unlearn_outputs(self.dir, results)
        self.metrics.close()
        return results

    def results(self) -> dict[str, Any]:
        """``results.json``'s content: the table, U2A's selection and rounds, the scores, data sizes, budget."""
        progress = U2AProgress.from_json(self.state["progress"].get("u2a"))
        ids = [str(ex["id"]) for ex in self.candidates]
        n_tokens = [len(ex["rejected_ids"]) for ex in self.candidates]
        initial_nll = [-float(self.cand_ref[i, 0]) / max(n, 1) for i, n in enumerate(n_tokens)]
        order = ["original", "u2a", *self.section.baselines]
        return {
            "table": {m: self.state["results"][m] for m in order if m in self.state["results"]},
            "objective": self.section.objective,
            "dpo_beta": self.section.dpo_beta,
            "weight_sign": self.section.weight_sign,
            "budget": self.state.get("budget"),
            "data": {
                "task": self.task.name,
                **self.data.sizes(),
                "tokenized_candidates": len(self.candidates),
                "tokenized_preference": len(self.preference),
            },
            "u2a": {
                "selection": selection_summary(
                    progress.scores or [], progress.selected, progress.weights, n_tokens, initial_nll
                ),
                "selected_ids": [ids[i] for i in progress.selected],
                "weights": progress.weights,
                "rounds": progress.rounds,
                "events": progress.events,
            },
            "baseline_events": self.state["events"],
            "scores": {"ids": ids, "values": progress.scores or []},
        }
