"""The LM head on selected positions only: a forward pre-hook on the output embedding hands it the hidden states
of the positions whose logits are needed, so a 49k-vocabulary head runs on those rows instead of every token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import DataParallel
from torch.nn.parallel import DistributedDataParallel

from lifealign.losses.logps import sum_scored

__all__ = ["output_head", "per_side", "selected_logits", "unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / DataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that maps hidden states to logits (``get_output_embeddings``), looked up through DDP/peft."""
    inner = unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def selected_logits(
    model: torch.nn.Module,
    select: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...] | torch.Size,
    n_selected: int,
    full: Callable[[torch.Tensor], torch.Tensor],
    **inputs: Any,
) -> torch.Tensor:
    """Logits ``(n_selected, V)`` of the hidden states ``select(hidden (*shape, H))`` picks, from
    ``model(**inputs, use_cache=False)``; the LM head runs on those rows only (a forward pre-hook on the head).

    ``full(logits (*shape, V))`` picks the same rows from full logits, for a head not reached through its module.
    """
    head = output_head(model)
    handle = None
    if head is not None:

        def select_rows(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            hidden = args[0] if args else None
            if not isinstance(hidden, torch.Tensor) or hidden.shape[:-1] != tuple(shape):
                return None
            return (select(hidden), *args[1:])

        handle = head.register_forward_pre_hook(select_rows)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if logits.dim() == 2 and logits.shape[0] == n_selected:
        return logits
    if logits.shape[:-1] == tuple(shape):
        return full(logits)
    raise RuntimeError(
        f"the model returned logits of shape {tuple(logits.shape)} for {tuple(shape)} input ids with "
        f"{n_selected} scored positions: expected ({n_selected}, vocab) or (*input shape, vocab)"
    )


def per_side(
    logits: torch.Tensor, per_token: torch.Tensor, scored: torch.Tensor, sides: tuple[str, ...], n_pairs: int
) -> dict[str, torch.Tensor]:
    """The per-pair outputs of a forward, side by side: ``<side>_logps`` (summed log-probs), ``<side>_tokens`` and
    ``<side>_logits_sum`` (the sum over response positions of the mean logit over the vocabulary, detached: trl's
    ``logits/<side>`` is its total over the batch divided by the tokens).

    ``logits (M, V)`` and ``per_token (M,)`` are in the row-major order of the True entries of ``scored (S * B, L)``,
    rows side-major (``S`` sides of ``B = n_pairs`` pairs).
    """
    logps, n_tokens = sum_scored(per_token, scored), scored.sum(dim=-1)
    with torch.no_grad():
        logit_sums = sum_scored(logits.detach().mean(dim=-1, dtype=torch.float32), scored)
    out: dict[str, torch.Tensor] = {}
    for k, side in enumerate(sides):
        rows = slice(k * n_pairs, (k + 1) * n_pairs)
        out[f"{side}_logps"], out[f"{side}_tokens"] = logps[rows], n_tokens[rows]
        out[f"{side}_logits_sum"] = logit_sums[rows]
    return out
