"""The forward of prefix-shared and packed batches (``lifealign.data.packing``): per-sequence log-probs equal to the
concatenated forward's.

The attention mask is built on the model's device from the batch's ``segment_ids`` and ``branch_ids``, in the form
the model's attention implementation takes (transformers passes a 4-D mask through unchanged):

    allowed(q, k) = segment[q] == segment[k]  and  k <= q  and  (branch[k] == 0  or  branch[k] == branch[q])

i.e. block-diagonal over pairs, causal, and a response sees the prompt and its own earlier tokens only. Padding is
segment 0, branch 0: a pad sees the pads before it in its row (never a real token, and no row of the mask is empty,
which would give NaNs), and no real token sees a pad. ``position_ids`` are passed explicitly: without them the model
would number the row ``0 .. L-1``.

``sdpa`` gets a boolean mask ``(R, 1, L, L)`` (True = attend), ``eager`` the additive float mask (0 or the dtype's
minimum), ``flex_attention`` a ``BlockMask``. Other implementations (flash-attention kernels take no 4-D mask) are
refused with an error naming the layout to use instead.

Models whose decoder input is rewritten by a forward pre-hook (L2P prepends soft prompts and extends a 2-D mask)
cannot take these layouts: such a hook is detected and refused; use layout ``concat``.
"""

from __future__ import annotations

from typing import Any

import torch

from lifealign.losses.logps import label_logps, sum_scored
from lifealign.training.head import selected_logits, unwrap

__all__ = ["MASKED_ATTENTION", "attention_implementation", "segment_logps", "segment_mask"]

MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take a custom 4-D mask (or ``BlockMask``)."""


def segment_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``(R, 1, L, L)``: ``[r, 0, q, k]`` is True where token ``q`` of row ``r`` may attend to token ``k``."""
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, L, L)
    visible = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    return (same_segment & visible & causal)[:, None]


def attention_implementation(model: torch.nn.Module) -> str:
    """The model's ``config._attn_implementation`` (through DDP/peft), ``"eager"`` when it does not say."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def model_attention_mask(
    model: torch.nn.Module, segment_ids: torch.Tensor, branch_ids: torch.Tensor, layout: str
) -> Any:
    """The mask of ``segment_mask`` in the form ``model``'s attention implementation takes."""
    implementation = attention_implementation(model)
    if implementation == "sdpa":
        return segment_mask(segment_ids, branch_ids)
    if implementation == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        allowed = segment_mask(segment_ids, branch_ids)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Any, _h: Any, q: Any, k: Any) -> Any:
            same = segment_ids[b, q] == segment_ids[b, k]
            visible = (branch_ids[b, k] == 0) | (branch_ids[b, k] == branch_ids[b, q])
            return same & visible & (k <= q)

        rows, length = segment_ids.shape
        return create_block_mask(mask_mod, rows, None, length, length, device=segment_ids.device)
    raise ValueError(
        f"batch layout {layout!r} needs an attention implementation that takes a 4-D mask "
        f"({', '.join(MASKED_ATTENTION)}); this model uses {implementation!r}: use layout 'concat'"
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


def segment_logps(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"<side>_logps": (B,), "<side>_tokens": (B,)}`` of a ``shared``/``packed`` batch, in pair order.

    One forward over the batch's rows with the segment mask and position ids; the LM head projects only the
    ``score_index`` positions (the last prompt position once per side). The sums run in fp32 (``label_logps``).
    """
    device = next(model.parameters()).device
    layout = batch["layout"]
    mask = model_attention_mask(model, batch["segment_ids"].to(device), batch["branch_ids"].to(device), layout=layout)
    index = batch["score_index"].to(device)
    decoder = _decoder(model)
    guard = (
        decoder.register_forward_pre_hook(_refuse_rewritten_inputs(mask, layout), with_kwargs=True)
        if decoder is not None
        else None
    )
    try:
        logits = selected_logits(
            model,
            lambda hidden: hidden.flatten(0, 1).index_select(0, index),
            batch["input_ids"].shape,
            index.numel(),
            input_ids=batch["input_ids"].to(device),
            attention_mask=mask,
            position_ids=batch["position_ids"].to(device),
            full=lambda full_logits: full_logits.flatten(0, 1).index_select(0, index),
        )
    finally:
        if guard is not None:
            guard.remove()
    per_token = label_logps(logits, batch["labels"].to(device))  # (M,) side-major
    n_scored = batch["n_scored"].to(device)  # (S * B,)
    width = int(n_scored.max()) if n_scored.numel() else 0
    grid = torch.arange(width, device=device)[None, :] < n_scored[:, None]  # (S * B, width): M True, row-major
    logps = sum_scored(per_token, grid)
    b = batch["n_pairs"]
    result: dict[str, torch.Tensor] = {}
    for k, side in enumerate(batch["sides"]):
        result[f"{side}_logps"] = logps[k * b : (k + 1) * b]
        result[f"{side}_tokens"] = n_scored[k * b : (k + 1) * b]
    return result
