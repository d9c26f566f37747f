"""Batched, deterministic greedy generation with the KV cache: prompts in, decoded completions out.

Decoding is greedy (``do_sample=False, num_beams=1``) with an explicit ``GenerationConfig``, so a checkpoint's own
sampling defaults (temperature, top-p) never apply: the LifeAlign authors' evaluation decoded with LLaMA-Factory's
sampling defaults (METHODS.md §D.2), which makes BLEU/ROUGE/judge numbers noisy; we fix greedy and say so.

Prompts are left-padded (a decoder-only model continues from the last position of every row). The padding is
built here from token ids and lengths (:func:`left_pad`) rather than by flipping ``tokenizer.padding_side``, so the
caller's tokenizer (right padding for training) is never mutated, not even temporarily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig

__all__ = ["END_OF_TURN_TOKENS", "generate_completions", "greedy_generate", "left_pad", "stop_token_ids"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, T_max)``, each row right-aligned; the mask is built from lengths."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
"""End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3, GPT-2 family)."""


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Ids that end a completion: the tokenizer's EOS, the model's ``generation_config.eos_token_id`` (int or
    list), and the end-of-turn token the chat template writes after an assistant reply (a chat-trained policy
    closes its answer with it, e.g. ChatML's ``<|im_end|>``, which need not be the tokenizer's EOS)."""
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates += list(model_eos) if isinstance(model_eos, list | tuple) else [model_eos]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        specials = set(getattr(tokenizer, "all_special_tokens", []))
        candidates += [
            tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in template and t in specials
        ]
    ids: list[int] = []
    for token_id in candidates:
        if isinstance(token_id, int) and token_id not in ids:
            ids.append(token_id)
    return ids


def _cut_at_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop id (the stop token and everything after it, i.e. padding, removed)."""
    for k, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:k]
    return tokens


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, cut before the first stop token; one list of new token ids per prompt."""
    if not stop_ids:
        raise ValueError("greedy_generate needs at least one stop token id (the tokenizer has no EOS)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=list(stop_ids),
    )
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        input_ids, attention_mask = left_pad(prompt_ids[start : start + batch_size], pad_id)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        new_tokens = generated[:, input_ids.shape[1] :].tolist()  # (B, <= max_new_tokens)
        out.extend(_cut_at_stop(row, stop_ids) for row in new_tokens)
    return out


def generate_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    add_special_tokens: bool = False,
) -> list[str]:
    """Decoded greedy completions (the new text only, without the prompt or the stop token), one per prompt.

    ``prompts`` are either token-id lists (e.g. ``prompt_ids`` from ``tokenize_pairs``) or already-rendered
    strings; strings are tokenized without special tokens by default because a rendered chat template already
    contains them. Same inputs and weights give the same outputs.
    """
    if not prompts:
        return []
    if isinstance(prompts[0], str):
        prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens, padding=False)["input_ids"]
    else:
        prompt_ids = [list(p) for p in prompts]  # type: ignore[arg-type]
    tokens = greedy_generate(
        model,
        prompt_ids,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(model, tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
    )
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]
