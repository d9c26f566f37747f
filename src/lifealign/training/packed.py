"""The forward of prefix-shared and packed batches (``lifealign.data.packing``): per-sequence log-probs equal to the
concatenated forward's.

Attention must follow the segment structure:

    allowed(q, k) = segment[q] == segment[k]  and  k <= q  and  (branch[k] == 0  or  branch[k] == branch[q])

i.e. block-diagonal over pairs, causal, and a response sees the prompt and its own earlier tokens only.
``position_ids`` are always passed: without them the model would number a row ``0 .. L-1``. Two ways, by the
model's attention implementation:

- ``sdpa`` (and the flash-attention kernels): **segment attention**. For the forward, the model's attention
  implementation is switched to ``segment_attention`` (registered with transformers' ``AttentionInterface``), which
  runs ``scaled_dot_product_attention`` per segment and side: the prompt + first response as one causal block, each
  further response against ``[prompt keys; its own keys]`` with a lower-right causal mask. Only the allowed blocks
  are computed, causally (a dense ``L x L`` mask would make every query attend over the whole packed row: measured
  on this CPU, 3.3x the attention time of a 1130-token row of four pairs, fwd + bwd). A forward that does not reach
  it (a model that does not dispatch through ``ALL_ATTENTION_FUNCTIONS``) is refused rather than silently run with
  plain causal attention.
- ``eager``: the model's own attention with the additive 4-D mask of ``segment_mask`` (transformers passes a 4-D
  mask through unchanged).

Other implementations are refused with an error naming layout ``concat``; flex attention is not used (torch 2.13 has
no flex-attention backward on CPU). Sliding-window attention is refused when a segment is longer than the window.

Models whose decoder input is rewritten by a forward pre-hook (L2P prepends soft prompts and extends a 2-D mask)
cannot take these layouts: such a rewrite is detected and refused; L2P needs layout ``concat``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

from lifealign.losses.logps import label_logps
from lifealign.training.head import per_side, selected_logits, unwrap

__all__ = ["SEGMENT_ATTENTION", "SegmentPlan", "segment_attention", "segment_logps", "segment_mask"]

SEGMENT_ATTENTION = "lifealign_pair_segments"
"""The name ``segment_attention`` is registered under in transformers' ``AttentionInterface``."""
SEGMENT_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Implementations replaced by ``segment_attention`` for the forward (same math: softmax attention, no extras)."""


@dataclass
class SegmentPlan:
    """Per row, ``(first column, prompt length, response lengths)`` of each segment; ``calls`` counts the attention
    layers that ran ``segment_attention`` on it."""

    rows: list[list[tuple[int, int, tuple[int, ...]]]]
    calls: int = 0


def segment_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``(R, 1, L, L)``: ``[r, 0, q, k]`` is True where token ``q`` of row ``r`` may attend to token ``k``.

    Padding is segment 0, branch 0: a pad sees the pads before it (no empty mask row, which would give NaNs), and
    no real token sees a pad.
    """
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, L, L)
    visible = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    return (same_segment & visible & causal)[:, None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt: int, **sdpa: Any) -> torch.Tensor:
    """``q (1, H, n, d)`` of one response against ``k, v (1, H_kv, prompt + n, d)``: all of the prompt, causal
    within."""
    n = q.shape[2]
    if prompt == 0 or n == k.shape[2]:
        return scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
    mask = torch.ones(n, prompt + n, dtype=torch.bool, device=q.device).tril(prompt)  # lower-right causal
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    pair_segments: SegmentPlan | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query (R, H, L, d)``, ``key/value (R, H_kv, L, d)`` -> ``(R, L, H, d)``.

    Per segment: ``[prompt; response_1]`` is one causal block (is_causal SDPA), and every further response attends
    to ``[prompt; itself]``. Padding columns get zeros (no real token attends to them, and they are never scored).
    """
    plan = pair_segments
    if plan is None:
        raise ValueError(f"attention {SEGMENT_ATTENTION!r} needs the batch's segment plan (pair_segments=...)")
    plan.calls += 1
    sdpa = {"dropout_p": dropout, "scale": scaling, "enable_gqa": query.shape[1] != key.shape[1]}
    length = query.shape[2]
    rows = []
    for r, segments in enumerate(plan.rows):
        # 4-D (1, H, L, d) slices: SDPA's fused CPU kernel takes 4-D inputs only (3-D ones fall back to the unfused
        # math path, slower and rounded differently from the concatenated forward's call)
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        pieces, end = [], 0
        for start, prompt, responses in segments:
            first = start + prompt + responses[0]
            if first > start:
                pieces.append(
                    scaled_dot_product_attention(
                        q[:, :, start:first], k[:, :, start:first], v[:, :, start:first], is_causal=True, **sdpa
                    )
                )
            end = first
            for n in responses[1:]:
                if n:
                    keys = torch.cat([k[:, :, start : start + prompt], k[:, :, end : end + n]], dim=2)
                    values = torch.cat([v[:, :, start : start + prompt], v[:, :, end : end + n]], dim=2)
                    pieces.append(_attend(q[:, :, end : end + n], keys, values, prompt, **sdpa))
                end += n
        if end < length:
            pieces.append(q.new_zeros(1, q.shape[1], length - end, value.shape[-1]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def attention_implementation(model: torch.nn.Module) -> str:
    """The model's ``config._attn_implementation`` (through DDP/peft), ``"eager"`` when it does not say."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


@contextlib.contextmanager
def attention_switched(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """The model's attention implementation set to ``implementation`` for the duration (its config is shared by
    every layer, so one assignment switches them all)."""
    config = unwrap(model).config
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def _check_window(model: torch.nn.Module, batch: dict[str, Any]) -> None:
    """Refuse segments longer than a sliding attention window: neither path here applies the window."""
    config = getattr(unwrap(model), "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return
    longest = max(prompt + sum(responses) for row in batch["segments"] for _, prompt, responses in row)
    if longest > window:
        raise ValueError(
            f"batch layout {batch['layout']!r}: a segment of {longest} tokens exceeds the model's sliding window "
            f"({window}), which this layout does not apply; use layout 'concat'"
        )


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers base model (``model.model`` of a ``*ForCausalLM``), looked up through DDP/peft."""
    inner = unwrap(model)
    get_base = getattr(inner, "get_base_model", None)
    hf = get_base() if callable(get_base) else inner
    decoder = getattr(hf, "base_model", None)
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not hf else None


def _refuse_rewritten_inputs(mask: Any, layout: str) -> Any:
    """A decoder pre-hook, registered after any existing one: the inputs must still be ours."""

    def check(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs.get("attention_mask") is not mask or kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                f"batch layout {layout!r}: a forward pre-hook on the decoder rewrote its inputs (L2P prepends soft "
                "prompts this way); such models need layout 'concat'"
            )

    return check


def _attention_inputs(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[dict, Any, Any]:
    """``(model kwargs, attention context, plan or None)`` for the model's attention implementation."""
    implementation, layout = attention_implementation(model), batch["layout"]
    if implementation in SEGMENT_KERNELS:
        plan = SegmentPlan(batch["segments"])
        inputs = {"attention_mask": None, "pair_segments": plan}
        return inputs, attention_switched(model, SEGMENT_ATTENTION), plan
    if implementation == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        allowed = segment_mask(batch["segment_ids"].to(device), batch["branch_ids"].to(device))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return {"attention_mask": mask}, contextlib.nullcontext(), None
    raise ValueError(
        f"batch layout {layout!r} needs attention {', '.join((*SEGMENT_KERNELS, 'eager'))}; this model uses "
        f"{implementation!r}: use layout 'concat'"
    )


def segment_logps(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"<side>_logps": (B,), "<side>_tokens": (B,)}`` of a ``shared``/``packed`` batch, in pair order.

    One forward over the batch's rows with segment attention and the batch's position ids; the LM head projects
    only the ``score_index`` positions (the last prompt position once per side). Sums run in fp32 (``label_logps``).
    """
    device = next(model.parameters()).device
    layout = batch["layout"]
    _check_window(model, batch)
    inputs, attention, plan = _attention_inputs(model, batch, device)
    index = batch["score_index"].to(device)
    decoder = _decoder(model)
    guard = (
        decoder.register_forward_pre_hook(_refuse_rewritten_inputs(inputs["attention_mask"], layout), with_kwargs=True)
        if decoder is not None
        else None
    )
    try:
        with attention:
            logits = selected_logits(
                model,
                lambda hidden: hidden.flatten(0, 1).index_select(0, index),
                batch["input_ids"].shape,
                index.numel(),
                input_ids=batch["input_ids"].to(device),
                position_ids=batch["position_ids"].to(device),
                full=lambda full_logits: full_logits.flatten(0, 1).index_select(0, index),
                **inputs,
            )
    finally:
        if guard is not None:
            guard.remove()
    if plan is not None and plan.calls == 0:
        raise ValueError(
            f"batch layout {layout!r}: the model's attention never dispatched to {SEGMENT_ATTENTION!r} (it does not "
            "use transformers' attention interface), so its sides and pairs would attend to each other; use layout "
            "'concat'"
        )
    per_token = label_logps(logits, batch["labels"].to(device))  # (M,) side-major
    scored = batch["scored"].to(device)  # (S * B, T - 1): the concatenated rows' grid, M True
    result = per_side(logits, per_token, scored, tuple(batch["sides"]), batch["n_pairs"])
    return result
