"""Selection of the candidates to unlearn and their weights by mirror descent on the simplex (METHODS.md §2.2-2.3).

**Sign convention** (ADDENDUM B; the one used throughout lifealign). J is the DPO *loss* on the preference set, so
lower J is better alignment. ``l_i`` is the loss the inner optimiser *minimises* (GA: ``log pi(y_i|x_i)/|y_i|``).
The score is ``s_i = <H^-1 grad J, grad l_i>`` (``influence.py``) and, with ``H`` positive definite (``H = gamma I``,
gamma > 0, as in U2A's code; B.2 shows that a finite run of AdamW from theta_0 behaves like this with
``H_eff = (alpha T)^-1 I``), the implicit function theorem gives

    dJ/dw_i = -s_i.

Hence unlearning candidate i lowers J iff ``s_i > 0``: **select the k largest scores, keeping only positive ones**,
and the exponentiated-gradient step that *descends* ``J + beta_s sum_i sqrt(w_i)`` on the scaled simplex is

    g_i = -s_i + beta_s / (2 sqrt(w_i)),    w <- w * exp(-eta g) / Z,    sum_i w_i = |S|  (mean weight 1),

i.e. ``w_i`` grows with ``exp(+eta s_i)``. The released U2A code selects the largest ``s_i`` *and* applies
``exp(-eta s_i)``, which is consistent under neither sign of H (ADDENDUM B.1); we resolve the inconsistency in
favour of the selection (and of the derivation), and keep the code's update as ``weight_sign="code"`` so its
behaviour can be reproduced and reported as a variant. The weights are kept at mean 1 from the first solve on
(the code starts at ``1/1024`` and renormalises to mean 1 only after the first update, ADDENDUM B.3 note 4).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "choose_k",
    "exponentiated_gradient_step",
    "random_subset",
    "select_top_k",
    "standardized",
    "update_weights",
    "weight_gradient",
    "weight_stats",
]


def choose_k(n_candidates: int, k: int | None, k_fraction: float) -> int:
    """``k`` if given, else ``ceil(k_fraction * n)``; never more than ``n``."""
    return min(n_candidates, k if k is not None else math.ceil(k_fraction * n_candidates))


def select_top_k(scores: Tensor, k: int, positive_only: bool = True) -> list[int]:
    """Indices of the ``k`` largest scores, best first; with ``positive_only`` only those with ``s_i > 0``.

    Under the sign convention above these are the candidates whose unlearning lowers J the most (to first order).
    Ties are broken by the lower index (a stable sort), so the selection is deterministic.
    """
    order = torch.sort(scores.double(), descending=True, stable=True).indices.tolist()
    chosen = order[:k]
    if positive_only:
        chosen = [i for i in chosen if float(scores[i]) > 0.0]
    return chosen


def random_subset(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices of ``range(n)`` drawn with a seeded generator (the random-subset baseline)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


def standardized(scores: Tensor) -> Tensor:
    """``s / std(s)`` over the selected set (ADDENDUM B.3 note 1: raw LoRA dot products have an arbitrary scale);
    unchanged when there are fewer than two scores or they are all equal."""
    if scores.numel() < 2:
        return scores
    std = scores.double().std()
    return scores if not torch.isfinite(std) or std == 0 else (scores.double() / std).to(scores.dtype)


def weight_gradient(
    scores: Tensor, weights: Tensor, sparsity: float = 0.0, sign: Literal["paper", "code"] = "paper"
) -> Tensor:
    """``dJ/dw + beta_s d(sum sqrt w)/dw``: ``-s_i + beta_s/(2 sqrt w_i)`` (``paper``) or ``+s_i + ...`` (``code``).

    A zero weight has an infinite penalty gradient; it stays zero (``exponentiated_gradient_step`` keeps it).
    """
    data = -scores.double() if sign == "paper" else scores.double()
    if sparsity > 0:
        w = weights.double()
        penalty = torch.where(w > 0, sparsity / (2 * w.clamp_min(1e-300).sqrt()), torch.zeros_like(w))
        data = data + penalty
    return data


def exponentiated_gradient_step(weights: Tensor, grad: Tensor, lr: float) -> Tensor:
    """Mirror descent with the entropy map on the scaled simplex ``{w >= 0, sum w = |S|}``.

    ``w_i <- |S| * w_i exp(-lr g_i) / sum_j w_j exp(-lr g_j)``, computed in the log domain (no overflow); zero
    weights stay zero. If every weight is zero the input is returned unchanged.
    """
    w = weights.double()
    positive = w > 0
    if not positive.any():
        return weights.clone()
    logits = torch.full_like(w, -math.inf)
    logits[positive] = w[positive].log() - lr * grad.double()[positive]
    logits = logits - logits[positive].max()
    new = logits.exp()
    return (new * (w.numel() / new.sum())).to(weights.dtype)


def update_weights(
    weights: Tensor,
    scores: Tensor,
    *,
    lr: float,
    sparsity: float = 0.0,
    sign: Literal["paper", "code"] = "paper",
    standardize: bool = True,
) -> Tensor:
    """One outer step on the selected set: (standardised) scores -> weight gradient -> exponentiated step."""
    s = standardized(scores) if standardize else scores
    return exponentiated_gradient_step(weights, weight_gradient(s, weights, sparsity, sign), lr)


def weight_stats(weights: Tensor) -> dict[str, float]:
    """Summary of a weight vector: min, max, effective size ``(sum w)^2 / sum w^2`` and normalised entropy."""
    w = weights.double()
    if w.numel() == 0:
        return {"n": 0, "min": math.nan, "max": math.nan, "effective_size": 0.0, "entropy": math.nan, "n_zero": 0}
    p = w / w.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(w.numel())) if w.numel() > 1 else 1.0
    return {
        "n": int(w.numel()),
        "min": float(w.min()),
        "max": float(w.max()),
        "effective_size": float(w.sum() ** 2 / (w**2).sum()),
        "entropy": entropy,
        "n_zero": int((w == 0).sum()),
    }
