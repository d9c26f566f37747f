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

Every evaluation also writes its per-pair values to ``items.jsonl`` (one line per method and metric: ``{"method",
"metric", "ids", "values"}``; ``pref_acc``, ``J``, ``delta_J``, ``margin`` on the held-out pairs). Each checkpoint
records the file's offset, so a resumed run truncates what a killed phase wrote and writes it once more:
no line is lost or doubled. ``results.json`` gets every method's SE and interval from a bootstrap over those pairs
and U2A's paired tests against each baseline (:func:`unlearn_statistics`, which ``bench/u2a.py`` also runs over
several seeds' folders).

With an original-model SFT, its LoRA is saved as ``original_adapter/`` (on the plain base) beside U2A's ``adapter/``
(trained on base + that LoRA merged), and ``adapter/README.md`` shows how to stack the two with plain peft.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lifealign.config.load import trajectory_signature
from lifealign.config.schema import LossTerm, RunConfig
from lifealign.data.records import Task
from lifealign.data.sources import load_stream
from lifealign.data.tokenize import tokenize_pairs
from lifealign.engine.experiment import build_scorers, make_accelerator, write_resolved_config
from lifealign.engine.items import ITEMS_FILE, read_items
from lifealign.engine.parts import AdapterPart
from lifealign.engine.run import JsonPart, Run, TensorPart
from lifealign.engine.rundir import claim_run_dir
from lifealign.engine.specs import bind_config
from lifealign.engine.stages import solve_summary
from lifealign.evaluation.scorers.base import Shard
from lifealign.evaluation.stats import bootstrap, compare_methods, holm, minimal_detectable_difference, underpowered
from lifealign.losses import CombinedLoss, bind_losses
from lifealign.models.load import load_model_and_tokenizer
from lifealign.models.lora import attach_lora, load_lora_state, lora_state, reference_context, save_adapter
from lifealign.report.unlearn import selection_summary, write_unlearn_outputs
from lifealign.training.forward import compute_reference_logps
from lifealign.training.loop import StageContext, StagePlan, train_task
from lifealign.training.metrics import MetricsWriter
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.unlearning.baselines import BaselineContext, baseline_job
from lifealign.unlearning.data import U2AData, pool_data, reindex, tokenize_side
from lifealign.unlearning.evaluate import ITEM_METRICS, evaluate_unlearning, prepare_eval_sets
from lifealign.unlearning.inner import InnerSolver, inner_plugins
from lifealign.unlearning.objectives import FORGET_SIDES, forget_loss, inner_lr
from lifealign.unlearning.selection import choose_k
from lifealign.unlearning.u2a import U2A, U2AInputs, U2AProgress

logger = logging.getLogger(__name__)

__all__ = [
    "COMPARED",
    "UnlearnRun",
    "item_array",
    "merge_statistics",
    "run_unlearning",
    "u2a_comparisons",
    "unlearn_statistics",
]

PAIR = ("chosen", "rejected")
COMPARED = ("pref_acc", "delta_J")
"""The metrics of U2A's paired tests against each baseline (J's difference is delta_J's)."""
Records = Sequence[Mapping[str, Any]]


ORIGINAL_ADAPTER = "original_adapter"
STACKING = """# How to load this adapter

U2A trained it on the *original* model: the base with the SFT adapter of `../{original}/` merged in
(`unlearn.original_sft_steps > 0`). `adapter_config.json` names the plain base, so stack the two:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained(BASE)  # base_model_name_or_path of ../{original}/adapter_config.json
original = PeftModel.from_pretrained(base, "RUN_DIR/{original}").merge_and_unload()
model = PeftModel.from_pretrained(original, "RUN_DIR/adapter")  # the unlearned policy; disable it for the original
```
"""


class UnlearnRun:
    """One ``lifealign unlearn`` run in ``run_dir``."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool | str = False, overwrite: bool = False):
        self.cfg, self.section, self.dir, self.resume = cfg, cfg.unlearn, Path(run_dir), resume
        self.overwrite = overwrite
        self.signature = trajectory_signature(cfg)
        self.state: dict[str, Any] = {"started": [], "progress": {}, "results": {}, "stages": {}, "events": []}
        self.original = TensorPart({})
        """The LoRA of the original model's SFT (empty when ``original_sft_steps`` is 0), merged into the base."""

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

    def _train_original(self, peft: torch.nn.Module) -> None:
        """SFT of a fresh LoRA on positives' chosen + negatives' rejected (not checkpointed mid-way)."""
        examples = reindex(tokenize_side(self.data.original, self.tokenizer, self.cfg.data, ("chosen",)))
        loss = bind_losses([LossTerm(name="sft")], "sft")
        plan = StagePlan(0, Task("original", []), "sft", loss, self.section.original_sft_lr, 1.0,
                         max_steps=self.section.original_sft_steps)  # fmt: skip
        stage = StageContext(
            model=peft, tokenizer=self.tokenizer, accelerator=self.acc, train=self.cfg.train, data=self.cfg.data,
            loss=loss, plugins=[], metrics=self.metrics.write, commit=lambda loop: None, method_name="original",
            steps=self.phases.steps,
        )  # fmt: skip
        ctx = PluginContext(model=peft, tokenizer=self.tokenizer, task=plan.task, task_index=0, data=self.cfg.data)
        train_task(peft, examples, plan, stage, ctx)
        self.original.tensors = lora_state(peft)

    def _original_model(self, base: torch.nn.Module) -> torch.nn.Module:
        """The base itself, or the base + an SFT LoRA merged in (U2A's LLaMA-Factory SFT + ``merge.py``)."""
        if self.section.original_sft_steps == 0:
            return base
        torch.manual_seed(self.cfg.train.seed + 1)
        peft = attach_lora(base, self.cfg.model.lora)
        self.phases.phase("original", lambda: self._train_original(peft))
        load_lora_state(peft, self.original.tensors)
        if self.acc.is_main_process:
            save_adapter(peft, self.dir / ORIGINAL_ADAPTER)
        return peft.merge_and_unload()

    def _setup(self) -> None:
        cfg = self.cfg
        self.data = self._load_data()
        self.acc = make_accelerator(cfg)
        self.metrics = MetricsWriter(self.dir / "metrics.jsonl", enabled=self.acc.is_main_process)
        self.items = MetricsWriter(self.dir / ITEMS_FILE, enabled=self.acc.is_main_process)
        """Per-pair values of every evaluation; its offset is in every checkpoint (``Run.register_log``)."""
        self.phases = Run(self.dir, self.signature, is_main=self.acc.is_main_process, keep=cfg.train.keep_checkpoints,
                       metrics=self.metrics)  # fmt: skip
        self.phases.register_log("items", self.items)
        self.phases.register("runner", JsonPart(lambda: self.state, self.state.update))
        self.phases.register("original", self.original)
        if not self.phases.restore(self.resume):
            self.metrics.truncate_to(0)
            self.items.truncate_to(0)
        if self.acc.is_main_process:
            write_resolved_config(cfg, self.dir)
            sizes = {"task": self.task.name, **self.data.sizes(), "skipped": self.task.skipped}
            (self.dir / "data_summary.json").write_text(json.dumps(sizes, indent=2))
        base, self.tokenizer = load_model_and_tokenizer(cfg.model)
        base = self._original_model(base)
        torch.manual_seed(cfg.train.seed)
        model = attach_lora(base, cfg.model.lora)
        self.init_adapter = lora_state(model)
        self.model = self.acc.prepare(model)
        self.unwrapped = self.acc.unwrap_model(self.model)
        self.phases.register("adapter", AdapterPart(self.unwrapped))
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
            data=cfg.data,
            autocast=self.acc.autocast,
            rank=self.acc.process_index,
            world_size=self.acc.num_processes,
        )

    # ----- methods ------------------------------------------------------------------------------------------------
    def _start(self, method: str) -> None:
        """A method starts from the shared initial adapter (unless a checkpoint of this method was restored)."""
        if method not in self.state["started"]:
            load_lora_state(self.unwrapped, self.init_adapter)
            self.state["started"].append(method)

    def _solver(self, method: str, loss: CombinedLoss) -> InnerSolver:
        stage = StageContext(
            model=self.model, tokenizer=self.tokenizer, accelerator=self.acc, train=self.cfg.train, data=self.cfg.data,
            loss=loss, plugins=[], metrics=self.metrics.write, commit=self.phases.commit,
            take_resume=self.phases.take_resume, method_name=method, steps=self.phases.steps,
            layout=self.cfg.train.pair_layout, pack_tokens=self.cfg.train.pack_tokens,
        )  # fmt: skip
        return InnerSolver(stage=stage, ctx=self.ctx, task_index=0, lr=inner_lr(self.section, self.cfg.train))

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

    def _run_u2a(self) -> None:
        self._start("u2a")
        loss = forget_loss(self.section)
        solver = self._solver("u2a", loss)
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
            self.phases.commit()

        progress = procedure.run(
            inputs,
            U2AProgress.from_json(self.state["progress"].get("u2a")),
            commit,
            resume_loop=self.phases.take_resume,
        )
        n_selected = len(progress.selected) or choose_k(len(self.candidates), self.section.k, self.section.k_fraction)
        self.state["budget"] = procedure.budget(n_selected)
        self.state["stages"]["u2a"] = {
            "steps": sum((r.get("solve") or {}).get("steps", 0) for r in progress.rounds),
            "stopped": progress.stopped,
        }

    def _run_baseline(self, name: str) -> None:
        self._start(name)
        job = baseline_job(
            name,
            BaselineContext(
                self.section,
                self.candidates,
                self.preference,
                self.state["progress"]["u2a"]["selected"],
                self.cfg.train.seed,
            ),
        )
        if job.empty:
            self.state["results"][name] = {"skipped": "U2A selected no candidate, so there is no subset of its size"}
            return
        plugins = self._plugins(job.objective, name) if job.objective else []
        outcome = self._solver(name, job.loss).solve(
            Task(name, []),
            job.examples,
            job.loss,
            max_steps=self.state["budget"],
            plugins=plugins,
            resume=self.phases.take_resume(),
        )
        self.state["stages"][name] = {**solve_summary(outcome), "examples": len(job.examples)}
        self.state["events"] += outcome.events

    def _evaluate(self, name: str) -> None:
        if "skipped" in self.state["results"].get(name, {}):
            return
        if name == "original":
            self._start(name)
        evaluation = evaluate_unlearning(
            self.unwrapped,
            self.tokenizer,
            self.eval_sets,
            beta=self.section.dpo_beta,
            data=self.cfg.data,
            eval_cfg=self.cfg.eval,
            scorers=self.scorers,
            shard=Shard(self.acc.process_index, self.acc.num_processes),
        )
        metrics = evaluation.metrics
        for metric, values in evaluation.items.items():
            self.items.write({"method": name, "metric": metric, **values.to_dict()})
        stage = self.state["stages"].get(name, {"steps": 0, "stopped": False})
        self.state["results"][name] = {**metrics, "steps": stage["steps"], "stopped": stage["stopped"]}
        self.metrics.write({"event": "eval", "method": name, **metrics})
        if name == "u2a" and self.acc.is_main_process:
            save_adapter(self.unwrapped, self.dir / "adapter")
            if self.section.original_sft_steps:
                (self.dir / "adapter" / "README.md").write_text(STACKING.format(original=ORIGINAL_ADAPTER))

    # ----- the run -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        bind_config(self.cfg)
        with claim_run_dir(self.dir, resume=self.resume, overwrite=self.overwrite):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self._setup()
        self.phases.phase("eval:original", lambda: self._evaluate("original"))
        self.phases.phase("u2a", self._run_u2a)
        self.phases.phase("eval:u2a", lambda: self._evaluate("u2a"))
        for name in self.section.baselines:
            self.phases.phase(name, lambda name=name: self._run_baseline(name))
            self.phases.phase(f"eval:{name}", lambda name=name: self._evaluate(name))
        results = self.results()
        if self.acc.is_main_process:
            write_unlearn_outputs(self.dir, results)
        self.metrics.close()
        self.items.close()
        return results

    def results(self) -> dict[str, Any]:
        """``results.json``'s content: the table (with each metric's ``_se`` and ``_ci`` from the per-pair values),
        the paired ``comparisons`` of U2A against every baseline, U2A's selection and rounds, the scores, data sizes,
        budget. The statistics need ``items.jsonl``, which only the main process writes: other ranks get points only."""
        progress = U2AProgress.from_json(self.state["progress"].get("u2a"))
        ids = [str(ex["id"]) for ex in self.candidates]
        n_tokens = [len(ex["rejected_ids"]) for ex in self.candidates]
        initial_nll = [-float(self.cand_ref[i, 0]) / max(n, 1) for i, n in enumerate(n_tokens)]
        order = ["original", "u2a", *self.section.baselines]
        table = {m: dict(self.state["results"][m]) for m in order if m in self.state["results"]}
        records = read_items(self.dir / ITEMS_FILE) if self.acc.is_main_process else []
        ev = self.cfg.eval
        stats = unlearn_statistics([records], list(table), n_boot=ev.n_boot, level=ev.ci_level)
        merge_statistics(table, stats)
        return {
            "table": table,
            "statistics": stats["statistics"],
            "comparisons": stats["comparisons"],
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


# ----- statistics over the held-out pairs (one run, or several seeds' runs: bench/u2a.py) ------------------------


def item_array(runs: Sequence[Records], method: str, metric: str) -> tuple[list[str], np.ndarray] | None:
    """``(ids, values (S, 1, n))``: ``method``'s per-pair ``metric`` in each of the ``S`` runs' ``items.jsonl``
    records, as :mod:`lifealign.evaluation.stats` reads one task scored once (``last`` = the pair mean); None when
    a run lacks it. The held-out pairs must be the same, in the same order, in every run (``ValueError``)."""
    rows: list[list[float]] = []
    ids: list[str] | None = None
    for s, records in enumerate(runs):
        found = [r for r in records if r.get("method") == method and r.get("metric") == metric]
        if not found:
            return None
        line = found[-1]
        if ids is not None and list(line["ids"]) != ids:
            raise ValueError(f"run {s} scored {method}/{metric} on other held-out pairs than run 0")
        ids = list(line["ids"])
        rows.append([np.nan if v is None else float(v) for v in line["values"]])
    if ids is None or not ids:
        return None
    return ids, np.asarray(rows, dtype=np.float64)[:, None, :]


def _mean(m: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return m[:, 0, 0]  # (B,): the pair mean of the seed-averaged 1 x 1 "matrix"


def _estimates(runs: Sequence[Records], method: str, n_boot: int, level: float) -> dict[str, Any]:
    """``{metric, metric_se, metric_ci}`` for each of ``ITEM_METRICS`` the runs have (seeds, then pairs)."""
    out: dict[str, Any] = {}
    for metric in ITEM_METRICS:
        found = item_array(runs, method, metric)
        if found is None:
            continue
        e = bootstrap([found[1]], statistics={"mean": _mean}, n_boot=n_boot, level=level)["mean"]
        out.update({metric: float(e.point), f"{metric}_se": float(e.se), f"{metric}_ci": e.ci.tolist()})
        if e.between_seeds is not None:
            components = {"between_seeds": float(e.between_seeds), "within_seeds": float(e.within_seeds)}
            out.setdefault("variance_components", {})[metric] = components
        out["n_items"] = found[1].shape[2]
    return out


def _comparison(a: np.ndarray, b: np.ndarray, metric: str, n_boot: int, level: float, power: float) -> dict[str, Any]:
    """One paired test of ``a − b`` (both ``(S, 1, n)``): the bootstrap's ``diff, se, ci, p, mde`` and ``mde_items``,
    ``(z_{1−α/2} + z_power) · σ_d / √n`` of the per-pair differences of the seed means (the pairs' part alone)."""
    c = compare_methods([a], [b], metrics=("last",), n_boot=n_boot, level=level, power=power)["last"]
    d = a.mean(axis=0)[0] - b.mean(axis=0)[0]  # (n,)
    mde_items = minimal_detectable_difference(float(d.std(ddof=1)), d.size, 1 - level, power) if d.size > 1 else None
    return {"metric": metric, "diff": c.diff, "se": c.se, "ci": list(c.ci), "p": c.p, "mde": c.mde} | {
        "mde_items": mde_items
    }


def u2a_comparisons(
    runs: Sequence[Records], baselines: Sequence[str], *, n_boot: int, level: float, power: float = 0.8
) -> list[dict[str, Any]]:
    """U2A against each baseline on the shared pairs (and seeds): ``diff`` = U2A − baseline of ``COMPARED``'s
    metrics, the paired bootstrap's ``se``, ``ci`` and ``p`` (:func:`compare_methods` on the pair means), ``mde``
    at ``power``, Holm over every row together (one family), ``significant`` = ``p_holm < 1 − level``."""
    rows: list[dict[str, Any]] = []
    for baseline in baselines:
        for metric in COMPARED:
            a, b = item_array(runs, "u2a", metric), item_array(runs, baseline, metric)
            if a is None or b is None:
                continue
            if a[0] != b[0]:
                raise ValueError(f"u2a and {baseline} were scored on different held-out pairs")
            rows.append({"method": "u2a", "baseline": baseline} | _comparison(a[1], b[1], metric, n_boot, level, power))
    alpha = 1 - level
    for row, p_holm in zip(rows, holm([r["p"] for r in rows])):
        row.update(p_holm=p_holm, significant=bool(p_holm < alpha))
        row["underpowered"] = underpowered(row["diff"], row["mde"], row["significant"])
    return rows


def unlearn_statistics(
    runs: Sequence[Records], methods: Sequence[str], *, n_boot: int = 2000, level: float = 0.95, power: float = 0.8
) -> dict[str, Any]:
    """From the ``items.jsonl`` records of one run or of ``S`` seeds' runs (the same held-out pairs in each):
    ``{"estimates": {method: {metric, metric_se, metric_ci, n_items[, variance_components]}}, "comparisons": [...],
    "statistics": {...}}``. Intervals are percentile intervals of a bootstrap over the pairs (with ``S > 1``
    hierarchical: seeds, then pairs; ``evaluation.stats.bootstrap``); ``comparisons`` is :func:`u2a_comparisons`
    against every method but ``original`` and ``u2a``."""
    estimates = {m: e for m in methods if (e := _estimates(runs, m, n_boot, level))}
    baselines = [m for m in methods if m not in ("original", "u2a")]
    n_items = sorted({e["n_items"] for e in estimates.values()})
    statistics = {
        "method": "percentile bootstrap over the held-out pairs" + (", seeds then pairs" if len(runs) > 1 else ""),
        "level": level,
        "n_boot": n_boot,
        "n_seeds": len(runs),
        "n_items": n_items[0] if len(n_items) == 1 else n_items,
        "power": power,
        "holm": "over every row of comparisons together",
    }
    comparisons = u2a_comparisons(runs, baselines, n_boot=n_boot, level=level, power=power)
    return {"estimates": estimates, "comparisons": comparisons, "statistics": statistics}


def merge_statistics(table: dict[str, dict[str, Any]], stats: Mapping[str, Any]) -> None:
    """Add each row's ``metric_se``/``metric_ci`` (the point values stay the table's) and, to each baseline's row,
    ``vs_u2a``: the paired tests of U2A against it (``{metric: {diff, ci, p_holm, significant}}``, U2A − row)."""
    for method, row in table.items():
        estimate = stats["estimates"].get(method, {})
        for metric in ITEM_METRICS:
            if metric in estimate:
                row.update({f"{metric}_se": estimate[f"{metric}_se"], f"{metric}_ci": estimate[f"{metric}_ci"]})
    for c in stats["comparisons"]:
        if c["baseline"] in table:
            shown = {k: c[k] for k in ("diff", "ci", "p_holm", "significant")}
            table[c["baseline"]].setdefault("vs_u2a", {})[c["metric"]] = shown


def run_unlearning(
    cfg: RunConfig, out_dir: str | Path | None = None, resume: bool | str = False, overwrite: bool = False
) -> dict[str, Any]:
    """``lifealign unlearn``: U2A and the configured baselines on ``cfg.tasks[0]``; returns the results with a
    ``"table"`` (method -> metrics) and writes ``results.json``, ``report.md`` and the figures to the run folder."""
    return UnlearnRun(cfg, Path(out_dir or cfg.output_dir), resume=resume, overwrite=overwrite).run()
