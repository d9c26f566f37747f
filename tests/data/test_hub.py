"""Hub datasets: each mapper on rows in its published schema, and ``load_hub_task`` on local fixture files
(JSON lines / parquet written here, loaded with ``datasets.load_dataset``), offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifealign.data.hub import (
    HUB_DATASETS,
    load_hub_task,
    map_capybara,
    map_hc3,
    map_hh_rlhf,
    map_pku_saferlhf,
    map_truthfulqa,
    map_ultrafeedback,
    resolve_hub_spec,
    split_hh_dialogue,
)
from lifealign.data.loaders import DataError
from lifealign.data.records import PreferencePair


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


HH_SHARED = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:"
HH_ROWS = [
    {"chosen": HH_SHARED + " I can't help with that.", "rejected": HH_SHARED + " Use a tension wrench. "},
    {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D", "rejected": "\n\nHuman: X\n\nAssistant: E"},
]


def test_registry_has_the_short_names():
    assert set(HUB_DATASETS) == {
        "hh-rlhf-harmless-base",
        "hh-rlhf-helpful-base",
        "pku-saferlhf",
        "ultrafeedback",
        "truthfulqa",
        "hc3",
        "capybara",
    }


def test_full_hub_id_and_unknown_names():
    assert resolve_hub_spec("PKU-Alignment/PKU-SafeRLHF") is HUB_DATASETS["pku-saferlhf"]
    assert resolve_hub_spec("anthropic/hh-rlhf").data_dir == "harmless-base"
    with pytest.raises(DataError, match=r"unknown hub dataset 'nope' \(known: capybara, hc3, "):
        resolve_hub_spec("nope")


# ---------------------------------------------------------------------------------------------------------- mappers


def test_hh_split_is_at_the_last_assistant_turn():
    prompt, reply = split_hh_dialogue(HH_ROWS[0]["chosen"])
    assert prompt == "Human: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert reply == "I can't help with that."
    assert split_hh_dialogue("\n\nHuman: no reply") is None


def test_hh_mapper_shares_the_prompt_or_filters():
    pair = map_hh_rlhf(HH_ROWS[0])
    assert pair == PreferencePair(
        prompt=split_hh_dialogue(HH_SHARED + " x")[0],
        chosen="I can't help with that.",
        rejected="Use a tension wrench.",
    )
    assert map_hh_rlhf(HH_ROWS[1]) is None  # the two dialogues differ before the last assistant turn


def test_pku_keeps_rows_with_exactly_one_safe_response():
    row = {"prompt": "P", "response_0": "r0", "response_1": "r1"}
    assert map_pku_saferlhf({**row, "is_response_0_safe": True, "is_response_1_safe": False}) == PreferencePair(
        "P", "r0", "r1"
    )
    assert map_pku_saferlhf({**row, "is_response_0_safe": False, "is_response_1_safe": True}) == PreferencePair(
        "P", "r1", "r0"
    )
    assert map_pku_saferlhf({**row, "is_response_0_safe": True, "is_response_1_safe": True}) is None
    assert map_pku_saferlhf({**row, "is_response_0_safe": False, "is_response_1_safe": False}) is None


def test_ultrafeedback_takes_the_last_assistant_message():
    row = {
        "prompt": "Q",
        "chosen": [msg("user", "Q"), msg("assistant", "good")],
        "rejected": [msg("user", "Q"), msg("assistant", "bad")],
        "score_chosen": 8.0,
    }
    assert map_ultrafeedback(row) == PreferencePair("Q", "good", "bad")


def test_truthfulqa_joins_incorrect_answers():
    row = {"question": "Q?", "best_answer": "true", "correct_answers": ["true"], "incorrect_answers": ["f1", "f2"]}
    assert map_truthfulqa(row) == PreferencePair("Q?", "true", "f1; f2")
    assert map_truthfulqa({**row, "incorrect_answers": []}) is None


def test_hc3_prefers_the_first_human_answer():
    row = {"id": "0", "question": "Q", "human_answers": ["h1", "h2"], "chatgpt_answers": ["c1"]}
    assert map_hc3(row) == PreferencePair("Q", "h1", "c1")
    assert map_hc3({**row, "chatgpt_answers": []}) is None


def test_capybara_prompt_is_everything_before_the_final_assistant_message():
    shared = [msg("user", "U1"), msg("assistant", "A1"), msg("user", "U2")]
    row = {"source": "s", "chosen": shared + [msg("assistant", "good")], "rejected": shared + [msg("assistant", "bad")]}
    assert map_capybara(row) == PreferencePair(shared, "good", "bad")
    assert map_capybara({**row, "rejected": [msg("user", "other"), msg("assistant", "bad")]}) is None


# ---------------------------------------------------------------------------------------------- load_hub_task on files


def load(name, split, tmp_path, data_files, **kwargs):
    files = list(data_files.values()) if isinstance(data_files, dict) else [data_files]
    path = "parquet" if files[0].endswith(".parquet") else "json"
    return load_hub_task(name, split, path=path, data_files=data_files, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_hh_rlhf_from_jsonl_counts_filtered_rows(tmp_path):
    result = load("hh-rlhf-helpful-base", "test", tmp_path, write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), task="hh")
    assert [(r.chosen, r.rejected, r.task, r.id) for r in result.records] == [
        ("I can't help with that.", "Use a tension wrench.", "hh", "hh-rlhf-helpful-base:test:0")
    ]
    assert result.notes == {"filtered": 1} and result.skipped == {} and result.n_read == 2


def test_pku_saferlhf_from_parquet_validates_like_files(tmp_path):
    base = {
        "prompt": "P",
        "response_0": "safe",
        "response_1": "unsafe",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
    }
    rows = [
        base,
        {**base, "is_response_1_safe": True},
        {**base, "prompt": "Q", "response_0": "  "},
        base,
        {**base, "prompt": "R", "is_response_0_safe": False, "is_response_1_safe": True},
    ]
    result = load("pku-saferlhf", "train", tmp_path, write_parquet(tmp_path / "pku.parquet", rows))
    assert [(r.prompt, r.chosen, r.rejected) for r in result.records] == [
        ("P", "safe", "unsafe"),
        ("R", "unsafe", "safe"),
    ]
    assert result.skipped == {"empty_response": 1, "duplicate_pair": 1} and result.notes == {"filtered": 1}


def test_ultrafeedback_split_names_map_to_prefs(tmp_path):
    rows = [
        {
            "prompt": f"Q{i}",
            "prompt_id": str(i),
            "chosen": [msg("user", f"Q{i}"), msg("assistant", "good")],
            "rejected": [msg("user", f"Q{i}"), msg("assistant", "bad")],
        }
        for i in range(2)
    ]
    files = write_parquet(tmp_path / "uf.parquet", rows)
    result = load("ultrafeedback", "test", tmp_path, {"test_prefs": files})
    assert [r.id for r in result.records] == ["ultrafeedback:test_prefs:0", "ultrafeedback:test_prefs:1"]
    assert result.records[1].chosen == "good"


def test_truthfulqa_holds_out_every_tenth_row(tmp_path):
    """12 validation rows: test = rows 0 and 10; train = the other 10."""
    rows = [
        {
            "type": "Adversarial",
            "category": "c",
            "question": f"Q{i}",
            "best_answer": f"T{i}",
            "correct_answers": [f"T{i}"],
            "incorrect_answers": [f"F{i}a", f"F{i}b"],
            "source": "s",
        }
        for i in range(12)
    ]
    files = write_jsonl(tmp_path / "tqa.jsonl", rows)
    test = load("truthfulqa", "test", tmp_path, files)
    train = load("truthfulqa", "train", tmp_path, files)
    assert [r.prompt for r in test.records] == ["Q0", "Q10"] and test.records[0].rejected == "F0a; F0b"
    assert [r.prompt for r in train.records] == [f"Q{i}" for i in range(12) if i % 10]
    assert (train.n_read, test.n_read) == (10, 2)


def test_hc3_and_capybara_from_files(tmp_path):
    hc3 = [
        {"id": str(i), "question": f"Q{i}", "human_answers": [f"h{i}"], "chatgpt_answers": [f"c{i}"]} for i in range(3)
    ]
    result = load("hc3", "train", tmp_path, write_jsonl(tmp_path / "hc3.jsonl", hc3))
    assert [(r.prompt, r.chosen, r.rejected) for r in result.records] == [("Q1", "h1", "c1"), ("Q2", "h2", "c2")]
    shared = [msg("user", "U")]
    capy = [
        {
            "source": "s",
            "chosen": shared + [msg("assistant", f"g{i}")],
            "rejected": shared + [msg("assistant", f"b{i}")],
        }
        for i in range(2)
    ]
    result = load("capybara", "test", tmp_path, write_parquet(tmp_path / "capy.parquet", capy))
    assert [(r.prompt, r.chosen) for r in result.records] == [(shared, "g0")]


def test_schema_errors_name_the_row_or_are_skipped(tmp_path):
    rows = [
        {"prompt": "P", "response_0": "a", "response_1": "b", "is_response_0_safe": True, "is_response_1_safe": False},
        {
            "prompt": "P2",
            "response_0": None,
            "response_1": "b",
            "is_response_0_safe": True,
            "is_response_1_safe": False,
        },
    ]
    files = write_jsonl(tmp_path / "pku.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"pku-saferlhf:train row 1: chosen: expected a string or a list of "
        r"messages, got null",
    ):
        load("pku-saferlhf", "train", tmp_path, files)
    result = load("pku-saferlhf", "train", tmp_path, files, on_invalid="skip")
    assert len(result.records) == 1 and result.skipped == {"wrong_type": 1}


def test_missing_column_is_reported(tmp_path):
    files = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answers": ["x"]}])
    with pytest.raises(DataError, match=r"hc3:train row 0: human_answers: missing field"):
        load("hc3", "test", tmp_path, files)


def test_unloadable_source_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"could not load 'json' split 'train'"):
        load("pku-saferlhf", "train", tmp_path, str(tmp_path / "missing.jsonl"))
