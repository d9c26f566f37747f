"""Plugins that complete the inner unlearning objective inside the one loop (``train_task``), without a second loop.

- ``AnchorPlugin``: ``lambda_reg * mean_p ||theta_p - theta_0,p||^2`` over the LoRA tensors (U2A's parameter
  regulariser, ``lamda = 0.1``), pulling toward the adapter unlearning started from.
- ``RetainPlugin``: GradDiff's retain term ``c * KL(pi_orig || pi_theta)`` (token level, U2A's code) or
  ``c * NLL`` on retain sequences drawn independently of the forget batch, unweighted.
- ``ForgetNLLGuard``: the stop rule of RELIABILITY R6 — once the forget batch's mean per-token NLL exceeds a bound
  for ``patience`` consecutive micro-batches, it asks the loop to stop (``Plugin.stop_request``) *before* that
  micro-batch's backward, so no update is taken at the stopping step; the stage returns the structured
  ``unlearn_stopped`` event (on every rank, when any rank's batch trips it) carrying the guard's ``scope``: what the
  stop ends (``epoch``, ``solve`` or ``run``; ``inner.InnerSolver`` and ``u2a.U2A`` act on it).

  U2A's code (``optimize_inner``) checks its "bad loss" *after* the step's update, so the update of the micro-batch
  that trips the bound is taken there and not here; after a trigger its later epochs therefore take one step each
  while the bound stays exceeded, ours none. Its "bad loss" is ``-normal_loss``: the forget batch's mean response
  NLL for GA and GradDiff (less ``lamda * reg`` for GA), but minus the NPO loss for NPO; ours is the forget NLL for
  every objective (docs/METHODS.md, "stop rule").

Retain batches are a pure function of (seed, optimizer step, micro-batch), so a resumed stage draws the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lifealign.data.collate import collate_pairs
from lifealign.evaluation.drift import token_kl
from lifealign.models.lora import lora_parameters, reference_context
from lifealign.training.forward import batch_logps
from lifealign.training.loop import micro_batch_indices
from lifealign.training.plugin import Plugin, PluginContext

__all__ = ["AnchorPlugin", "ForgetNLLGuard", "RetainPlugin", "optimizer_steps_taken"]

RETAIN = ("chosen",)


def optimizer_steps_taken(optimizer: torch.optim.Optimizer | None) -> int:
    """Completed optimizer steps (AdamW's per-parameter ``step``; 0 before the first), restored on resume."""
    if optimizer is None:
        return 0
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


class AnchorPlugin(Plugin):
    """``lambda * mean_p ||theta_p - anchor_p||^2`` over the trainable LoRA tensors (P of them)."""

    name = "anchor"

    def __init__(self, anchor: dict[str, Tensor], weight: float):
        self.anchor = {k: v.detach().clone() for k, v in anchor.items()}
        self.weight = weight

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        if self.weight == 0:
            return None
        params = lora_parameters(ctx.model)
        terms = [((p - self.anchor[n].to(p)) ** 2).sum() for n, p in params.items()]
        return self.weight * torch.stack(terms).mean()


class RetainPlugin(Plugin):
    """``weight * retain_term`` on a retain micro-batch per forget micro-batch (GradDiff's second term)."""

    name = "retain"

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        *,
        pad_id: int,
        mode: Literal["kl", "nll"],
        weight: float,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        reference_state: dict[str, Tensor] | None = None,
    ):
        if not examples:
            raise ValueError("the retain term needs at least one retain example")
        self.examples, self.pad_id, self.mode, self.weight = list(examples), pad_id, mode, weight
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.reference_state = reference_state
        self._step, self._micro = -1, 0

    def _next_indices(self, ctx: PluginContext) -> list[int]:
        step = optimizer_steps_taken(ctx.optimizer)
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        return micro_batch_indices(
            len(self.examples),
            self.seed,
            step,
            self._micro % self.grad_accum,
            self.grad_accum,
            self.batch_size,
            ctx.rank,
            ctx.world_size,
        )

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        if self.weight == 0:
            return None
        retain = collate_pairs([self.examples[i] for i in self._next_indices(ctx)], self.pad_id, sides=RETAIN)
        term = (
            retain_kl(ctx.model, retain, self.reference_state) if self.mode == "kl" else retain_nll(ctx.model, retain)
        )
        return self.weight * term


def retain_nll(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Token-weighted mean NLL of the batch's responses."""
    policy = batch_logps(model, batch)
    return -policy["chosen_logps"].sum() / policy["chosen_tokens"].sum().clamp_min(1)


def retain_kl(model: nn.Module, batch: dict[str, Any], reference_state: dict[str, Tensor] | None) -> Tensor:
    """Token-weighted mean ``KL(pi_ref || pi_theta)`` over response positions (the reference is the original model:
    adapter disabled, or ``reference_state`` substituted functionally so no parameter is modified in place)."""
    device = next(model.parameters()).device
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "use_cache": False,
    }
    policy_logits = model(**inputs).logits
    with torch.no_grad():
        if reference_state is None:
            with reference_context(model):
                ref_logits = model(**inputs).logits
        else:
            ref_logits = functional_call(model, reference_state, args=(), kwargs=inputs, strict=False).logits
    kl_sum, n_tokens = token_kl(ref_logits, policy_logits, batch["completion_mask"].to(device))
    return kl_sum.sum() / n_tokens.sum().clamp_min(1)


class ForgetNLLGuard(Plugin):
    """Stop the stage when the forget NLL stays above ``bound`` for ``patience`` consecutive micro-batches.

    The count is reset at the start of a stage unless ``load_state_dict`` restored it: a stage resumed mid-way, or
    the next epoch of a solve whose previous epoch this stop ended (``scope="epoch"``), keeps it.
    """

    name = "forget_guard"

    def __init__(self, bound: float, patience: int = 4, label: str = "", scope: str = "run"):
        self.bound, self.patience, self.label, self.scope = bound, patience, label, scope
        self.count = 0
        self._restored = False

    def before_stage(self, ctx: PluginContext) -> None:
        if not self._restored:  # a stage resumed mid-way keeps the count its checkpoint carried
            self.count = 0
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {}, "meta": {"count": self.count}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["meta"].get("count", 0))
        self._restored = True

    def stop_request(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any] | None:
        policy = outputs["policy"]
        with torch.no_grad():
            nll = float(-policy["rejected_logps"].sum() / policy["rejected_tokens"].sum().clamp_min(1))
        self.count = self.count + 1 if nll > self.bound else 0
        if self.count < self.patience:
            return None
        return {
            "event": "unlearn_stopped",
            "reason": "forget_nll_above_bound",
            "where": self.label,
            "steps_completed": optimizer_steps_taken(ctx.optimizer),
            "forget_nll": nll,
            "bound": self.bound,
            "patience": self.patience,
            "scope": self.scope,
        }
