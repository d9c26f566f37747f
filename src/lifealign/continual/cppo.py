"""CPPO (Zhang et al., ICLR 2024) re-implemented on the DPO loss as the LifeAlign code does (METHODS.md §1.6).

Per example i of a micro-batch, with the implicit-reward margin ``m_i = r_c,i − r_r,i`` (of the first loss term that
reports rewards, e.g. DPO's ``β(log π − log π_ref)``) and the chosen log-prob ``c_i = log π(y_c,i | x_i)`` (summed
over response tokens), both detached, and thresholds ``mean ± std_mult · std`` over the batch (unbiased std, as
``torch.std``):

=================  ============================  ==========  =========
class              condition                     α_i         β_i
=================  ============================  ==========  =========
high-performance   c ≥ c_hi and m ≥ m_hi         alpha_ub    beta_ub
overfitting        c ≥ c_hi and m ≤ m_lo         alpha_ub    beta_lb
high-variance      c ≤ c_lo and m ≥ m_hi         alpha_ub    beta_lb
noisy              c ≤ c_lo and m ≤ m_lo         alpha_lb    beta_lb
normal             otherwise                     1           1
=================  ============================  ==========  =========

(bounds 0.5 and 2). A zero std is clamped to 1e-8 as in the authors' code, with the statistics in float64 so that
the floor is not rounded away (every example is then "normal"); a one-pair batch has no std and gets α = β = 1. The authors' loss per example is ``α_i ℓ_i + kr_coef · β_i · KR_i`` with ``ℓ_i`` the per-example objective and

    KR_i = (log π(y_c,i) − log π_old(y_c,i))² + (log π(y_r,i) − log π_old(y_r,i))²,

averaged over the batch. The loop already adds ``mean_i ℓ_i`` (``ℓ_i = Σ_k w_k L_k,i`` over the method's loss
terms), so this plugin's ``extra_loss`` returns

    mean_i (α_i − 1) ℓ_i  +  kr_coef · mean_i β_i KR_i,

which makes the total exactly the authors' ``mean_i [α_i ℓ_i + kr_coef β_i KR_i]``. ``ℓ_i`` is recomputed from
``outputs["inputs"]`` with the method's loss terms (``ctx.loss``); the log-probs carry the gradient.

``π_old`` is the adapter state snapshotted in ``before_task`` (``snapshot="task"``: the policy at the end of the
previous task; the initial adapter for the first task). The authors' code snapshots once, at the first DPO step of
the first task, and never refreshes it (``snapshot="once"``, taken at ``before_task`` of the first task).
Old log-probs are computed for each micro-batch under ``no_grad`` by ``torch.func.functional_call`` with the
snapshot's LoRA tensors, which leaves the live parameters (saved for the backward pass) untouched.

Only the stages in ``stages`` are reweighted (default the preference stage: the authors have no CPPO SFT trainer).
A side the loss does not read (the SFT stage reads only ``chosen``) drops out of KR; without rewards α = β = 1.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor

from lifealign.losses.logps import sequence_logps
from lifealign.losses.spec import LossInputs
from lifealign.models.lora import lora_state
from lifealign.training.plugin import Plugin, PluginContext, TrainingStage
from lifealign.utils.kwargs import check_distinct, check_range

__all__ = ["CPPOPlugin", "cppo_weights", "knowledge_retention", "logps_with_adapter", "per_example_loss"]

logger = logging.getLogger(__name__)

Snapshot = Literal["task", "once"]
STD_FLOOR = 1e-8


# ----- pure functions --------------------------------------------------------------------------------------------
def cppo_weights(
    margins: Tensor,
    chosen_logps: Tensor,
    std_mult: float = 1.0,
    alpha_bounds: tuple[float, float] = (0.5, 2.0),
    beta_bounds: tuple[float, float] = (0.5, 2.0),
) -> tuple[Tensor, Tensor]:
    """Per-example ``(α, β)`` from the classification table in the module docstring (later rows override earlier
    ones where both hold, as in the authors' code). Inputs ``(B,)``; outputs float32 ``(B,)``."""
    # float64: in float32 a 1e-8 floor vanishes next to a mean of ~0.3, and equal values would all be "noisy"
    m, c = margins.detach().double(), chosen_logps.detach().double()
    alpha = torch.ones(m.shape, dtype=torch.float32, device=m.device)
    beta = torch.ones_like(alpha)
    if m.numel() < 2:
        return alpha, beta
    m_std, c_std = m.std().clamp_min(STD_FLOOR), c.std().clamp_min(STD_FLOOR)
    m_hi, m_lo = m.mean() + std_mult * m_std, m.mean() - std_mult * m_std
    c_hi, c_lo = c.mean() + std_mult * c_std, c.mean() - std_mult * c_std
    (a_lb, a_ub), (b_lb, b_ub) = alpha_bounds, beta_bounds
    classes = [
        ((c >= c_hi) & (m >= m_hi), a_ub, b_ub),  # high-performance
        ((c >= c_hi) & (m <= m_lo), a_ub, b_lb),  # overfitting
        ((c <= c_lo) & (m >= m_hi), a_ub, b_lb),  # high-variance
        ((c <= c_lo) & (m <= m_lo), a_lb, b_lb),  # noisy
    ]
    for mask, a, b in classes:
        alpha[mask], beta[mask] = a, b
    return alpha, beta


def knowledge_retention(policy: dict[str, Tensor], old: dict[str, Tensor], sides: tuple[str, ...]) -> Tensor:
    """``KR_i = Σ_sides (log π_side,i − log π_old side,i)²`` ``(B,)``."""
    terms = [(policy[f"{s}_logps"].float() - old[f"{s}_logps"].float().detach()).pow(2) for s in sides]
    return torch.stack(terms).sum(0)


def per_example_loss(loss: Any, inputs: LossInputs) -> tuple[Tensor, Tensor | None]:
    """``(ℓ (B,), margins (B,) or None)``: ``ℓ_i = Σ_k w_k L_k,i`` over the loss terms, and the reward margin of the
    first term that reports both rewards."""
    total, margins = None, None
    for term in loss.terms:
        out = term(inputs)
        weighted = term.weight * out.losses
        total = weighted if total is None else total + weighted
        if margins is None and out.chosen_rewards is not None and out.rejected_rewards is not None:
            margins = out.chosen_rewards - out.rejected_rewards
    assert total is not None
    return total, margins


@torch.no_grad()
def logps_with_adapter(model: torch.nn.Module, batch: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{"<side>_logps": (B,)}`` of ``model`` with its LoRA tensors replaced by ``state`` (``functional_call``; the
    model's own parameters are not modified)."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    out = torch.func.functional_call(
        model,
        {k: v.to(device) for k, v in state.items()},
        args=(),
        kwargs={"input_ids": input_ids, "attention_mask": batch["attention_mask"].to(device), "use_cache": False},
        strict=False,
    )
    logps, _ = sequence_logps(out.logits, input_ids, batch["completion_mask"].to(device))
    b = batch["n_pairs"]
    return {f"{side}_logps": logps[k * b : (k + 1) * b] for k, side in enumerate(batch["sides"])}


# ----- the plugin ------------------------------------------------------------------------------------------------
class CPPOPlugin(Plugin):
    """CPPO sample weights and knowledge retention on top of the loop's DPO-family loss."""

    name = "cppo"
    plain_rows_only = True  # the old policy's log-probs come from a functional forward on plain rows

    def __init__(
        self,
        *,
        std_mult: float = 1.0,
        kr_coef: float = 0.1,
        alpha_bounds: tuple[float, float] = (0.5, 2.0),
        beta_bounds: tuple[float, float] = (0.5, 2.0),
        snapshot: Snapshot = "task",
        stages: tuple[TrainingStage, ...] = ("pref",),
    ):
        self.std_mult = check_range("std_mult", std_mult, low=0)
        self.kr_coef = check_range("kr_coef", kr_coef, low=0)
        self.alpha_bounds = _check_bounds("alpha_bounds", tuple(alpha_bounds))
        self.beta_bounds = _check_bounds("beta_bounds", tuple(beta_bounds))
        self.snapshot = snapshot
        self.stages = check_distinct("stages", stages)
        self.old_state: dict[str, Tensor] | None = None
        """π_old: the LoRA tensors snapshotted at ``before_task`` (CPU)."""
        self.snapshot_task: int | None = None
        self.last: dict[str, float] = {}
        """Statistics of the latest micro-batch: ``alpha_mean``, ``beta_mean``, ``kr_mean``, class fractions."""

    def before_task(self, ctx: PluginContext) -> None:
        if self.snapshot == "once" and self.old_state is not None:
            return
        self.old_state = {k: v.detach().cpu().clone() for k, v in lora_state(ctx.model).items()}
        self.snapshot_task = ctx.task_index

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        if ctx.stage not in self.stages:
            return None
        if self.old_state is None:
            raise ValueError("cppo: no old-policy snapshot (before_task did not run)")
        inputs: LossInputs = outputs["inputs"]
        policy: dict[str, Tensor] = outputs["policy"]
        losses, margins = per_example_loss(ctx.loss, inputs)
        if margins is not None and "chosen_logps" in policy:
            alpha, beta = cppo_weights(
                margins, policy["chosen_logps"], self.std_mult, self.alpha_bounds, self.beta_bounds
            )
        else:
            alpha, beta = torch.ones_like(losses.detach()), torch.ones_like(losses.detach())
        alpha, beta = alpha.to(losses.device), beta.to(losses.device)
        with ctx.autocast():
            old = logps_with_adapter(ctx.model, batch, self.old_state)
        kr = knowledge_retention(policy, old, tuple(batch["sides"]))
        self.last = {
            "alpha_mean": float(alpha.mean()),
            "beta_mean": float(beta.mean()),
            "kr_mean": float(kr.detach().mean()),
            "reweighted_fraction": float((alpha != 1).float().mean()),
        }
        return ((alpha - 1.0) * losses).mean() + self.kr_coef * (beta * kr.to(losses.device)).mean()

    # ----- resume --------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        n = sum(v.numel() for v in (self.old_state or {}).values())
        return {"snapshot_task": self.snapshot_task, "old_policy_parameters": n, "last": dict(self.last)}

    def state_dict(self) -> dict[str, Any]:
        tensors = {f"old/{k}": v for k, v in (self.old_state or {}).items()}
        return {"tensors": tensors, "meta": {"snapshot": self.snapshot, "snapshot_task": self.snapshot_task}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, meta = state.get("tensors", {}), state.get("meta", {})
        saved = meta.get("snapshot", self.snapshot)
        if saved != self.snapshot:
            raise ValueError(f"cppo snapshot: the checkpoint has {saved!r} but this plugin has {self.snapshot!r}")
        old = {k[len("old/") :]: v.clone() for k, v in tensors.items() if k.startswith("old/")}
        self.old_state = old or None
        self.snapshot_task = meta.get("snapshot_task")


def _check_bounds(key: str, value: tuple[float, float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{key}: must be a pair [lower, upper], got {list(value)!r}")
    low = check_range(f"{key}.0", float(value[0]), low=0)
    high = check_range(f"{key}.1", float(value[1]), low=0)
    if low > high:
        raise ValueError(f"{key}: lower bound {low} exceeds upper bound {high}")
    return low, high
