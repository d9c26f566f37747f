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
