"""Strict JSON: non-finite floats as ``null`` (and back), and atomic text writes."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write_text", "nan_to_null", "null_to_nan"]


def nan_to_null(obj: Any) -> Any:
    """A copy of a JSON-like structure with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating | np.integer):
        return nan_to_null(obj.item())
    if isinstance(obj, Mapping):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_null(v) for v in obj]
    return obj


def null_to_nan(obj: Any) -> Any:
    """The inverse of :func:`nan_to_null` for numbers: every ``None`` inside lists and dict values becomes NaN."""
    if obj is None:
        return math.nan
    if isinstance(obj, Mapping):
        return {k: null_to_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [null_to_nan(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and ``os.replace``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
