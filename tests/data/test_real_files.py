"""The real preference tasks in ../shared/data/preference-tasks: the README's counts and known warts, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifealign.config.schema import DataSection, TaskSection
from lifealign.data.inspect import inspect_file
from lifealign.data.loaders import load_records
from lifealign.data.sources import load_task
from lifealign.data.tokenize import tokenize_pairs

DATA = Path(__file__).parents[2].parent / "shared/data/preference-tasks"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real preference data not found at {DATA}")

# (task, split, records read, skipped by reason) from the README's table and its "Known warts".
COUNTS = [
    ("hh-rlhf-harmless-base", "train", 3000, {}),
    ("hh-rlhf-harmless-base", "test", 1000, {}),
    ("hh-rlhf-helpful-base", "train", 3000, {"identical_pair": 6}),
    ("hh-rlhf-helpful-base", "test", 1000, {"identical_pair": 1}),
    ("safe-rlhf", "train", 2985, {"empty_response": 13}),
    ("safe-rlhf", "test", 348, {"empty_response": 1}),
    ("TruthfulQA", "train", 653, {}),
    ("TruthfulQA", "test", 83, {}),
]


@pytest.mark.parametrize("task,split,n_read,skipped", COUNTS)
def test_counts_and_warts_match_the_readme(task, split, n_read, skipped):
    result = load_records(DATA / task / f"{split}.json", task=task)
    assert result.n_read == n_read and result.skipped == skipped
    assert len(result.records) == n_read - sum(skipped.values())
    assert all(isinstance(r.prompt, str) and r.prompt for r in result.records)  # "query" became "prompt"
    assert result.records[0].id == f"{task}:2"  # the first object of the list opens on line 2


# (task, split, kept, chosen starting "Assistant: ", rejected starting "Assistant: ")
HH_SHAPE = [
    ("hh-rlhf-harmless-base", "train", 3000, 2952, 2917),
    ("hh-rlhf-harmless-base", "test", 1000, 977, 964),
    ("hh-rlhf-helpful-base", "train", 2994, 2828, 2857),
    ("hh-rlhf-helpful-base", "test", 999, 930, 959),
]


@pytest.mark.parametrize("task,split,kept,chosen_tagged,rejected_tagged", HH_SHAPE)
def test_hh_prompts_are_dialogues_and_replies_carry_the_assistant_tag(
    task, split, kept, chosen_tagged, rejected_tagged
):
    """What the files actually hold: every prompt is a "Human: ..." transcript that stops BEFORE the final
    "Assistant:" (none ends with it); most replies start with "Assistant: " instead (the rest were cut elsewhere
    when the authors split the dialogue)."""
    records = load_records(DATA / task / f"{split}.json").records
    assert len(records) == kept
    assert all(r.prompt.startswith("Human: ") for r in records)
    assert not any(r.prompt.rstrip().endswith("Assistant:") for r in records)
    assert sum(r.chosen.startswith("Assistant: ") for r in records) == chosen_tagged
    assert sum(r.rejected.startswith("Assistant: ") for r in records) == rejected_tagged


def test_load_task_on_real_files_with_limits():
    section = TaskSection(
        name="safe",
        train=str(DATA / "safe-rlhf/train.json"),
        test=str(DATA / "safe-rlhf/test.json"),
        max_train=100,
        max_test=20,
    )
    task = load_task(section, DataSection())
    assert (len(task.train), len(task.test)) == (100, 20)
    assert task.skipped == {"empty_response": 14} and {r.task for r in task.train} == {"safe"}


@pytest.mark.parametrize(
    "task,medians",
    [
        ("hh-rlhf-harmless-base", (318, 120, 153)),
        ("hh-rlhf-helpful-base", (404, 175, 133)),
        ("safe-rlhf", (126, 408, 477)),
        ("TruthfulQA", (50, 51, 173)),
    ],
)
def test_inspect_medians_match_the_readme(task, medians):
    """The README's medians are over all records, rounded (helpful prompts: 403.5 -> 404); the 6 skipped identical
    pairs move the helpful prompt median to 402.5, so the tolerance is 1.5 characters."""
    d = inspect_file(DATA / task / "train.json")
    assert [d["chars"][f]["median"] for f in ("prompt", "chosen", "rejected")] == pytest.approx(medians, abs=1.5)


def test_real_records_tokenise_within_limits():
    """64 safe-rlhf pairs, tiny tokenizer (1 token per byte), max_length 256: every kept response has at least one
    token, prompt <= 128, prompt + response <= 256, and examples + skips account for every record."""
    from lifealign.models.tiny import tiny_tokenizer

    records = load_records(DATA / "safe-rlhf/test.json").records[:64]
    data = DataSection(max_length=256, max_prompt_length=128)
    ts = tokenize_pairs(records, tiny_tokenizer(), data)
    skipped = ts.stats.get("prompt_exceeds_max_length", 0) + ts.stats.get("identical_tokens", 0)
    assert ts.stats["n_examples"] + skipped == 64 and ts.stats["response_truncated"] > 0
    for example in ts.examples:
        assert len(example["prompt_ids"]) <= 128
        for side in ("chosen_ids", "rejected_ids"):
            assert 1 <= len(example[side]) and len(example["prompt_ids"]) + len(example[side]) <= 256
