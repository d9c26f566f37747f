"""Continual LoRA merging: after each task, merge the task's LoRA update into the running adapter with task
arithmetic (Ilharco et al., ICLR 2023), TIES (Yadav et al., NeurIPS 2023) or DARE (Yu et al., ICML 2024), through
peft's own merging functions (``peft.utils.merge_utils``).

What is merged. Per LoRA module the adapter's update is ``ΔW = (alpha/r) · B A`` (d_out, d_in); the constant scale
is left out below, as in SLMC's product mode (it changes no ratio and commutes with every operator). Each task
starts training from the running merged adapter, whose product ``M_{t−1} = B_start A_start`` is snapshotted at
``before_task``; at ``after_task``, with ``B A`` the trained factors,

    τ_t = B A − M_{t−1}                                     (the task's own update)
    M_t = merge([M_{t−1}, τ_t], weights = (w_merged, w_new))

on the dense products, so trimming and sign election act on entries of the weight change (what TIES and DARE are
defined on), not on the factors (peft's ``add_weighted_adapter`` combines factors, which for TIES/DARE is only an
approximation of merging the products). With peft's definitions (``T`` the stacked pair, ``w`` the weights):

- ``task_arithmetic``: ``w_0 M + w_1 τ`` (``(1, 1)`` is sequential fine-tuning, up to the re-split of the
  factors; ``(1, λ)`` scales each new task);
- ``ties``: trim to the ``density`` fraction of largest-magnitude entries (``prune`` magnitude), elect per entry the
  sign of the trimmed sum (``calculate_majority_sign_mask``, ``"total"``; ``"frequency"`` counts signs), and take
  the disjoint mean ``Σ_i w_i T_i [sign T_i = elected] / #agreeing`` (``disjoint_merge``): where both agree the
  result is the *mean*, so ``(1, 1)`` averages, as TIES does before its scale λ (here folded into the weights);
- ``dare_linear``: drop each entry with probability ``1 − density`` and rescale the kept ones by ``1/density``
  (``prune`` random, rescaled), then ``w_0 M' + w_1 τ'``; ``dare_ties``: the same drop-and-rescale, then TIES'
  sign election and disjoint mean. The random masks come from the CPU generator seeded with
  ``(seed, task, module)`` inside ``torch.random.fork_rng``, so a resumed run draws the same masks and the
  process's random state is left as it was.

Which tensors are trimmed or dropped (``sparsify``). TIES and DARE were defined for task vectors measured once from
the base model. In the running form the merged history is one of the two tensors, and ``sparsify="both"`` (peft's
``ties``/``dare_linear``/``dare_ties`` verbatim) trims or drops it again at every task; ``"new"`` (default) applies
``prune`` to the new update only and then the same sign election / disjoint mean / weighted sum (peft's
``calculate_majority_sign_mask``, ``disjoint_merge``, ``task_arithmetic``), so each task's update is sparsified
once, when it is merged. Measured on ``configs/tiny-stream.yaml`` (three tasks, DPO, density 0.2, r = 8 on 64x64
and 32x64 projections): with ``"both"`` DARE's rescaled drop re-noises the whole history every task and the
adapter's change grows to 2.8, 12 and 75 times the task's own update energy (``retained_update``); with ``"new"`` it
stays near 3 (one task's ``1/density`` rescale, of which the rank-r write-back keeps part). TIES retains 0.56, 0.80,
0.75 (``"new"``) or 0.56, 0.95, 0.85 (``"both"``). The rank-r write-back lost 13-17 % of the merged energy under
TIES and 16-43 % under DARE (``refactor_residual``), below 0.1 % under task arithmetic with weights (1, 0.5).

Defaults: TIES with ``density = 0.2`` (the TIES paper's top-20 %) and weights ``(1, 1)`` (λ = 1).

Written back at rank r. ``M_t`` can have rank above r (the sum of two rank-r matrices, and the sparse masks of TIES
and DARE are full-rank patterns), so it is written into the adapter as its best rank-r approximation (truncated
SVD, ``slmc.refactorise_lora``: ``A = c V_rᵀ``, ``B = U_r Σ_r / c``, ``c`` the trained ``A``'s mean row norm), and
the running merge continues from what the adapter holds. The lost energy ``‖M_t − B A‖² / ‖M_t‖²`` is reported as
``refactor_residual`` (energy-weighted over modules), the measured cost of keeping the adapter a plain rank-r peft
adapter that SLMC, EWC or a saved ``adapter/`` use unchanged; the alternative, a dense frozen update hooked into
the layers as ``olora.py`` hooks its frozen factors, would be exact but lets the merged update grow past rank r (to
full rank under TIES/DARE masks), a capacity the rank-r methods compared with it (SLMC included) do not have.

``report()`` per task, to put the operators side by side (SLMC reports its own kept energy and, in product mode,
the same ``refactor_residual``): ``update_norm`` ``‖τ_t‖``, ``merged_norm`` ``‖M_t‖`` and ``adapter_norm``
``‖B A‖`` (Frobenius over all modules), ``retained_update`` ``‖B A − M_{t−1}‖² / ‖τ_t‖²`` (how much of the task's
update energy the merged adapter keeps), ``sign_conflict`` (the share of entries where both ``M_{t−1}`` and ``τ_t``
are non-zero and disagree in sign: what TIES' election resolves), ``refactor_residual`` and per-module values.

Sharded training: the snapshot and the merge run inside ``gathered_lora`` on the full matrices; every rank computes
the same merge (same seeds) and rank 0's result is written to every shard.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import torch
from peft.utils import merge_utils
from torch import Tensor

from lifealign.continual.slmc import refactorise_lora
from lifealign.models.lora import gathered_lora, lora_modules
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.utils.kwargs import check_range

__all__ = ["MERGE_METHODS", "MergePlugin", "merge_pair", "sign_conflict"]

logger = logging.getLogger(__name__)

MergeMethod = Literal["task_arithmetic", "ties", "dare_linear", "dare_ties"]
MERGE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SignMethod = Literal["total", "frequency"]
Sparsify = Literal["new", "both"]


# ----- pure functions --------------------------------------------------------------------------------------------
def merge_pair(
    merged: Tensor,
    update: Tensor,
    method: str,
    weights: tuple[float, float],
    density: float = 1.0,
    majority_sign_method: str = "total",
    seed: int = 0,
    sparsify: str = "new",
) -> Tensor:
    """``merge([merged, update], weights)`` by task arithmetic, TIES, DARE-linear or DARE-TIES (module docstring),
    with peft's functions, in fp32 on the CPU. ``sparsify="both"`` trims/drops both tensors (peft's ``ties``,
    ``dare_linear``, ``dare_ties``); ``"new"`` only ``update``. DARE's masks come from the CPU generator seeded with
    ``seed`` inside ``fork_rng``: the same ``seed`` gives the same masks and the caller's random state is untouched.
    """
    tensors = [merged.detach().float().cpu(), update.detach().float().cpu()]
    w = torch.tensor([float(weights[0]), float(weights[1])])
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {', '.join(MERGE_METHODS)}")
    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(tensors, w)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        torch.default_generator.manual_seed(seed)
        if sparsify == "both":
            if method == "ties":
                return merge_utils.ties(tensors, w, density, majority_sign_method)
            if method == "dare_linear":
                return merge_utils.dare_linear(tensors, w, density)
            return merge_utils.dare_ties(tensors, w, density, majority_sign_method)
        if method == "ties":
            new = merge_utils.prune(tensors[1], density, method="magnitude")
        else:
            new = merge_utils.prune(tensors[1], density, method="random", rescale=True)
    if method == "dare_linear":
        return merge_utils.task_arithmetic([tensors[0], new], w)
    stacked = torch.stack([tensors[0], new])
    mask = merge_utils.calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return merge_utils.disjoint_merge(stacked * merge_utils.reshape_weight_task_tensors(stacked, w), mask)


def sign_conflict(a: Tensor, b: Tensor) -> tuple[int, int]:
    """``(entries where a and b are both non-zero and of opposite sign, entries where both are non-zero)``."""
    both = (a != 0) & (b != 0)
    return int((both & (a.sign() != b.sign())).sum()), int(both.sum())


# ----- the plugin ------------------------------------------------------------------------------------------------
class MergePlugin(Plugin):
    """Merge each task's LoRA update into the running adapter (task arithmetic, TIES, DARE) after the task."""

    name = "merge"

    def __init__(
        self,
        *,
        method: MergeMethod = "ties",
        density: float = 0.2,
        weights: tuple[float, float] = (1.0, 1.0),
        majority_sign_method: SignMethod = "total",
        sparsify: Sparsify = "new",
        seed: int = 0,
    ):
        self.method = method
        self.density = check_range("density", density, low=0, high=1, low_open=True)
        if len(tuple(weights)) != 2:
            raise ValueError(f"weights: must be a pair [merged, new], got {list(weights)!r}")
        self.weights = (float(weights[0]), float(weights[1]))
        self.majority_sign_method = majority_sign_method
        self.sparsify = sparsify
        self.seed = seed
        self.start: dict[str, tuple[Tensor, Tensor]] | None = None
        """Module -> the ``(A, B)`` the current task started from (fp32, CPU): ``M_{t−1} = B A``."""
        self.start_task: int | None = None
        self.merged_tasks: list[int] = []
        self.reports: list[dict[str, Any]] = []

    # ----- hooks ---------------------------------------------------------------------------------------------
    def before_task(self, ctx: PluginContext) -> None:
        with gathered_lora(ctx.model, modify=False):
            modules = lora_modules(ctx.model)
            if not modules:
                raise ValueError("merge: the model has no LoRA modules (was attach_lora called?)")
            self.start = {
                k: (a.detach().float().cpu().clone(), b.detach().float().cpu().clone()) for k, (a, b) in modules.items()
            }
        self.start_task = ctx.task_index

    def after_task(self, ctx: PluginContext) -> None:
        if ctx.task_index in self.merged_tasks:
            logger.warning("merge: task %d already merged; not merged twice", ctx.task_index)
            return
        if self.start is None or self.start_task != ctx.task_index:
            raise RuntimeError(f"merge: after_task for task {ctx.task_index} without its before_task snapshot")
        with gathered_lora(ctx.model, modify=True), torch.no_grad():
            infos = {
                name: self._merge_module(ctx.task_index, i, name, a, b)
                for i, (name, (a, b)) in enumerate(sorted(lora_modules(ctx.model).items()))
            }
        self.reports.append(self._report(ctx, infos))
        self.merged_tasks.append(ctx.task_index)
        self.start, self.start_task = None, None
        logger.info(
            "merge %s (%s): retained update %.4f, sign conflict %.4f, refactor residual %.4g",
            ctx.task.name,
            self.method,
            self.reports[-1]["retained_update"],
            self.reports[-1]["sign_conflict"],
            self.reports[-1]["refactor_residual"],
        )

    # ----- the merge -----------------------------------------------------------------------------------------
    def _merge_module(self, task: int, index: int, name: str, a: Tensor, b: Tensor) -> dict[str, float]:
        """Merge one module's update into its running product and write the rank-r result into ``a``, ``b``."""
        assert self.start is not None
        if name not in self.start:
            raise ValueError(f"merge: LoRA module {name} has no start snapshot (the adapter changed inside the task)")
        a0, b0 = self.start[name]
        a_now, b_now = a.detach().float().cpu(), b.detach().float().cpu()
        base = b0 @ a0  # M_{t−1} (d_out, d_in)
        update = b_now @ a_now - base  # τ_t
        seed = self.seed * 1_000_003 + task * 1009 + index
        merged = merge_pair(
            base, update, self.method, self.weights, self.density, self.majority_sign_method, seed, self.sparsify
        )
        new_b, new_a, residual = refactorise_lora(merged, a.shape[0], float(a_now.norm(dim=1).mean()))
        a.copy_(new_a.to(device=a.device, dtype=a.dtype))
        b.copy_(new_b.to(device=b.device, dtype=b.dtype))
        kept = new_b @ new_a
        conflicts, overlap = sign_conflict(base, update)
        return {
            "update_energy": float(update.pow(2).sum()),
            "merged_energy": float(merged.pow(2).sum()),
            "adapter_energy": float(kept.pow(2).sum()),
            "change_energy": float((kept - base).pow(2).sum()),
            "lost_energy": residual * float(merged.pow(2).sum()),
            "refactor_residual": residual,
            "conflicts": conflicts,
            "overlap": overlap,
        }

    def _report(self, ctx: PluginContext, infos: dict[str, dict[str, float]]) -> dict[str, Any]:
        def total(key: str) -> float:
            return sum(i[key] for i in infos.values())

        update, merged = total("update_energy"), total("merged_energy")
        overlap = total("overlap")
        return {
            "task_index": ctx.task_index,
            "task": ctx.task.name,
            "method": self.method,
            "density": self.density,
            "weights": list(self.weights),
            "sparsify": self.sparsify,
            "update_norm": update**0.5,
            "merged_norm": merged**0.5,
            "adapter_norm": total("adapter_energy") ** 0.5,
            "retained_update": total("change_energy") / update if update > 0 else 0.0,
            "sign_conflict": total("conflicts") / overlap if overlap > 0 else 0.0,
            "refactor_residual": total("lost_energy") / merged if merged > 0 else 0.0,
            "modules": {
                name: {
                    "update_norm": i["update_energy"] ** 0.5,
                    "retained_update": i["change_energy"] / i["update_energy"] if i["update_energy"] > 0 else 0.0,
                    "sign_conflict": i["conflicts"] / i["overlap"] if i["overlap"] > 0 else 0.0,
                    "refactor_residual": i["refactor_residual"],
                }
                for name, i in infos.items()
            },
        }

    # ----- reporting and resume ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Settings, the merged tasks and one report per merge (see the module docstring)."""
        return {
            "method": self.method,
            "density": self.density,
            "weights": list(self.weights),
            "majority_sign_method": self.majority_sign_method,
            "sparsify": self.sparsify,
            "merged_tasks": list(self.merged_tasks),
            "reports": list(self.reports),
        }

    def state_dict(self) -> dict[str, Any]:
        """Tensors ``start/<module>.A`` and ``.B`` (inside a task); meta: settings, merged tasks, reports."""
        tensors: dict[str, Tensor] = {}
        for name, (a, b) in (self.start or {}).items():
            tensors[f"start/{name}.A"], tensors[f"start/{name}.B"] = a, b
        meta = {
            "settings": {"method": self.method, "density": self.density, "weights": list(self.weights)},
            "start_task": self.start_task,
            "merged_tasks": list(self.merged_tasks),
            "reports": list(self.reports),
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, meta = state.get("tensors", {}), state.get("meta", {})
        saved = meta.get("settings", {}).get("method", self.method)
        if saved != self.method:
            raise ValueError(f"merge method: the checkpoint has {saved!r} but this plugin has {self.method!r}")
        names = {k[len("start/") : -len(".A")] for k in tensors if k.startswith("start/") and k.endswith(".A")}
        start = {n: (tensors[f"start/{n}.A"].float().clone(), tensors[f"start/{n}.B"].float().clone()) for n in names}
        self.start = start or None
        self.start_task = meta.get("start_task") if start else None
        self.merged_tasks = [int(t) for t in meta.get("merged_tasks", [])]
        self.reports = list(meta.get("reports", []))
