"""collate_pairs: side-major rows, right padding, masks from lengths (CONTRACTS.md)."""

from __future__ import annotations

import pytest
import torch

from lifealign.config.schema import DataSection
from lifealign.data.collate import collate, collate_pairs
from lifealign.data.records import PreferencePair
from lifealign.data.tokenize import tokenize_pairs
from lifealign.models.tiny import tiny_tokenizer

EXAMPLES = [
    {"id": "a", "index": 4, "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
    {"id": "b", "index": 7, "prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [10]},
]


def test_rows_are_side_major_and_right_padded():
    """Rows: chosen a = [1,2,3], chosen b = [7,8,9], rejected a = [1,2,4,5,6], rejected b = [7,10]; T = 5."""
    batch = collate_pairs(EXAMPLES, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 0, 0], [1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["n_pairs"] == 2 and batch["sides"] == ("chosen", "rejected") and batch["ids"] == ["a", "b"]
    assert batch["index"].tolist() == [4, 7] and batch["index"].dtype == torch.long
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "completion_mask"))


def test_masks_come_from_lengths_even_when_pad_equals_a_real_token():
    """pad_id = 6 = the last rejected token of pair a: that token still counts in both masks (trl #1623)."""
    batch = collate_pairs(EXAMPLES, pad_id=6)
    assert batch["input_ids"][2].tolist() == [1, 2, 4, 5, 6] and batch["input_ids"][3].tolist() == [7, 10, 6, 6, 6]
    assert batch["completion_mask"][2].tolist() == [0, 0, 1, 1, 1]
    assert batch["attention_mask"].sum().item() == 3 + 3 + 5 + 2


def test_single_side_and_examples_without_index():
    examples = [{k: v for k, v in ex.items() if k != "index"} for ex in EXAMPLES]
    batch = collate_pairs(examples, pad_id=0, sides=("rejected",))
    assert batch["input_ids"].shape == (2, 5) and batch["sides"] == ("rejected",)
    assert batch["completion_mask"].sum(dim=1).tolist() == [3, 1]
    assert "index" not in batch


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="at least one example"):
        collate_pairs([], pad_id=0)


def test_tokenised_pairs_collate_with_one_completion_token_per_response_id():
    """End to end with the tiny tokenizer: completion tokens per row = len(<side>_ids); the EOS (256) is in the
    completion even though pad (257) differs, and every row starts with the same prompt ids as its pair."""
    tokenizer = tiny_tokenizer()
    ts = tokenize_pairs(
        [PreferencePair("ab", "cde", "f"), PreferencePair("xyz", "", "gh", id="neg")],
        tokenizer,
        DataSection(use_chat_template=False),
        sides=("rejected",),
    )
    batch = collate_pairs(ts.examples, pad_id=tokenizer.pad_token_id, sides=ts.sides)
    assert batch["completion_mask"].sum(dim=1).tolist() == [2, 3]  # "f"+EOS, "gh"+EOS
    assert batch["input_ids"][0].tolist()[:4] == [97, 98, 102, 256]
    assert batch["index"].tolist() == [0, 1]


def test_collate_concat_is_collate_pairs_with_its_layout():
    batch = collate(EXAMPLES, pad_id=0)
    assert batch.pop("layout") == "concat"
    want = collate_pairs(EXAMPLES, pad_id=0)
    assert batch.keys() == want.keys()
    assert all(
        torch.equal(batch[k], want[k]) if isinstance(want[k], torch.Tensor) else batch[k] == want[k] for k in want
    )


def test_shared_rows_hold_the_prompt_once_and_score_the_last_prompt_token_for_each_side():
    """Pair a = [1,2 | 3 | 4,5,6], pair b = [7 | 8,9 | 10], one row each, width 6 (b padded with two 0s).

    Positions: the rejected side continues from the prompt's end, like its concatenated row (a: 0,1,2,2,3,4).
    Scored (flat index into 2x6, label): chosen a (1, 3); chosen b (6, 8), (7, 9); rejected a (1, 4) - the last
    prompt token again -, (3, 5), (4, 6); rejected b (6, 10) - the last prompt token of b again.
    """
    batch = collate(EXAMPLES, pad_id=0, layout="shared")
    assert batch["layout"] == "shared"
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 4], [0, 1, 2, 1, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 0, 0]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 0]]
    assert batch["score_index"].tolist() == [1, 6, 7, 1, 3, 4, 6]
    assert batch["labels"].tolist() == [3, 8, 9, 4, 5, 6, 10]
    assert batch["scored"].sum(dim=1).tolist() == [1, 2, 3, 1]  # chosen a, chosen b, rejected a, rejected b
    assert torch.equal(batch["scored"], collate_pairs(EXAMPLES, pad_id=0)["completion_mask"][:, 1:].bool())
    assert batch["n_pairs"] == 2 and batch["sides"] == ("chosen", "rejected") and batch["ids"] == ["a", "b"]
    assert batch["index"].tolist() == [4, 7]


def test_packed_rows_put_several_pairs_in_a_row_without_padding_between_them():
    """Both segments (6 + 4 tokens) in one row: b's flat indices shift by 6, its segment id is 2."""
    batch = collate(EXAMPLES, pad_id=0, layout="packed")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 4, 0, 1, 2, 1]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]]
    assert batch["score_index"].tolist() == [1, 6, 7, 1, 3, 4, 6]
    budget = collate(EXAMPLES, pad_id=0, layout="packed", pack_tokens=8)  # 6 + 4 > 8: one pair per row
    assert budget["input_ids"].shape == (2, 6)


def test_single_side_segments_are_plain_rows():
    batch = collate(EXAMPLES, pad_id=0, sides=("rejected",), layout="shared")
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [4, 5, 6, 10] and batch["scored"].sum(dim=1).tolist() == [3, 1]
