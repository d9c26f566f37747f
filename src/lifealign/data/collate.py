"""Batch tokenised pairs into right-padded tensors, one row per (side, pair), side-major.

Rows are ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`` (for the default sides), each
``prompt_ids + <side>_ids`` followed by padding. Masks come from the lengths, never from ``input_ids == pad_id``:
the pad id may equal the EOS id, and the EOS ending a response must count (trl #1623).

``collate`` is the one entry point for every layout: ``concat`` (these rows), ``shared`` (one ``prompt | chosen |
rejected`` segment per pair) and ``packed`` (several segments per row), see ``lifealign.data.packing``. The batch
records its ``layout`` and ``lifealign.training.forward.batch_logps`` dispatches on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lifealign.data.packing import SEGMENT_LAYOUTS, collate_segments

__all__ = ["LAYOUTS", "collate", "collate_pairs"]

LAYOUTS = ("concat", *SEGMENT_LAYOUTS)
"""``concat``: one row per (side, pair), the prompt repeated; ``shared``: one row per pair, the prompt once;
``packed``: ``shared`` segments packed into rows of at most ``pack_tokens`` tokens."""


def collate(
    examples: Sequence[dict[str, Any]],
    pad_id: int,
    sides: Sequence[str] = ("chosen", "rejected"),
    layout: str = "concat",
    pack_tokens: int | None = None,
) -> dict[str, Any]:
    """A batch in ``layout`` (one of ``LAYOUTS``), with ``batch["layout"]`` set; ``pack_tokens`` is the row budget
    of ``packed`` (``None``: all segments in one row). ``concat`` is ``collate_pairs`` unchanged."""
    if layout == "concat":
        return {**collate_pairs(examples, pad_id, sides=sides), "layout": "concat"}
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    return collate_segments(examples, pad_id, sides=sides, layout=layout, pack_tokens=pack_tokens)


def collate_pairs(
    examples: Sequence[dict[str, Any]], pad_id: int, sides: Sequence[str] = ("chosen", "rejected")
) -> dict[str, Any]:
    """``input_ids``, ``attention_mask``, ``completion_mask`` of shape ``(S*B, T)`` with ``T`` the longest row.

    ``completion_mask`` is 1 on response tokens only. Also ``n_pairs = B``, ``sides``, ``ids`` and, when every
    example carries ``"index"``, ``index: LongTensor (B,)``.
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    prompts = [ex["prompt_ids"] for ex in examples]
    responses = [ex[f"{side}_ids"] for side in sides for ex in examples]
    prompts = prompts * len(sides)  # side-major: row s*B + b is pair b, side s
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    n_rows, width = len(responses), max(lengths)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
    completion_mask = torch.zeros((n_rows, width), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        n_prompt, n_total = len(prompt), len(prompt) + len(response)
        input_ids[row, :n_total] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, :n_total] = 1
        completion_mask[row, n_prompt:n_total] = 1
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "n_pairs": len(examples),
        "sides": tuple(sides),
        "ids": [ex["id"] for ex in examples],
    }
    if all("index" in ex for ex in examples):
        batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
    return batch
