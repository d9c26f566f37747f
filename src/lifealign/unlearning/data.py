"""U2A's data: forget candidates, the preference set D_pa, retain sequences, the original model's SFT data, a test set.

``lifealign unlearn`` splits one pairwise pool as U2A's ``create_datasets.py`` does (METHODS.md ADDENDUM C.1; HF
``train_test_split`` sizes, ``test = ceil(ratio * N)``, with our own seeded permutation)::

    pool --(pa_ratio)--> D_pa (preference pairs)  |  rest --(negative_ratio)--> negatives | positives
    negatives --(forget_ratio)--> forget candidates (their rejected responses) | retained negatives

The original model is SFT-trained on positives' chosen + all negatives' rejected (``_original.json``); the retain
set is the positives' chosen (``_remain2.json``, the C.1 correction). A negative-only pool (``kind: negative``)
takes every record as a candidate and D_pa from ``unlearn.preference``.

Inside a stream (``unlearn_stage``) every record of the negative task is a candidate; D_pa is ``unlearn.preference``
or, failing that, the task's own records that carry a chosen response (transductive: the pairs decide which of
their negatives to unlearn); retain sequences are ``unlearn.retain_data``, else those chosen responses, else the
chosen responses of the earlier tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lifealign.config.schema import DataSection, TaskSection
from lifealign.config.unlearn import UnlearnSection
from lifealign.data.records import PreferencePair, Task
from lifealign.data.sources import load_task
from lifealign.data.tokenize import tokenize_pairs

__all__ = [
    "U2AData",
    "as_forget",
    "as_response",
    "ceil_split",
    "pool_data",
    "reindex",
    "split_pool",
    "stream_data",
    "tokenize_side",
]


@dataclass
class U2AData:
    """Records for one U2A run; candidates carry the negative as ``rejected``, retain/original as ``chosen``."""

    candidates: list[PreferencePair]
    preference: list[PreferencePair]
    retain: list[PreferencePair] = field(default_factory=list)
    original: list[PreferencePair] = field(default_factory=list)
    test: list[PreferencePair] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("candidates", "preference", "retain", "original", "test")}


def as_forget(pair: PreferencePair) -> PreferencePair:
    """The negative-only record of a pair: its rejected response, no chosen."""
    return replace(pair, chosen="")


def as_response(pair: PreferencePair, text: str) -> PreferencePair:
    """A single-response record (SFT / retain): ``text`` as ``chosen``."""
    return replace(pair, chosen=text, rejected="")


def ceil_split(items: Sequence[Any], test_ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(train, test)`` with ``len(test) = ceil(test_ratio * n)`` (HF ``train_test_split``), seeded permutation."""
    n = len(items)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(n, math.ceil(test_ratio * n))
    return [items[i] for i in perm[n_test:]], [items[i] for i in perm[:n_test]]


def split_pool(pairs: Sequence[PreferencePair], section: UnlearnSection) -> U2AData:
    """METHODS.md ADDENDUM C.1 on a pool of preference pairs (see the module docstring)."""
    rest, preference = ceil_split(pairs, section.pa_ratio, section.split_seed)
    positives, negatives = ceil_split(rest, section.negative_ratio, section.split_seed)
    _, forget = ceil_split(negatives, section.forget_ratio, section.split_seed)
    if section.max_preference is not None:
        preference = preference[: section.max_preference]
    return U2AData(
        candidates=[as_forget(p) for p in forget],
        preference=preference,
        retain=[as_response(p, p.chosen) for p in positives],
        original=[as_response(p, p.chosen) for p in positives] + [as_response(p, p.rejected) for p in negatives],
    )


def load_spec(spec: str, name: str, data: DataSection, kind: str = "pairwise") -> list[PreferencePair]:
    """The train records of a file / ``synthetic:`` / ``hub:`` source, validated like a task's."""
    return load_task(TaskSection(name=name, train=spec, kind=kind), data).train


def _retain_from(records: Sequence[PreferencePair]) -> list[PreferencePair]:
    return [as_response(r, r.chosen) for r in records if r.chosen.strip()]


def pool_data(task: Task, section: UnlearnSection, data: DataSection) -> U2AData:
    """``lifealign unlearn``'s data from its one task: a pairwise pool split by C.1, or negatives + ``preference``."""
    if task.kind == "pairwise":
        out = split_pool(task.train, section)
    else:
        if section.preference is None:
            raise ValueError(f"task {task.name!r} is negative-only: set unlearn.preference (the preference pairs)")
        preference = load_spec(section.preference, f"{task.name}-preference", data)
        out = U2AData(
            candidates=[as_forget(r) for r in task.train],
            preference=preference[: section.max_preference] if section.max_preference else preference,
        )
        out.retain = _retain_from(preference)
    if section.retain_data is not None:
        out.retain = _retain_from(load_spec(section.retain_data, f"{task.name}-retain", data))
    out.test = list(task.test)
    return out


def stream_data(
    task: Task, records: Sequence[PreferencePair], earlier: Sequence[Task], section: UnlearnSection, data: DataSection
) -> U2AData:
    """A negative task's data inside a stream (see the module docstring); D_pa may be empty (then no selection)."""
    with_chosen = [r for r in records if r.chosen.strip()]
    if section.preference is not None:
        preference = load_spec(section.preference, f"{task.name}-preference", data)
    else:
        preference = with_chosen
    if section.max_preference is not None:
        preference = preference[: section.max_preference]
    if section.retain_data is not None:
        retain = _retain_from(load_spec(section.retain_data, f"{task.name}-retain", data))
    else:
        retain = _retain_from(with_chosen) or _retain_from([r for t in earlier for r in t.train])
    return U2AData(
        candidates=[as_forget(r) for r in records if r.rejected.strip()],
        preference=preference,
        retain=retain,
        test=list(task.test),
    )


def tokenize_side(
    records: Sequence[PreferencePair], tokenizer: Any, data: DataSection, sides: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Tokenised examples of ``records`` for ``sides`` (``("rejected",)`` forget, ``("chosen",)`` retain/SFT)."""
    return tokenize_pairs(records, tokenizer, data, sides=sides).examples if records else []


def reindex(examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with ``index`` = position, as the loop's cached reference log-probs require."""
    return [dict(ex, index=i) for i, ex in enumerate(examples)]
