"""Local JSON / JSONL loading: every bad-input case of RELIABILITY.md §3.2 that a loader can see (D1-D18).

Expected line numbers are computed by hand from how each fixture is written (one record per line for JSONL;
``json.dumps(indent=4)`` puts a 3-field record on 5 lines after the ``[`` line).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lifealign.config.schema import DataSection, TaskSection
from lifealign.data.inspect import format_inspection, inspect_file
from lifealign.data.loaders import DataError, load_records
from lifealign.data.sources import load_stream, load_task


def rec(prompt="p", chosen="good", rejected="bad", **extra) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra})


def write_lines(path: Path, lines: list[str], newline: str = "\n", bom: bool = False, final_newline=True) -> Path:
    text = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def distinct(n: int) -> list[str]:
    return [rec(prompt=f"p{i}") for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------- D1


@pytest.mark.parametrize("newline,bom", [("\n", False), ("\r\n", True)])
def test_malformed_json_names_line_and_column(tmp_path, newline, bom):
    """16 good lines, then a trailing comma on line 17: the error names line 17 and the column of the ``}``."""
    bad = '{"prompt": "p", "chosen": "a", "rejected": "b",}'
    path = write_lines(tmp_path / "task1.jsonl", distinct(16) + [bad, rec(prompt="after")], newline, bom)
    col = bad.index(",}") + 2  # 1-based column of the "}" that follows the comma
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"task1.jsonl:17: invalid JSON: Expecting property name enclosed in double quotes (col {col})" in str(
        err.value
    )


def test_bom_and_crlf_records_load_with_their_line_ids(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", distinct(3), "\r\n", bom=True)
    result = load_records(path)
    assert [r.prompt for r in result.records] == ["p0", "p1", "p2"]
    assert [r.id for r in result.records] == ["t:1", "t:2", "t:3"]
    assert result.n_read == 3 and result.n_lines == 3


def test_json_list_error_names_the_line_where_the_record_starts(tmp_path):
    """indent=4: "[" on line 1, record k spans lines 2+5k .. 6+5k, so record 2 starts on line 12 (CRLF + BOM)."""
    records = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    records[2]["chosen"] = 42
    text = json.dumps(records, indent=4).replace("\n", "\r\n")
    path = tmp_path / "list.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:12: chosen: expected a string or a list of messages, got integer (42)" in str(err.value)
    result = load_records(path, on_invalid="skip")
    assert [r.id for r in result.records] == ["list:2", "list:7", "list:17"]
    assert result.skipped == {"wrong_type": 1} and result.n_read == 4


def test_json_list_syntax_error_line_and_column(tmp_path):
    """Line 3 is ``  {"prompt": "q" "chosen": "a"}``: the missing comma is reported at the next token, the ``"``
    of ``"chosen"`` in column 18 (2 spaces + ``{"prompt": "q"`` = 16 characters, then a space)."""
    path = tmp_path / "x.json"
    path.write_text('[\n  {"prompt": "p", "chosen": "a", "rejected": "b"},\n  {"prompt": "q" "chosen": "a"}\n]\n')
    with pytest.raises(DataError, match=r"x\.json:3: invalid JSON: Expecting ',' delimiter \(col 18\)"):
        load_records(path, on_invalid="skip")  # a broken list cannot be resynchronised: always fatal


def test_json_list_missing_comma_between_records(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[\n" + rec() + "\n" + rec(prompt="q") + "\n]")
    with pytest.raises(DataError, match=r"x\.json:3: invalid JSON: expected ',' or ']' after a record \(col 1\)"):
        load_records(path)


# ---------------------------------------------------------------------------------------------------------------- D2


def test_truncated_last_jsonl_line_is_an_error_or_a_counted_skip(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", distinct(2) + ['{"prompt": "p", "chosen": "a"'], final_newline=False)
    with pytest.raises(DataError, match=r"t\.jsonl:3: truncated record"):
        load_records(path)
    result = load_records(path, on_invalid="skip")
    assert len(result.records) == 2 and result.skipped == {"truncated_record": 1} and result.n_read == 3


def test_truncated_json_list_is_fatal(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("[\n" + rec() + ',\n{"prompt": "p",')
    with pytest.raises(DataError, match=r"t\.json:3: truncated record"):
        load_records(path, on_invalid="skip")


def test_unclosed_json_list_is_fatal(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("[\n" + rec() + "\n")
    with pytest.raises(DataError, match="never closed"):
        load_records(path)


# ---------------------------------------------------------------------------------------------------------------- D3


def test_blank_lines_are_counted_not_errors(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ["", rec(prompt="a"), "   ", "\t", rec(prompt="b"), ""])
    result = load_records(path)
    assert [r.id for r in result.records] == ["t:2", "t:5"]
    assert result.notes["blank_lines"] == 4 and result.n_read == 2 and result.n_lines == 6


# ------------------------------------------------------------------------------------------------------------ D4, D5


def test_missing_field_names_field_and_expected_set(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [rec(), json.dumps({"prompt": "p", "chosen": "a"})])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2: rejected: missing required field 'rejected' (expected prompt, chosen, rejected)" in str(
        err.value
    )


@pytest.mark.parametrize(
    "record,message",
    [
        (
            {"prompt": "p", "chosen": 42, "rejected": "b"},
            "chosen: expected a string or a list of messages, got integer (42)",
        ),
        ({"prompt": "p", "chosen": None, "rejected": "b"}, "chosen: expected a string or a list of messages, got null"),
        ({"prompt": ["a"], "chosen": "a", "rejected": "b"}, "prompt[0]: expected a message object, got string"),
        (
            {"prompt": {"x": 1}, "chosen": "a", "rejected": "b"},
            "prompt: expected a string or a list of messages, got object",
        ),
        ("just text", "record: expected a JSON object, got string"),
    ],
)
def test_wrong_type_names_field_and_actual_type(tmp_path, record, message):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(record)])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:1: {message}" in str(err.value)


def test_skip_mode_counts_schema_errors_by_reason(tmp_path):
    lines = [
        rec(prompt="ok1"),
        '{"prompt": ',
        json.dumps({"prompt": "p", "chosen": "a"}),
        json.dumps({"prompt": "p", "chosen": 1, "rejected": "b"}),
        rec(prompt="ok2"),
    ]
    result = load_records(write_lines(tmp_path / "t.jsonl", lines), on_invalid="skip")
    assert [r.prompt for r in result.records] == ["ok1", "ok2"]
    assert result.skipped == {"invalid_json": 1, "missing_field": 1, "wrong_type": 1}
    assert result.n_read == 5 and result.n_skipped == 3


def test_error_lists_first_twenty_offenders_and_the_total(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"bad"'] * 25 + [rec()])
    with pytest.raises(DataError) as err:
        load_records(path)
    message = str(err.value)
    assert f"{path}:20: invalid JSON" in message and f"{path}:21:" not in message
    assert "... and 5 more" in message and f"25 invalid record(s) in {path}" in message


# --------------------------------------------------------------------------------------------------------------- D12


def test_non_utf8_byte_names_line_and_byte_offset(tmp_path):
    good = rec().encode()
    bad = b'{"prompt": "caf\xff", "chosen": "a", "rejected": "b"}'
    path = tmp_path / "t.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good.replace(b'"p"', b'"q"') + b"\n")
    offset = bad.index(b"\xff")  # 15
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2: invalid UTF-8 at byte offset {offset} (byte 0xff)" in str(err.value)
    result = load_records(path, on_invalid="skip")
    assert result.skipped == {"invalid_utf8": 1} and [r.prompt for r in result.records] == ["p", "q"]


def test_non_utf8_in_json_list_is_fatal_with_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_bytes(b"[\n" + rec().encode() + b',\n{"prompt": "\xfe", "chosen": "a", "rejected": "b"}\n]')
    with pytest.raises(DataError, match=r"t\.json:3: invalid UTF-8 at byte offset 12 \(byte 0xfe\)"):
        load_records(path, on_invalid="skip")


def test_lone_surrogate_and_nul_are_rejected_with_field(tmp_path):
    lines = [rec(), '{"prompt": "p", "chosen": "x\\ud800y", "rejected": "b"}', rec(rejected="a\u0000b")]
    path = write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2: chosen: lone surrogate '\\ud800' at character 1" in str(err.value)
    assert f"{path}:3: rejected: NUL character at character 1" in str(err.value)
    assert load_records(path, on_invalid="skip").skipped == {"invalid_text": 2}


# ------------------------------------------------------------------------------------------------------ D7, D9, D10


def test_no_signal_records_are_always_skipped_and_counted(tmp_path):
    lines = [
        rec(prompt="keep"),
        rec(chosen=""),
        rec(rejected="  \n\t"),
        rec(chosen="same", rejected="same"),
        rec(prompt="keep"),
        rec(prompt="keep2"),
    ]
    result = load_records(write_lines(tmp_path / "t.jsonl", lines))  # on_invalid="error" does not matter here
    assert result.skipped == {"empty_response": 2, "identical_pair": 1, "duplicate_pair": 1}
    assert [r.id for r in result.records] == ["t:1", "t:6"]  # the first of the duplicates is kept
    assert result.n_read == 6


def test_duplicates_ignore_ids_and_keep_the_first(tmp_path):
    lines = [rec(id="first"), rec(id="second"), rec(prompt="other", id="third")]
    result = load_records(write_lines(tmp_path / "t.jsonl", lines))
    assert [r.id for r in result.records] == ["first", "third"] and result.skipped == {"duplicate_pair": 1}


def test_contradictory_pairs_are_noted_and_kept(tmp_path):
    lines = [rec(chosen="A", rejected="B"), rec(chosen="B", rejected="A"), rec(prompt="q", chosen="B", rejected="A")]
    result = load_records(write_lines(tmp_path / "t.jsonl", lines))
    assert len(result.records) == 3 and result.notes == {"contradictory_pair": 1} and result.skipped == {}


def test_empty_prompt_is_allowed_and_noted(tmp_path):
    result = load_records(write_lines(tmp_path / "t.jsonl", [rec(prompt=""), rec(prompt="x")]))
    assert len(result.records) == 2 and result.notes == {"empty_prompt": 1}


# ---------------------------------------------------------------------------------------------------------------- D6


def test_unknown_keys_warn_once_per_file_and_metadata_is_used(tmp_path, caplog):
    lines = [rec(score=0.9, id="a", task="t0"), rec(prompt="q", source="x", score=0.1), rec(prompt="r")]
    path = write_lines(tmp_path / "t.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="lifealign.data.loaders"):
        result = load_records(path)
    warnings = [r.getMessage() for r in caplog.records if "unknown keys" in r.getMessage()]
    assert warnings == [f"{path}: ignoring unknown keys score, source"]
    assert [(r.id, r.task) for r in result.records] == [("a", "t0"), ("t:2", ""), ("t:3", "")]


def test_task_argument_sets_task_and_id_prefix(tmp_path):
    result = load_records(write_lines(tmp_path / "t.jsonl", [rec(task="ignored"), rec(id=7, prompt="q")]), task="hh")
    assert [(r.id, r.task) for r in result.records] == [("hh:1", "hh"), ("7", "hh")]


# ------------------------------------------------------------------------------------------------ column mapping


def test_query_maps_to_prompt_automatically(tmp_path):
    line = json.dumps({"query": "Q", "chosen": "a", "rejected": "b"})
    assert load_records(write_lines(tmp_path / "t.jsonl", [line])).records[0].prompt == "Q"


def test_explicit_column_mapping(tmp_path):
    line = json.dumps({"question": "Q", "good": "a", "bad": "b"})
    result = load_records(
        write_lines(tmp_path / "t.jsonl", [line]), columns={"question": "prompt", "good": "chosen", "bad": "rejected"}
    )
    pair = result.records[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "a", "b")


def test_mapping_onto_an_existing_key_is_an_error(tmp_path):
    line = json.dumps({"query": "Q", "prompt": "P", "chosen": "a", "rejected": "b"})
    with pytest.raises(DataError, match=r"t\.jsonl:1: prompt: given twice, as 'query' and 'prompt'"):
        load_records(write_lines(tmp_path / "t.jsonl", [line]), columns={"query": "prompt"})


# --------------------------------------------------------------------------------------------- conversational, D18


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_conversational_prompt_and_message_responses(tmp_path):
    prompt = [msg("system", "S"), msg("user", "U1"), msg("assistant", "A1"), msg("user", "U2")]
    line = json.dumps({"prompt": prompt, "chosen": [msg("assistant", "yes")], "rejected": [msg("assistant", "no")]})
    pair = load_records(write_lines(tmp_path / "t.jsonl", [line])).records[0]
    assert pair.prompt == prompt and (pair.chosen, pair.rejected) == ("yes", "no")


def test_implicit_prompt_is_the_shared_turns_before_the_reply(tmp_path):
    shared = [msg("user", "U")]
    line = json.dumps({"chosen": shared + [msg("assistant", "good")], "rejected": shared + [msg("assistant", "bad")]})
    pair = load_records(write_lines(tmp_path / "t.jsonl", [line])).records[0]
    assert pair.prompt == shared and (pair.chosen, pair.rejected) == ("good", "bad")


@pytest.mark.parametrize(
    "prompt,chosen,message",
    [
        ([msg("user", "a"), msg("user", "b")], "x", "prompt[1].role: role 'user' out of order (expected 'assistant')"),
        ([msg("user", "a"), msg("assistant", "b")], "x", "prompt[1].role: a prompt must end with a user message"),
        ([msg("user", "a"), msg("system", "s")], "x", "prompt[1].role: role 'system' out of order"),
        ([msg("tool", "a")], "x", "prompt[0].role: unsupported role 'tool'"),
        ([{"role": "user", "content": 3}], "x", "prompt[0].content: expected a string, got integer"),
        ([{"content": "a"}], "x", "prompt[0].role: missing 'role'"),
        ([], "x", "prompt: empty message list"),
        ([msg("user", "a")], [msg("user", "x")], "chosen[0].role: the last message must be the assistant's"),
    ],
)
def test_bad_chat_messages_name_the_message(tmp_path, prompt, chosen, message):
    line = json.dumps({"prompt": prompt, "chosen": chosen, "rejected": "r"})
    path = write_lines(tmp_path / "t.jsonl", [line])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:1: {message}" in str(err.value)
    assert load_records(path, on_invalid="skip").skipped == {"invalid_messages": 1}


# ---------------------------------------------------------------------------------------------------------------- D15


def test_oversized_record_is_rejected_before_parsing_and_reading_continues(tmp_path):
    lines = [rec(), rec(prompt="x" * 500), rec(prompt="q")]
    path = write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError, match=r"t\.jsonl:2: record exceeds max_record_bytes \(100\)"):
        load_records(path, max_record_bytes=100)
    result = load_records(path, max_record_bytes=100, on_invalid="skip")
    assert [r.id for r in result.records] == ["t:1", "t:3"] and result.skipped == {"record_too_large": 1}


def test_deeply_nested_record_is_an_error_not_a_recursion_crash(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [rec(), "[" * 200_000 + "]" * 200_000])
    with pytest.raises(DataError, match=r"t\.jsonl:2: record nests too deeply"):
        load_records(path, max_record_bytes=1_000_000)


# ---------------------------------------------------------------------------------------------- negative-only kind


def test_negative_kind_allows_missing_or_empty_chosen(tmp_path):
    lines = [json.dumps({"prompt": "p", "rejected": "harmful"}), rec(chosen="", rejected="other"), rec(rejected="")]
    result = load_records(write_lines(tmp_path / "t.jsonl", lines), kind="negative")
    assert [(r.chosen, r.rejected) for r in result.records] == [("", "harmful"), ("", "other")]
    assert result.skipped == {"empty_response": 1}


def test_json_extension_with_jsonl_content_is_read_as_jsonl(tmp_path):
    assert len(load_records(write_lines(tmp_path / "t.json", distinct(2))).records) == 2


def test_empty_file_reads_zero_records(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    (tmp_path / "e.json").write_text("[]")
    assert load_records(tmp_path / "e.jsonl").n_read == 0 and load_records(tmp_path / "e.json").n_read == 0


# ------------------------------------------------------------------------------------------ load_task, D16, D17


def test_load_task_keeps_first_n_and_sums_skips(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", distinct(5) + [rec(chosen="")])
    test = write_lines(tmp_path / "test.jsonl", [rec(prompt="t0"), rec(prompt="t1"), rec(prompt="t0")])
    section = TaskSection(name="demo", train=str(train), test=str(test), max_train=3, max_test=1)
    task = load_task(section, DataSection())
    assert [r.prompt for r in task.train] == ["p0", "p1", "p2"] and [r.prompt for r in task.test] == ["t0"]
    assert {r.task for r in task.train + task.test} == {"demo"}
    assert task.skipped == {"empty_response": 1, "duplicate_pair": 1} and task.kind == "pairwise"


def test_load_task_without_test_file_has_no_test_split(tmp_path):
    task = load_task(TaskSection(name="a", train=str(write_lines(tmp_path / "t.jsonl", distinct(2)))), DataSection())
    assert len(task.train) == 2 and task.test == []


def test_task_with_zero_usable_records_is_an_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [rec(chosen=""), rec(chosen="x", rejected="x")])
    with pytest.raises(
        DataError,
        match=r"task 'a' has 0 usable train records \(2 skipped: empty_response=1, "
        r"identical_pair=1\)",
    ):
        load_task(TaskSection(name="a", train=str(path)), DataSection(max_skipped_fraction=1.0))


def test_skipped_fraction_above_threshold_aborts(tmp_path):
    """3 records, 2 skipped: 2/3 = 66.7% > 0.5 aborts; with a 0.7 threshold the task loads."""
    path = write_lines(tmp_path / "t.jsonl", [rec(), rec(chosen=""), rec(rejected="")])
    section = TaskSection(name="a", train=str(path))
    with pytest.raises(DataError, match=r"2 of 3 train records skipped \(66\.7% > data\.max_skipped_fraction=0\.5\)"):
        load_task(section, DataSection(max_skipped_fraction=0.5))
    assert len(load_task(section, DataSection(max_skipped_fraction=0.7)).train) == 1


def test_missing_file_or_directory_names_task_and_key(tmp_path):
    with pytest.raises(DataError, match=r"task 'a': tasks\[\]\.train '.*nope\.jsonl' not found"):
        load_task(TaskSection(name="a", train=str(tmp_path / "nope.jsonl")), DataSection())
    with pytest.raises(DataError, match=r"task 'a': tasks\[\]\.test '.*' is not a file"):
        load_task(
            TaskSection(name="a", train=str(write_lines(tmp_path / "t.jsonl", distinct(1))), test=str(tmp_path)),
            DataSection(),
        )
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_on_invalid_comes_from_the_data_section(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", distinct(3) + ["{oops"])
    with pytest.raises(DataError, match=r"t\.jsonl:4: invalid JSON"):
        load_task(TaskSection(name="a", train=str(path)), DataSection())
    task = load_task(TaskSection(name="a", train=str(path)), DataSection(on_invalid="skip"))
    assert len(task.train) == 3 and task.skipped == {"invalid_json": 1}


def test_synthetic_task_is_sized_by_max_train_and_max_test():
    section = TaskSection(name="math", train="synthetic:arithmetic", max_train=6, max_test=3)
    task = load_task(section, DataSection(), seed=1)
    assert (len(task.train), len(task.test)) == (6, 3)
    assert {r.task for r in task.train + task.test} == {"math"}
    again = load_task(section, DataSection(), seed=1)
    assert [r.content_hash() for r in again.train] == [r.content_hash() for r in task.train]
    with pytest.raises(DataError, match="task 'x': unknown synthetic task 'nope'"):
        load_task(TaskSection(name="x", train="synthetic:nope"), DataSection())


def test_hub_task_dispatches_train_and_test_splits(monkeypatch):
    """``hub:<name>`` without ``test`` loads the dataset's own test split; ``hub:<name>:<split>`` names one."""
    from lifealign.data import sources
    from lifealign.data.loaders import LoadResult
    from lifealign.data.records import PreferencePair

    calls = []

    def fake(name, split, *, hub_split=None, task="", kind="pairwise", on_invalid="error"):
        calls.append((name, split, hub_split, task, on_invalid))
        return LoadResult([PreferencePair(f"{split}", "a", "b", task=task)], n_read=1)

    monkeypatch.setattr(sources, "load_hub_task", fake)
    task = load_task(TaskSection(name="uf", train="hub:ultrafeedback"), DataSection(on_invalid="skip"))
    assert calls == [("ultrafeedback", "train", None, "uf", "skip"), ("ultrafeedback", "test", None, "uf", "skip")]
    assert [r.prompt for r in task.train + task.test] == ["train", "test"]
    calls.clear()
    load_task(TaskSection(name="uf", train="hub:ultrafeedback:train_sft"), DataSection())
    assert calls[0][:3] == ("ultrafeedback", "train", "train_sft")


def test_load_stream_keeps_order_and_rejects_repeated_names(tmp_path):
    a = str(write_lines(tmp_path / "a.jsonl", distinct(2)))
    b = str(write_lines(tmp_path / "b.jsonl", distinct(3)))
    stream = load_stream([TaskSection(name="b", train=b), TaskSection(name="a", train=a)], DataSection())
    assert stream.names == ["b", "a"] and [len(t.train) for t in stream] == [3, 2]
    with pytest.raises(DataError, match="repeated: a"):
        load_stream([TaskSection(name="a", train=a), TaskSection(name="a", train=b)], DataSection())


# ---------------------------------------------------------------------------------------------------------- inspect


def test_inspect_file_counts_and_character_lengths(tmp_path):
    """Kept prompts "p", "pp", "ppp", "pppppppppp" -> lengths 1, 2, 3, 10: median 2.5, p95 = 3 + 0.85 * 7 = 8.95."""
    lines = [rec(prompt="p" * n) for n in (1, 2, 3, 10)] + [rec(chosen=""), "{bad", ""]
    d = inspect_file(write_lines(tmp_path / "t.jsonl", lines))
    assert (d["n_read"], d["n_kept"], d["n_lines"]) == (6, 4, 7)
    assert d["skipped"] == {"empty_response": 1, "invalid_json": 1} and d["notes"] == {"blank_lines": 1}
    assert d["chars"]["prompt"] == {"min": 1, "median": 2.5, "p95": pytest.approx(8.95), "max": 10}
    assert d["chars"]["chosen"] == {"min": 4, "median": 4.0, "p95": 4.0, "max": 4}
    text = format_inspection(d)
    assert "skipped: 2 (empty_response=1, invalid_json=1)" in text and "prompt" in text and "8.9" in text


def test_inspect_file_token_lengths_with_the_tiny_tokenizer(tmp_path):
    """Plain text, byte tokens: prompt "abc" -> 3, chosen "good" + EOS -> 5, rejected "bad" + EOS -> 4."""
    from lifealign.models.tiny import tiny_tokenizer

    d = inspect_file(
        write_lines(tmp_path / "t.jsonl", [rec(prompt="abc")]),
        tokenizer=tiny_tokenizer(),
        data=DataSection(use_chat_template=False),
    )
    assert [d["tokens"][k]["max"] for k in ("prompt", "chosen", "rejected")] == [3, 5, 4]
    assert "length (tokens)" in format_inspection(d)


# ------------------------------------------------------------------------------------- duplicate keys, record size


def test_duplicate_key_in_a_jsonl_record_is_a_schema_violation_naming_line_and_key(tmp_path):
    """``json`` keeps the last of two ``chosen`` keys; which one the author meant is unknown, so it is an error."""
    dup = '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}'
    nested = '{"prompt": [{"role": "user", "content": "x", "content": "y"}], "chosen": "a", "rejected": "b"}'
    path = write_lines(tmp_path / "t.jsonl", [rec(), dup, rec(prompt="q"), nested])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:2: duplicate key 'chosen'" in str(err.value)
    assert f"{path}:4: duplicate key 'content'" in str(err.value)
    result = load_records(path, on_invalid="skip")
    assert [r.id for r in result.records] == ["t:1", "t:3"] and result.skipped == {"duplicate_key": 2}


def test_duplicate_key_in_a_json_list_record_is_located_and_the_list_goes_on(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        '[\n  {"prompt": "p", "chosen": "a", "rejected": "b"},\n'
        '  {"prompt": "p2", "rejected": "x", "chosen": "a", "rejected": "b"},\n'
        '  {"prompt": "p3", "chosen": "a", "rejected": "b"}\n]\n'
    )
    with pytest.raises(DataError, match=rf"{path}:3: duplicate key 'rejected'"):
        load_records(path)
    result = load_records(path, on_invalid="skip")
    assert [r.prompt for r in result.records] == ["p", "p3"] and result.skipped == {"duplicate_key": 1}


def test_max_record_bytes_is_a_config_key_with_the_loaders_default(tmp_path):
    from lifealign.data.loaders import MAX_RECORD_BYTES, load_records_for

    assert DataSection().max_record_bytes == MAX_RECORD_BYTES == 1 << 20
    path = write_lines(tmp_path / "t.jsonl", [rec(), rec(prompt="x" * 500), rec(prompt="q")])
    data = DataSection(max_record_bytes=100, on_invalid="skip")
    result = load_records_for(path, TaskSection(name="t", train=str(path)), data)
    assert result.skipped == {"record_too_large": 1} and len(result.records) == 2


def test_max_record_bytes_applies_to_json_list_records(tmp_path):
    big = {"prompt": "é" * 40, "chosen": "good", "rejected": "bad"}
    text = json.dumps(big, ensure_ascii=False)
    assert len(text) < 100 < len(text.encode())  # the limit counts UTF-8 bytes, not characters
    path = tmp_path / "t.json"
    path.write_text(f"[{rec()},\n{text},\n{rec(prompt='q')}]", encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.json:2: record exceeds max_record_bytes \(100\)"):
        load_records(path, max_record_bytes=100)
    result = load_records(path, max_record_bytes=100, on_invalid="skip")
    assert [r.prompt for r in result.records] == ["p", "q"] and result.skipped == {"record_too_large": 1}
