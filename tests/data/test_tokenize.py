"""Tokenisation: trl 1.16 DPOTrainer's ids (oracle: trl's own ``_prepare_dataset``), EOS, templates, truncation.

The tiny tokenizer maps byte b to id b, EOS ``<|endoftext|>`` = 256, ``<|im_start|>`` = 258, ``<|im_end|>`` = 259,
so expected ids are written by hand as ``list(b"...")``.
"""

from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from lifealign.config.schema import DataSection
from lifealign.data.records import PreferencePair
from lifealign.data.tokenize import (
    common_prefix_length,
    render_plain_prompt,
    tokenize_pairs,
    tokenize_prompts,
    truncate_pair,
)
from lifealign.models.tiny import tiny_tokenizer

EOS, IM_START, IM_END, NL = 256, 258, 259, 10
PLAIN = DataSection(use_chat_template=False)
CHAT = DataSection()


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chatml(role: str, content: str) -> list[int]:
    return [IM_START] + ids(f"{role}\n{content}") + [IM_END, NL]


GENERATION_PROMPT = [IM_START] + ids("assistant\n")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Characters a, b, x, y plus the merge "ab": "xa" -> [x, a] but "xaby" -> [x, ab, y] (tokens merge across the
    prompt/response boundary). Ids: x=0, a=1, b=2, y=3, ab=4, EOS=5."""
    vocab = {"x": 0, "a": 1, "b": 2, "y": 3, "ab": 4, "</s>": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.add_special_tokens(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")


# ------------------------------------------------------------------------------------------------ ids built by hand


def test_plain_text_prompt_and_eos_appended(tok):
    ts = tokenize_pairs([PreferencePair("ab", "cd", "e", id="r0")], tok, PLAIN)
    assert ts.examples == [
        {
            "id": "r0",
            "index": 0,
            "prompt_ids": ids("ab"),
            "chosen_ids": ids("cd") + [EOS],
            "rejected_ids": ids("e") + [EOS],
        }
    ]


def test_eos_is_not_doubled_when_the_response_already_ends_with_it(tok):
    ts = tokenize_pairs([PreferencePair("ab", "cd<|endoftext|>", "e")], tok, PLAIN)
    assert ts.examples[0]["chosen_ids"] == ids("cd") + [EOS]


def test_chat_template_renders_a_string_prompt_as_a_user_turn(tok):
    ts = tokenize_pairs([PreferencePair("hi", "yo", "no")], tok, CHAT)
    example = ts.examples[0]
    assert example["prompt_ids"] == chatml("user", "hi") + GENERATION_PROMPT
    assert example["chosen_ids"] == ids("yo") + [IM_END, NL]  # the template's end of turn, no EOS text
    assert example["rejected_ids"] == ids("no") + [IM_END, NL]


def test_conversational_prompt_keeps_every_turn(tok):
    prompt = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    example = tokenize_pairs([PreferencePair(prompt, "c", "r")], tok, CHAT).examples[0]
    assert example["prompt_ids"] == (
        chatml("system", "S") + chatml("user", "U") + chatml("assistant", "A") + chatml("user", "V") + GENERATION_PROMPT
    )
    assert example["chosen_ids"] == ids("c") + [IM_END, NL]


def test_messages_without_template_use_the_plain_transcript(tok):
    prompt = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert render_plain_prompt(prompt) == "User: U\n\nAssistant: A\n\nUser: V\n\nAssistant:"
    example = tokenize_pairs([PreferencePair(prompt, "c", "r")], tok, PLAIN).examples[0]
    assert example["prompt_ids"] == ids("User: U\n\nAssistant: A\n\nUser: V\n\nAssistant:")
    assert example["chosen_ids"] == ids("c") + [EOS]


# ------------------------------------------------------------------------------------------------------ trl oracle


def trl_tokenize(rows: list[dict], tokenizer) -> list[dict]:
    """trl 1.16 ``DPOTrainer._prepare_dataset`` (prompt extraction, EOS, tokenize_fn) without truncation."""
    from types import SimpleNamespace

    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    dataset = datasets.Dataset.from_list(rows)
    out = trl.DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "train")
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in out]


def as_trl_row(pair: PreferencePair, chat: bool) -> dict:
    if not chat:
        return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    prompt = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else pair.prompt
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }


@pytest.mark.parametrize("chat", [False, True])
def test_ids_equal_trl_dpo_trainer(tok, chat):
    """Our ids are trl's on the same records (string prompts in chat mode = trl on their conversational form)."""
    pairs = [
        PreferencePair("What is 2+2?", "4", "5"),
        PreferencePair("Été — ünïcode ✓ ", "oui", "non merci"),
        PreferencePair(
            [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}],
            "yes",
            "no",
        )
        if chat
        else PreferencePair("tail", "x<|endoftext|>", "y"),
    ]
    ours = tokenize_pairs(pairs, tok, CHAT if chat else PLAIN).examples
    oracle = trl_tokenize([as_trl_row(p, chat) for p in pairs], tok)
    assert [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in ours] == oracle


def test_merge_across_boundary_equals_trl_and_is_counted(caplog):
    """ "xa" -> [x, a]; "xaby</s>" -> [x, ab, y, </s>]: the common prefix is [x], so trl and we start the response
    at "ab" and leave the prompt's "a" out; we count it."""
    tokenizer = merging_tokenizer()
    pairs = [PreferencePair("xa", "by", "b")]
    with caplog.at_level(logging.WARNING, logger="lifealign.data.tokenize"):
        ts = tokenize_pairs(pairs, tokenizer, PLAIN)
    assert ts.examples[0]["prompt_ids"] == [0]
    assert (ts.examples[0]["chosen_ids"], ts.examples[0]["rejected_ids"]) == ([4, 3, 5], [4, 5])
    assert ts.stats["prompt_not_prefix"] == 1
    assert any("not a prefix" in r.getMessage() and "'a'" in r.getMessage() for r in caplog.records)
    oracle = trl_tokenize([as_trl_row(p, False) for p in pairs], tokenizer)
    assert [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in ts.examples] == oracle


def test_template_rendering_the_prompt_differently_is_counted(tok):
    """A template whose generation prompt adds "THINK\\n" that the full conversation lacks (as Gemma's empty thought
    block): the prompt stops before "THINK", the response starts at the reply."""
    tokenizer = tiny_tokenizer()
    generation_prompt = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert generation_prompt in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(
        generation_prompt, "{% if add_generation_prompt %}{{ '<|im_start|>assistant\nTHINK\n' }}{% endif %}"
    )
    ts = tokenize_pairs([PreferencePair("hi", "yo", "no"), PreferencePair("ho", "ya", "na")], tokenizer, CHAT)
    assert ts.stats["prompt_not_prefix"] == 2
    assert ts.examples[0]["prompt_ids"] == chatml("user", "hi") + GENERATION_PROMPT
    assert ts.examples[0]["chosen_ids"] == ids("yo") + [IM_END, NL]


def test_duplicate_bos_is_counted(tok):
    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = "<|im_start|>"  # id 258; a prompt that already starts with it twice
    ts = tokenize_pairs([PreferencePair("<|im_start|><|im_start|>x", "a", "b")], tokenizer, PLAIN)
    assert ts.stats["duplicate_bos"] == 1 and ts.examples[0]["prompt_ids"][:2] == [258, 258]


# ------------------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_prompt_end_and_response_start(tok):
    """max_length 10, max_prompt_length 4: "abcdefgh" -> "efgh"; the budget left is 6, so "0123456789"+EOS
    (11 tokens) keeps "012345"; "xy"+EOS (3 tokens) is untouched."""
    data = DataSection(max_length=10, max_prompt_length=4, use_chat_template=False)
    ts = tokenize_pairs([PreferencePair("abcdefgh", "0123456789", "xy")], tok, data)
    example = ts.examples[0]
    assert example["prompt_ids"] == ids("efgh")
    assert example["chosen_ids"] == ids("012345") and example["rejected_ids"] == ids("xy") + [EOS]
    assert ts.stats["prompt_truncated"] == 1 and ts.stats["response_truncated"] == 1


def test_prompt_leaving_fewer_than_min_response_tokens_is_skipped(tok):
    """max_length 10, max_prompt_length 8, min 3: prompts of 8 and 9 tokens (-> 8) leave 2 < 3 and are skipped;
    a 7-token prompt leaves exactly 3."""
    data = DataSection(max_length=10, max_prompt_length=8, min_response_tokens=3, use_chat_template=False)
    pairs = [
        PreferencePair("a" * 8, "long answer", "other"),
        PreferencePair("b" * 7, "long answer", "other"),
        PreferencePair("c" * 9, "x", "y"),
    ]
    ts = tokenize_pairs(pairs, tok, data)
    assert ts.stats["prompt_exceeds_max_length"] == 2 and ts.stats["n_examples"] == 1
    example = ts.examples[0]
    assert example["prompt_ids"] == ids("b" * 7) and example["chosen_ids"] == ids("lon")
    assert example["index"] == 0  # contiguous positions in the tokenised set


def test_pairs_identical_after_truncation_are_skipped(tok):
    data = DataSection(max_length=8, max_prompt_length=2, use_chat_template=False)
    ts = tokenize_pairs([PreferencePair("p", "abcdefgX", "abcdefgY"), PreferencePair("q", "ab", "cd")], tok, data)
    assert ts.stats["identical_tokens"] == 1
    assert [(e["id"], e["index"]) for e in ts.examples] == [("", 0)] and ts.examples[0]["prompt_ids"] == ids("q")


def test_truncate_pair_unit():
    data = DataSection(max_length=8, max_prompt_length=3, min_response_tokens=2)
    assert truncate_pair([1, 2, 3, 4], {"chosen": [5] * 9}, data) == ([2, 3, 4], {"chosen": [5] * 5}, True, True)
    assert truncate_pair([1], {"chosen": [5]}, data) == ([1], {"chosen": [5]}, False, False)
    assert (
        truncate_pair([1, 2, 3], {"chosen": [5]}, DataSection(max_length=8, max_prompt_length=7, min_response_tokens=6))
        is None
    )
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_length([], [1]) == 0


# ------------------------------------------------------------------------------------------- sides, prompts, stats


def test_negative_only_tokenises_the_rejected_side(tok):
    ts = tokenize_pairs([PreferencePair("p", "", "bad", id="n0")], tok, PLAIN, sides=("rejected",))
    assert ts.examples == [{"id": "n0", "index": 0, "prompt_ids": ids("p"), "rejected_ids": ids("bad") + [EOS]}]
    assert ts.sides == ("rejected",)


def test_tokenize_prompts_matches_pair_prompts_and_keeps_the_end(tok):
    """ "hi" renders to 1 + 7 + 2 + 11 = 21 tokens (fits 30); 40 a's to 59 tokens, of which the last 30 are kept."""
    data = DataSection(max_length=64, max_prompt_length=30)
    prompts = ["hi", [{"role": "user", "content": "a" * 40}]]
    out = tokenize_prompts(prompts, tok, data)
    assert out[0] == chatml("user", "hi") + GENERATION_PROMPT and len(out[0]) == 21
    full = chatml("user", "a" * 40) + GENERATION_PROMPT
    assert len(full) == 59 and out[1] == full[-30:]
    assert out[0] == tokenize_pairs([PreferencePair("hi", "x", "y")], tok, data).examples[0]["prompt_ids"]


def test_stats_always_have_the_contract_keys(tok):
    stats = tokenize_pairs([PreferencePair("p", "a", "b")], tok, PLAIN).stats
    assert stats == {
        "prompt_truncated": 0,
        "response_truncated": 0,
        "prompt_not_prefix": 0,
        "duplicate_bos": 0,
        "n_records": 1,
        "n_examples": 1,
    }
