"""Tokenise preference pairs into prompt / response ids exactly as trl 1.16's ``DPOTrainer`` does, then truncate.

trl (``DPOTrainer._prepare_dataset.tokenize_fn``) tokenises three sequences per pair, ``prompt``,
``prompt + chosen`` and ``prompt + rejected``:

- conversational (chat template): ``apply_chat_template(prompt, add_generation_prompt=True)`` for the prompt and
  ``apply_chat_template(prompt + [assistant reply])`` for each full sequence; the template's end-of-turn closes the
  response;
- plain text: ``tokenizer(text=prompt)`` and ``tokenizer(text=prompt + response + eos_token)`` (EOS appended as
  text unless the response already ends with it).

The prompt kept is the longest common prefix ``L = min(lcp(prompt, prompt+chosen), lcp(prompt, prompt+rejected))``
and each response is ``full[L:]``; when ``L < len(prompt_ids)`` (a template that renders the prompt alone
differently, or tokens merging across the boundary) we count ``prompt_not_prefix`` and warn, where trl only warns
once. A string prompt is rendered with the chat template too (as a single user turn) when the tokenizer has one and
``data.use_chat_template`` is on: that is trl on the conversational form of the same record.

Truncation (DESIGN.md): a prompt longer than ``max_prompt_length`` keeps its END; then a response that makes
``prompt + response > max_length`` keeps its START, never below ``min_response_tokens``. If even that does not fit,
the pair is skipped as ``prompt_exceeds_max_length`` (trl drops such rows silently). A pair whose chosen and
rejected ids are identical after truncation carries no signal and is skipped as ``identical_tokens``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lifealign.config.schema import DataSection
from lifealign.data.records import Message, PreferencePair, Prompt

__all__ = [
    "TokenizedSet",
    "common_prefix_length",
    "encode_pair",
    "render_plain_prompt",
    "tokenize_pairs",
    "tokenize_prompts",
    "truncate_pair",
    "uses_chat_template",
]

logger = logging.getLogger(__name__)

STAT_KEYS = ("prompt_truncated", "response_truncated", "prompt_not_prefix", "duplicate_bos")


@dataclass
class TokenizedSet:
    """Tokenised examples ``{"id", "index", "prompt_ids", "<side>_ids"...}`` and the counts of what was changed."""

    examples: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)
    """``n_records``, ``n_examples``, ``prompt_truncated``, ``response_truncated`` (examples with at least one
    truncated response), ``prompt_not_prefix``, ``duplicate_bos`` and skipped counts by reason."""
    sides: tuple[str, ...] = ("chosen", "rejected")

    def __len__(self) -> int:
        return len(self.examples)


def uses_chat_template(tokenizer: Any, data: DataSection) -> bool:
    """Render with the chat template iff the config asks for it and the tokenizer has one."""
    return bool(data.use_chat_template and getattr(tokenizer, "chat_template", None))


def as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_plain_prompt(prompt: Prompt) -> str:
    """A prompt as plain text: a string as is; messages as ``"Role: content"`` turns separated by a blank line,
    ending with ``"Assistant:"`` (the hh-rlhf transcript shape) for tokenizers without a chat template."""
    if isinstance(prompt, str):
        return prompt
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt]
    return "\n\n".join(turns + ["Assistant:"])


def with_eos(text: str, eos_token: str | None) -> str:
    """trl's ``add_eos``: append the EOS token text unless the response already ends with it."""
    if not eos_token or text.endswith(eos_token):
        return text
    return text + eos_token


def chat_ids(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text=text)["input_ids"])


def encode_prompt(prompt: Prompt, tokenizer: Any, chat: bool) -> list[int]:
    """Untruncated prompt ids: chat template with the generation prompt, or the plain-text rendering."""
    if chat:
        return chat_ids(tokenizer, as_messages(prompt), add_generation_prompt=True)
    return text_ids(tokenizer, render_plain_prompt(prompt))


def encode_full(prompt: Prompt, response: str, tokenizer: Any, chat: bool) -> list[int]:
    """Untruncated ids of prompt + response (+ EOS for plain text)."""
    if chat:
        return chat_ids(tokenizer, as_messages(prompt) + [{"role": "assistant", "content": response}], False)
    return text_ids(tokenizer, render_plain_prompt(prompt) + with_eos(response, tokenizer.eos_token))


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share (trl ``common_prefix_length``)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def encode_pair(
    record: PreferencePair, tokenizer: Any, chat: bool, sides: Sequence[str] = ("chosen", "rejected")
) -> tuple[list[int], dict[str, list[int]], list[int]]:
    """Untruncated ``(prompt_ids, {side: response_ids}, dropped_prompt_ids)`` as trl 1.16 builds them.

    The prompt is cut to ``L = min_side lcp(prompt_ids, full_ids[side])`` and each response is ``full[L:]``;
    the last value is the prompt tail ``prompt_ids[L:]`` that was left out (empty when the prompt is a prefix of
    every full sequence).
    """
    prompt_ids = encode_prompt(record.prompt, tokenizer, chat)
    full = {side: encode_full(record.prompt, getattr(record, side), tokenizer, chat) for side in sides}
    n_prompt = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    responses = {side: ids[n_prompt:] for side, ids in full.items()}
    return prompt_ids[:n_prompt], responses, prompt_ids[n_prompt:]


def truncate_pair(
    prompt_ids: list[int], responses: dict[str, list[int]], data: DataSection
) -> tuple[list[int], dict[str, list[int]], bool, bool] | None:
    """Keep the prompt's last ``max_prompt_length`` tokens, then each response's first ``max_length - len(prompt)``.

    Returns ``(prompt_ids, responses, prompt_truncated, response_truncated)``, or None when fewer than
    ``min_response_tokens`` response tokens would fit.
    """
    prompt_truncated = len(prompt_ids) > data.max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-data.max_prompt_length :]
    budget = data.max_length - len(prompt_ids)
    if budget < data.min_response_tokens:
        return None
    response_truncated = any(len(ids) > budget for ids in responses.values())
    return prompt_ids, {side: ids[:budget] for side, ids in responses.items()}, prompt_truncated, response_truncated


def has_duplicate_bos(ids: Sequence[int], tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos


def warn_prompt_not_prefix(record: PreferencePair, dropped: list[int], tokenizer: Any) -> None:
    logger.warning(
        "record %s: the tokenised prompt is not a prefix of prompt+response; the response starts where "
        "they diverge and the prompt end %r is left out (counted as prompt_not_prefix)",
        record.id,
        tokenizer.decode(dropped),
    )


def tokenize_pairs(
    records: Sequence[PreferencePair], tokenizer: Any, data: DataSection, sides: Sequence[str] = ("chosen", "rejected")
) -> TokenizedSet:
    """Tokenise and truncate pairs (see the module docstring); ``sides=("rejected",)`` for negative-only tasks.

    ``example["index"]`` is the example's position in ``TokenizedSet.examples`` (0..n-1, contiguous even when
    records are skipped), the key for cached reference log-probs.
    """
    chat = uses_chat_template(tokenizer, data)
    stats: Counter[str] = Counter({key: 0 for key in STAT_KEYS})
    examples: list[dict[str, Any]] = []
    for record in records:
        prompt_ids, responses, dropped = encode_pair(record, tokenizer, chat, sides)
        if dropped:
            if stats["prompt_not_prefix"] == 0:
                warn_prompt_not_prefix(record, dropped, tokenizer)
            stats["prompt_not_prefix"] += 1
        stats["duplicate_bos"] += has_duplicate_bos(prompt_ids, tokenizer)
        if any(not ids for ids in responses.values()):
            stats["empty_response"] += 1
            continue
        truncated = truncate_pair(prompt_ids, responses, data)
        if truncated is None:
            stats["prompt_exceeds_max_length"] += 1
            continue
        prompt_ids, responses, prompt_cut, response_cut = truncated
        if len(sides) > 1 and all(responses[s] == responses[sides[0]] for s in sides[1:]):
            stats["identical_tokens"] += 1
            continue
        stats["prompt_truncated"] += prompt_cut
        stats["response_truncated"] += response_cut
        example: dict[str, Any] = {"id": record.id, "index": len(examples), "prompt_ids": prompt_ids}
        example.update({f"{side}_ids": ids for side, ids in responses.items()})
        examples.append(example)
    stats["n_records"], stats["n_examples"] = len(records), len(examples)
    log_tokenize_summary(stats)
    return TokenizedSet(examples=examples, stats=dict(stats), sides=tuple(sides))


def log_tokenize_summary(stats: Counter[str]) -> None:
    skipped = {k: v for k, v in stats.items() if k not in STAT_KEYS and k not in ("n_records", "n_examples")}
    if any(skipped.values()):
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        logger.warning("tokenisation skipped %d of %d pairs: %s", sum(skipped.values()), stats["n_records"], reasons)
    changed = ", ".join(f"{k}={stats[k]}" for k in STAT_KEYS if stats[k])
    if changed:
        logger.info("tokenisation: %s", changed)


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer: Any, data: DataSection) -> list[list[int]]:
    """Prompt ids for generation, rendered as in ``tokenize_pairs`` and keeping the last ``max_prompt_length``."""
    chat = uses_chat_template(tokenizer, data)
    return [encode_prompt(p, tokenizer, chat)[-data.max_prompt_length :] for p in prompts]
