"""Published reference numbers: the packaged file holds exactly the transcribed values, every row carries its
setting, and the report prints them apart, as not comparable."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifealign.report.markdown import render_report
from lifealign.report.reference import load_references, reference_section

# LifeAlign Table 1, AVG BWT / Last / AP (METHODS.md §1.7); the 2026 replication (STATISTICS.md).
TABLE1 = {
    "SeqFT": (-13.36, 22.34, 25.39),
    "L2P": (1.85, 18.81, 21.15),
    "O-LoRA": (-10.46, 23.50, 33.98),
    "ER": (-4.46, 32.22, 35.63),
    "GEM": (-11.90, 25.93, 27.77),
    "EWC": (-8.75, 26.09, 32.70),
    "CPPO": (-8.40, 25.89, 28.13),
    "LifeAlign": (0.91, 37.67, 36.43),
    "STL": (None, 36.94, None),
    "MTL (upper bound)": (None, 38.00, None),
}
REPLICATION_TASK = {
    "SeqFT": (-0.113, 0.476),
    "EWC": (-0.063, 0.529),
    "GEM": (-0.057, 0.536),
    "CPPO": (-0.003, 0.734),
    "LifeAlign": (0.001, 0.741),
    "MTL (upper bound)": (None, 0.759),
}
REPLICATION_FEEDSUM = {"CPPO": (-0.057, 0.711), "LifeAlign": (0.005, 0.612)}
REPLICATION_LLAMA = {"CPPO": (None, 0.726), "LifeAlign": (None, 0.710)}


def by_id() -> dict:
    return {s.id: s for s in load_references()}


def test_packaged_numbers_are_the_published_ones() -> None:
    settings = by_id()
    table1 = settings["lifealign-table1-avg"]
    assert {r.method: (r.bwt, r.last, r.ap) for r in table1.rows} == TABLE1
    assert (table1.model, table1.scale) == ("Qwen2.5-7B-Instruct", "0-100")
    for key, expected, model in [
        ("ready2blend-task-incremental-qwen", REPLICATION_TASK, "Qwen3.5-9B"),
        ("ready2blend-preference-incremental-feedsum", REPLICATION_FEEDSUM, "Qwen3.5-9B"),
        ("ready2blend-task-incremental-llama", REPLICATION_LLAMA, "Llama-3.1-8B"),
    ]:
        s = settings[key]
        assert {r.method: (r.bwt, r.last) for r in s.rows} == expected
        assert (s.model, s.scale, s.metric) == (model, "0-1", "LLM judge")
        assert "2609.39365" in s.source


def test_every_setting_names_model_tasks_metric_scale_and_seeds() -> None:
    for s in load_references():
        assert all((s.source, s.model, s.tasks, s.metric, s.scale, s.seeds)), s.id
        assert "1" in s.seeds  # single runs, as published


def test_reference_section_is_separate_and_says_not_comparable() -> None:
    lines = reference_section(load_references())
    text = "\n".join(lines)
    assert lines[0] == "## Reference (published; not comparable)"
    assert "**never comparable**" in text
    assert "model Qwen3.5-9B; tasks: summarisation stream of four FeedSum preferences; metric: LLM judge" in text
    assert "| LifeAlign | 0.91 | 37.67 | 36.43 |" in text  # published decimals
    assert "| MTL (upper bound) | – | 0.759 |" in text
    assert "| CPPO | 0.726 |" in text  # the Llama setting publishes Last only: no BWT column


def test_render_report_prints_references_only_when_given() -> None:
    scores = {"seqft": {"pref_acc": {"tasks": ["a"], "matrix": [[50.0]], "bwt": None, "last": 50.0, "ap": 50.0}}}
    assert "Reference (published" not in render_report(scores, {}, {})
    assert render_report(scores, {}, {}, references=load_references()).count("## Reference") == 1


def test_a_bad_reference_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ref.yaml"
    path.write_text("settings:\n  - {id: x, source: s, model: m, tasks: t, metric: j, scale: '0-1', rows: []}\n")
    with pytest.raises(ValueError, match=r"settings\[0\]: missing \['seeds'\]"):
        load_references(path)
    path.write_text(
        "settings:\n  - {id: x, source: s, model: m, tasks: t, metric: j, scale: '0-1', seeds: '1',"
        " rows: [{method: A, bwt: high}]}\n"
    )
    with pytest.raises(ValueError, match=r"rows\[0\]\.bwt: expected a number or null"):
        load_references(path)
