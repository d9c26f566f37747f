"""Public preference datasets by name, mapped row by row to ``PreferencePair`` and validated like local files.

Each mapper is a pure function ``row -> PreferencePair | None`` written against the dataset's published schema;
``None`` means the row carries no usable preference by that dataset's definition (e.g. PKU-SafeRLHF rows where
both or neither response is safe) and is counted as ``filtered``, not as a skip. Datasets that publish only one
split get a deterministic hold-out: every ``holdout_every``-th row (0, k, 2k, ...) is the test split.

``load_hub_task(..., path=, data_files=)`` loads the same schema from local files (``load_dataset("json", ...)``),
which is how the tests run offline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lifealign.data.loaders import (
    DataError,
    Kind,
    LoadResult,
    OnInvalid,
    RecordError,
    check_prompt,
    check_response,
    filter_no_signal,
    format_errors,
    log_summary,
)
from lifealign.data.records import Message, PreferencePair

__all__ = [
    "HUB_DATASETS",
    "HubSpec",
    "load_hub_task",
    "map_capybara",
    "map_hc3",
    "map_hh_rlhf",
    "map_pku_saferlhf",
    "map_truthfulqa",
    "map_ultrafeedback",
    "resolve_hub_spec",
    "split_hh_dialogue",
]

Row = Mapping[str, Any]
Mapper = Callable[[Row], PreferencePair | None]

HH_ASSISTANT_TURN = "\n\nAssistant:"


def split_hh_dialogue(dialogue: str) -> tuple[str, str] | None:
    """Split an hh-rlhf transcript at its LAST ``"\\n\\nAssistant:"``: (dialogue up to and including
    ``"Assistant:"``, the reply stripped). None when the transcript has no assistant turn."""
    cut = dialogue.rfind(HH_ASSISTANT_TURN)
    if cut < 0:
        return None
    end = cut + len(HH_ASSISTANT_TURN)
    return dialogue[:end].lstrip(), dialogue[end:].strip()


def map_hh_rlhf(row: Row) -> PreferencePair | None:
    """Anthropic/hh-rlhf: ``chosen``/``rejected`` are whole dialogues that share everything before the last
    assistant turn. Rows whose two dialogues differ before that turn are filtered."""
    chosen, rejected = split_hh_dialogue(row["chosen"]), split_hh_dialogue(row["rejected"])
    if chosen is None or rejected is None or chosen[0] != rejected[0]:
        return None
    return PreferencePair(prompt=chosen[0], chosen=chosen[1], rejected=rejected[1])


def map_pku_saferlhf(row: Row) -> PreferencePair | None:
    """PKU-Alignment/PKU-SafeRLHF: keep rows where exactly one response is safe; that one is chosen."""
    safe_0, safe_1 = bool(row["is_response_0_safe"]), bool(row["is_response_1_safe"])
    if safe_0 == safe_1:
        return None
    safe, unsafe = ("response_0", "response_1") if safe_0 else ("response_1", "response_0")
    return PreferencePair(prompt=row["prompt"], chosen=row[safe], rejected=row[unsafe])


def last_assistant_content(messages: list[Message]) -> str:
    """Content of the final message, which must be the assistant's (trl's conversational preference format)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise RecordError("messages", "the last message must be the assistant's", "invalid_messages")
    return messages[-1]["content"]


def map_ultrafeedback(row: Row) -> PreferencePair | None:
    """HuggingFaceH4/ultrafeedback_binarized: chosen/rejected are [user, assistant] message lists."""
    return PreferencePair(
        prompt=row["prompt"],
        chosen=last_assistant_content(row["chosen"]),
        rejected=last_assistant_content(row["rejected"]),
    )


def map_truthfulqa(row: Row) -> PreferencePair | None:
    """truthful_qa/generation: the best answer over all incorrect answers joined with "; " (as the LifeAlign data)."""
    if not row["incorrect_answers"]:
        return None
    return PreferencePair(
        prompt=row["question"], chosen=row["best_answer"], rejected="; ".join(row["incorrect_answers"])
    )


def map_hc3(row: Row) -> PreferencePair | None:
    """Hello-SimpleAI/HC3: the first human answer over the first ChatGPT answer."""
    if not row["human_answers"] or not row["chatgpt_answers"]:
        return None
    return PreferencePair(prompt=row["question"], chosen=row["human_answers"][0], rejected=row["chatgpt_answers"][0])


def map_capybara(row: Row) -> PreferencePair | None:
    """argilla/Capybara-Preferences: full conversations; the prompt is every message before the final assistant
    one (shared by chosen and rejected, else filtered)."""
    chosen, rejected = list(row["chosen"]), list(row["rejected"])
    if not chosen or chosen[:-1] != rejected[:-1]:
        return None
    prompt = [{"role": m["role"], "content": m["content"]} for m in chosen[:-1]]
    return PreferencePair(
        prompt=prompt, chosen=last_assistant_content(chosen), rejected=last_assistant_content(rejected)
    )


@dataclass(frozen=True)
class HubSpec:
    """Where a dataset lives on the hub and how its rows become pairs."""

    hub_id: str
    mapper: Mapper
    config: str | None = None
    """``name=`` of ``load_dataset`` (a dataset configuration)."""
    data_dir: str | None = None
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    """Our split name -> the hub's split name."""
    holdout_every: int | None = None
    """When the hub has a single split: row i is test iff ``i % holdout_every == 0``."""


HUB_DATASETS: dict[str, HubSpec] = {
    "hh-rlhf-harmless-base": HubSpec("Anthropic/hh-rlhf", map_hh_rlhf, data_dir="harmless-base"),
    "hh-rlhf-helpful-base": HubSpec("Anthropic/hh-rlhf", map_hh_rlhf, data_dir="helpful-base"),
    "pku-saferlhf": HubSpec("PKU-Alignment/PKU-SafeRLHF", map_pku_saferlhf),
    "ultrafeedback": HubSpec(
        "HuggingFaceH4/ultrafeedback_binarized",
        map_ultrafeedback,
        splits={"train": "train_prefs", "test": "test_prefs"},
    ),
    "truthfulqa": HubSpec(
        "truthful_qa",
        map_truthfulqa,
        config="generation",
        splits={"train": "validation", "test": "validation"},
        holdout_every=10,
    ),
    "hc3": HubSpec(
        "Hello-SimpleAI/HC3", map_hc3, config="all", splits={"train": "train", "test": "train"}, holdout_every=10
    ),
    "capybara": HubSpec(
        "argilla/Capybara-Preferences", map_capybara, splits={"train": "train", "test": "train"}, holdout_every=10
    ),
}


def resolve_hub_spec(name: str) -> HubSpec:
    """A short name (``pku-saferlhf``) or a full hub id (``PKU-Alignment/PKU-SafeRLHF``; the first spec wins)."""
    if name in HUB_DATASETS:
        return HUB_DATASETS[name]
    for spec in HUB_DATASETS.values():
        if spec.hub_id.lower() == name.lower():
            return spec
    known = ", ".join(sorted(HUB_DATASETS))
    raise DataError(f"unknown hub dataset {name!r} (known: {known}, or their hub ids)")


def holdout_rows(n_rows: int, split: str, every: int | None) -> range | list[int]:
    """Row indices of our split inside a single hub split: test = multiples of ``every``, train = the rest."""
    if every is None:
        return range(n_rows)
    if split == "test":
        return range(0, n_rows, every)
    return [i for i in range(n_rows) if i % every]


def fetch_split(spec: HubSpec, hub_split: str, path: str | None, data_files: Any, cache_dir: str | None) -> Any:
    """``datasets.load_dataset`` for the spec, or for local files in its schema when ``path`` is given."""
    import datasets

    try:
        if path is None:
            return datasets.load_dataset(
                spec.hub_id, name=spec.config, data_dir=spec.data_dir, split=hub_split, cache_dir=cache_dir
            )
        if data_files is not None and not isinstance(data_files, Mapping):
            data_files = {hub_split: data_files}
        return datasets.load_dataset(path, data_files=data_files, split=hub_split, cache_dir=cache_dir)
    except Exception as e:  # any loader/network failure becomes one message naming the dataset and split
        source = path or spec.hub_id
        raise DataError(f"could not load {source!r} split {hub_split!r}: {type(e).__name__}: {e}") from e


def map_rows(
    rows: Iterable[tuple[int, Row]], mapper: Mapper, source: str
) -> tuple[list[PreferencePair], list[str], Counter[str], int]:
    """Apply the mapper and the record checks to ``(row index, row)`` pairs; returns (pairs, errors, reasons,
    filtered)."""
    pairs: list[PreferencePair] = []
    errors: list[str] = []
    reasons: Counter[str] = Counter()
    filtered = 0
    for i, row in rows:
        try:
            pair = mapper(row)
            if pair is None:
                filtered += 1
                continue
            pair = replace(
                pair,
                prompt=check_prompt(pair.prompt),
                chosen=check_response(pair.chosen, "chosen"),
                rejected=check_response(pair.rejected, "rejected"),
                id=f"{source}:{i}",
            )
        except KeyError as e:
            errors.append(f"{source} row {i}: {e.args[0]}: missing field")
            reasons["missing_field"] += 1
            continue
        except (TypeError, AttributeError, IndexError) as e:
            errors.append(f"{source} row {i}: unexpected schema: {e}")
            reasons["wrong_type"] += 1
            continue
        except RecordError as e:
            errors.append(f"{source} row {i}: {e}")
            reasons[e.reason] += 1
            continue
        pairs.append(pair)
    return pairs, errors, reasons, filtered


def load_hub_task(
    name: str,
    split: str = "train",
    *,
    hub_split: str | None = None,
    task: str = "",
    kind: Kind = "pairwise",
    on_invalid: OnInvalid = "error",
    path: str | None = None,
    data_files: Any = None,
    cache_dir: str | None = None,
) -> LoadResult:
    """Load our ``split`` (``train``/``test``) of a registered dataset as validated pairs.

    ``hub_split`` overrides the hub split name; ``path``/``data_files`` load local files in the same schema
    (e.g. ``path="json"``). Ids are ``f"{name}:{hub split}:{row}"``.
    """
    spec = resolve_hub_spec(name)
    hub_split = hub_split or spec.splits.get(split)
    if hub_split is None:
        raise DataError(f"hub dataset {name!r} has no {split!r} split (known: {', '.join(spec.splits)})")
    rows = fetch_split(spec, hub_split, path, data_files, cache_dir)
    source = f"{name}:{hub_split}"
    indices = holdout_rows(len(rows), split, spec.holdout_every)
    selected = rows if spec.holdout_every is None else rows.select(indices)  # iterating beats rows[i] lookups
    pairs, errors, reasons, filtered = map_rows(zip(indices, selected), spec.mapper, source)
    if errors and on_invalid == "error":
        raise DataError(format_errors(source, errors))
    pairs = [replace(p, task=task) for p in pairs]
    kept, no_signal, notes = filter_no_signal(pairs, kind)
    reasons.update(no_signal)
    if filtered:
        notes["filtered"] = filtered
    result = LoadResult(records=kept, skipped=dict(reasons), n_read=len(indices), notes=dict(notes))
    log_summary(source, result, errors)
    return result
