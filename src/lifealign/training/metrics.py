"""``metrics.jsonl``: one strict JSON object per line, with trl's metric names where they overlap.

Non-finite values are written as ``null`` and listed under ``"nonfinite"`` (RELIABILITY.md R5). The writer
tracks its byte offset so a checkpoint can record it and a resumed run can truncate what came after the commit
(no duplicated or partial lines). A failing sink (disk full) raises at the first write.

TensorBoard (``train.tensorboard: true``) uses trl's tag names, so dashboards made for trl runs read ours:
a training step's record becomes ``train/loss``, ``train/rewards/chosen``, ``train/rewards/rejected``,
``train/rewards/margins``, ``train/rewards/accuracies``, ``train/logps/chosen``, ``train/logps/rejected``,
``train/learning_rate``, ``train/grad_norm`` (and ``train/loss/<term>``, ``train/nonfinite_skipped``), with
``global_step`` (counted across tasks and stages) as the x axis; an evaluation record's numbers go to
``eval/<key>`` and any other event's to ``<event>/<key>``. Bookkeeping keys (``global_step``, the stage-local
``step``, ``task_index``) and non-numbers are not logged. ``metrics.jsonl`` keeps its own keys unchanged
(``loss``, ``rewards/chosen``, ... plus ``task``, ``stage``, ``method``, ``step``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def sanitize_record(record: dict[str, Any]) -> dict[str, Any]:
    """Replace non-finite floats by None and list their keys under ``nonfinite``."""
    out: dict[str, Any] = {}
    bad: list[str] = []
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            bad.append(key)
        else:
            out[key] = value
    if bad:
        out["nonfinite"] = bad
    return out


TRAIN_EVENTS = ("step", "nonfinite_skipped")
"""Events that are optimizer steps: their scalars go under ``train/``."""
NOT_LOGGED_TO_TENSORBOARD = frozenset({"global_step", "step", "task_index"})


def tensorboard_scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """``[(tag, value), ...]`` of one metrics record in trl's naming (see the module docstring); empty without a
    ``global_step``. Nested mappings are flattened with ``/``."""
    if "global_step" not in record:
        return []
    event = record.get("event", "step")
    prefix = "train" if event in TRAIN_EVENTS else "eval" if event == "eval" else str(event)
    return [(f"{prefix}/{key}", value) for key, value in _numbers(record) if key not in NOT_LOGGED_TO_TENSORBOARD]


def _numbers(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        if isinstance(value, dict):
            out.extend(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", value))
    return out


class MetricsWriter:
    """Append-only JSONL writer (main process only) with optional TensorBoard mirroring."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    @property
    def offset(self) -> int:
        return self._fh.tell() if self._fh is not None else 0

    def truncate_to(self, offset: int) -> None:
        """Drop everything written after ``offset`` (used on resume, before any new write)."""
        if self._fh is None:
            return
        self._fh.flush()
        os.truncate(self.path, offset)
        self._fh.seek(offset)

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        line = json.dumps(sanitize_record(record), allow_nan=False, ensure_ascii=False) + "\n"
        try:
            self._fh.write(line.encode("utf-8"))
            self._fh.flush()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write metrics to {self.path}: {exc.strerror}") from exc
        if self._tb is not None:
            for tag, value in tensorboard_scalars(record):
                self._tb.add_scalar(tag, value, record["global_step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse every line strictly (a partial or invalid line raises)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
