"""Examples a plugin keeps of finished tasks (EWC's Fisher sample, GEM's episodic memory), ready for the loss.

``sample_records`` draws a reproducible sample of a task's records; ``StoredExamples.prepare`` tokenises them for the
method's loss and, when the loss needs them, computes base-model reference log-probs once (adapter disabled: the
``reference: base`` setting); ``batches`` cuts them into collated batches with their reference rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lifealign.data.collate import collate
from lifealign.data.records import PreferencePair
from lifealign.data.tokenize import tokenize_pairs
from lifealign.models.lora import reference_context
from lifealign.training.forward import compute_reference_logps
from lifealign.training.plugin import PluginContext

__all__ = ["StoredExamples", "sample_records"]


def sample_records(records: Sequence[PreferencePair], n: int, seed: str) -> list[PreferencePair]:
    """``min(n, len)`` records drawn without replacement by ``random.Random(seed)``, in their original order."""
    k = min(n, len(records))
    picked = sorted(random.Random(seed).sample(range(len(records)), k))
    return [records[i] for i in picked]


@dataclass
class StoredExamples:
    """Tokenised examples (``index`` = position) for the method's loss and their reference log-probs
    ``(n, len(sides))`` (None when the loss needs none)."""

    examples: list[dict[str, Any]]
    reference: Tensor | None
    sides: tuple[str, ...]
    layout: str = "concat"
    pack_tokens: int | None = None

    @classmethod
    def prepare(cls, ctx: PluginContext, records: Sequence[PreferencePair], batch_size: int) -> StoredExamples:
        """Tokenise ``records`` for ``ctx.loss``'s sides; reference log-probs of the base model when it needs them."""
        assert ctx.loss is not None, "stored examples need the method's loss (PluginContext.loss)"
        sides = ctx.loss.uses
        examples = tokenize_pairs(list(records), ctx.tokenizer, ctx.data, sides=sides).examples
        if not examples or not ctx.loss.needs_reference:
            return cls(examples, None, sides, ctx.layout, ctx.pack_tokens)
        model = ctx.model
        ref = compute_reference_logps(
            model,
            examples,
            ctx.tokenizer.pad_token_id,
            sides,
            lambda: reference_context(model),
            batch_size,
            ctx.autocast,
            layout=ctx.layout,
            pack_tokens=ctx.pack_tokens,
        )
        return cls(examples, ref, sides, ctx.layout, ctx.pack_tokens)

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, positions: Sequence[int]) -> StoredExamples:
        """The examples at ``positions`` (re-indexed 0..k-1) with their reference rows."""
        examples = [{**self.examples[i], "index": k} for k, i in enumerate(positions)]
        ref = self.reference[torch.tensor(list(positions), dtype=torch.long)] if self.reference is not None else None
        return StoredExamples(examples, ref, self.sides, self.layout, self.pack_tokens)

    def batches(self, pad_id: int, size: int) -> list[tuple[dict[str, Any], Tensor | None]]:
        """Consecutive collated batches of ``size`` examples with their rows of the reference log-probs."""
        out = []
        for start in range(0, len(self.examples), size):
            chunk = self.examples[start : start + size]
            idx = torch.tensor([ex["index"] for ex in chunk])
            ref = self.reference[idx] if self.reference is not None else None
            out.append((collate(chunk, pad_id, self.sides, self.layout, self.pack_tokens), ref))
        return out
