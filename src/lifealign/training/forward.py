"""Forward passes that turn a collated batch into per-sequence log-probs, and the cached reference log-probs.

The chosen and rejected rows of a batch go through the model in one forward (trl's concatenated forward); the
log-softmax and the sums run in fp32 even under bf16 autocast (``sequence_logps``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lifealign.data.collate import collate_pairs
from lifealign.losses.logps import sequence_logps
from lifealign.losses.spec import LossInputs
from lifealign.models.lora import load_lora_state, lora_state, reference_context


def batch_logps(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"<side>_logps": (B,), "<side>_tokens": (B,)}`` for every side of a side-major batch."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    logps, n_tokens = sequence_logps(out.logits, batch["input_ids"].to(device), batch["completion_mask"].to(device))
    b = batch["n_pairs"]
    result: dict[str, torch.Tensor] = {}
    for k, side in enumerate(batch["sides"]):
        result[f"{side}_logps"] = logps[k * b : (k + 1) * b]
        result[f"{side}_tokens"] = n_tokens[k * b : (k + 1) * b]
    return result


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


def reference_policy(model: torch.nn.Module, previous_state: dict[str, torch.Tensor] | None) -> contextlib.AbstractContextManager:
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
) -> torch.Tensor:
    """Reference log-probs for every example, ``(n, len(sides))`` in dataset-index order (fp32)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), len(sides), dtype=torch.float32)
    try:
        with reference():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = collate_pairs(chunk, pad_id, sides=sides)
                with autocast():
                    logps = batch_logps(model, batch)
                idx = torch.tensor([ex["index"] for ex in chunk])
                for k, side in enumerate(sides):
                    out[idx, k] = logps[f"{side}_logps"].float().cpu()
    finally:
        model.train(was_training)
    return out
