"""Gradient Episodic Memory (GEM; Lopez-Paz & Ranzato 2017) and Averaged GEM (A-GEM; Chaudhry et al. 2019).

Both keep an episodic memory of ``memory_per_task`` pairs of every finished task (a seeded random sample of the
task's own training records, added in ``after_task``) and edit the gradient in ``after_backward``, after the
micro-batch gradients are accumulated and before clipping. Memory gradients are gradients of the *method's* loss
(``ctx.loss``, e.g. DPO, with base-model reference log-probs computed once per stored task) with respect
to every trainable parameter, flattened into one vector, at the current weights; the step's gradient is saved first
and restored after, so only the projection changes it.

GEM (``gem``): with ``g`` the step's gradient and ``G`` the ``(K, p)`` matrix of the K memory tasks' gradients, if
any ``⟨g, g_k⟩ < 0`` solve

    min_g̃ ½‖g̃ − g‖²   s.t.   G g̃ ≥ 0

through its dual (the GEM paper's Eq. 11): ``min_v ½ vᵀ(G Gᵀ)v + (G g)ᵀ v`` s.t. ``v ≥ margin``, then
``g̃ = Gᵀ v + g``. The dual is a K-dimensional bound-constrained convex QP, solved here exactly (to 1e-12) by cyclic
coordinate descent in float64 (:func:`solve_gem_dual`); no ``qpth``/``quadprog`` is needed. At the optimum
``G g̃ = μ ≥ 0`` (the bound multipliers), so every constraint holds whatever the margin. ``margin = 0`` gives the
closest feasible ``g̃``; ``margin > 0`` (the GEM code's ``memory_strength``, 0.1 in the LifeAlign code's ``gem_margin``)
is a lower bound on the dual variables, which adds at least ``margin · g_k`` of every memory gradient and so moves
``g̃`` further towards the old tasks than the closest point. ``eps`` is added to the diagonal of ``G Gᵀ`` (GEM
code: 1e-3; LifeAlign code: 1.0, only when ``G Gᵀ`` is not positive definite); it is not needed for the solver and
with ``eps > 0`` the constraints hold only approximately, so the default is 0.

Differences from the authors' ``TaskGradientCallback`` (documented, not reproduced): it projects each parameter
tensor on its own against an exponential moving average (0.9/0.1) of that task's own *training* gradients, and runs
in ``on_optimizer_step``, which transformers calls after the optimizer step, so its projection never reaches the
update. Here the projection is the paper's: one QP on the whole gradient vector against episodic-memory gradients.

A-GEM (``agem``): one reference gradient ``g_ref`` of a seeded random sample of ``sample_size`` pairs from the union
of the memory; if ``gᵀ g_ref < 0``, ``g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) g_ref`` (closed form).

Options: ``memory_per_task`` (pairs stored per task), ``memory_batch_size`` (micro-batch size of the memory
forwards), ``stages`` (stages whose gradients are projected; default both; the memory loss is always the method's
loss). Every step adds ``K`` (GEM) or one (A-GEM) forward/backward passes over the memory.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from torch import Tensor

from lifealign.continual.buffers import record_from_json, record_to_json
from lifealign.data.records import PreferencePair
from lifealign.training.plugin import Plugin, PluginContext, TrainingStage
from lifealign.training.step import forward_loss
from lifealign.training.stored import StoredExamples, sample_records
from lifealign.utils.kwargs import check_distinct, check_range

__all__ = [
    "AGEMPlugin",
    "GEMPlugin",
    "assign_flat_grad",
    "flat_grad",
    "project_agem",
    "project_gem",
    "solve_gem_dual",
]

logger = logging.getLogger(__name__)

DUAL_TOL = 1e-12
DUAL_MAX_SWEEPS = 10_000


# ----- pure functions --------------------------------------------------------------------------------------------
def solve_gem_dual(
    gram: Tensor, q: Tensor, margin: float = 0.0, tol: float = DUAL_TOL, max_sweeps: int = DUAL_MAX_SWEEPS
) -> Tensor:
    """``argmin_v ½ vᵀ P v + qᵀ v`` subject to ``v ≥ margin`` (``P`` = ``gram``, ``(K, K)`` symmetric PSD).

    Cyclic coordinate descent in float64: each coordinate is set to its exact constrained minimiser
    ``max(margin, v_k − (P v + q)_k / P_kk)``; a coordinate with ``P_kk = 0`` (a zero memory gradient) sits at the
    bound. Stops when no coordinate moves more than ``tol · (1 + max|v|)``. Returns float64 ``(K,)``.
    """
    p, q = gram.double(), q.double()
    k = q.numel()
    v = torch.full((k,), float(margin), dtype=torch.float64)
    diag = torch.diagonal(p)
    for _ in range(max_sweeps):
        moved = 0.0
        for i in range(k):
            if diag[i] <= 0:
                new = float(margin)
            else:
                new = max(float(margin), float(v[i] - (p[i] @ v + q[i]) / diag[i]))
            moved = max(moved, abs(new - float(v[i])))
            v[i] = new
        if moved <= tol * (1.0 + float(v.abs().max())):
            break
    else:
        logger.warning("gem: the dual QP did not converge in %d sweeps", max_sweeps)
    return v


def project_gem(g: Tensor, memory: Tensor, margin: float = 0.0, eps: float = 0.0) -> tuple[Tensor, bool]:
    """GEM's projection of ``g`` (p,) against the rows of ``memory`` (K, p): ``(g̃, projected)``.

    When every ``⟨g, g_k⟩ ≥ 0``, ``g`` is returned unchanged (``projected=False``). Otherwise
    ``g̃ = g + Gᵀ v`` with ``v`` the dual solution for ``P = G Gᵀ + eps·I``, ``q = G g`` (see the module docstring);
    computed in float64 and returned in ``g``'s dtype.
    """
    gd, m = g.double(), memory.double()
    dots = m @ gd
    if bool((dots >= 0).all()):
        return g, False
    gram = m @ m.T + eps * torch.eye(m.shape[0], dtype=torch.float64)
    v = solve_gem_dual(gram, dots, margin)
    return (gd + m.T @ v).to(g.dtype), True


def project_agem(g: Tensor, g_ref: Tensor) -> tuple[Tensor, bool]:
    """A-GEM: ``g − (gᵀ g_ref / g_refᵀ g_ref) g_ref`` if ``gᵀ g_ref < 0`` (and ``g_ref ≠ 0``), else ``g``."""
    gd, rd = g.double(), g_ref.double()
    dot, norm2 = float(gd @ rd), float(rd @ rd)
    if dot >= 0 or norm2 == 0:
        return g, False
    return (gd - (dot / norm2) * rd).to(g.dtype), True


def flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    """The gradients of ``params`` concatenated into one float32 vector (zeros where a gradient is None)."""
    return torch.cat(
        [
            (p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)).reshape(-1)
            for p in params
        ]
    )


def assign_flat_grad(params: list[torch.nn.Parameter], vec: Tensor) -> None:
    """Write ``vec`` (from :func:`flat_grad`) back into ``p.grad`` for every parameter, in each one's dtype."""
    offset = 0
    for p in params:
        n = p.numel()
        chunk = vec[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n
    if offset != vec.numel():
        raise ValueError(f"gradient vector has {vec.numel()} entries, the parameters {offset}")


# ----- the plugins -----------------------------------------------------------------------------------------------
class GEMPlugin(Plugin):
    """GEM: episodic memory of every finished task and a QP projection of each step's gradient."""

    name = "gem"

    def __init__(
        self,
        *,
        memory_per_task: int = 16,
        margin: float = 0.1,
        eps: float = 0.0,
        memory_batch_size: int = 8,
        stages: tuple[TrainingStage, ...] = ("sft", "pref"),
        seed: int = 0,
    ):
        self.memory_per_task = check_range("memory_per_task", memory_per_task, low=1)
        self.margin = check_range("margin", margin, low=0)
        self.eps = check_range("eps", eps, low=0)
        self.memory_batch_size = check_range("memory_batch_size", memory_batch_size, low=1)
        self.stages = check_distinct("stages", stages)
        self.seed = seed
        self.memory: dict[int, list[PreferencePair]] = {}
        """Task index -> its stored pairs (task order)."""
        self.steps = 0
        """``after_backward`` calls so far (the A-GEM sample seed; persisted for exact resume)."""
        self.projected = 0
        self.last: dict[str, Any] = {}
        """The latest step's ``dots_before`` / ``dots_after`` (⟨g, g_k⟩ before and after) and ``projected``."""
        self._prepared: dict[int, StoredExamples] = {}

    # ----- memory --------------------------------------------------------------------------------------------
    def after_task(self, ctx: PluginContext) -> None:
        if ctx.task_index in self.memory:
            logger.warning("%s: task %d already in memory; not added twice", self.name, ctx.task_index)
            return
        self.memory[ctx.task_index] = sample_records(
            ctx.task.train, self.memory_per_task, f"{self.seed}:{ctx.task_index}"
        )

    def _prepared_task(self, ctx: PluginContext, task_index: int) -> StoredExamples:
        """Tokenised memory of one task with base-model reference log-probs (computed once; deterministic)."""
        if task_index not in self._prepared:
            self._prepared[task_index] = StoredExamples.prepare(ctx, self.memory[task_index], self.memory_batch_size)
        return self._prepared[task_index]

    def _memory_gradient(self, ctx: PluginContext, params: list[torch.nn.Parameter], stored: StoredExamples) -> Tensor:
        """Flat gradient of the method's mean loss over the stored examples (batches weighted by their size)."""
        for p in params:
            p.grad = None
        for batch, batch_ref in stored.batches(ctx.tokenizer.pad_token_id, self.memory_batch_size):
            share = batch["n_pairs"] / len(stored)
            (forward_loss(ctx.model, batch, ctx.loss, batch_ref, autocast=ctx.autocast).total * share).backward()
        return flat_grad(params)

    def _reference_gradients(self, ctx: PluginContext, params: list[torch.nn.Parameter]) -> Tensor | None:
        """``(K, p)``: one memory gradient per stored task with at least one usable pair."""
        rows = []
        for task_index in sorted(self.memory):
            stored = self._prepared_task(ctx, task_index)
            if stored.examples:
                rows.append(self._memory_gradient(ctx, params, stored))
        return torch.stack(rows) if rows else None

    # ----- the projection ------------------------------------------------------------------------------------
    def after_backward(self, ctx: PluginContext) -> None:
        self.steps += 1
        if not self.memory or ctx.stage not in self.stages:
            return
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        g = flat_grad(params)
        try:
            memory = self._reference_gradients(ctx, params)
        finally:
            assign_flat_grad(params, g)
        if memory is None:
            return
        new, projected = self.project(g, memory)
        if projected:
            assign_flat_grad(params, new)
            self.projected += 1
        self.last = {
            "dots_before": (memory.double() @ g.double()).tolist(),
            "dots_after": (memory.double() @ new.double()).tolist(),
            "projected": projected,
        }

    def project(self, g: Tensor, memory: Tensor) -> tuple[Tensor, bool]:
        return project_gem(g, memory, self.margin, self.eps)

    # ----- reporting and resume ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return {
            "tasks": {str(t): len(r) for t, r in sorted(self.memory.items())},
            "steps": self.steps,
            "projected_steps": self.projected,
            "last": dict(self.last),
        }

    def state_dict(self) -> dict[str, Any]:
        meta = {
            "memory": {str(t): [record_to_json(r) for r in recs] for t, recs in self.memory.items()},
            "steps": self.steps,
            "projected": self.projected,
        }
        return {"tensors": {}, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state.get("meta", {})
        self.memory = {
            int(t): [record_from_json(r, where=f"{self.name} memory task {t}") for r in recs]
            for t, recs in meta.get("memory", {}).items()
        }
        self.steps = int(meta.get("steps", 0))
        self.projected = int(meta.get("projected", 0))
        self._prepared = {}


class AGEMPlugin(GEMPlugin):
    """A-GEM: one averaged memory gradient from a random memory sample, closed-form projection."""

    name = "agem"

    def __init__(
        self,
        *,
        memory_per_task: int = 16,
        sample_size: int = 8,
        memory_batch_size: int = 8,
        stages: tuple[TrainingStage, ...] = ("sft", "pref"),
        seed: int = 0,
    ):
        super().__init__(
            memory_per_task=memory_per_task,
            margin=0.0,
            eps=0.0,
            memory_batch_size=memory_batch_size,
            stages=stages,
            seed=seed,
        )
        self.sample_size = check_range("sample_size", sample_size, low=1)

    def _reference_gradients(self, ctx: PluginContext, params: list[torch.nn.Parameter]) -> Tensor | None:
        """``(1, p)``: the gradient of a sample of ``sample_size`` pairs from the whole memory (seeded by step)."""
        pool: list[tuple[int, int]] = []
        for task_index in sorted(self.memory):
            pool.extend((task_index, i) for i in range(len(self._prepared_task(ctx, task_index))))
        if not pool:
            return None
        rng = random.Random(f"{self.seed}:agem:{self.steps}")
        picked = sorted(rng.sample(pool, min(self.sample_size, len(pool))))
        sample = _concat([self._prepared_task(ctx, t).subset([i]) for t, i in picked])
        return self._memory_gradient(ctx, params, sample).unsqueeze(0)

    def project(self, g: Tensor, memory: Tensor) -> tuple[Tensor, bool]:
        return project_agem(g, memory[0])


def _concat(parts: list[StoredExamples]) -> StoredExamples:
    """Stored examples of several tasks in one set (re-indexed; every part has the same sides)."""
    examples = [{**ex, "index": k} for k, ex in enumerate(ex for part in parts for ex in part.examples)]
    refs = [part.reference for part in parts]
    reference = torch.cat(refs) if refs and all(r is not None for r in refs) else None
    first = parts[0]
    return StoredExamples(examples, reference, first.sides, first.layout, first.pack_tokens)
