"""The continual-learning score matrix and its summary metrics (LifeAlign paper §Metrics; METHODS.md §1.6).

``m[i][j]`` is the score on task ``j`` after training through task ``i`` (0-based, ``N`` tasks, ``N × N``); an
entry that was not evaluated is ``NaN`` (after task ``i`` the default runner scores only tasks ``0..i``, so the
upper triangle is ``NaN``). ``b[j]`` is the optional score of the initial model on task ``j`` (the "row −1").

All functions are pure: a nested sequence (or array) in, a float or list out. A metric that needs an entry that
is ``NaN`` is ``NaN`` itself: a missing evaluation is never silently treated as a score. JSON written here is
strict (``allow_nan=False``): non-finite numbers become ``null`` and read back as ``NaN``.

Papers disagree on some definitions, so BWT, forgetting and FWT take a named ``convention`` (allowed names in
:data:`CONVENTIONS`, defaults in :data:`DEFAULT_CONVENTIONS`); name it next to every number you report.

Each metric also has a ``batch_*`` form on a stack of matrices ``(..., N, N)`` (and baselines ``(..., N)``) that
returns one value per matrix; the scalar functions are thin wrappers of those, so the bootstrap in
:mod:`lifealign.evaluation.stats` computes exactly the same formulas on thousands of resampled matrices at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from lifealign.utils.jsonio import nan_to_null, null_to_nan

MatrixLike = Sequence[Sequence[float | None]] | np.ndarray

CONVENTIONS: dict[str, tuple[str, ...]] = {
    "bwt": ("lifealign", "n_tasks"),
    "forgetting": ("chaudhry", "final"),
    "fwt": ("untrained", "all_prior"),
}
"""Allowed convention names per metric (the first is the default); a config can validate a choice against this."""

DEFAULT_CONVENTIONS: dict[str, str] = {metric: names[0] for metric, names in CONVENTIONS.items()}
"""``{"bwt": "lifealign", "forgetting": "chaudhry", "fwt": "untrained"}``."""


def check_convention(metric: str, name: str) -> str:
    """``name`` if it is an allowed convention of ``metric``, else ``ValueError`` naming the allowed ones."""
    if metric not in CONVENTIONS:
        raise ValueError(f"no conventions for metric {metric!r}; metrics with conventions: {sorted(CONVENTIONS)}")
    if name not in CONVENTIONS[metric]:
        raise ValueError(f"unknown {metric} convention {name!r}; choose one of {list(CONVENTIONS[metric])}")
    return name


def resolve_conventions(conventions: Mapping[str, str] | None = None) -> dict[str, str]:
    """The defaults updated with ``conventions``, every name checked: ``{"bwt": …, "forgetting": …, "fwt": …}``."""
    out = dict(DEFAULT_CONVENTIONS)
    for metric, name in (conventions or {}).items():
        out[metric] = check_convention(metric, name)
    return out


def as_array(m: MatrixLike) -> np.ndarray:
    """``m`` as a square float64 array, ``None`` mapped to ``NaN``."""
    a = np.array([[np.nan if v is None else float(v) for v in row] for row in m], dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a score matrix must be square (N x N), got shape {a.shape}")
    return a


def _as_baseline(baseline: Sequence[float | None] | np.ndarray, n: int) -> np.ndarray:
    b = np.array([np.nan if v is None else float(v) for v in baseline], dtype=np.float64)
    if b.shape != (n,):
        raise ValueError(f"baseline must have one score per task ({n}), got {b.shape[0]}")
    return b


def _nan(a: np.ndarray) -> np.ndarray:
    """An all-NaN result with one entry per matrix of the stack ``a`` (``(..., N, N)`` -> ``(...)``)."""
    return np.full(a.shape[:-2], np.nan)


# --- batched forms: ``a`` is ``(..., N, N)``, the result has shape ``(...)`` (forgetting: ``(..., N-1)``) ---


def batch_last(a: np.ndarray) -> np.ndarray:
    """``Last = 1/N Σ_j m[N-1][j]`` for every matrix of the stack."""
    if a.shape[-1] == 0:
        return _nan(a)
    return a[..., -1, :].mean(axis=-1)


def batch_bwt(a: np.ndarray, convention: str = "lifealign") -> np.ndarray:
    """``Σ_{i<N-1} (m[N-1][i] − m[i][i])`` divided by ``N-1`` (``"lifealign"``) or ``N`` (``"n_tasks"``).

    ``"lifealign"``: LifeAlign's §Metrics and Lopez-Paz & Ranzato (GEM, 2017) average over the ``N-1`` tasks that can
    have been forgotten. ``"n_tasks"``: several continual-instruction-tuning benchmarks (STATISTICS.md) average
    ``m[N-1][i] − m[i][i]`` over all ``N`` tasks, so the last task contributes ``0`` and the value is ``(N-1)/N``
    times the LifeAlign one; BeGin's average forgetting (Ko et al., graph continual learning) divides by ``N`` the
    same way. NaN if ``N < 2`` under both (no task can have been forgotten yet).
    """
    check_convention("bwt", convention)
    n = a.shape[-1]
    if n < 2:
        return _nan(a)
    diag = np.diagonal(a, axis1=-2, axis2=-1)
    total = (a[..., -1, :-1] - diag[..., :-1]).sum(axis=-1)
    return total / (n - 1 if convention == "lifealign" else n)


def batch_ap(a: np.ndarray) -> np.ndarray:
    """``AP = 1/N Σ_k 1/(k+1) Σ_{i≤k} m[k][i]`` for every matrix of the stack (NaN if a needed entry is NaN)."""
    n = a.shape[-1]
    if n == 0:
        return _nan(a)
    seen = np.tril(np.ones((n, n), dtype=bool))  # seen[k, i]: task i has been learned after stage k
    stage_means = np.where(seen, a, 0.0).sum(axis=-1) / np.arange(1, n + 1)
    return stage_means.mean(axis=-1)


def batch_fwt(a: np.ndarray, baseline: np.ndarray | None, convention: str = "untrained") -> np.ndarray:
    """Forward transfer against the untrained model's scores ``b`` (``baseline``, shape ``(..., N)``).

    ``"untrained"`` (Lopez-Paz & Ranzato, GEM 2017; avalanche): ``1/(N-1) Σ_{i≥1} (m[i-1][i] − b[i])``, the score on
    task ``i`` just before learning it minus the untrained model's. ``"all_prior"`` (Díaz-Rodríguez et al. 2018,
    "Don't forget, there is more than forgetting"): the mean of ``m[i][j] − b[j]`` over every stage before task
    ``j`` was learned (all ``i < j``, ``N(N-1)/2`` entries); their printed formula averages ``m[i][j]`` without
    ``b[j]``, which we keep so the number stays a transfer relative to the untrained model (``b = 0`` gives theirs).
    Both need the upper triangle (``eval.on: all``); NaN without a baseline or if ``N < 2``.
    """
    check_convention("fwt", convention)
    n = a.shape[-1]
    if baseline is None or n < 2:
        return _nan(a)
    if convention == "untrained":
        before = np.diagonal(a, offset=1, axis1=-2, axis2=-1)  # before[..., i-1] = m[i-1][i]
        return (before - baseline[..., 1:]).mean(axis=-1)
    earlier = np.triu(np.ones((n, n), dtype=bool), k=1)  # earlier[i, j]: stage i precedes learning task j
    gains = np.where(earlier, a - baseline[..., None, :], 0.0)
    return gains.sum(axis=(-2, -1)) / (n * (n - 1) / 2)


def batch_forgetting(a: np.ndarray, convention: str = "chaudhry") -> np.ndarray:
    """Per-task forgetting ``f_j`` for ``j < N-1``, shape ``(..., N-1)``.

    ``"chaudhry"`` (Chaudhry et al. 2018, Riemannian Walk): ``f_j = max_{j≤k<N-1} m[k][j] − m[N-1][j]``, the best
    score since task ``j`` was learned (``k ≥ j``, so a zero-shot score before learning is not counted) minus the
    final one; NaN entries among those stages are ignored and ``f_j`` is NaN if none was measured. ``"final"``
    (avalanche's ``ExperienceForgetting``; BeGin's AF): ``f_j = m[j][j] − m[N-1][j]``, the score just after learning
    minus the final one, i.e. ``−`` the per-task BWT term.
    """
    check_convention("forgetting", convention)
    n = a.shape[-1]
    if n < 2:
        return np.zeros(a.shape[:-2] + (0,))
    final = a[..., -1, : n - 1]
    if convention == "final":
        return np.diagonal(a, axis1=-2, axis2=-1)[..., : n - 1] - final
    earlier = a[..., : n - 1, : n - 1]  # earlier[k, j] for stages k < N-1
    since = np.tril(np.ones((n - 1, n - 1), dtype=bool))  # since[k, j]: k >= j
    best = np.where(since & ~np.isnan(earlier), earlier, -np.inf).max(axis=-2)
    return np.where(np.isneginf(best), np.nan, best) - final


# --- scalar forms on one matrix ---


def last(m: MatrixLike) -> float:
    """``Last = 1/N Σ_j m[N-1][j]``: the mean score over all tasks after training the last one."""
    return float(batch_last(as_array(m)))


def bwt(m: MatrixLike, convention: str = "lifealign") -> float:
    """Backward transfer; negative = forgetting. ``"lifealign"`` (default): ``1/(N-1) Σ_{i<N-1} (m[N-1][i] −
    m[i][i])``; ``"n_tasks"``: the same sum over ``N``. NaN if N < 2. See :func:`batch_bwt` for the sources."""
    return float(batch_bwt(as_array(m), convention))


def ap(m: MatrixLike) -> float:
    """Average performance ``AP = 1/N Σ_k 1/(k+1) Σ_{i≤k} m[k][i]``: the mean over stages of the seen-task mean."""
    return float(batch_ap(as_array(m)))


def fwt(m: MatrixLike, baseline: Sequence[float | None] | None, convention: str = "untrained") -> float:
    """Forward transfer. ``"untrained"`` (default): ``FWT = 1/(N-1) Σ_{i≥1} (m[i-1][i] − b[i])``; ``"all_prior"``:
    the mean of ``m[i][j] − b[j]`` over all ``i < j``. See :func:`batch_fwt` for the sources.

    ``m[i-1][i]`` is the score on task ``i`` *before* learning it (only measured when every task is evaluated
    after every stage, ``eval.on: all``), ``b[i]`` that of the initial model. NaN without a baseline or if N < 2.
    """
    a = as_array(m)
    b = None if baseline is None else _as_baseline(baseline, a.shape[0])
    return float(batch_fwt(a, b, convention))


def forgetting(m: MatrixLike, convention: str = "chaudhry") -> list[float]:
    """Per-task forgetting for every ``j < N-1``. ``"chaudhry"`` (default): ``f_j = max_{j≤k<N-1} m[k][j] −
    m[N-1][j]``; ``"final"``: ``f_j = m[j][j] − m[N-1][j]``. See :func:`batch_forgetting` for the sources.

    The maximum runs over the stages *since task j was learned* (``k ≥ j``; Chaudhry et al. 2018), so a zero-shot
    score measured before learning (``eval.on: all``) does not count as knowledge that was later forgotten.
    ``NaN`` entries among those stages are ignored; ``f_j`` is NaN if none was measured.
    """
    return [float(v) for v in batch_forgetting(as_array(m), convention)]


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

    def summary(self, conventions: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``{"tasks", "matrix", "bwt", "last", "ap", "fwt", "forgetting", "conventions"[, "initial"]}``.

        ``conventions`` (``{metric: name}``, see :data:`CONVENTIONS`; missing metrics take the defaults) picks the
        definitions; the resolved names are recorded under ``"conventions"`` so ``scores.json`` names them. Floats;
        NaN = undefined.
        """
        conv = resolve_conventions(conventions)
        out: dict[str, Any] = {
            "tasks": list(self.tasks),
            "matrix": [list(row) for row in self.matrix],
            "bwt": bwt(self.matrix, conv["bwt"]),
            "last": last(self.matrix),
            "ap": ap(self.matrix),
            "fwt": fwt(self.matrix, self.initial, conv["fwt"]),
            "forgetting": forgetting(self.matrix, conv["forgetting"]),
            "conventions": conv,
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
