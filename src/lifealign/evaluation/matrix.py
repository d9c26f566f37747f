"""The continual-learning score matrix and its summary metrics (LifeAlign paper §Metrics; METHODS.md §1.6).

``m[i][j]`` is the score on task ``j`` after training through task ``i`` (0-based, ``N`` tasks, ``N × N``); an
entry that was not evaluated is ``NaN`` (after task ``i`` the default runner scores only tasks ``0..i``, so the
upper triangle is ``NaN``). ``b[j]`` is the optional score of the initial model on task ``j`` (the "row −1").

All functions are pure: a nested sequence (or array) in, a float or list out. A metric that needs an entry that
is ``NaN`` is ``NaN`` itself: a missing evaluation is never silently treated as a score. JSON written here is
strict (``allow_nan=False``): non-finite numbers become ``null`` and read back as ``NaN``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from lifealign.utils.jsonio import nan_to_null, null_to_nan

MatrixLike = Sequence[Sequence[float | None]] | np.ndarray


def as_array(m: MatrixLike) -> np.ndarray:
    """``m`` as a square float64 array, ``None`` mapped to ``NaN``."""
    a = np.array([[np.nan if v is None else float(v) for v in row] for row in m], dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a score matrix must be square (N x N), got shape {a.shape}")
    return a


def last(m: MatrixLike) -> float:
    """``Last = 1/N Σ_j m[N-1][j]``: the mean score over all tasks after training the last one."""
    a = as_array(m)
    if a.shape[0] == 0:
        return math.nan
    return float(np.mean(a[-1]))


def bwt(m: MatrixLike) -> float:
    """Backward transfer ``BWT = 1/(N-1) Σ_{i<N-1} (m[N-1][i] − m[i][i])``; negative = forgetting. NaN if N < 2."""
    a = as_array(m)
    n = a.shape[0]
    if n < 2:
        return math.nan
    return float(np.mean(a[-1, :-1] - np.diag(a)[:-1]))


def ap(m: MatrixLike) -> float:
    """Average performance ``AP = 1/N Σ_k 1/(k+1) Σ_{i≤k} m[k][i]``: the mean over stages of the seen-task mean."""
    a = as_array(m)
    n = a.shape[0]
    if n == 0:
        return math.nan
    return float(np.mean([np.mean(a[k, : k + 1]) for k in range(n)]))


def fwt(m: MatrixLike, baseline: Sequence[float | None] | None) -> float:
    """Forward transfer ``FWT = 1/(N-1) Σ_{i≥1} (m[i-1][i] − b[i])``.

    ``m[i-1][i]`` is the score on task ``i`` *before* learning it (only measured when every task is evaluated
    after every stage, ``eval.on: all``), ``b[i]`` that of the initial model. NaN without a baseline or if N < 2.
    """
    a = as_array(m)
    n = a.shape[0]
    if baseline is None or n < 2:
        return math.nan
    b = np.array([np.nan if v is None else float(v) for v in baseline], dtype=np.float64)
    if b.shape != (n,):
        raise ValueError(f"baseline must have one score per task ({n}), got {b.shape[0]}")
    return float(np.mean([a[i - 1, i] - b[i] for i in range(1, n)]))


def forgetting(m: MatrixLike) -> list[float]:
    """Per-task forgetting ``f_j = max_{j≤k<N-1} m[k][j] − m[N-1][j]`` for every ``j < N-1``.

    The maximum runs over the stages *since task j was learned* (``k ≥ j``; Chaudhry et al. 2018), so a zero-shot
    score measured before learning (``eval.on: all``) does not count as knowledge that was later forgotten.
    ``NaN`` entries among those stages are ignored; ``f_j`` is NaN if none was measured.
    """
    a = as_array(m)
    n = a.shape[0]
    out: list[float] = []
    for j in range(n - 1):
        seen = a[j : n - 1, j]
        seen = seen[~np.isnan(seen)]
        out.append(float(seen.max() - a[-1, j]) if seen.size else math.nan)
    return out


@dataclass
class ScoreMatrix:
    """One metric's ``N × N`` matrix over a task stream, plus the initial model's scores when measured."""

    tasks: list[str]
    matrix: list[list[float]] = field(default_factory=list)
    """``matrix[i][j]``: score on task ``j`` after training task ``i``; NaN where not evaluated."""
    initial: list[float] | None = None
    """Score of the model before any training on each task (the FWT baseline), if measured."""

    def __post_init__(self) -> None:
        n = len(self.tasks)
        if not self.matrix:
            self.matrix = [[math.nan] * n for _ in range(n)]
        self.matrix = as_array(self.matrix).tolist()
        if len(self.matrix) != n:
            raise ValueError(f"matrix is {len(self.matrix)} x {len(self.matrix)} but there are {n} tasks")
        if self.initial is not None:
            if len(self.initial) != n:
                raise ValueError(f"initial has {len(self.initial)} scores but there are {n} tasks")
            self.initial = [math.nan if v is None else float(v) for v in self.initial]

    def set(self, i: int, j: int, value: float) -> None:
        """Record the score on task ``j`` after training task ``i``."""
        self.matrix[i][j] = float(value)

    def set_initial(self, j: int, value: float) -> None:
        """Record the initial (untrained) model's score on task ``j``."""
        if self.initial is None:
            self.initial = [math.nan] * len(self.tasks)
        self.initial[j] = float(value)

    def summary(self) -> dict[str, Any]:
        """``{"tasks", "matrix", "bwt", "last", "ap", "fwt", "forgetting"[, "initial"]}`` (floats; NaN = undefined)."""
        out: dict[str, Any] = {
            "tasks": list(self.tasks),
            "matrix": [list(row) for row in self.matrix],
            "bwt": bwt(self.matrix),
            "last": last(self.matrix),
            "ap": ap(self.matrix),
            "fwt": fwt(self.matrix, self.initial),
            "forgetting": forgetting(self.matrix),
        }
        if self.initial is not None:
            out["initial"] = list(self.initial)
        return out

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> ScoreMatrix:
        """Rebuild from :meth:`summary` output or its JSON form (``null`` = NaN). Task names default to T1..TN."""
        matrix = null_to_nan(summary["matrix"])
        tasks = list(summary.get("tasks") or [f"T{k + 1}" for k in range(len(matrix))])
        initial = summary.get("initial")
        return cls(tasks=tasks, matrix=matrix, initial=None if initial is None else null_to_nan(list(initial)))

    def to_json(self) -> str:
        """Strict JSON ``{"tasks", "matrix", "initial"}`` with ``null`` for NaN."""
        payload = {"tasks": self.tasks, "matrix": self.matrix, "initial": self.initial}
        return json.dumps(nan_to_null(payload), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ScoreMatrix:
        return cls.from_summary(json.loads(text))


def record_scores(
    matrices: dict[str, ScoreMatrix], tasks: Sequence[str], i: int, j: int, scores: Mapping[str, float]
) -> None:
    """Put every metric of one evaluation (task ``j`` after training task ``i``) in its matrix, creating it if new.

    ``i = -1`` records the initial model's scores (the FWT baseline).
    """
    for metric, value in scores.items():
        sm = matrices.setdefault(metric, ScoreMatrix(tasks=list(tasks)))
        if i < 0:
            sm.set_initial(j, value)
        else:
            sm.set(i, j, value)
