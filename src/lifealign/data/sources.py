"""Where a task's records come from: a file, ``hub:<name>`` or ``synthetic:<name>``; tasks and streams.

``load_task`` loads one task's train and test splits, validates them and keeps the first ``max_train`` /
``max_test``; ``load_stream`` loads every task of a config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from lifealign.config.schema import DataSection, TaskSection
from lifealign.data.hub import load_hub_task
from lifealign.data.loaders import DataError, LoadResult, load_records
from lifealign.data.records import PreferencePair, Task, TaskStream
from lifealign.data.synthetic import make_synthetic_task

__all__ = ["load_source", "load_stream", "load_task"]

DEFAULT_SYNTHETIC_TRAIN = 256
DEFAULT_SYNTHETIC_TEST = 64


def load_source(spec: str, split: str, section: TaskSection, data: DataSection) -> LoadResult:
    """One split from a file path or ``hub:<name>[:<hub split>]``."""
    if spec.startswith("hub:"):
        name, _, hub_split = spec[len("hub:") :].partition(":")
        return load_hub_task(
            name, split, hub_split=hub_split or None, task=section.name, kind=section.kind, on_invalid=data.on_invalid
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "not found" if not path.exists() else "is not a file"
        raise DataError(f"task {section.name!r}: tasks[].{split} {spec!r} {what}")
    return load_records(path, section.columns, task=section.name, on_invalid=data.on_invalid, kind=section.kind)


def synthetic_task(section: TaskSection, seed: int) -> Task:
    """``synthetic:<name>``: the offline suite (lifealign.data.synthetic), sized by max_train / max_test."""
    names = {s[len("synthetic:") :] for s in (section.train, section.test) if s and s.startswith("synthetic:")}
    if len(names) != 1:
        raise DataError(f"task {section.name!r}: train and test name different synthetic tasks: {sorted(names)}")
    name = names.pop()
    try:
        return make_synthetic_task(
            name,
            seed=seed,
            n_train=section.max_train or DEFAULT_SYNTHETIC_TRAIN,
            n_test=section.max_test or DEFAULT_SYNTHETIC_TEST,
        )
    except ValueError as e:
        raise DataError(f"task {section.name!r}: {e}") from e


def check_usable(section: TaskSection, split: str, result: LoadResult, data: DataSection) -> None:
    """Abort on 0 usable records or a skipped fraction above ``data.max_skipped_fraction`` (RELIABILITY D16, R8)."""
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(result.skipped.items())) or "no records"
    if not result.records:
        raise DataError(f"task {section.name!r} has 0 usable {split} records ({result.n_skipped} skipped: {reasons})")
    fraction = result.n_skipped / max(result.n_read, 1)
    if fraction > data.max_skipped_fraction:
        raise DataError(
            f"task {section.name!r}: {result.n_skipped} of {result.n_read} {split} records skipped "
            f"({fraction:.1%} > data.max_skipped_fraction={data.max_skipped_fraction}): {reasons}"
        )


def split_spec(section: TaskSection, split: str) -> str | None:
    """The source of one split; without ``test``, a hub or synthetic task takes its source's own test split."""
    spec = getattr(section, split)
    if spec is None and split == "test" and section.train and section.train.startswith(("hub:", "synthetic:")):
        return section.train
    return spec


def load_split(section: TaskSection, split: str, data: DataSection, synthetic: Task | None) -> LoadResult | None:
    spec = split_spec(section, split)
    if spec is None:
        return None
    if spec.startswith("synthetic:"):
        assert synthetic is not None
        records = synthetic.train if split == "train" else synthetic.test
        return LoadResult(records=[replace(r, task=section.name) for r in records], n_read=len(records))
    return load_source(spec, split, section, data)


def load_task(section: TaskSection, data: DataSection, seed: int = 0) -> Task:
    """Load one task's train and test splits, validate them, and keep the first ``max_train`` / ``max_test``.

    Without ``test``, a ``hub:`` or ``synthetic:`` task takes its source's test split; a file task has none.
    """
    if section.train is None:
        raise DataError(f"task {section.name!r}: tasks[].train is required")
    specs = (section.train, section.test or "")
    synthetic = synthetic_task(section, seed) if any(s.startswith("synthetic:") for s in specs) else None
    skipped: Counter[str] = Counter()
    splits: dict[str, list[PreferencePair]] = {}
    for split, limit in (("train", section.max_train), ("test", section.max_test)):
        result = load_split(section, split, data, synthetic)
        if result is None:
            splits[split] = []
            continue
        check_usable(section, split, result, data)
        skipped.update(result.skipped)
        splits[split] = result.records[:limit] if limit else result.records
    kind = synthetic.kind if synthetic is not None and "kind" not in section.model_fields_set else section.kind
    return Task(name=section.name, train=splits["train"], test=splits["test"], kind=kind, skipped=dict(skipped))


def load_stream(sections: Iterable[TaskSection], data: DataSection, seed: int = 0) -> TaskStream:
    """Load every task of a stream, in order; task names must be unique."""
    sections = list(sections)
    names = Counter(s.name for s in sections)
    duplicated = sorted(n for n, c in names.items() if c > 1)
    if duplicated:
        raise DataError(f"task names must be unique in a stream; repeated: {', '.join(duplicated)}")
    return TaskStream([load_task(s, data, seed) for s in sections])
