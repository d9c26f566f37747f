"""``lifealign data inspect PATH``: what a data file holds and what the loader would drop, before training.

Reads the file with ``on_invalid="skip"`` so every problem is counted instead of stopping at the first one
(structural errors of a JSON list file still raise ``DataError``). Lengths are in characters and, with a
tokenizer, in tokens as ``tokenize_pairs`` would build them before truncation (responses include EOS or the
template's end-of-turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lifealign.config.schema import DataSection
from lifealign.data.loaders import load_records
from lifealign.data.records import PreferencePair, Prompt
from lifealign.data.tokenize import encode_pair, uses_chat_template

__all__ = ["format_inspection", "inspect_file", "length_summary"]

FIELDS = ("prompt", "chosen", "rejected")


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """min / median / p95 (linear interpolation, numpy's default) / max; zeros for an empty list."""
    if not lengths:
        return {"min": 0, "median": 0.0, "p95": 0.0, "max": 0}
    values = np.asarray(lengths, dtype=np.float64)
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt; for messages, the sum of their contents."""
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def char_lengths(records: Sequence[PreferencePair]) -> dict[str, dict[str, float]]:
    return {
        "prompt": length_summary([prompt_chars(r.prompt) for r in records]),
        "chosen": length_summary([len(r.chosen) for r in records]),
        "rejected": length_summary([len(r.rejected) for r in records]),
    }


def token_lengths(records: Sequence[PreferencePair], tokenizer: Any, data: DataSection) -> dict[str, dict[str, float]]:
    chat = uses_chat_template(tokenizer, data)
    lengths: dict[str, list[int]] = {name: [] for name in FIELDS}
    for record in records:
        prompt_ids, responses, _ = encode_pair(record, tokenizer, chat)
        lengths["prompt"].append(len(prompt_ids))
        lengths["chosen"].append(len(responses["chosen"]))
        lengths["rejected"].append(len(responses["rejected"]))
    return {name: length_summary(values) for name, values in lengths.items()}


def inspect_file(
    path: str | Path, columns: dict[str, str] | None = None, tokenizer: Any = None, data: DataSection | None = None
) -> dict[str, Any]:
    """Counts (read, kept, skipped by reason, notes) and length statistics of one data file."""
    result = load_records(path, columns=columns, on_invalid="skip")
    summary: dict[str, Any] = {
        "path": str(path),
        "n_lines": result.n_lines,
        "n_read": result.n_read,
        "n_kept": len(result.records),
        "skipped": dict(sorted(result.skipped.items())),
        "notes": dict(sorted(result.notes.items())),
        "conversational": sum(not isinstance(r.prompt, str) for r in result.records),
        "chars": char_lengths(result.records),
    }
    if tokenizer is not None:
        summary["tokens"] = token_lengths(result.records, tokenizer, data or DataSection())
    return summary


def format_length_table(title: str, table: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{title:<16}{'min':>8}{'median':>10}{'p95':>10}{'max':>8}"]
    for name, s in table.items():
        lines.append(f"  {name:<14}{s['min']:>8}{s['median']:>10.1f}{s['p95']:>10.1f}{s['max']:>8}")
    return lines


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"


def format_inspection(d: dict[str, Any]) -> str:
    """A readable report of ``inspect_file``'s dictionary."""
    n_skipped = sum(d["skipped"].values())
    lines = [
        f"file: {d['path']}",
        f"records read: {d['n_read']} ({d['n_lines']} lines)   kept: {d['n_kept']}   "
        f"conversational: {d['conversational']}",
        f"skipped: {n_skipped} ({format_counts(d['skipped'])})",
        f"notes: {format_counts(d['notes'])}",
        "",
    ]
    lines += format_length_table("length (chars)", d["chars"])
    if "tokens" in d:
        lines += [""] + format_length_table("length (tokens)", d["tokens"])
    return "\n".join(lines)
