"""``reward_model``: the mean scalar reward a local sequence-classification model gives the greedy generations.

``score = mean_i r(prompt_i, generation_i)`` (the items are the ``r(prompt_i, generation_i)``) where ``r`` is
``logits[:, 0]`` of an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a trl ``RewardTrainer``-style
model), read at the last non-pad token of ``prompt + response``. The pair is rendered with the reward model's own
chat template when it has one (``[*prompt messages, {assistant: response}]``), else as plain ``prompt + response``.

Batches are right-padded with the model's ``config.pad_token_id``, which is exactly the id the model's pooling
skips (it takes the rightmost token that is not the pad id), and attention masks come from lengths. So a padded
batch pools at the same position as an unpadded single-example forward and scores do not depend on batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from lifealign.data.records import Prompt, Task
from lifealign.evaluation.judge import prompt_as_text
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Scorer, eval_mode, task_generations
from lifealign.models.load import ensure_pad_token

__all__ = ["RewardModelScorer", "load_reward_model", "reward_input_ids", "reward_scores"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def reward_input_ids(tokenizer: Any, prompt: Prompt, response: str, max_length: int | None = None) -> list[int]:
    """Token ids of one (prompt, response) pair as the reward model reads it; truncation keeps the *end*
    (the last ``max_length`` tokens), because the reward is read at the last token."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt_as_text(prompt) + response)["input_ids"]
    if not ids:
        raise ValueError("reward model input is empty (empty prompt and response without a chat template)")
    return list(ids[-max_length:] if max_length else ids)


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``(B, T_max)``, content left-aligned, mask built from lengths."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _model_pad_id(model: PreTrainedModel, n_rows: int) -> int:
    pad_id = model.config.get_text_config().pad_token_id
    if pad_id is None:
        if n_rows > 1:
            raise ValueError("reward model config has no pad_token_id; batches need one (load_reward_model sets it)")
        return 0  # a single row is never padded, so the value is never read
    return int(pad_id)


def reward_scores(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """``[r(prompt_i, response_i)]`` = ``logits[:, 0]`` (fp32) of the reward model, in input order."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = [reward_input_ids(tokenizer, p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
    scores: list[float] = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids, mask = _right_pad(batch, _model_pad_id(model, len(batch)))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, num_labels)
            scores.extend(logits[:, 0].float().tolist())
    return scores


def load_reward_model(
    path: str | Path, dtype: str = "float32", device: torch.device | str | None = None
) -> tuple[PreTrainedModel, Any]:
    """A local ``save_pretrained`` reward model (safetensors, no remote code, every weight present) with
    ``num_labels == 1``, in eval mode, and its tokenizer; the model's ``pad_token_id`` is set to the tokenizer's
    pad token (which is added if missing)."""
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"reward model {path} must be a local directory with config.json")
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    model, info = AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=1, dtype=_DTYPES[dtype], use_safetensors=True, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        # e.g. a causal LM directory: its score head would be freshly random and the rewards meaningless.
        raise ValueError(f"{path} is not a trained reward model: missing weights {sorted(info['missing_keys'])[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    ensure_pad_token(tokenizer)
    # Set here rather than via ensure_pad_token(tokenizer, model): a classifier has no generation_config.
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


class RewardModelScorer(Scorer):
    """Mean reward of the generations; the model path comes from ``path`` or ``ctx.eval.reward_model``."""

    name = "reward_model"
    needs_generation = True

    def __init__(
        self,
        path: str | Path | None = None,
        batch_size: int | None = None,
        max_length: int | None = 1024,
        dtype: str = "float32",
    ) -> None:
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self._loaded: tuple[PreTrainedModel, Any] | None = None

    def _model_path(self, ctx: EvalContext) -> str | Path:
        path = self.path if self.path is not None else getattr(ctx.eval, "reward_model", None)
        if not path:
            raise ValueError("the 'reward_model' scorer needs a local model directory (eval.reward_model)")
        return path

    def model_and_tokenizer(self, ctx: EvalContext) -> tuple[PreTrainedModel, Any]:
        """Loaded once, on the policy's device, and kept for later passes."""
        if self._loaded is None:
            self._loaded = load_reward_model(self._model_path(ctx), self.dtype, ctx.resolved_device())
        return self._loaded

    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        gens = task_generations(ctx, task)
        if not gens.completions:
            return {self.name: ItemScores([], [])}
        model, tokenizer = self.model_and_tokenizer(ctx)
        batch_size = self.batch_size or ctx.eval.batch_size
        rewards = ctx.map_sharded(
            list(zip(gens.prompts, gens.completions, strict=True)),
            lambda part: reward_scores(
                model, tokenizer, [p for p, _ in part], [c for _, c in part], batch_size, self.max_length
            ),
        )
        return {self.name: ItemScores(list(gens.ids), [float(r) for r in rewards])}
