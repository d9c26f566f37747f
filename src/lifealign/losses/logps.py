"""Per-sequence log-probabilities of response tokens, and the DPO implicit reward.

``log pi(y|x) = sum_{t in response} log softmax(z_{t-1})[y_t]``: the logits at position ``t-1`` predict the token at
``t``, and only response (completion) tokens are summed (LifeAlign / LLaMA-Factory ``get_batch_logps`` with the
sigmoid loss, trl's DPOTrainer).

The log-softmax always runs in fp32 (fp64 stays fp64), also for bf16 logits and under autocast. To keep memory
bounded it works one sequence at a time, so at most one ``(T, V)`` fp32 copy exists; for low-precision logits that
require grad, the per-row upcast is recomputed in the backward pass (activation checkpointing) instead of being
saved, so an fp32 copy of the whole ``(N, T, V)`` tensor is never kept.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["implicit_reward", "sequence_logps", "token_logps"]


def _row_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z[t, y_t] - logsumexp_v z[t, v]`` for one sequence: logits ``(T, V)``, labels ``(T,)`` -> ``(T,)``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the logits at the same position, in (at least) fp32.

    ``logits (N, T, V)``, ``labels (N, T)`` (already aligned: ``logits[:, t]`` scores ``labels[:, t]``) ->
    ``(N, T)``. Labels must be valid vocabulary ids everywhere (mask afterwards, don't use ``-100``).
    """
    low_precision = logits.dtype not in (torch.float32, torch.float64)
    rows = []
    # Autocast would cast the fp32 upcast back down; the point here is fp32 arithmetic.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        for row_logits, row_labels in zip(logits, labels):
            if low_precision and row_logits.requires_grad:
                rows.append(checkpoint(_row_token_logps, row_logits, row_labels, use_reentrant=False))
            else:
                rows.append(_row_token_logps(row_logits, row_labels))
    return torch.stack(rows)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token log-probs and response lengths.

    ``logits (N, T, V)``, ``input_ids (N, T)``, ``completion_mask (N, T)`` (1 on response tokens) ->
    ``(logps_sum (N,) float32 (float64 for float64 logits), n_tokens (N,) int64)`` with
    ``logps_sum[i] = sum_{t>=1, mask[i,t]=1} log softmax(logits[i, t-1])[input_ids[i, t]]``.
    A response token at position 0 has no predicting position and is not counted.
    """
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()  # (N, T-1)
    per_token = token_logps(logits[:, :-1], labels)  # (N, T-1)
    # where(), not multiply: padded positions may hold non-finite logits, and 0 * nan is nan.
    logps_sum = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)
    return logps_sum, mask.sum(dim=-1)


def implicit_reward(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` (LifeAlign Eq. 1, one side); shapes ``(B,)``."""
    return beta * (logps - ref_logps)
