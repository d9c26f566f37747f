"""Elastic Weight Consolidation (EWC; Kirkpatrick et al. 2017) on the LoRA weights (METHODS.md §1.6 and §3).

    L = L_t + (λ/2) Σ_i F_i (θ_i − θ*_i)²

over the trainable LoRA parameters θ (``lora_parameters``), where

- ``θ*`` (the anchor) is the LoRA weights at the latest *registration*, as in the authors' ``EWCManager`` (one
  anchor, overwritten at each ``register_ewc_params``). The authors' ``BaseTrainerCL`` registers twice per task
  when the SFT stage runs: after the SFT stage (Fisher of the SFT loss on the task's SFT data, anchor = the
  post-SFT weights, so the task's own preference stage is pulled toward them) and after the DPO stage (Fisher of
  the DPO loss, anchor = the end-of-task weights). ``consolidate_sft=True`` (default) does the same: ``after_stage``
  of the ``sft`` stage registers with the SFT loss (token NLL of the chosen responses, as the SFT stage trains)
  on the task's records with a chosen response, and ``after_task`` registers with the method's loss.
  ``consolidate_sft=False`` registers only after the task. Without an SFT stage the two agree.
- ``F`` is the diagonal empirical Fisher of the loss of the stage registered (``ctx.loss``, e.g. DPO, after the
  task; the SFT loss after the SFT stage) at ``θ*``:
  ``F_i = (1/M) Σ_m (∂ℓ_m/∂θ_i)²`` over ``M`` mini-batches of ``batch_size`` examples taken, in a seeded random
  order, from ``n_samples`` pairs of the finished task's own training data (not the replay buffer; the authors use
  the whole task dataset).
  ``batch_size=1`` squares per-example gradients (the textbook empirical Fisher); the authors' code squares the
  gradients of its training mini-batches. Dropout is off (``model.eval()``) while the Fisher is computed. When the
  loss needs reference log-probs they come from the base model (adapter disabled), the ``reference: base``
  setting; with ``reference: previous`` the Fisher still uses the base reference.
- Fishers of successive registrations (two per task with ``consolidate_sft`` and an SFT stage) are combined by
  ``accumulate``:

  * ``"sum"`` (default): ``F = Σ_k F_k``. With one shared anchor this is "online EWC" with γ = 1 and equals
    ``Σ_k (λ/2) F_k (θ − θ*)²``: every past registration keeps its full weight.
  * ``"mean"``: the running mean ``F = (1/K) Σ_k F_k`` over the K registrations (the penalty's scale does not grow
    with the number of tasks).
  * ``"replace"``: only the latest Fisher (the authors' code recomputes ``fisher_info`` from zeros).

- The penalty is added in every stage listed in ``stages`` (default SFT and preference: the authors run EWC in both
  trainers) once a Fisher exists: from the first task's preference stage when the SFT stage registers, from the
  second task otherwise.

``lam`` defaults to the authors' 0.1. On LoRA weights the squared gradients of a DPO loss are small (mean entry
≈1e-4 on the tiny test model), and LoRA weights move little per task, so ``(λ/2) F Δθ²`` can be negligible next to
the task loss: check ``loss/ewc`` in ``metrics.jsonl`` and ``report()["fisher"]`` (in ``run_info.json``), and raise ``lam`` (EWC
papers use 10²–10⁴) when it is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lifealign.config.schema import LossTerm
from lifealign.data.records import PreferencePair
from lifealign.losses import CombinedLoss, bind_losses
from lifealign.models.lora import lora_parameters
from lifealign.training.plugin import Plugin, PluginContext, TrainingStage
from lifealign.training.step import forward_loss
from lifealign.training.stored import StoredExamples, sample_records
from lifealign.utils.kwargs import check_choice, check_distinct, check_range

__all__ = [
    "ACCUMULATIONS",
    "Accumulation",
    "EWCPlugin",
    "accumulate_fisher",
    "diagonal_fisher",
    "ewc_penalty",
]

logger = logging.getLogger(__name__)

Accumulation = Literal["sum", "mean", "replace"]
ACCUMULATIONS: tuple[str, ...] = ("sum", "mean", "replace")


# ----- pure functions --------------------------------------------------------------------------------------------
def ewc_penalty(params: dict[str, Tensor], fisher: dict[str, Tensor], anchor: dict[str, Tensor], lam: float) -> Tensor:
    """``(λ/2) Σ_name Σ_i F[name]_i (θ[name]_i − θ*[name]_i)²`` over the names in ``fisher`` (a float32 scalar).

    ``fisher`` and ``anchor`` must be on the parameters' devices; a name of ``fisher`` missing from ``params`` is an
    error (the adapter changed shape since the Fisher was taken).
    """
    missing = sorted(set(fisher) - set(params))
    if missing:
        raise ValueError(f"ewc: the Fisher has parameters the model lacks: {missing[:3]}")
    total = None
    for name, f in fisher.items():
        term = (f * (params[name].float() - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


def accumulate_fisher(
    old: dict[str, Tensor] | None, new: dict[str, Tensor], n_old: int, mode: str
) -> dict[str, Tensor]:
    """Combine the Fisher of ``n_old`` earlier tasks with a new task's: ``sum`` (old + new), ``mean`` (running mean
    ``(n_old·old + new)/(n_old + 1)``) or ``replace`` (new)."""
    check_choice("accumulate", mode, ACCUMULATIONS)
    if old is None or n_old == 0 or mode == "replace":
        return {k: v.clone() for k, v in new.items()}
    if set(old) != set(new):
        raise ValueError("ewc: the new Fisher covers different parameters than the accumulated one")
    if mode == "sum":
        return {k: old[k] + new[k] for k in new}
    return {k: (n_old * old[k] + new[k]) / (n_old + 1) for k in new}


def diagonal_fisher(
    params: dict[str, torch.nn.Parameter], batches: Iterable[Any], loss_of: Callable[[Any], Tensor]
) -> dict[str, Tensor]:
    """``F[name] = (1/M) Σ_m (∂ loss_of(batch_m) / ∂ params[name])²`` (float32, on the parameters' devices).

    Gradients are cleared before each batch and after the last; a parameter with no gradient contributes zeros.
    """
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    n = 0
    for batch in batches:
        for p in params.values():
            p.grad = None
        loss_of(batch).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float().pow(2)
        n += 1
    for p in params.values():
        p.grad = None
    if n == 0:
        raise ValueError("ewc: no batch to estimate the Fisher from")
    return {name: f / n for name, f in fisher.items()}


# ----- the plugin ------------------------------------------------------------------------------------------------
class EWCPlugin(Plugin):
    """EWC with a diagonal Fisher of the method's loss; YAML keys are the constructor's arguments."""

    name = "ewc"

    def __init__(
        self,
        *,
        lam: float = 0.1,
        n_samples: int = 64,
        batch_size: int = 1,
        accumulate: Accumulation = "sum",
        stages: tuple[TrainingStage, ...] = ("sft", "pref"),
        consolidate_sft: bool = True,
        seed: int = 0,
    ):
        self.lam = check_range("lam", lam, low=0)
        self.n_samples = check_range("n_samples", n_samples, low=1)
        self.batch_size = check_range("batch_size", batch_size, low=1)
        self.accumulate = accumulate
        self.stages = check_distinct("stages", stages)
        self.consolidate_sft = consolidate_sft
        self.seed = seed
        self.fisher: dict[str, Tensor] | None = None
        """Accumulated diagonal Fisher per LoRA parameter name (CPU float32)."""
        self.anchor: dict[str, Tensor] | None = None
        """θ*: the LoRA weights at the latest registration (CPU float32)."""
        self.tasks: list[int] = []
        """Indices of the finished tasks (registrations after the task)."""
        self.registered: list[str] = []
        """Every registration, in order: ``"<task index>:sft"`` (after the SFT stage) or ``"<task index>:task"``."""
        self.n_fishers = 0
        """How many Fishers ``fisher`` combines (the count of the running mean)."""
        self.reports: list[dict[str, Any]] = []
        self._on_device: dict[str, tuple[Tensor, Tensor]] = {}

    # ----- hooks ---------------------------------------------------------------------------------------------
    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        if self.fisher is None or ctx.stage not in self.stages:
            return None
        params = lora_parameters(ctx.model)
        fisher, anchor = {}, {}
        for name in self.fisher:
            if name not in params:
                raise ValueError(f"ewc: LoRA parameter {name} of the Fisher is not trainable in the model")
            fisher[name], anchor[name] = self._device_copy(name, params[name].device)
        return ewc_penalty(params, fisher, anchor, self.lam)

    def after_stage(self, ctx: PluginContext) -> None:
        if ctx.stage == "sft" and self.consolidate_sft:
            records = [r for r in ctx.task.train if r.chosen.strip()]  # the records the SFT stage trains on
            self.register(dataclasses.replace(ctx, loss=sft_fisher_loss()), "sft", records)

    def after_task(self, ctx: PluginContext) -> None:
        self.register(ctx, "task", list(ctx.task.train))

    def register(self, ctx: PluginContext, when: str, pool: list[PreferencePair]) -> None:
        """Fisher of ``ctx.loss`` on ``n_samples`` of ``pool`` accumulated into ``F``; the anchor moves to the current
        weights (the authors' ``register_ewc_params``). ``when`` is ``sft`` or ``task``."""
        key = f"{ctx.task_index}:{when}"
        if key in self.registered:
            logger.warning("ewc: task %d (%s) already registered; not counted twice", ctx.task_index, when)
            return
        salt = "" if when == "task" else f":{when}"
        records = sample_records(pool, self.n_samples, f"{self.seed}:{ctx.task_index}{salt}")
        new = self.task_fisher(ctx, records)
        if new is None:
            logger.warning(
                "ewc: task %r (%s) has no usable example for the Fisher; the anchor moves, F is unchanged",
                ctx.task.name,
                when,
            )
        else:
            self.fisher = accumulate_fisher(self.fisher, new, self.n_fishers, self.accumulate)
            self.n_fishers += 1
        self.anchor = {name: p.detach().float().cpu().clone() for name, p in lora_parameters(ctx.model).items()}
        self._on_device = {}
        self.registered.append(key)
        if when == "task":
            self.tasks.append(ctx.task_index)
        report = {
            "task_index": ctx.task_index,
            "task": ctx.task.name,
            "after": when,
            "n_records": len(records),
            "task_fisher": fisher_stats(new or {}),
            "accumulated": fisher_stats(self.fisher or {}),
        }
        self.reports.append(report)

    def task_fisher(self, ctx: PluginContext, records: list) -> dict[str, Tensor] | None:
        """The diagonal Fisher of ``ctx.loss`` (the method's loss, or the SFT loss after the SFT stage) on
        ``records`` at the current weights (CPU float32), None if no example survives tokenisation."""
        model = ctx.model
        was_training = model.training
        model.eval()
        try:
            stored = StoredExamples.prepare(ctx, records, self.batch_size)
            if not stored.examples:
                return None
            batches = stored.batches(ctx.tokenizer.pad_token_id, self.batch_size)
            fisher = diagonal_fisher(
                lora_parameters(model),
                batches,
                lambda b: forward_loss(model, b[0], ctx.loss, b[1], autocast=ctx.autocast).total,
            )
        finally:
            model.train(was_training)
        return {k: v.cpu() for k, v in fisher.items()}

    def _device_copy(self, name: str, device: torch.device) -> tuple[Tensor, Tensor]:
        assert self.fisher is not None and self.anchor is not None
        cached = self._on_device.get(name)
        if cached is None or cached[0].device != device:
            cached = (self.fisher[name].to(device), self.anchor[name].to(device))
            self._on_device[name] = cached
        return cached

    # ----- reporting and resume ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """``{"tasks", "registered", "fisher": stats of the accumulated Fisher, "reports": per-registration stats}``."""
        return {
            "tasks": list(self.tasks),
            "registered": list(self.registered),
            "fisher": fisher_stats(self.fisher or {}),
            "reports": list(self.reports),
        }

    def state_dict(self) -> dict[str, Any]:
        tensors: dict[str, Tensor] = {}
        for name, v in (self.fisher or {}).items():
            tensors[f"fisher/{name}"] = v
        for name, v in (self.anchor or {}).items():
            tensors[f"anchor/{name}"] = v
        meta = {
            "settings": {"accumulate": self.accumulate},
            "tasks": list(self.tasks),
            "registered": list(self.registered),
            "n_fishers": self.n_fishers,
            "reports": list(self.reports),
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta, tensors = state.get("meta", {}), state.get("tensors", {})
        saved = meta.get("settings", {}).get("accumulate", self.accumulate)
        if saved != self.accumulate:
            raise ValueError(f"ewc accumulate: the checkpoint has {saved!r} but this plugin has {self.accumulate!r}")
        fisher = {k[len("fisher/") :]: v.float().cpu().clone() for k, v in tensors.items() if k.startswith("fisher/")}
        anchor = {k[len("anchor/") :]: v.float().cpu().clone() for k, v in tensors.items() if k.startswith("anchor/")}
        if fisher and set(fisher) != set(anchor):
            raise ValueError("ewc: checkpoint Fisher and anchor cover different parameters")
        if fisher and not anchor:
            raise ValueError("ewc: checkpoint has a Fisher without an anchor")
        self.fisher = fisher or None
        self.anchor = anchor or None
        self.n_fishers = int(meta.get("n_fishers", 0))
        self.tasks = [int(t) for t in meta.get("tasks", [])]
        self.registered = [str(k) for k in meta.get("registered", [f"{t}:task" for t in self.tasks])]
        self.reports = list(meta.get("reports", []))
        self._on_device = {}


def sft_fisher_loss() -> CombinedLoss:
    """The loss of the SFT stage (token NLL of the chosen response, per-token mean), for the Fisher after it."""
    return bind_losses([LossTerm(name="sft")], "ewc.sft")


def fisher_stats(fisher: dict[str, Tensor]) -> dict[str, float]:
    """``{"sum", "max", "mean"}`` over every entry of a Fisher (zeros for an empty one)."""
    if not fisher:
        return {"sum": 0.0, "max": 0.0, "mean": 0.0}
    flat = torch.cat([v.reshape(-1).float() for v in fisher.values()])
    return {"sum": float(flat.sum()), "max": float(flat.max()), "mean": float(flat.mean())}
