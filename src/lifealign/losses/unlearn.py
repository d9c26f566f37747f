"""Unlearning losses on the forget (``rejected``) response: GA, GradDiff, NPO, SimNPO (METHODS.md §2.2, §3).

Each is *minimised*. GradDiff's retain response is ``chosen``. ``|y|`` is the number of response tokens (at least 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lifealign.losses.dpo import check_beta
from lifealign.losses.logps import implicit_reward
from lifealign.losses.spec import LossInputs, LossOutput

__all__ = ["ga_loss", "grad_diff_loss", "npo_loss", "simnpo_loss"]


def _mean_token_logp(logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    return logps / n_tokens.clamp(min=1)


def ga_loss(inputs: LossInputs) -> LossOutput:
    """Gradient ascent: ``L = log pi(y_f|x) / |y_f|``, the mean per-token log-likelihood of the forget response.

    Minimising it is gradient ascent on the per-token NLL (U2A's GA, ``-(mean NLL)``). Unbounded below: the loop's
    stop rule must guard it (RELIABILITY R6). Shape ``(B,)``. U2A's code divides by every position from the end of
    the prompt to the padded length 256 (its padding mask tests token id 1, OPT's pad), i.e. by ``256 - |x|``
    rather than ``|y_f|``; we divide by the response tokens (docs/METHODS.md, "GA's normaliser").
    """
    forget, n_forget = inputs.require("rejected_logps", "rejected_tokens")
    return LossOutput(_mean_token_logp(forget, n_forget))


def grad_diff_loss(inputs: LossInputs, *, retain_weight: float = 1.0) -> LossOutput:
    """Gradient difference: ``L = log pi(y_f|x)/|y_f| + c * (-log pi(y_r|x)/|y_r|)`` with ``c = retain_weight``.

    ``y_f`` is the forget response (``rejected``), ``y_r`` the retain response (``chosen``), shape ``(B,)``. The
    retain term is the per-token NLL (the common GradDiff form; U2A's code uses a KL to the reference with c = 0.3).
    """
    if retain_weight < 0:
        raise ValueError(f"retain_weight must be >= 0, got {retain_weight}")
    forget, n_forget, retain, n_retain = inputs.require(
        "rejected_logps", "rejected_tokens", "chosen_logps", "chosen_tokens"
    )
    losses = _mean_token_logp(forget, n_forget) - retain_weight * _mean_token_logp(retain, n_retain)
    return LossOutput(losses)


def npo_loss(inputs: LossInputs, *, beta: float = 0.1, reduction: Literal["sum", "mean"] = "sum") -> LossOutput:
    """Negative Preference Optimization (Zhang et al. 2024): ``L = -(2/beta) log sigma(-beta (ell_f - ref_ell_f))``.

    DPO with only a losing response. ``ell`` is the forget response's log-likelihood under ``reduction``:

    - ``"sum"`` (the NPO paper, and this function's default): ``ell = log pi(y_f|x)``, summed over response tokens;
    - ``"mean"`` (U2A's code, and the default of ``unlearn.forget_reduction``): ``ell = log pi(y_f|x) / |y_f|``, the
      mean per-token log-likelihood, as U2A's ``get_npo_inner_loss`` takes it from ``outputs.loss`` (the mean token
      NLL). U2A's ``outputs.loss`` also averages over the prompt tokens and, in a batch, over the tokens of every
      sequence (its inner loop then applies NPO to that batch mean and multiplies by the batch's mean weight);
      here the mean is over each sequence's response tokens only, per example (docs/METHODS.md, "NPO's length").

    At ``ell = ref_ell`` the loss is ``(2/beta) ln 2`` and ``dL/d log pi(y_f|x)`` is 1 (``sum``) or ``1/|y_f|``
    (``mean``): the summed form's gradient, and so its impact score, is ``|y_f|`` times the mean form's, and it
    saturates ``|y_f|`` times faster. Returns the implicit reward ``beta (ell_f - ref_ell_f)`` as
    ``rejected_rewards``. Shapes ``(B,)``.
    """
    check_beta(beta)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    forget, ref_forget = inputs.require("rejected_logps", "ref_rejected_logps")
    if reduction == "mean":
        (n_forget,) = inputs.require("rejected_tokens")
        forget, ref_forget = _mean_token_logp(forget, n_forget), _mean_token_logp(ref_forget, n_forget)
    reward = implicit_reward(forget, ref_forget, beta)
    losses = -(2 / beta) * F.logsigmoid(-reward)
    return LossOutput(losses, rejected_rewards=reward.detach())


def simnpo_loss(inputs: LossInputs, *, beta: float = 2.5, delta: float = 0.0) -> LossOutput:
    """SimNPO (Fan et al. 2024): ``L = -(2/beta) log sigma(-(beta/|y_f|) log pi(y_f|x) - delta)``; no reference.

    The length-normalised reward ``(beta/|y_f|) log pi(y_f|x)`` (SimPO's) is returned as ``rejected_rewards``.
    Shapes ``(B,)``.
    """
    check_beta(beta)
    forget, n_forget = inputs.require("rejected_logps", "rejected_tokens")
    reward = beta * _mean_token_logp(forget, n_forget)
    losses = -(2 / beta) * F.logsigmoid(-reward - delta)
    return LossOutput(losses, rejected_rewards=reward.detach())
