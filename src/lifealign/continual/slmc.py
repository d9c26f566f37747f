"""Short-to-Long Memory Consolidation (SLMC; LifeAlign paper Eqs. 4–11, METHODS.md §1.3).

After a training stage, the stage's LoRA update (the short-term memory ``SM = W_now − W0``) is, per LoRA matrix:

1. denoised (Eqs. 4–7): ``SM' = U[:, :k'] Σ[:k'] V[:, :k']ᵀ`` with the smallest ``k'`` such that
   ``Σ_{i≤k'} σ_i² / Σ_i σ_i² ≥ θ`` (total energy ≤ 1e-9: unchanged);
2. refined against the history (Eqs. 8–10): with ``V_h`` an orthonormal basis of the span of the earlier refined
   updates (rows of ``Vh`` from the SVD of the stacked, flattened history), ``p = V_hᵀ V_h flat(SM')`` and
   ``RSM = flat(SM') − p + λ p`` (no history: ``RSM = flat(SM')``);
3. integrated (Eq. 11): ``W = W0 + reshape(RSM)``, written into the adapter in place; ``RSM`` joins the history.

Options (``{name: slmc, ...}`` YAML keys):

- ``stages``: ``("pref",)`` (default; paper: SLMC after FPO) or ``("sft", "pref")`` (authors' code: also after the
  SFT stage, with one shared history per matrix, [SFT_0, RL_0, SFT_1, RL_1, …], so the preference update of task t
  is projected against the SFT update of the same task too). Only the second denoises, projects and remembers the
  SFT update, which at the authors' learning rates (SFT 1e-4, FPO 5e-6) is the larger one.
  ``configs/lifealign/paper-six-tasks.yaml`` (SFT on) sets ``[sft, pref]``; the shipped configs without an SFT stage
  set or keep ``[pref]`` (docs/METHODS.md).
- ``granularity``: ``"factors"`` (paper and code): every ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r) is
  consolidated on its own, so the effective ``ΔW = B A`` is not itself denoised. ``"product"`` (ours): per module
  the effective update ``SM = B A − B0 A0`` (d_out, d_in; without the constant ``alpha/r`` scale, which changes
  neither the energy ratios nor the projections) is consolidated, then ``T = B0 A0 + RSM`` is written back as the
  rank-r truncated SVD ``T ≈ U_r Σ_r V_rᵀ`` split as ``A = c V_rᵀ``, ``B = U_r Σ_r / c`` with ``c`` the mean row
  norm of the trained ``A``: A keeps orthogonal rows at its trained scale and B carries the singular values, so a
  slot with ``σ_i = 0`` is ``B``-column zero with a non-zero ``A`` row and still trains (as peft's init ``B = 0``).
  ``T`` can have rank above r (``B0 A0`` and ``RSM`` add up); the lost fraction ``‖T − B A‖²/‖T‖²`` is reported as
  ``refactor_residual``. History entries are the flattened ``RSM`` of ``ΔW`` (d_out·d_in floats per module).
- ``rank_truncate_basis``: True drops history directions with ``σ ≤ 1e-6 σ_max``; False uses every row of ``Vh``
  like the code, where a zero history row contributes an arbitrary direction that is then damped too
  (paper-vs-code difference 5). The code also zero-pads the history of a parameter first seen at task > 0; here
  a new matrix simply starts with an empty history.

All linear algebra runs in float32 on the CPU (history and ``W0`` live there); results are cast back to the
parameter's dtype and device when written.

Sharded training (ZeRO-3, FSDP1, FSDP2): the snapshot and the consolidation run inside ``gathered_lora``, i.e. on
the full LoRA matrices; every rank computes the consolidation and rank 0's result is written to every shard
(``lifealign.models.gather``), so the history is the same on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lifealign.models.lora import gathered_lora, lora_modules
from lifealign.training.plugin import Plugin, PluginContext, TrainingStage
from lifealign.utils.kwargs import check_distinct, check_range

__all__ = [
    "SLMCPlugin",
    "consolidate_update",
    "history_basis",
    "project_onto_span",
    "refactorise_lora",
    "truncate_by_energy",
]

logger = logging.getLogger(__name__)

ENERGY_EPS = 1e-9
"""A short-term update with ``Σσ² ≤ ENERGY_EPS`` is returned unchanged (authors' ``_denoise_update_vector``)."""
BASIS_REL_TOL = 1e-6
"""``rank_truncate_basis`` keeps history directions with ``σ > BASIS_REL_TOL · σ_max``."""
Granularity = Literal["factors", "product"]


def truncate_by_energy(m: Tensor, theta: float) -> tuple[Tensor, int, float]:
    """Energy-threshold truncated SVD (Eqs. 4–7): ``(U[:, :k'] Σ[:k'] V[:, :k']ᵀ, k', kept_energy)``.

    ``k'`` is the smallest rank with ``Σ_{i≤k'} σ_i² / Σ_i σ_i² ≥ θ`` (θ = 0 keeps rank 1; θ = 1 keeps all);
    ``kept_energy`` is that ratio. ``m`` is 2-D; the result is float32. If ``Σσ² ≤ 1e-9``, ``m`` is returned
    unchanged with ``k' = min(m.shape)`` and ``kept_energy = 1``.
    """
    if m.ndim != 2:
        raise ValueError(f"truncate_by_energy expects a matrix, got shape {tuple(m.shape)}")
    m = m.float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    energy = s.double() ** 2
    total = float(energy.sum())
    if total <= ENERGY_EPS:
        return m.clone(), s.numel(), 1.0
    cumulative = torch.cumsum(energy, 0) / total
    # Rounding can leave cumulative[-1] a hair below 1, so θ = 1 must clamp to the full rank.
    k = min(int((cumulative < theta).sum()) + 1, s.numel())
    return (u[:, :k] * s[:k]) @ vh[:k], k, float(cumulative[k - 1])


def history_basis(history: Sequence[Tensor] | Tensor, rank_truncate_basis: bool = True) -> Tensor:
    """Orthonormal rows spanning the flattened history (Eq. 8): ``Vh`` of ``svd(H)``, ``H = [RSM_1; …; RSM_{t−1}]``.

    Returns a ``(k_h, n)`` float32 tensor. With ``rank_truncate_basis`` only rows with ``σ > 1e-6 σ_max`` are kept
    (none if ``H = 0``); otherwise all ``min(t, n)`` rows, as the authors' code does.
    """
    h = history if isinstance(history, Tensor) else torch.stack([v.reshape(-1) for v in history])
    if h.ndim != 2 or h.shape[0] == 0:
        raise ValueError(f"history must be a non-empty stack of flat updates, got shape {tuple(h.shape)}")
    _, s, vh = torch.linalg.svd(h.float(), full_matrices=False)
    if rank_truncate_basis:
        vh = vh[s > BASIS_REL_TOL * s.max()]
    return vh


def project_onto_span(v: Tensor, basis: Tensor) -> Tensor:
    """``p = V_hᵀ (V_h v)`` (Eq. 9): the orthogonal projection of ``flat(v)`` onto the row span of ``basis``.

    ``basis`` is ``(k, n)`` with orthonormal rows; ``v`` has ``n`` elements; ``p`` has ``v``'s shape.
    """
    flat = v.reshape(-1).float()
    if basis.ndim != 2 or basis.shape[1] != flat.numel():
        raise ValueError(f"basis of shape {tuple(basis.shape)} does not match an update of {flat.numel()} elements")
    return (basis.T @ (basis @ flat)).reshape(v.shape)


def consolidate_update(
    sm: Tensor, history: Sequence[Tensor] | Tensor, theta: float, lam: float, rank_truncate_basis: bool = True
) -> tuple[Tensor, dict[str, Any]]:
    """One matrix's SLMC (Eqs. 4–10): ``RSM = SM' − p + λ p`` with ``SM'`` the θ-truncated ``sm`` and ``p`` its
    projection onto the span of ``history`` (``p = 0`` for an empty history). ``RSM`` has ``sm``'s shape (float32).

    ``info``: ``rank`` (k'), ``max_rank``, ``kept_energy``, ``history_rank`` (k_h) and ``in_span_energy``
    (``‖p‖² / ‖SM'‖²``, the share of the update that conflicts with the history).
    """
    refined, k, kept = truncate_by_energy(sm, theta)
    info: dict[str, Any] = {
        "rank": k,
        "max_rank": min(sm.shape),
        "kept_energy": kept,
        "history_rank": 0,
        "in_span_energy": 0.0,
    }
    if len(history) == 0:
        return refined, info
    basis = history_basis(history, rank_truncate_basis)
    p = project_onto_span(refined, basis)
    norm2 = float(refined.pow(2).sum())
    info["history_rank"] = basis.shape[0]
    info["in_span_energy"] = float(p.pow(2).sum()) / norm2 if norm2 > 0 else 0.0
    return refined - p + lam * p, info


def refactorise_lora(target: Tensor, rank: int, a_row_norm: float) -> tuple[Tensor, Tensor, float]:
    """Split ``target`` (d_out, d_in) into ``B (d_out, r)``, ``A (r, d_in)`` with ``B A`` its best rank-r approximation.

    ``target ≈ U_r Σ_r V_rᵀ`` (Eckart–Young); ``A = c V_rᵀ`` (orthogonal rows of norm ``c = a_row_norm``, or 1 if
    that is not positive and finite), ``B = U_r Σ_r / c``. Returns ``(B, A, residual)`` with ``residual = ‖target − B A‖² / ‖target‖²`` (0 if
    ``target = 0``).
    """
    d_out, d_in = target.shape
    if rank > min(d_out, d_in):
        raise ValueError(f"adapter rank {rank} exceeds the module's size {d_out}x{d_in}")
    c = a_row_norm if math.isfinite(a_row_norm) and a_row_norm > 0 else 1.0
    u, s, vh = torch.linalg.svd(target.float(), full_matrices=False)
    b = u[:, :rank] * (s[:rank] / c)
    a = c * vh[:rank]
    total = float(target.float().pow(2).sum())
    residual = float((target.float() - b @ a).pow(2).sum()) / total if total > 0 else 0.0
    return b, a, residual


def _key_a(module: str) -> str:
    return f"{module}.lora_A"


def _key_b(module: str) -> str:
    return f"{module}.lora_B"


class SLMCPlugin(Plugin):
    """SLMC after every configured stage; constructor kwargs are the YAML keys of ``{name: slmc, ...}``.

    ``before_stage`` snapshots ``W0`` (every ``lora_A``/``lora_B``); ``after_stage`` consolidates and overwrites the
    adapter. On resume, ``load_state_dict`` restores a mid-stage ``W0`` and the next ``before_stage`` of the same
    (task, stage) keeps it instead of snapshotting the half-trained weights (``train_task`` calls ``before_stage``
    on resume too).
    """

    name = "slmc"

    def __init__(
        self,
        *,
        theta: float = 0.9,
        lam: float = 0.5,
        stages: tuple[TrainingStage, ...] = ("pref",),
        granularity: Granularity = "factors",
        rank_truncate_basis: bool = True,
    ):
        self.theta = check_range("theta", theta, low=0, high=1)
        self.lam = check_range("lam", lam, low=0, high=1)
        self.stages = check_distinct("stages", stages)
        self.granularity = granularity
        self.rank_truncate_basis = rank_truncate_basis
        self.history: dict[str, list[Tensor]] = {}
        """Matrix key (``<module>.lora_A``/``.lora_B``, or ``<module>`` in product mode) -> flat float32 RSMs."""
        self.reports: list[dict[str, Any]] = []
        self._w0: dict[str, Tensor] | None = None
        self._w0_at: tuple[int, str] | None = None
        self._w0_restored = False

    # ----- hooks ---------------------------------------------------------------------------------------------
    def before_stage(self, ctx: PluginContext) -> None:
        if ctx.stage not in self.stages:
            return
        at = (ctx.task_index, ctx.stage)
        if self._w0_restored and self._w0_at == at:
            self._w0_restored = False
            return
        with gathered_lora(ctx.model, modify=False):
            modules = lora_modules(ctx.model)
            if not modules:
                raise ValueError("slmc: the model has no LoRA modules (was attach_lora called?)")
            w0 = {}
            for name, (a, b) in modules.items():
                w0[_key_a(name)] = a.detach().float().cpu().clone()
                w0[_key_b(name)] = b.detach().float().cpu().clone()
        self._w0, self._w0_at, self._w0_restored = w0, at, False

    def after_stage(self, ctx: PluginContext) -> None:
        if ctx.stage not in self.stages:
            return
        if self._w0 is None or self._w0_at != (ctx.task_index, ctx.stage):
            raise RuntimeError(
                f"slmc: after_stage for task {ctx.task_index} stage {ctx.stage!r} without its before_stage snapshot "
                f"(snapshot is for {self._w0_at})"
            )
        consolidate = self._consolidate_product if self.granularity == "product" else self._consolidate_factors
        with gathered_lora(ctx.model, modify=True), torch.no_grad():
            modules = lora_modules(ctx.model)
            infos = {name: info for module, params in modules.items() for name, info in consolidate(module, *params)}
        report = self._report(ctx, infos)
        self.reports.append(report)
        self._w0, self._w0_at, self._w0_restored = None, None, False
        logger.info(
            "slmc %s/%s: mean kept rank %.2f, mean kept energy %.4f, history %d bytes",
            ctx.task.name,
            ctx.stage,
            report["mean_rank"],
            report["mean_kept_energy"],
            report["history_bytes"],
        )

    # ----- consolidation -------------------------------------------------------------------------------------
    def _w0_of(self, key: str) -> Tensor:
        assert self._w0 is not None
        if key not in self._w0:
            raise ValueError(f"slmc: LoRA matrix {key} has no W0 snapshot (the adapter changed inside the stage)")
        return self._w0[key]

    def _consolidate_matrix(self, key: str, sm: Tensor) -> tuple[Tensor, dict[str, Any]]:
        history = self.history.setdefault(key, [])
        if history and history[0].numel() != sm.numel():
            raise ValueError(f"slmc: {key} has {sm.numel()} elements but its history has {history[0].numel()}")
        rsm, info = consolidate_update(sm, history, self.theta, self.lam, self.rank_truncate_basis)
        history.append(rsm.reshape(-1).clone())
        return rsm, info

    def _consolidate_factors(self, module: str, a: Tensor, b: Tensor) -> list[tuple[str, dict[str, Any]]]:
        """``W = W0 + RSM`` for ``lora_A`` and ``lora_B`` separately (paper and code)."""
        out = []
        for key, param in ((_key_a(module), a), (_key_b(module), b)):
            w0 = self._w0_of(key)
            rsm, info = self._consolidate_matrix(key, param.detach().float().cpu() - w0)
            param.copy_((w0 + rsm).to(device=param.device, dtype=param.dtype))
            out.append((key, info))
        return out

    def _consolidate_product(self, module: str, a: Tensor, b: Tensor) -> list[tuple[str, dict[str, Any]]]:
        """``B A ≈ B0 A0 + RSM`` with ``SM = B A − B0 A0`` (see the module docstring)."""
        a0, b0 = self._w0_of(_key_a(module)), self._w0_of(_key_b(module))
        a_now, b_now = a.detach().float().cpu(), b.detach().float().cpu()
        base = b0 @ a0  # (d_out, d_in)
        rsm, info = self._consolidate_matrix(module, b_now @ a_now - base)
        new_b, new_a, residual = refactorise_lora(base + rsm, a.shape[0], float(a_now.norm(dim=1).mean()))
        a.copy_(new_a.to(device=a.device, dtype=a.dtype))
        b.copy_(new_b.to(device=b.device, dtype=b.dtype))
        info["refactor_residual"] = residual
        return [(module, info)]

    # ----- reporting -----------------------------------------------------------------------------------------
    def history_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for rows in self.history.values() for v in rows)

    def _report(self, ctx: PluginContext, infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
        n = max(len(infos), 1)
        return {
            "task_index": ctx.task_index,
            "task": ctx.task.name,
            "stage": ctx.stage,
            "granularity": self.granularity,
            "theta": self.theta,
            "lam": self.lam,
            "history_bytes": self.history_bytes(),
            "history_length": max((len(rows) for rows in self.history.values()), default=0),
            "mean_rank": sum(i["rank"] for i in infos.values()) / n,
            "mean_kept_energy": sum(i["kept_energy"] for i in infos.values()) / n,
            "mean_in_span_energy": sum(i["in_span_energy"] for i in infos.values()) / n,
            "matrices": infos,
        }

    def report(self) -> dict[str, Any]:
        """``{"history_bytes", "history_length", "consolidations", "reports"}``; ``reports`` has one dict per
        consolidation (task, stage, kept rank / kept energy / history rank per matrix)."""
        return {
            "history_bytes": self.history_bytes(),
            "history_length": max((len(rows) for rows in self.history.values()), default=0),
            "consolidations": len(self.reports),
            "reports": list(self.reports),
        }

    # ----- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors ``history/<key>`` (t, n) and, mid-stage, ``w0/<key>``; meta: settings, reports, W0 position."""
        tensors = {f"history/{k}": torch.stack(rows) for k, rows in self.history.items() if rows}
        if self._w0 is not None:
            tensors.update({f"w0/{k}": v.clone() for k, v in self._w0.items()})
        meta = {
            "settings": {"granularity": self.granularity, "theta": self.theta, "lam": self.lam},
            "reports": list(self.reports),
            "w0_at": list(self._w0_at) if self._w0 is not None and self._w0_at is not None else None,
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta, tensors = state.get("meta", {}), state.get("tensors", {})
        saved = meta.get("settings", {}).get("granularity", self.granularity)
        if saved != self.granularity:
            raise ValueError(f"slmc granularity: the checkpoint has {saved!r} but this plugin has {self.granularity!r}")
        history = {
            k[len("history/") :]: list(v.float().cpu().unbind(0))
            for k, v in tensors.items()
            if k.startswith("history/")
        }
        w0 = {k[len("w0/") :]: v.float().cpu().clone() for k, v in tensors.items() if k.startswith("w0/")}
        w0_at = meta.get("w0_at")
        if (w0_at is None) != (not w0):
            raise ValueError("slmc: checkpoint has a W0 position without W0 tensors (or the reverse)")
        self.history, self.reports = history, list(meta.get("reports", []))
        self._w0 = w0 or None
        self._w0_at = (int(w0_at[0]), str(w0_at[1])) if w0_at is not None else None
        self._w0_restored = self._w0 is not None
