"""Per-sequence log-probabilities of response tokens, and the DPO implicit reward.

``log pi(y|x) = sum_{t in response} log softmax(z_{t-1})[y_t]``: the logits at position ``t-1`` predict the token at
``t``, and only response (completion) tokens are summed (LifeAlign / LLaMA-Factory ``get_batch_logps`` with the
sigmoid loss, trl's DPOTrainer).

The log-softmax always runs in fp32 (fp64 stays fp64), also for bf16 logits and under autocast. Only the scored
positions (those that predict a response token) are normalised: prompt and padding positions are never touched, so
their cost is skipped and a non-finite logit there cannot leak into the value or the gradient. The rows are
normalised in chunks of at most ``CHUNK_ELEMENTS`` logits, so at most one chunk-sized fp32 temporary exists; for
low-precision logits that require grad, each chunk's upcast is recomputed in the backward pass (activation
checkpointing) instead of being saved, so an fp32 copy of all the logits is never kept.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["CHUNK_ELEMENTS", "implicit_reward", "label_logps", "sequence_logps", "sum_scored", "token_logps"]

CHUNK_ELEMENTS = 1 << 22
"""Logits normalised per chunk (16 MiB in fp32): bounds the fp32 temporaries of the log-softmax."""


def _rows_label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z[i, y_i] - logsumexp_v z[i, v]`` for rows ``(M, V)`` and labels ``(M,)`` -> ``(M,)``, in >= fp32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each row's label: ``logits (M, V)``, ``labels (M,)`` -> ``(M,)`` in (at least) fp32.

    ``out[i] = logits[i, labels[i]] - logsumexp_v logits[i, v]``. Labels must be valid vocabulary ids.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.promote_types(logits.dtype, torch.float32)) + logits.sum()
    low_precision = logits.dtype not in (torch.float32, torch.float64)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    recompute = low_precision and logits.requires_grad
    # Autocast would cast the fp32 upcast back down; the point here is fp32 arithmetic.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if logits.shape[0] <= rows_per_chunk and not recompute:
            return _rows_label_logps(logits, labels)
        # split(), not a loop of slices: one SplitBackward node concatenates the chunk gradients, where each
        # slice's backward would allocate a zero tensor the size of all the logits.
        parts = []
        for chunk, chunk_labels in zip(logits.split(rows_per_chunk), labels.split(rows_per_chunk)):
            if recompute:
                parts.append(checkpoint(_rows_label_logps, chunk, chunk_labels, use_reentrant=False))
            else:
                parts.append(_rows_label_logps(chunk, chunk_labels))
    return torch.cat(parts)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the logits at the same position, in (at least) fp32.

    ``logits (N, T, V)``, ``labels (N, T)`` (already aligned: ``logits[:, t]`` scores ``labels[:, t]``) ->
    ``(N, T)``. Labels must be valid vocabulary ids everywhere (mask afterwards, don't use ``-100``).
    """
    flat = label_logps(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return flat.view(labels.shape)


def sum_scored(per_token: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per-row sums of the values of the scored positions: ``per_token (M,)`` in row-major order of the True
    entries of ``scored (N, L)`` -> ``(N,)``.

    The values are scattered back into an ``(N, L)`` zero grid and summed along each row, so the summation order
    is that of a masked row sum.
    """
    return per_token.new_zeros(scored.shape).masked_scatter(scored, per_token).sum(dim=-1)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token log-probs and response lengths.

    ``logits (N, T, V)``, ``input_ids (N, T)``, ``completion_mask (N, T)`` (1 on response tokens) ->
    ``(logps_sum (N,) float32 (float64 for float64 logits), n_tokens (N,) int64)`` with
    ``logps_sum[i] = sum_{t>=1, mask[i,t]=1} log softmax(logits[i, t-1])[input_ids[i, t]]``.
    A response token at position 0 has no predicting position and is not counted.
    """
    scored = completion_mask[:, 1:].bool()  # (N, T-1): position t-1 predicts response token t
    per_token = label_logps(logits[:, :-1][scored], input_ids[:, 1:][scored])  # (M,)
    return sum_scored(per_token, scored), scored.sum(dim=-1)


def implicit_reward(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` (LifeAlign Eq. 1, one side); shapes ``(B,)``."""
    return beta * (logps - ref_logps)
