"""``metrics.jsonl``: one strict JSON object per line, with trl's metric names where they overlap.

Non-finite values are written as ``null`` and listed under ``"nonfinite"`` (RELIABILITY.md R5). The writer
tracks its byte offset so a checkpoint can record it and a resumed run can truncate what came after the commit
(no duplicated or partial lines). A failing sink (disk full) raises at the first write.
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
        if self._tb is not None and "global_step" in record:
            prefix = f"{record.get('task', '')}/{record.get('stage', '')}".strip("/")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step":
                    self._tb.add_scalar(f"{prefix}/{key}" if prefix else key, value, record["global_step"])

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
