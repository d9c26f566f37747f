"""Read preference records from JSON / JSONL files, with located errors (``sources.py`` picks files, hub or synthetic).

Input policy (RELIABILITY.md R8, §3.2):

- **Schema violations** (malformed JSON, truncated last record, missing field, wrong type, bad chat messages,
  invalid UTF-8, lone surrogates / NUL characters, a key given twice in one JSON object, a record over
  ``max_record_bytes`` = ``data.max_record_bytes``, 1 MiB by default) raise one ``DataError`` that
  lists up to 20 offenders as ``file:line: field: problem`` plus the total. With ``on_invalid="skip"`` they are
  skipped and counted by reason instead. Structural errors of a JSON *list* file (syntax, encoding) are always
  fatal: the parser cannot find the next record after them.
- **No-signal records** are always skipped with a count and a warning: an empty or whitespace-only response
  (``empty_response``; an empty completion gives a constant DPO loss and NaN for length-normalised losses),
  ``chosen == rejected`` (``identical_pair``; zero gradient) and exact duplicates by content hash
  (``duplicate_pair``; the first is kept, so the kept set is deterministic).
- **Noted, kept**: blank lines (``blank_lines``), empty prompts (``empty_prompt``), contradictory pairs, i.e. the
  same prompt with chosen and rejected swapped (``contradictory_pair``).

Line numbers are 1-based physical lines (``\\n``-terminated, so CRLF files count right; a UTF-8 BOM is ignored).
For a JSON list the line is the one where the record's ``{`` stands.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lifealign.config.schema import DataSection, TaskSection
from lifealign.data.records import Message, PreferencePair, Prompt

__all__ = [
    "DataError",
    "LoadResult",
    "filter_no_signal",
    "load_records",
    "load_records_for",
    "pair_from_object",
]

logger = logging.getLogger(__name__)

OnInvalid = Literal["error", "skip"]
Kind = Literal["pairwise", "negative"]

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
METADATA_FIELDS = ("id", "task")
CHAT_ROLES = ("system", "user", "assistant")
MAX_RECORD_BYTES: int = DataSection.model_fields["max_record_bytes"].default
"""The default of ``data.max_record_bytes`` (the schema holds it)."""
MAX_LISTED_ERRORS = 20
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}
_UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A data problem; the message names ``file:line: field: problem``."""


class RecordError(Exception):
    """A schema violation inside one record, before its location is known; ``reason`` is the skip-count key."""

    def __init__(self, field_name: str, problem: str, reason: str) -> None:
        super().__init__(f"{field_name}: {problem}" if field_name else problem)
        self.reason = reason


@dataclass
class LoadResult:
    """Records that passed validation, in file order, with the counts of what was dropped and why."""

    records: list[PreferencePair]
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped records by reason (schema reasons only with ``on_invalid="skip"``)."""
    n_read: int = 0
    """Records encountered (objects in a JSON list, non-blank lines in JSONL, rows of a hub split)."""
    n_lines: int = 0
    """Physical lines of the file (0 for hub datasets)."""
    notes: dict[str, int] = field(default_factory=dict)
    """Counted but kept (``blank_lines``, ``empty_prompt``, ``contradictory_pair``) or filtered by design
    (``filtered`` rows a hub mapper does not turn into a pair)."""

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


# ----------------------------------------------------------------------------------------------------------------
# Record schema


def json_type_name(value: Any) -> str:
    """The JSON name of a Python value's type (``null``, ``integer``, ``array``, ...)."""
    return "null" if value is None else _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def check_text(value: str, field_name: str) -> str:
    """Reject strings no tokenizer can encode: lone surrogates (``"\\ud800"`` escapes) and NUL characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        problem = f"lone surrogate {value[e.start]!r} at character {e.start}"
        raise RecordError(field_name, problem, "invalid_text") from None
    if "\x00" in value:
        raise RecordError(field_name, f"NUL character at character {value.index(chr(0))}", "invalid_text")
    return value


def check_message(message: Any, where: str) -> Message:
    """One chat message: an object with a known string ``role`` and a string ``content``."""
    if not isinstance(message, dict):
        raise RecordError(where, f"expected a message object, got {json_type_name(message)}", "invalid_messages")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        problem = "missing 'role'" if role is None else f"unsupported role {role!r} (expected one of {CHAT_ROLES})"
        raise RecordError(f"{where}.role", problem, "invalid_messages")
    if not isinstance(content, str):
        problem = f"expected a string, got {json_type_name(content)}"
        raise RecordError(f"{where}.content", problem, "invalid_messages")
    return {"role": role, "content": check_text(content, f"{where}.content")}


def check_prompt_messages(messages: list[Any], field_name: str) -> list[Message]:
    """A conversational prompt: optional system first, then user/assistant alternating, ending with user."""
    if not messages:
        raise RecordError(field_name, "empty message list", "invalid_messages")
    checked = [check_message(m, f"{field_name}[{i}]") for i, m in enumerate(messages)]
    start = 1 if checked[0]["role"] == "system" else 0
    for i in range(start, len(checked)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if checked[i]["role"] != expected:
            problem = f"role {checked[i]['role']!r} out of order (expected {expected!r})"
            raise RecordError(f"{field_name}[{i}].role", problem, "invalid_messages")
    if checked[-1]["role"] != "user":
        problem = "a prompt must end with a user message (missing user turn)"
        raise RecordError(f"{field_name}[{len(checked) - 1}].role", problem, "invalid_messages")
    return checked


def check_prompt(value: Any) -> Prompt:
    """``prompt`` is a string or a list of chat messages."""
    if isinstance(value, str):
        return check_text(value, "prompt")
    if isinstance(value, list):
        return check_prompt_messages(value, "prompt")
    raise RecordError("prompt", f"expected a string or a list of messages, got {json_type_name(value)}", "wrong_type")


def check_response(value: Any, field_name: str) -> str:
    """A response is a string, or a message list whose last message is the assistant's (its content is taken)."""
    if isinstance(value, str):
        return check_text(value, field_name)
    if isinstance(value, list) and value:
        messages = [check_message(m, f"{field_name}[{i}]") for i, m in enumerate(value)]
        if messages[-1]["role"] != "assistant":
            problem = f"the last message must be the assistant's, got {messages[-1]['role']!r} (missing assistant turn)"
            raise RecordError(f"{field_name}[{len(value) - 1}].role", problem, "invalid_messages")
        return messages[-1]["content"]
    if isinstance(value, list):
        raise RecordError(field_name, "empty message list", "invalid_messages")
    problem = f"expected a string or a list of messages, got {json_type_name(value)}"
    if isinstance(value, (int, float, bool)):
        problem += f" ({value!r})"
    raise RecordError(field_name, problem, "wrong_type")


def rename_columns(obj: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply the column mapping (file key -> our key); ``query`` maps to ``prompt`` when ``prompt`` is absent."""
    mapping = dict(columns)
    if "query" in obj and "prompt" not in obj and "query" not in mapping:
        mapping["query"] = "prompt"
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in obj.items():
        target = mapping.get(key, key)
        if target in out:
            problem = f"given twice, as {source[target]!r} and {key!r} (check the column mapping)"
            raise RecordError(target, problem, "conflicting_fields")
        out[target], source[target] = value, key
    return out


def implicit_prompt(obj: dict[str, Any]) -> list[Any]:
    """trl's implicit-prompt format: without ``prompt``, the messages shared by chosen and rejected before their
    final assistant turn are the prompt."""
    chosen, rejected = obj["chosen"], obj["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise RecordError(
            "prompt", "missing, and chosen/rejected do not share the turns before the reply", "missing_field"
        )
    return chosen[:-1]


def pair_from_object(
    obj: Any, *, columns: dict[str, str] | None = None, task: str = "", default_id: str = "", kind: Kind = "pairwise"
) -> tuple[PreferencePair, list[str]]:
    """Validate one decoded record and build the pair; returns it with the unknown keys it carried.

    Raises ``RecordError`` (field, problem, reason) on a schema violation. For ``kind="negative"`` (unlearning
    data) ``chosen`` may be absent and defaults to ``""``.
    """
    if not isinstance(obj, dict):
        raise RecordError("record", f"expected a JSON object, got {json_type_name(obj)}", "wrong_type")
    obj = rename_columns(obj, columns or {})
    if kind == "negative":
        obj.setdefault("chosen", "")
    if "prompt" not in obj and isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
        obj["prompt"] = implicit_prompt(obj)
    for name in REQUIRED_FIELDS:
        if name not in obj:
            problem = f"missing required field {name!r} (expected {', '.join(REQUIRED_FIELDS)})"
            raise RecordError(name, problem, "missing_field")
    prompt = check_prompt(obj["prompt"])
    chosen = check_response(obj["chosen"], "chosen")
    rejected = check_response(obj["rejected"], "rejected")
    record_id = obj.get("id")
    record_task = obj.get("task")
    pair = PreferencePair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        task=task or (record_task if isinstance(record_task, str) else ""),
        id=str(record_id) if isinstance(record_id, (str, int)) and not isinstance(record_id, bool) else default_id,
    )
    extra = sorted(k for k in obj if k not in REQUIRED_FIELDS and k not in METADATA_FIELDS)
    return pair, extra


# ----------------------------------------------------------------------------------------------------------------
# No-signal filter


def is_blank(text: str) -> bool:
    return not text.strip()


def prompt_is_empty(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return is_blank(prompt)
    return any(m["role"] == "user" and is_blank(m["content"]) for m in prompt)


def no_signal_reason(pair: PreferencePair, kind: Kind) -> str | None:
    """Why a pair carries no preference signal, or None: ``empty_response`` or ``identical_pair``."""
    if is_blank(pair.rejected) or (kind == "pairwise" and is_blank(pair.chosen)):
        return "empty_response"
    if kind == "pairwise" and pair.chosen == pair.rejected:
        return "identical_pair"
    return None


def orientation_key(prompt: Prompt, first: str, second: str) -> str:
    return json.dumps([prompt, first, second], ensure_ascii=False, sort_keys=True)


def filter_no_signal(
    pairs: Iterable[PreferencePair], kind: Kind = "pairwise"
) -> tuple[list[PreferencePair], Counter[str], Counter[str]]:
    """Drop empty responses, identical pairs and exact duplicates (keeping the first); note the rest.

    Returns ``(kept, skipped_by_reason, notes)``; notes count ``empty_prompt`` and ``contradictory_pair``
    (kept: a pair whose swap was seen earlier for the same prompt).
    """
    kept: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    seen_hashes: set[str] = set()
    seen_orientations: set[str] = set()
    for pair in pairs:
        reason = no_signal_reason(pair, kind)
        digest = pair.content_hash()
        if reason is None and digest in seen_hashes:
            reason = "duplicate_pair"
        if reason is not None:
            skipped[reason] += 1
            continue
        seen_hashes.add(digest)
        if prompt_is_empty(pair.prompt):
            notes["empty_prompt"] += 1
        if kind == "pairwise":
            if orientation_key(pair.prompt, pair.rejected, pair.chosen) in seen_orientations:
                notes["contradictory_pair"] += 1
            seen_orientations.add(orientation_key(pair.prompt, pair.chosen, pair.rejected))
        kept.append(pair)
    return kept, skipped, notes


# ----------------------------------------------------------------------------------------------------------------
# File readers: yield (line, decoded object) or (line, RecordError) per record


@dataclass
class ParsedFile:
    items: list[tuple[int, Any]]
    """``(line, object)`` or ``(line, RecordError)`` in file order."""
    n_lines: int
    blank_lines: int = 0


def utf8_problem(data: bytes, offset: int) -> str:
    """``invalid UTF-8 at byte offset X`` where X counts from the start of the line holding ``data[offset]``."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return f"invalid UTF-8 at byte offset {offset - line_start} (byte 0x{data[offset]:02x})"


class _KeyTracker:
    """``object_pairs_hook`` that builds each JSON object as ``json`` would, noting the first key given twice.

    ``json`` silently keeps the last of duplicate keys; a record whose ``chosen`` appears twice is ambiguous, so the
    reader reports it as a schema violation instead. Objects are still built so a JSON list can go on parsing.
    """

    def __init__(self) -> None:
        self.duplicate: str | None = None

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs) and self.duplicate is None:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.duplicate = key
                    break
                seen.add(key)
        return obj

    def take(self) -> RecordError | None:
        """The violation for the record just decoded (and reset), or None."""
        if self.duplicate is None:
            return None
        key, self.duplicate = self.duplicate, None
        return RecordError("", f"duplicate key {key!r} in one object (JSON would keep only the last)", "duplicate_key")


def decode_line(raw: bytes, at_eof: bool) -> Any:
    """Decode one JSONL line strictly; raises ``RecordError`` (with a located message) on any problem."""
    if b"\x00" in raw:
        raise RecordError("", f"NUL byte at byte offset {raw.index(0)}", "invalid_text")
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise RecordError("", utf8_problem(raw, e.start), "invalid_utf8") from None
    keys = _KeyTracker()
    try:
        obj = json.loads(text, object_pairs_hook=keys)
    except json.JSONDecodeError as e:
        if at_eof and e.pos >= len(text.rstrip()):
            raise RecordError("", "truncated record (the file ends inside it)", "truncated_record") from None
        raise RecordError("", f"invalid JSON: {e.msg} (col {e.colno})", "invalid_json") from None
    except RecursionError:
        raise RecordError("", "record nests too deeply", "invalid_json") from None
    duplicate = keys.take()
    if duplicate is not None:
        raise duplicate
    return obj


def read_bounded_line(handle: Any, max_bytes: int) -> tuple[bytes, bool]:
    """Read one line of at most ``max_bytes`` content bytes; returns ``(line, too_large)``, draining long lines."""
    raw = handle.readline(max_bytes + 2)
    if len(raw) == max_bytes + 2 and not raw.endswith(b"\n"):
        while (more := handle.readline(1 << 20)) and not more.endswith(b"\n"):
            pass
        return raw, True
    return raw, len(raw.rstrip(b"\r\n")) > max_bytes


def parse_jsonl(path: Path, max_record_bytes: int) -> ParsedFile:
    """One JSON object per line; blank lines are counted, not errors; BOM on line 1 and CRLF are fine."""
    parsed = ParsedFile(items=[], n_lines=0)
    with path.open("rb") as handle:
        while True:
            raw, too_large = read_bounded_line(handle, max_record_bytes)
            if not raw:
                break
            parsed.n_lines += 1
            lineno = parsed.n_lines
            if too_large:
                problem = f"record exceeds max_record_bytes ({max_record_bytes})"
                parsed.items.append((lineno, RecordError("", problem, "record_too_large")))
                continue
            at_eof = not raw.endswith(b"\n")
            body = raw.rstrip(b"\n").rstrip(b"\r")
            if lineno == 1 and body.startswith(_UTF8_BOM):
                body = body[len(_UTF8_BOM) :]
            if not body.strip():
                parsed.blank_lines += 1
                continue
            try:
                parsed.items.append((lineno, decode_line(body, at_eof)))
            except RecordError as e:
                parsed.items.append((lineno, e))
    return parsed


def decode_file(path: Path) -> str:
    """Whole-file strict UTF-8 decode (BOM dropped); an invalid byte is a located, fatal ``DataError``."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: {utf8_problem(data, e.start)}") from None
    return text[1:] if text.startswith("\ufeff") else text


_WHITESPACE = re.compile(r"[ \t\r\n]*")


class LineIndex:
    """Maps a character offset of a text to its 1-based line."""

    def __init__(self, text: str) -> None:
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1


def json_list_error(path: Path, text: str, e: json.JSONDecodeError) -> DataError:
    if e.pos >= len(text.rstrip()):
        return DataError(f"{path}:{e.lineno}: truncated record (the file ends inside it)")
    return DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (col {e.colno})")


def parse_json_list(path: Path, text: str, max_record_bytes: int = MAX_RECORD_BYTES) -> ParsedFile:
    """A JSON list of objects, decoded one element at a time (``raw_decode``) to know where each record starts.

    A record with a duplicate key or over ``max_record_bytes`` (UTF-8) is a per-record violation; parsing goes on.
    """
    index = LineIndex(text)
    keys = _KeyTracker()
    decoder = json.JSONDecoder(object_pairs_hook=keys)
    parsed = ParsedFile(items=[], n_lines=len(index.newlines) + (0 if text.endswith("\n") else 1))
    pos = _WHITESPACE.match(text, 0).end() + 1  # past the "["
    pos = _WHITESPACE.match(text, pos).end()
    if pos < len(text) and text[pos] == "]":
        return parsed
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise json_list_error(path, text, e) from None
        except RecursionError:
            raise DataError(f"{path}:{index.line(pos)}: record nests too deeply") from None
        problem = keys.take()
        if problem is None and end - pos > max_record_bytes // 4 and len(text[pos:end].encode()) > max_record_bytes:
            problem = RecordError("", f"record exceeds max_record_bytes ({max_record_bytes})", "record_too_large")
        parsed.items.append((index.line(pos), obj if problem is None else problem))
        pos = _WHITESPACE.match(text, end).end()
        if pos >= len(text):
            raise DataError(f"{path}:{index.line(pos)}: truncated file (the list is never closed with ']')")
        if text[pos] == "]":
            break
        if text[pos] != ",":
            col = pos - text.rfind("\n", 0, pos)
            raise DataError(f"{path}:{index.line(pos)}: invalid JSON: expected ',' or ']' after a record (col {col})")
        pos = _WHITESPACE.match(text, pos + 1).end()
    rest = text[pos + 1 :]
    if rest.strip():
        raise DataError(f"{path}:{index.line(pos + 1 + len(rest) - len(rest.lstrip()))}: extra data after the list")
    return parsed


def parse_file(path: Path, max_record_bytes: int) -> ParsedFile:
    """Dispatch on content, not extension: a file whose first non-blank character is ``[`` is a JSON list."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(_UTF8_BOM).lstrip()
    if head.startswith(b"["):
        return parse_json_list(path, decode_file(path), max_record_bytes)
    return parse_jsonl(path, max_record_bytes)


# ----------------------------------------------------------------------------------------------------------------
# load_records


def format_errors(path: str | Path, errors: list[str]) -> str:
    shown = errors[:MAX_LISTED_ERRORS]
    more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return "\n".join(shown) + more + f"\n{len(errors)} invalid record(s) in {path}"


def check_readable_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")


def load_records(
    path: str | Path,
    columns: dict[str, str] | None = None,
    task: str = "",
    on_invalid: OnInvalid = "error",
    *,
    kind: Kind = "pairwise",
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> LoadResult:
    """Read a JSON list or JSONL file of ``prompt/chosen/rejected`` records; see the module docstring for the policy.

    ``id`` defaults to ``f"{task or file stem}:{line}"``; ``columns`` renames file keys to ours. Pass
    ``max_record_bytes=data.max_record_bytes`` to apply the config's limit (:func:`load_records_for` does).
    """
    path = Path(path)
    check_readable_file(path)
    parsed = parse_file(path, max_record_bytes)
    prefix = task or path.stem
    errors: list[str] = []
    skipped: Counter[str] = Counter()
    extra_keys: set[str] = set()
    pairs: list[PreferencePair] = []
    for lineno, item in parsed.items:
        try:
            if isinstance(item, RecordError):
                raise item
            pair, extra = pair_from_object(item, columns=columns, task=task, default_id=f"{prefix}:{lineno}", kind=kind)
        except RecordError as e:
            errors.append(f"{path}:{lineno}: {e}")
            skipped[e.reason] += 1
            continue
        extra_keys.update(extra)
        pairs.append(pair)
    if errors and on_invalid == "error":
        raise DataError(format_errors(path, errors))
    if extra_keys:
        logger.warning("%s: ignoring unknown keys %s", path, ", ".join(sorted(extra_keys)))
    kept, no_signal, notes = filter_no_signal(pairs, kind)
    skipped.update(no_signal)
    if parsed.blank_lines:
        notes["blank_lines"] = parsed.blank_lines
    result = LoadResult(
        records=kept, skipped=dict(skipped), n_read=len(parsed.items), n_lines=parsed.n_lines, notes=dict(notes)
    )
    log_summary(str(path), result, errors)
    return result


def load_records_for(path: str | Path, section: TaskSection, data: DataSection) -> LoadResult:
    """:func:`load_records` with one task's columns, name and kind and the run's ``data`` policy
    (``on_invalid``, ``max_record_bytes``)."""
    return load_records(
        path,
        section.columns,
        task=section.name,
        on_invalid=data.on_invalid,
        kind=section.kind,
        max_record_bytes=data.max_record_bytes,
    )


def log_summary(source: str, result: LoadResult, errors: list[str] | None = None) -> None:
    """One WARNING per source for skipped records (with the first schema error), INFO for the notes."""
    if result.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(result.skipped.items()))
        first = f" (first: {errors[0]})" if errors else ""
        logger.warning("%s: skipped %d of %d records: %s%s", source, result.n_skipped, result.n_read, reasons, first)
    if result.notes:
        logger.info("%s: %s", source, ", ".join(f"{k}={v}" for k, v in sorted(result.notes.items())))
