"""metrics.jsonl: strict JSON, non-finite values as null, truncation on resume, a full disk fails fast (F7, F14)."""

import json
import math
from pathlib import Path

import pytest

from lifealign.training.metrics import MetricsWriter, read_metrics, sanitize_record


def test_non_finite_values_become_null_and_are_listed():
    out = sanitize_record({"loss": math.nan, "grad_norm": math.inf, "step": 3})
    assert out == {"loss": None, "grad_norm": None, "step": 3, "nonfinite": ["loss", "grad_norm"]}


def test_truncate_to_offset_drops_later_lines(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"step": 1})
    offset = w.offset
    w.write({"step": 2})
    w.truncate_to(offset)
    w.write({"step": 3})
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 3]


def test_partial_last_line_is_removed_by_truncation(tmp_path):
    path = tmp_path / "m.jsonl"
    w = MetricsWriter(path)
    w.write({"step": 1})
    offset = w.offset
    w.close()
    with open(path, "ab") as fh:
        fh.write(b'{"step": 2, "lo')  # a kill in the middle of a write
    w = MetricsWriter(path)
    w.truncate_to(offset)
    w.write({"step": 2})
    w.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_fails_at_the_first_write_naming_the_path():
    w = MetricsWriter("/dev/full")
    with pytest.raises(OSError, match="cannot write metrics to /dev/full"):
        w.write({"step": 1})


def test_tensorboard_mirror_writes_event_files(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    w.write({"global_step": 1, "task": "t", "stage": "pref", "loss": 0.5})
    w.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_tags_follow_trl_names():
    from lifealign.training.metrics import tensorboard_scalars

    step = {
        "event": "step",
        "method": "seqft",
        "task": "t",
        "task_index": 0,
        "stage": "pref",
        "step": 3,
        "global_step": 7,
        "learning_rate": 1e-4,
        "grad_norm": 0.5,
        "nonfinite_skipped": 0,
        "loss": 0.69,
        "loss/ewc": 0.01,
        "rewards/chosen": 0.1,
        "rewards/rejected": -0.1,
        "rewards/margins": 0.2,
        "rewards/accuracies": 1.0,
        "logps/chosen": -10.0,
        "logps/rejected": -12.0,
        "flag": True,
    }
    assert dict(tensorboard_scalars(step)) == {
        "train/learning_rate": 1e-4,
        "train/grad_norm": 0.5,
        "train/nonfinite_skipped": 0,
        "train/loss": 0.69,
        "train/loss/ewc": 0.01,
        "train/rewards/chosen": 0.1,
        "train/rewards/rejected": -0.1,
        "train/rewards/margins": 0.2,
        "train/rewards/accuracies": 1.0,
        "train/logps/chosen": -10.0,
        "train/logps/rejected": -12.0,
    }
    assert dict(tensorboard_scalars({"event": "eval", "global_step": 7, "pref_acc": 75.0, "drift": {"kl": 0.01}})) == {
        "eval/pref_acc": 75.0,
        "eval/drift/kl": 0.01,
    }
    assert tensorboard_scalars({"event": "eval", "scores": {"pref_acc": [50.0]}}) == []  # no step: not logged


def test_tensorboard_event_file_holds_the_trl_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    w.write({"event": "step", "global_step": 1, "task": "t", "stage": "pref", "loss": 0.5, "rewards/chosen": 0.1})
    w.write({"event": "step", "global_step": 2, "task": "u", "stage": "sft", "loss": 0.4})
    w.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/rewards/chosen"]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.4)]
