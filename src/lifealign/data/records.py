"""Preference records: the data contract every layer above ``data`` speaks.

A record is ``prompt, chosen, rejected`` (+ ``task``, ``id``). ``prompt`` is either plain text or a list of
``{role, content}`` messages (conversational records); ``chosen``/``rejected`` are plain text responses. A
negative-only record (for unlearning) has ``chosen == ""`` and ``kind == "negative"``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Literal

Message = dict[str, str]
Prompt = str | list[Message]


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: ``chosen`` is preferred over ``rejected`` as a reply to ``prompt``."""

    prompt: Prompt
    chosen: str
    rejected: str
    task: str = ""
    id: str = ""

    def content_hash(self) -> str:
        """sha256 of (prompt, chosen, rejected); the key for de-duplication and replay identity."""
        payload = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class Task:
    """One alignment task: a name, its training and test records, and its kind."""

    name: str
    train: list[PreferencePair]
    test: list[PreferencePair] = field(default_factory=list)
    kind: Literal["pairwise", "negative"] = "pairwise"
    skipped: dict[str, int] = field(default_factory=dict)
    """Counts of skipped records by reason (``empty_response``, ``identical_pair``, ``duplicate_pair``, ...)."""


@dataclass
class TaskStream:
    """An ordered sequence of tasks, learned one after another."""

    tasks: list[Task]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]
