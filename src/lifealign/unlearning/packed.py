"""Packed forward for per-example impact scores (``influence.fast_scores``): ragged candidates share rows, unpadded.

Each candidate (prompt + forget response) is one *segment*; ``pack_rows`` puts segments into rows of at most
``budget`` tokens, longest first, each into the least-filled row that has room. A row goes through the decoder once
as a batch of one, so no position is padding and every linear layer sees one ``(T, d)`` matmul:

- positions: ``position_ids`` restart at 0 in every segment, so the rotary embedding of each token is the one it
  has in a forward of its candidate alone;
- attention (``attention="segments"``, the default): an attention function registered with transformers'
  ``AttentionInterface`` regroups the row's queries, keys and values into a batch of segments ``(S, H, L_max, D)``
  and calls transformers' own SDPA attention with ``is_causal`` on it. A segment attends to itself only and no
  score across segments is computed. When segments differ in length the shorter ones are padded to ``L_max`` inside
  the attention only (the scores of those padded query rows are dropped, and causality keeps every real query off
  the padded keys ``k >= L_i > q``); equal lengths are a reshape. The model is switched to this function for the
  forward (``config._attn_implementation``) and back after; transformers builds no mask for it.
- attention (``attention="mask"``): the stock SDPA with a block-diagonal causal boolean mask ``(1, 1, T, T)``.
  transformers 5 passes a user-supplied 4-D mask through unchanged (``masking_utils._preprocess_mask_arguments``)
  and takes explicit ``position_ids`` for the rotary embedding, so this is exact too, but SDPA then computes all
  ``T^2`` scores of the row. Measured on CPU (one thread, SmolLM2 heads, 16 segments of 128 tokens, one layer's
  forward + backward): 27 ms by segments, 292 ms with the mask. Kept as the cross-check of the segment attention.
  (Flex attention has no backward on CPU in torch 2.13.)
- LM head: it projects only the positions that predict a response token, fused with the log-softmax
  (``HeadLogps``): per chunk of rows the logits ``z = h W^T`` give ``log p(y) = z_y - logsumexp(z)`` and, in the
  same pass, ``d log p(y) / d h = (onehot(y) - softmax(z)) W``, kept for the backward (``(M, d)``) in place of the
  ``(M, V)`` logits. The head's FLOPs are those of a forward + input-gradient backward; the logits never leave the
  chunk, and the vocabulary-sized elementwise passes drop from about ten (log-softmax, its backward, the gather's
  zero-filled scatter, their sum) to five (max, subtract, exp, sum, divide), all in place.

The head has no weight gradient: scores differentiate only towards the LoRA layers' outputs. ``packing_unsupported``
names what rules a model out (then ``fast_scores`` pads instead): no decoder/Linear head to call separately, logit
or attention soft-capping, sliding-window attention, or a pre-hook that rewrites the decoder's input (L2P).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import DataParallel
from torch.nn.parallel import DistributedDataParallel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = [
    "SEGMENT_ATTENTION",
    "HeadLogps",
    "PackedRow",
    "pack_examples",
    "packed_logps",
    "packing_unsupported",
]

SEGMENT_ATTENTION = "lifealign_segments"
"""The name ``segment_attention`` is registered under in transformers' ``AttentionInterface``."""

HEAD_CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk of the fused head (64 MiB fp32): bounds its temporaries; larger chunks run the head's matmuls
a little faster on CPU (measured: 85 rows x 49k vocab 8 % slower than 341)."""

Attention = Literal["segments", "mask"]


# ----- packing -------------------------------------------------------------------------------------------------------


@dataclass
class PackedRow:
    """One packed row of ``S`` segments, ``T`` tokens and ``M`` scored positions (those predicting a response
    token)."""

    input_ids: Tensor  # (1, T)
    position_ids: Tensor  # (1, T): 0 .. L_i - 1 in every segment
    lengths: list[int]  # (S,) segment lengths, in row order
    segment: Tensor  # (T,) the segment of each token
    scored: Tensor  # (M,) row positions whose logits predict a response token
    labels: Tensor  # (M,) the token each scored position predicts
    scored_segment: Tensor  # (M,) the segment of each scored position
    n_tokens: Tensor  # (S,) scored positions per segment (the response length, or one less without a prompt)

    def to(self, device: torch.device) -> PackedRow:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()}
        return PackedRow(**moved)


def pack_examples(examples: Sequence[dict[str, Any]], side: str = "rejected") -> PackedRow:
    """One row of ``prompt_ids + <side>_ids`` segments, in the given order."""
    ids: list[int] = []
    positions: list[int] = []
    segment: list[int] = []
    scored: list[int] = []
    for s, ex in enumerate(examples):
        prompt, response = list(ex["prompt_ids"]), list(ex[f"{side}_ids"])
        start, n = len(ids), len(prompt) + len(response)
        ids += prompt + response
        positions += range(n)
        segment += [s] * n
        # Position p predicts token p + 1: the response tokens after the segment's first token.
        scored += range(start + max(len(prompt), 1) - 1, start + n - 1)
    scored_t = torch.tensor(scored, dtype=torch.long)
    ids_t = torch.tensor(ids, dtype=torch.long)
    segment_t = torch.tensor(segment, dtype=torch.long)
    scored_segment = segment_t[scored_t]
    return PackedRow(
        input_ids=ids_t[None],
        position_ids=torch.tensor(positions, dtype=torch.long)[None],
        lengths=[len(ex["prompt_ids"]) + len(ex[f"{side}_ids"]) for ex in examples],
        segment=segment_t,
        scored=scored_t,
        labels=ids_t[scored_t + 1],
        scored_segment=scored_segment,
        n_tokens=torch.bincount(scored_segment, minlength=len(examples)),
    )


# ----- attention ---------------------------------------------------------------------------------------------------


class _Segments:
    """Regrouping of a packed row ``(1, H, T, D)`` into a batch of segments ``(S, H, L_max, D)`` and back."""

    def __init__(self, lengths: list[int], device: torch.device):
        self.n, self.width, self.total = len(lengths), max(lengths), sum(lengths)
        self.equal = all(n == self.width for n in lengths)
        if not self.equal:
            starts = torch.tensor([0, *lengths[:-1]], device=device).cumsum(0)
            lens = torch.tensor(lengths, device=device)
            offsets = torch.arange(self.width, device=device)
            valid = offsets[None, :] < lens[:, None]  # (S, L_max)
            # Padded slots read the segment's first token: never attended by a kept query, so their value is moot.
            self.gather = (starts[:, None] + offsets[None, :] * valid).flatten()  # (S * L_max,)
            self.keep = valid.flatten().nonzero().squeeze(1)  # (T,): row order

    def split(self, t: Tensor) -> Tensor:
        """``(1, H, T, D)`` -> ``(S, H, L_max, D)``. The projections are laid out ``(T, H, D)`` in memory (transformers
        transposes a view), so whole ``(H, D)`` token rows are regrouped; ``squeeze``, not ``t[0]``: the backward of
        a select would zero-fill and copy the whole tensor."""
        rows = t.squeeze(0).transpose(0, 1)  # (T, H, D)
        if not self.equal:
            rows = rows.index_select(0, self.gather)
        return rows.unflatten(0, (self.n, self.width)).transpose(1, 2)

    def merge(self, out: Tensor) -> Tensor:
        """``(S, L_max, H, D)`` -> ``(1, T, H, D)``."""
        flat = out.flatten(0, 1)
        if not self.equal:
            flat = flat.index_select(0, self.keep)
        return flat.unsqueeze(0)


def segment_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    segments: _Segments | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: causal attention of each segment of a packed row on itself only.

    ``query (1, H, T, D)``, ``key``/``value (1, H_kv, T, D)`` -> ``(1, T, H, D)``, by transformers' SDPA attention
    on the segments as a batch (``is_causal``: no mask). ``segments`` comes through the model's forward kwargs.
    """
    if segments is None or query.shape[0] != 1 or query.shape[2] != segments.total:
        raise RuntimeError(f"{SEGMENT_ATTENTION!r} attention needs a packed row of one batch and its segments")
    q, k, v = segments.split(query), segments.split(key), segments.split(value)
    out, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)  # (S, L_max, H, D)
    return segments.merge(out), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def segment_mask(segment: Tensor) -> Tensor:
    """Boolean ``(1, 1, T, T)``, True where query ``q`` may attend key ``k``: same segment and ``k <= q``."""
    same = segment[:, None] == segment[None, :]
    return (same & torch.ones_like(same).tril())[None, None]


@contextlib.contextmanager
def _attention_implementation(config: Any, name: str) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# ----- the fused head ----------------------------------------------------------------------------------------------


class HeadLogps(torch.autograd.Function):
    """``log softmax(h W^T + b)[y]`` per row, ``hidden (M, d)``, ``weight (V, d)``, ``labels (M,)`` -> ``(M,)`` fp32.

    The gradient towards ``hidden`` (``(onehot(y) - softmax(z)) W`` per row, times the incoming gradient) is computed in the
    forward, chunk by chunk, and kept instead of the logits; ``weight`` and ``bias`` get none.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.float(), weight.float()
            b = None if bias is None else bias.float()
            logps = h.new_empty(h.shape[0])
            direction = torch.empty_like(h)  # (M, d): d log p(y_m) / d h_m
            rows = max(1, HEAD_CHUNK_ELEMENTS // w.shape[0])
            buffer = h.new_empty(min(rows, h.shape[0]), w.shape[0])  # one allocation for every chunk's logits
            for start in range(0, h.shape[0], rows):
                part = slice(start, start + rows)
                y = labels[part]
                z = torch.mm(h[part], w.t(), out=buffer[: len(y)])  # (c, V) logits
                if b is not None:
                    z += b
                picked = z.gather(1, y[:, None]).squeeze(1)
                top = z.amax(1, keepdim=True)
                # In place: z - max is exact near the max, so exp() gives each p_v to fp32 precision, and 1 - p_y
                # of a confident token keeps its digits (through log_softmax they cancel: ~1e-4 off in scores).
                e = z.sub_(top).exp_()
                total = e.sum(1, keepdim=True)
                logps[part] = picked - top.squeeze(1) - total.log().squeeze(1)
                p_minus_onehot = e.div_(total).scatter_add_(1, y[:, None], e.new_full((len(y), 1), -1.0))
                torch.mm(p_minus_onehot, w, out=direction[part]).neg_()
        ctx.save_for_backward(direction)
        ctx.hidden_dtype = hidden.dtype
        return logps

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (direction,) = ctx.saved_tensors
        return (grad[:, None] * direction).to(ctx.hidden_dtype), None, None, None


# ----- the forward -------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


def _parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, Any]:
    """``(decoder, head, config)`` of a causal LM, looked up through DDP and peft (None where absent)."""
    inner = _unwrap(model)
    get_decoder = getattr(inner, "get_decoder", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    return decoder, head, getattr(inner, "config", None)


def packing_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot be scored packed, or None when it can (Llama-family decoders and their like)."""
    decoder, head, config = _parts(model)
    if not isinstance(decoder, nn.Module) or type(head) is not nn.Linear or config is None:
        return "no decoder and plain Linear LM head to call separately"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "soft-capped logits"
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return "scaled logits"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if not hasattr(config, "_attn_implementation"):
        return "no transformers attention implementation to switch"
    if decoder._forward_pre_hooks:
        return "a forward pre-hook rewrites the decoder's input (L2P soft prompts)"
    return None


def packed_logps(model: nn.Module, row: PackedRow, attention: Attention = "segments") -> tuple[Tensor, Tensor]:
    """``(logps (S,), n_tokens (S,))``: summed response log-probs of each segment of ``row``, fp32.

    Equal to ``batch_logps`` of each candidate alone (same positions, same attention, fp32 log-softmax).
    """
    reason = packing_unsupported(model)
    if reason is not None:
        raise ValueError(f"packed scoring does not support this model: {reason}")
    decoder, head, config = _parts(model)
    row = row.to(next(model.parameters()).device)
    kwargs: dict[str, Any] = {"input_ids": row.input_ids, "position_ids": row.position_ids, "use_cache": False}
    if attention == "segments":
        switch = _attention_implementation(config, SEGMENT_ATTENTION)
        kwargs["segments"] = _Segments(row.lengths, row.input_ids.device)
    elif attention == "mask":
        if config._attn_implementation != "sdpa":
            raise ValueError(f"attention='mask' needs the sdpa attention, the model has {config._attn_implementation}")
        switch = contextlib.nullcontext()
        kwargs["attention_mask"] = segment_mask(row.segment)
    else:
        raise ValueError(f"attention must be 'segments' or 'mask', got {attention!r}")
    with switch:
        hidden = decoder(**kwargs).last_hidden_state[0]  # (T, d)
    per_token = HeadLogps.apply(hidden.index_select(0, row.scored), head.weight, head.bias, row.labels)  # (M,)
    # Summed in fp64: a sequential fp32 sum over ~1000 tokens is off by ~1e-3 of ~-4000, which NPO's
    # sigma(beta (logp - ref)) turns into ~1e-4 of the score (a row sum, as batch_logps does, is pairwise).
    logps = per_token.new_zeros(len(row.lengths), dtype=torch.float64).index_add(
        0, row.scored_segment, per_token.double()
    )
    return logps.to(per_token.dtype), row.n_tokens
