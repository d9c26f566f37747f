"""Forward passes that turn a collated batch into per-sequence log-probs, and the cached reference log-probs.

The chosen and rejected rows of a batch go through the model in one forward (trl's concatenated forward), or, for
a ``shared``/``packed`` batch, one segment per pair with the prompt once (``lifealign.training.packed``); the
LM head projects only the positions that predict a response token, and the log-softmax and the sums run in fp32
even under bf16 autocast (``label_logps``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lifealign.data.collate import collate
from lifealign.losses.logps import label_logps
from lifealign.losses.spec import LossInputs
from lifealign.models.lora import load_lora_state, lora_state, reference_context
from lifealign.training.head import output_head, per_side, selected_logits
from lifealign.training.packed import segment_logps

__all__ = [
    "adapter_swapped",
    "batch_logps",
    "compute_reference_logps",
    "loss_inputs",
    "output_head",
    "reference_policy",
    "scored_logits",
]


def batch_logps(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"<side>_logps": (B,), "<side>_tokens": (B,), "<side>_logits_sum": (B,)}`` for every side, in pair order.

    Dispatches on ``batch["layout"]`` (``lifealign.data.collate.collate``): ``shared`` and ``packed`` batches go
    through ``segment_logps``; a ``concat`` batch (or one without a layout, from ``collate_pairs``) is one forward
    over its side-major rows. The LM head only projects the positions that predict a response token
    (``scored_logits``): prompt and padding positions need no logits, and on a 49k vocabulary the head is a large
    part of the step.
    """
    if batch.get("layout", "concat") != "concat":
        return segment_logps(model, batch)
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    scored = batch["completion_mask"].to(device)[:, 1:].bool()  # (N, T-1): position t-1 predicts response token t
    logits = scored_logits(model, input_ids, batch["attention_mask"].to(device), scored)
    per_token = label_logps(logits, input_ids[:, 1:][scored])
    return per_side(logits, per_token, scored, tuple(batch["sides"]), batch["n_pairs"])


def scored_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """Logits ``(M, V)`` of the positions ``p`` with ``scored[n, p]`` (row-major order), ``scored (N, T-1)``.

    The model's own forward is called (so DDP's gradient hooks and peft's adapters run as usual); a forward
    pre-hook on the LM head hands it only the scored positions' hidden states, so the head computes ``M`` rows
    instead of ``N * T``. If the head is not reached through its module (or returns another shape) the full logits
    are computed and the scored rows selected from them, which gives the same values.
    """
    keep = torch.nn.functional.pad(scored, (0, 1))  # (N, T): the last position predicts nothing
    return selected_logits(
        model,
        lambda hidden: hidden[keep],
        keep.shape,
        int(keep.sum()),
        input_ids=input_ids,
        attention_mask=attention_mask,
        full=lambda logits: logits[keep],
    )


def loss_inputs(policy: dict[str, torch.Tensor], reference: torch.Tensor | None, sides: tuple[str, ...]) -> LossInputs:
    """Assemble ``LossInputs`` from policy log-probs and a ``(B, len(sides))`` block of reference log-probs."""
    inputs = LossInputs(
        chosen_logps=policy.get("chosen_logps"),
        rejected_logps=policy.get("rejected_logps"),
        chosen_tokens=policy.get("chosen_tokens"),
        rejected_tokens=policy.get("rejected_tokens"),
    )
    if reference is not None:
        for k, side in enumerate(sides):
            setattr(inputs, f"ref_{side}_logps", reference[:, k].to(policy[f"{side}_logps"].device))
    return inputs


@contextlib.contextmanager
def adapter_swapped(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load another adapter state (the ``previous`` reference), restoring the current one after."""
    current = lora_state(model)
    load_lora_state(model, state)
    try:
        yield
    finally:
        load_lora_state(model, current)


def reference_policy(
    model: torch.nn.Module, previous_state: dict[str, torch.Tensor] | None
) -> contextlib.AbstractContextManager:
    """The reference as a context: ``base`` (adapter disabled) when no previous adapter state is given."""
    if previous_state is None:
        return reference_context(model)
    return adapter_swapped(model, previous_state)


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    pad_id: int,
    sides: tuple[str, ...],
    reference: Callable[[], contextlib.AbstractContextManager],
    batch_size: int = 8,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    layout: str = "concat",
    pack_tokens: int | None = None,
) -> torch.Tensor:
    """Reference log-probs for every example, ``(n, len(sides))`` in dataset-index order (fp32); batches of
    ``batch_size`` examples collated in ``layout`` (``collate``)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), len(sides), dtype=torch.float32)
    try:
        with reference():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = collate(chunk, pad_id, sides=sides, layout=layout, pack_tokens=pack_tokens)
                with autocast():
                    logps = batch_logps(model, batch)
                idx = torch.tensor([ex["index"] for ex in chunk])
                for k, side in enumerate(sides):
                    out[idx, k] = logps[f"{side}_logps"].float().cpu()
    finally:
        model.train(was_training)
    return out
