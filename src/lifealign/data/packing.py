"""Prefix-shared and packed batches: one segment per pair, ``prompt | side_1 | side_2 ...``, several per row.

The concatenated layout (``collate_pairs``) repeats the prompt in every side's row and pads every row to the
longest one. Here a pair is one *segment*: the prompt once, then each side's response. A response token sees the
prompt and the earlier tokens of its own response, never another side's (the attention mask keeps them apart), and
its position id continues from the prompt's end, exactly as in the concatenated row: side ``s`` token ``k`` has
position ``len(prompt) + k`` for every side. So every scored token has the same context and positions as in the
concatenated row, and the log-probs are the same function of the weights (Wang & Hegde 2024, prefix sharing).

Which position predicts what: in the concatenated row position ``t - 1`` predicts token ``t``. In a segment the last
prompt position predicts the first token of *every* side (its logits are used once per side), and side ``s``'s token
``k >= 1`` is predicted by side ``s``'s token ``k - 1``. A side's last token predicts nothing. With an empty prompt
the first response token has no predicting position, as in the concatenated row, and is not counted.

``shared`` puts one segment per row (rows padded to the longest segment); ``packed`` puts several segments per row
up to ``pack_tokens`` (first-fit decreasing), so padding is at most the tail of each row. A batch with one side
(SFT, unlearning) is a plain ``prompt | response`` segment per pair, packed the same way.

The batch records token-level ``segment_ids`` (pair index + 1, 0 on padding) and ``branch_ids`` (0 on the prompt,
``s + 1`` on side ``s``); the forward builds the attention mask the model's attention implementation wants from
them (``lifealign.training.packed``). Scored positions are listed flat (``score_index`` into the ``(R * L)``
flattened rows, with ``labels``) in side-major order: side 0 of pair 0 token by token, pair 1, ..., then side 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SEGMENT_LAYOUTS", "collate_segments", "pack_rows", "segment_length"]

SEGMENT_LAYOUTS = ("shared", "packed")


def segment_length(example: dict[str, Any], sides: Sequence[str]) -> int:
    """Tokens of one pair's segment: the prompt once plus every side's response."""
    return len(example["prompt_ids"]) + sum(len(example[f"{side}_ids"]) for side in sides)


def pack_rows(lengths: Sequence[int], pack_tokens: int | None) -> list[list[int]]:
    """Group segment indices into rows of at most ``pack_tokens`` tokens; ``None``: one row for all.

    ``ceil(total / pack_tokens)`` rows are opened and segments go longest first into the least-filled row with
    room, a new row opening when none has (longest-processing-time greedy): rows come out about equally full, so the
    padding to the longest row is small. A segment longer than the budget gets a row of its own. Rows are ordered
    by their lowest index, indices ascending within a row: the assignment is deterministic.
    """
    if pack_tokens is None:
        return [list(range(len(lengths)))]
    if pack_tokens < 1:
        raise ValueError(f"pack_tokens must be positive, got {pack_tokens}")
    n_rows = max(1, -(-sum(lengths) // pack_tokens))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    fill = [0] * n_rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if fill[r] + lengths[i] <= pack_tokens or not rows[r]]
        if not fits:
            rows.append([])
            fill.append(0)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda r: (fill[r], r))
        rows[r].append(i)
        fill[r] += lengths[i]
    return sorted(sorted(row) for row in rows if row)


def _segment(
    ex: dict[str, Any],
    sides: Sequence[str],
    start: int,
    predictors: list[list[list[int]]],
    targets: list[list[list[int]]],
    b: int,
) -> tuple[list[int], list[int], list[int]]:
    """``prompt | side_0 | side_1 ...`` of pair ``b`` starting at flat index ``start``: its token ids, position ids
    (every side continues from the prompt's end) and branch ids (0 prompt, s + 1 side s); fills
    ``predictors[s][b]`` (flat positions whose logits score side s) and ``targets[s][b]`` (the tokens they predict)."""
    prompt = list(ex["prompt_ids"])
    ids, positions, branches = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    for s, side in enumerate(sides):
        response = list(ex[f"{side}_ids"])
        first = start + len(ids)  # flat index of this side's first token
        # the last prompt token predicts token 0 (with no prompt, token 0 is not predicted)
        before = [start + len(prompt) - 1] if prompt and response else []
        predictors[s][b] = before + [first + k for k in range(len(response) - 1)]
        targets[s][b] = response[len(response) - len(predictors[s][b]) :]
        ids += response
        positions += range(len(prompt), len(prompt) + len(response))
        branches += [s + 1] * len(response)
    return ids, positions, branches


def _flatten(per_side: list[list[list[int]]]) -> list[int]:
    """Side-major, then pair, then token order (the order of the concatenated rows' scored positions)."""
    return [i for per_pair in per_side for values in per_pair for i in values]


def concat_scored_grid(examples: Sequence[dict[str, Any]], sides: Sequence[str]) -> torch.Tensor:
    """The concatenated rows' scored grid ``(S * B, T - 1)`` (row ``s * B + b``, column ``t - 1`` for response token
    ``t``): summing per-token values over it adds them in the order the concatenated forward does."""
    concat_width = max(len(ex["prompt_ids"]) + len(ex[f"{side}_ids"]) for ex in examples for side in sides)
    scored = torch.zeros(len(sides) * len(examples), max(concat_width - 1, 0), dtype=torch.bool)
    for s, side in enumerate(sides):
        for b, ex in enumerate(examples):
            n_prompt, n = len(ex["prompt_ids"]), len(ex[f"{side}_ids"])
            scored[s * len(examples) + b, max(n_prompt - 1, 0) : n_prompt + n - 1] = True
    return scored


def collate_segments(
    examples: Sequence[dict[str, Any]],
    pad_id: int,
    sides: Sequence[str] = ("chosen", "rejected"),
    layout: str = "shared",
    pack_tokens: int | None = None,
) -> dict[str, Any]:
    """A ``shared`` (one segment per row) or ``packed`` (segments up to ``pack_tokens`` per row) batch.

    Keys: ``layout``; ``input_ids``, ``position_ids``, ``segment_ids``, ``branch_ids`` of shape ``(R, L)`` (right
    padded with ``pad_id``, position 0, segment 0, branch 0); ``score_index (M,)`` (flat indices into ``R * L``),
    ``labels (M,)`` in side-major order, and ``scored (S * B, T - 1)``, the concatenated rows' scored positions (the
    values are summed over it, row-major, as the concatenated forward sums them); ``segments``: per row, the
    ``(first column, prompt length, response lengths per side)`` of each segment; ``n_pairs``, ``sides``, ``ids``
    and ``index (B,)`` when every example carries ``"index"``. ``pack_tokens`` only applies to ``packed``
    (``None``: every segment in one row).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if layout not in SEGMENT_LAYOUTS:
        raise ValueError(f"layout {layout!r} is not a segment layout ({', '.join(SEGMENT_LAYOUTS)})")
    sides = tuple(sides)
    lengths = [segment_length(ex, sides) for ex in examples]
    rows = [[i] for i in range(len(examples))] if layout == "shared" else pack_rows(lengths, pack_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    # predictors[s][b]: flat positions whose logits score side s of pair b, in token order; targets: the tokens
    predictors: list[list[list[int]]] = [[[] for _ in examples] for _ in sides]
    targets: list[list[list[int]]] = [[[] for _ in examples] for _ in sides]
    segments: list[list[tuple[int, int, tuple[int, ...]]]] = [[] for _ in rows]
    for r, row in enumerate(rows):
        col = 0  # the next free column of row r
        for b in row:
            ex = examples[b]
            segments[r].append((col, len(ex["prompt_ids"]), tuple(len(ex[f"{side}_ids"]) for side in sides)))
            ids, positions, branches = _segment(ex, sides, r * width + col, predictors, targets, b)
            span = slice(col, col + len(ids))
            input_ids[r, span] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, span] = torch.tensor(positions, dtype=torch.long)
            segment_ids[r, span] = b + 1
            branch_ids[r, span] = torch.tensor(branches, dtype=torch.long)
            col += len(ids)
    batch: dict[str, Any] = {
        "layout": layout,
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "branch_ids": branch_ids,
        "score_index": torch.tensor(_flatten(predictors), dtype=torch.long),
        "labels": torch.tensor(_flatten(targets), dtype=torch.long),
        "scored": concat_scored_grid(examples, sides),
        "segments": segments,
        "n_pairs": len(examples),
        "sides": sides,
        "ids": [ex["id"] for ex in examples],
    }
    if all("index" in ex for ex in examples):
        batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
    return batch
