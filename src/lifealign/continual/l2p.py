"""Learning to Prompt (L2P; Wang et al. 2022): a pool of learnable soft prompts chosen per input by key matching.

A pool of ``pool_size`` prompts ``P_m`` (``prompt_length`` × d embeddings) with keys ``k_m`` (d). For an input x:

1. query ``q(x)``: the mean of the frozen base model's input embeddings over the *prompt* tokens of the row — the
   tokens up to and including the last occurrence of the chat template's generation header (e.g.
   ``<|im_start|>assistant\\n``, found by rendering a message with and without ``add_generation_prompt``), so the
   chosen and rejected rows of a pair and the generation prompt of the same record all get the same query. Without
   a chat template (or when a row has no header) the query averages every attended token of the row. (The forward
   hook sees only ``input_ids``/``attention_mask``, not the collator's completion mask; the authors' code averages
   every position of the padded input.)
2. the ``top_k`` keys with the highest cosine ``γ(q, k_m)`` are selected (``torch.topk`` order, most similar first)
   and their prompts are prepended to the row's input embeddings (``top_k · prompt_length`` positions);
3. the surrogate loss ``λ · mean_rows Σ_{m selected} (1 − γ(q, k_m))`` pulls the selected keys towards the queries
   (``lam`` = the authors' "diversity weight" 0.5; their ``−λ Σ γ / B`` has the same gradient).

``key_mode="learned"``: separate learnable keys (the L2P paper; uniform in [−1, 1]); ``"prompt_mean"``: the key of
a prompt is the mean of its embeddings (the LifeAlign code). Prompts start as random rows of the input-embedding
matrix (the LifeAlign code), drawn from a generator seeded by ``seed``.

Mechanics (no change to the loop or the scorers): the pool is registered as ``l2p_pool`` on the transformers model
inside the peft wrapper in ``before_task`` of the first task (and whenever a hook sees a model without it), before
``train_task`` builds its optimizer from ``model.parameters()``; its parameter names contain no ``lora_A``/``lora_B``,
so ``lora_state`` and the saved peft adapter do not include it (it lives in this plugin's checkpoint state). A forward
pre-hook on the decoder (``model.model``) replaces ``input_ids`` by ``inputs_embeds`` with the prompts prepended and
extends ``attention_mask`` (and ``position_ids`` when given) by ``P = top_k · prompt_length``; a forward hook drops
the first P positions of the decoder's hidden states, so the logits have the caller's length. In generation the first
forward gets the prefix (it stays in the KV cache) and later steps only get the mask and positions shifted by P.
Inside ``reference_context`` (adapters disabled) nothing is prepended: the reference is the base model. With
``reference: previous`` the previous policy is the swapped adapter *with the current pool*.

``train_lora=False`` (default; the authors train only the prompt pool, backbone and LoRA frozen) drops the LoRA
gradients in ``after_backward``, so AdamW skips those weights; ``True`` trains both. Because LoRA weights stay
``requires_grad`` either way, the runner's adapter checkpoints are unaffected.

Resume: pool and keys are plugin state; ``load_state_dict`` arms a one-shot forward pre-hook that re-attaches the
pool on the first forward of a LoRA model (for an evaluation resumed before any training hook). The model carries the
pool and hooks until ``close()``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lifealign.continual.olora import bind_on_first_forward, lora_layers
from lifealign.data.tokenize import chat_ids, common_prefix_length, uses_chat_template
from lifealign.models.lora import lora_parameters
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.utils.kwargs import check_range

__all__ = [
    "KEY_MODES",
    "L2PPlugin",
    "PromptPool",
    "generation_header",
    "prompt_query",
    "query_end",
    "select_prompts",
    "surrogate_loss",
]

logger = logging.getLogger(__name__)

KeyMode = Literal["learned", "prompt_mean"]
KEY_MODES: tuple[str, ...] = ("learned", "prompt_mean")
POOL_ATTR = "l2p_pool"


# ----- pure functions --------------------------------------------------------------------------------------------
def generation_header(tokenizer: Any) -> list[int]:
    """The token ids a chat template appends for ``add_generation_prompt`` ([] without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "x"}]
    with_header = chat_ids(tokenizer, messages, add_generation_prompt=True)
    without = chat_ids(tokenizer, messages, add_generation_prompt=False)
    return list(with_header[common_prefix_length(with_header, without) :])


def query_end(input_ids: Tensor, attention_mask: Tensor, header: Sequence[int]) -> Tensor:
    """Per row, one past the last attended occurrence of ``header`` in ``input_ids`` (N, T); −1 where there is none."""
    n, t = input_ids.shape
    m = len(header)
    out = torch.full((n,), -1, dtype=torch.long)
    if m == 0 or m > t:
        return out
    pattern = torch.tensor(list(header), dtype=input_ids.dtype, device=input_ids.device)
    windows = input_ids.unfold(1, m, 1)  # (N, T − m + 1, m)
    attended = attention_mask.bool().unfold(1, m, 1).all(-1)
    hits = (windows == pattern).all(-1) & attended
    positions = torch.arange(t - m + 1, device=input_ids.device)
    last = torch.where(hits, positions, torch.full_like(positions, -1)).max(dim=1).values
    return torch.where(last >= 0, last + m, last).cpu()


def prompt_query(embeds: Tensor, attention_mask: Tensor, end: Tensor) -> Tensor:
    """Mean of ``embeds`` (N, T, d) over the attended positions before ``end`` (all attended ones where ``end < 0``)."""
    t = embeds.shape[1]
    positions = torch.arange(t, device=embeds.device).unsqueeze(0)
    end = end.to(embeds.device).unsqueeze(1)
    keep = attention_mask.bool() & ((end < 0) | (positions < end))
    weights = keep.to(embeds.dtype).unsqueeze(-1)
    return (embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def select_prompts(query: Tensor, keys: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """``(indices (N, k), cosines (N, k))`` of the ``top_k`` keys most cosine-similar to each query, best first."""
    cos = F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    values, indices = torch.topk(cos, k=top_k, dim=1)
    return indices, values


def surrogate_loss(selected_cos: Tensor, lam: float) -> Tensor:
    """``λ · mean_rows Σ_k (1 − γ(q, k_selected))``."""
    return lam * (1.0 - selected_cos).sum(dim=1).mean()


class PromptPool(nn.Module):
    """``prompts`` (pool, length, d) and, for ``key_mode="learned"``, ``keys`` (pool, d)."""

    def __init__(self, prompts: Tensor, keys: Tensor | None):
        super().__init__()
        self.prompts = nn.Parameter(prompts)
        self.keys = nn.Parameter(keys) if keys is not None else None

    def key_matrix(self) -> Tensor:
        return self.keys if self.keys is not None else self.prompts.mean(dim=1)


# ----- the plugin ------------------------------------------------------------------------------------------------
class L2PPlugin(Plugin):
    """L2P prompt pool prepended through model hooks; surrogate key-matching loss as ``extra_loss``."""

    name = "l2p"
    plain_rows_only = True  # the prompt pool is prepended to plain rows by a decoder pre-hook

    def __init__(
        self,
        *,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 3,
        lam: float = 0.5,
        key_mode: KeyMode = "learned",
        train_lora: bool = False,
        seed: int = 0,
    ):
        self.pool_size = check_range("pool_size", pool_size, low=1)
        self.prompt_length = check_range("prompt_length", prompt_length, low=1)
        self.top_k = check_range("top_k", top_k, low=1, high=pool_size)
        self.lam = check_range("lam", lam, low=0)
        self.key_mode = key_mode
        self.train_lora = train_lora
        self.seed = seed
        self.header: list[int] | None = None
        self.counts = torch.zeros(self.pool_size, dtype=torch.long)
        """How often each prompt was selected in training forwards (all tasks)."""
        self.pool: PromptPool | None = None
        self._hf: nn.Module | None = None
        self._probe: Any = None
        self._handles: list[RemovableHandle] = []
        self._pending: RemovableHandle | None = None
        self._saved: dict[str, Tensor] = {}
        self._strip: list[int] = []
        self._record: Tensor | None = None
        self._caches: list[weakref.ref] = []
        """The generation caches whose first forward got the prefix."""

    @property
    def prefix_length(self) -> int:
        return self.top_k * self.prompt_length

    # ----- attachment ----------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> bool:
        """Register the pool on ``model``'s transformers model and hook its decoder (idempotent); False if ``model``
        is not a causal LM with LoRA layers."""
        hf = model.get_base_model() if isinstance(model, PeftModel) else model
        if hf is self._hf:
            return True
        layers = lora_layers(hf)
        if not layers or not hasattr(hf, "get_output_embeddings") or hf.get_output_embeddings() is None:
            return False
        decoder = hf.base_model
        if decoder is hf:
            return False
        if self.header is None:
            raise ValueError("l2p: attach needs the tokenizer's generation header (call a hook with ctx first)")
        self.close()
        pool = self.pool if self.pool is not None else self._new_pool(hf.get_input_embeddings().weight)
        setattr(hf, POOL_ATTR, pool)
        self.pool, self._hf, self._probe = pool, hf, next(iter(layers.values()))
        self._handles = [
            decoder.register_forward_pre_hook(self._prepend_hook, with_kwargs=True),
            decoder.register_forward_hook(self._strip_hook, with_kwargs=True),
        ]
        return True

    def close(self) -> None:
        """Remove the hooks and the pool from the model (the pool's values stay in the plugin)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._hf is not None and getattr(self._hf, POOL_ATTR, None) is self.pool:
            delattr(self._hf, POOL_ATTR)
        self._hf, self._probe = None, None
        if self._pending is not None:
            self._pending.remove()
            self._pending = None

    def _new_pool(self, embedding: Tensor) -> PromptPool:
        """Prompts from random rows of the embedding matrix, keys uniform in [−1, 1] (or restored values)."""
        gen = torch.Generator().manual_seed(self.seed)
        vocab, dim = embedding.shape
        rows = torch.randint(vocab, (self.pool_size * self.prompt_length,), generator=gen)
        prompts = embedding.detach().float().cpu()[rows].reshape(self.pool_size, self.prompt_length, dim).clone()
        keys = (
            torch.empty(self.pool_size, dim).uniform_(-1.0, 1.0, generator=gen) if self.key_mode == "learned" else None
        )
        if self._saved:
            prompts = self._saved["prompts"].float().clone()
            keys = self._saved["keys"].float().clone() if keys is not None else None
            if prompts.shape != (self.pool_size, self.prompt_length, dim):
                raise ValueError(
                    f"l2p: saved prompts have shape {tuple(prompts.shape)}, the model needs "
                    f"{(self.pool_size, self.prompt_length, dim)}"
                )
            self._saved = {}
        return PromptPool(prompts, keys).to(embedding.device)

    def _ensure_attached(self, ctx: PluginContext) -> None:
        if self.header is None:
            chat = uses_chat_template(ctx.tokenizer, ctx.data)
            self.header = generation_header(ctx.tokenizer) if chat else []
        if not self.attach(ctx.model):
            raise ValueError("l2p: the model is not a causal LM with LoRA layers")

    def _active(self) -> bool:
        return self.pool is not None and not (self._probe is not None and self._probe.disable_adapters)

    # ----- model hooks ---------------------------------------------------------------------------------------
    def _prepend_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not self._active():
            self._strip.append(0)
            return None
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        mask, positions, cache = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("cache")
        if mask is not None and mask.ndim != 2:
            raise NotImplementedError("l2p: only 2-D attention masks are supported")
        n_new = (input_ids if input_ids is not None else embeds).shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        p = self.prefix_length
        if past > 0:  # a generation step after the first: the prefix is in the cache already
            if self._cache_has_prefix(cache, mask, past + n_new):
                if mask is not None:
                    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
                if positions is not None:
                    kwargs["position_ids"] = positions + p
            self._strip.append(0)
            return args, kwargs
        base = embeds if embeds is not None else module.get_input_embeddings()(input_ids)
        n = base.shape[0]
        full_mask = mask if mask is not None else torch.ones(base.shape[:2], dtype=torch.long, device=base.device)
        end = query_end(input_ids, full_mask, self.header or []) if input_ids is not None else torch.full((n,), -1)
        query = prompt_query(base.detach().float(), full_mask, end)
        assert self.pool is not None
        indices, cos = select_prompts(query, self.pool.key_matrix(), self.top_k)
        prefix = self.pool.prompts[indices].reshape(n, p, -1).to(base.dtype)
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([prefix, base], dim=1), None
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(n, p), mask], dim=1)
        if positions is not None:
            lead = torch.arange(p, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], p)
            kwargs["position_ids"] = torch.cat([lead, positions + p], dim=1)
        if cache is not None:
            self._caches = [r for r in self._caches if r() is not None] + [weakref.ref(cache)]
        if torch.is_grad_enabled():
            self._record = cos
            self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=self.pool_size)
        self._strip.append(p)
        return args, kwargs

    def _cache_has_prefix(self, cache: Any, mask: Tensor | None, total: int) -> bool:
        """Whether a continued generation's cache starts with our prefix: it is a cache we prefixed, or the
        caller's mask is exactly P shorter than cache + new tokens."""
        if any(r() is cache for r in self._caches):
            return True
        return mask is not None and total == mask.shape[1] + self.prefix_length

    def _strip_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        p = self._strip.pop() if self._strip else 0
        if p == 0:
            return output
        if isinstance(output, tuple):
            return (output[0][:, p:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, p:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, p:] for h in output.hidden_states)
        return output

    # ----- plugin hooks --------------------------------------------------------------------------------------
    def before_task(self, ctx: PluginContext) -> None:
        self._ensure_attached(ctx)

    def train_data(self, ctx: PluginContext, records: list) -> list:
        self._ensure_attached(ctx)
        return records

    def before_stage(self, ctx: PluginContext) -> None:
        self._ensure_attached(ctx)
        self._record = None

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        record, self._record = self._record, None
        if record is None:
            return None
        return surrogate_loss(record, self.lam)

    def after_backward(self, ctx: PluginContext) -> None:
        if not self.train_lora:
            for p in lora_parameters(ctx.model).values():
                p.grad = None

    # ----- reporting and resume ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.pool.parameters()) if self.pool is not None else 0
        return {"pool_parameters": n, "selection_counts": self.counts.tolist()}

    def state_dict(self) -> dict[str, Any]:
        tensors: dict[str, Tensor] = {}
        if self.pool is not None:
            tensors["prompts"] = self.pool.prompts.detach().float().cpu().clone()
            if self.pool.keys is not None:
                tensors["keys"] = self.pool.keys.detach().float().cpu().clone()
        elif self._saved:
            tensors = {k: v.clone() for k, v in self._saved.items()}
        meta = {
            "settings": {"pool_size": self.pool_size, "prompt_length": self.prompt_length, "key_mode": self.key_mode},
            "header": self.header,
            "counts": self.counts.tolist(),
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, meta = state.get("tensors", {}), state.get("meta", {})
        settings = {"pool_size": self.pool_size, "prompt_length": self.prompt_length, "key_mode": self.key_mode}
        for key, value in meta.get("settings", {}).items():
            if settings.get(key) != value:
                raise ValueError(f"l2p {key}: the checkpoint has {value!r} but this plugin has {settings.get(key)!r}")
        if self.key_mode == "learned" and "prompts" in tensors and "keys" not in tensors:
            raise ValueError("l2p: checkpoint has prompts without keys")
        self.close()
        self.pool = None
        self._saved = {k: v.float().cpu() for k, v in tensors.items() if k in ("prompts", "keys")}
        self.header = meta.get("header")
        self.counts = torch.tensor(meta.get("counts", [0] * self.pool_size), dtype=torch.long)
        if self._saved and self.header is not None:
            self._pending = bind_on_first_forward(self._bind_lazily)

    def _bind_lazily(self, module: nn.Module) -> bool:
        if self._hf is not None:
            return True
        pending, self._pending = self._pending, None
        ok = self.attach(module)
        self._pending = None if ok else pending
        return ok
