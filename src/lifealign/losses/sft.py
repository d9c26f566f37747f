"""Supervised fine-tuning on the chosen response: its negative log-likelihood."""

from __future__ import annotations

from typing import Literal

from lifealign.losses.spec import LossInputs, LossOutput

__all__ = ["sft_loss"]


def sft_loss(inputs: LossInputs, *, reduction: Literal["mean", "sum"] = "mean") -> LossOutput:
    """``L = -log pi(y_w|x) / |y_w|`` (``reduction="mean"``, per-token NLL) or ``-log pi(y_w|x)`` (``"sum"``).

    Shapes ``(B,)``; ``|y_w|`` is the number of response tokens (at least 1). The mean is taken per sequence, so the
    batch loss weights sequences equally (trl's ``sft`` term averages over all tokens of the batch instead; the two
    agree when responses have equal lengths).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    (chosen,) = inputs.require("chosen_logps")
    if reduction == "sum":
        return LossOutput(-chosen)
    (n_tokens,) = inputs.require("chosen_tokens")
    return LossOutput(-chosen / n_tokens.clamp(min=1))
