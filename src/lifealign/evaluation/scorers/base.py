"""The scorer contract and the evaluation context that scorers share.

A scorer turns (model, task) into per-item values, ``score_items -> {<metric>: ItemScores}`` (one value per held-out
pair or generation prompt, with the record ids), and its scores are their means, ``score -> {<scorer name>: main
score, <extra>: value, ...}``; the runner puts every key in its own score matrix. Scores are on a 0–100 scale where
the metric has one (accuracy, ROUGE-L, BLEU-4, judge). Keeping the items lets every statistic be recomputed from a
run folder (bootstrap intervals, paired tests, per-example inspection).

An item a scorer could not score (an unparsable judge reply) is NaN: the mean skips it, :attr:`ItemScores.n_failed`
counts it, and :func:`check_failures` turns "every item failed" into a :class:`ScorerError` instead of a silent NaN.

One :class:`EvalContext` is built per evaluation pass (after training task ``i``): it caches what several scorers
need so it is computed once per pass — the tokenized held-out pairs, the policy log-probs and the greedy
generations of each task. The reference log-probs live in ``reference_cache``, which the caller may keep across
passes because the reference (the base model, adapter disabled) never changes; with another reference (e.g. the
``previous`` policy) pass a ``reference`` context factory and a distinct ``reference_key``.

Under several processes (``shard`` = this rank and the world size) the per-example work — log-probs, generations,
reward-model scores — is split into contiguous slices, one per rank, and gathered (:meth:`EvalContext.map_sharded`),
so every rank ends with the same full results; paid or rate-limited calls (the LLM judge) run on rank 0 only and are
broadcast (:meth:`EvalContext.on_main`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.records import PreferencePair, Prompt, Task
from lifealign.data.tokenize import tokenize_pairs, tokenize_prompts
from lifealign.evaluation.generate import generate_completions
from lifealign.models.lora import reference_context

__all__ = [
    "EvalContext",
    "Generations",
    "ItemScores",
    "PairLogps",
    "Scorer",
    "ScorerError",
    "Shard",
    "ShardError",
    "check_failures",
    "eval_mode",
    "eval_records",
    "task_examples",
    "task_generations",
]


log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class ShardError(RuntimeError):
    """A rank failed while computing its slice of an evaluation; raised on every rank so none waits forever."""


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world_size`` evaluating processes (``rank`` 0 is the main process)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid shard: rank {self.rank} of {self.world_size}")

    def bounds(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous slice of ``n`` items; sizes differ by at most one."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


def _all_gather(local: Any, world_size: int) -> list[Any]:
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, local)
    return out


def _attempt(compute: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, compute())``, or ``(False, "<error type>: <message>")`` to report to every rank."""
    try:
        return True, compute()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _raise_if_any_failed(parts: Sequence[tuple[bool, Any]]) -> None:
    failed = [f"rank {rank}: {value}" for rank, (ok, value) in enumerate(parts) if not ok]
    if failed:
        raise ShardError("sharded evaluation failed on " + "; ".join(failed))


@dataclass
class PairLogps:
    """Summed response log-probs of held-out pairs: ``chosen``/``rejected`` are ``(n,)`` fp32, aligned with ``ids``.

    ``chosen_tokens``/``rejected_tokens`` ``(n,)`` are the response lengths (tokens scored) from the same forward;
    ``None`` where they were not kept (e.g. at-learning values restored by the drift tracker).
    """

    ids: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None


class ScorerError(RuntimeError):
    """A metric has no value for a task because every item failed; ``task`` and ``metric`` say which."""

    def __init__(self, task: str, metric: str, message: str) -> None:
        super().__init__(message)
        self.task = task
        self.metric = metric


@dataclass
class ItemScores:
    """One metric's per-item values on one task: ``values[i]`` belongs to record ``ids[i]``; NaN = the item failed.

    ``weights`` (optional, ``>= 0``) make :meth:`mean` a weighted mean — e.g. the drift ``kl`` is per-pair per-token
    KL weighted by the pair's response tokens, which gives back the token-weighted KL of all pairs. ``failures``
    counts failed items by reason where the scorer knows one (the judge's ``no_score``, ``http_500``, ...).
    """

    ids: list[str]
    values: list[float]
    weights: list[float] | None = None
    failures: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.values):
            raise ValueError(f"{len(self.ids)} ids but {len(self.values)} values")
        if self.weights is not None and len(self.weights) != len(self.values):
            raise ValueError(f"{len(self.values)} values but {len(self.weights)} weights")

    @property
    def n(self) -> int:
        """Number of items (scored or failed)."""
        return len(self.values)

    @property
    def n_failed(self) -> int:
        """Items without a finite value."""
        return sum(not math.isfinite(v) for v in self.values)

    @property
    def n_scored(self) -> int:
        return self.n - self.n_failed

    def mean(self) -> float:
        """``Σ v_i / n`` over the finite values (``Σ w_i v_i / Σ w_i`` with weights); NaN when nothing is left."""
        if self.weights is None:
            finite = [v for v in self.values if math.isfinite(v)]
            return math.fsum(finite) / len(finite) if finite else math.nan
        kept = [(v, w) for v, w in zip(self.values, self.weights, strict=True) if math.isfinite(v)]
        total = math.fsum(w for _, w in kept)
        return math.fsum(v * w for v, w in kept) / total if total > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (a non-finite value is ``None``); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {"ids": list(self.ids), "values": [v if math.isfinite(v) else None for v in self.values]}
        if self.weights is not None:
            out["weights"] = list(self.weights)
        if self.failures:
            out["failures"] = dict(self.failures)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemScores:
        return cls(
            ids=[str(i) for i in data["ids"]],
            values=[math.nan if v is None else float(v) for v in data["values"]],
            weights=None if data.get("weights") is None else [float(w) for w in data["weights"]],
            failures={str(k): int(v) for k, v in data.get("failures", {}).items()},
        )


def check_failures(task_name: str, metric: str, items: ItemScores) -> None:
    """Raise :class:`ScorerError` when every item of ``metric`` on ``task_name`` failed; log a WARNING when some did.

    A metric with no items at all (nothing to score, e.g. ``generation_examples: 0``) is not a failure. Call it
    after the scores were saved, so a failing judge still leaves the other metrics and the items on disk.
    """
    if items.n == 0 or items.n_failed == 0:
        return
    reasons = f" ({', '.join(f'{r}: {c}' for r, c in sorted(items.failures.items()))})" if items.failures else ""
    if items.n_failed == items.n:
        raise ScorerError(
            task_name,
            metric,
            f"metric {metric!r} failed on all {items.n} items of task {task_name!r}{reasons}: it has no score",
        )
    log.warning(
        "metric %r on task %r: %d of %d items failed%s; the score is the mean of the other %d",
        metric,
        task_name,
        items.n_failed,
        items.n,
        reasons,
        items.n_scored,
    )


@dataclass
class Generations:
    """Greedy completions for a task's first ``generation_examples`` test prompts, with the chosen references."""

    ids: list[str]
    prompts: list[Prompt]
    completions: list[str]
    references: list[str]


@dataclass
class EvalContext:
    """Everything a scorer reads, plus the per-pass caches that let scorers share work."""

    model: torch.nn.Module
    tokenizer: Any
    data: DataSection
    eval: EvalSection
    device: torch.device | str | None = None
    """Where batches go; ``None`` = the device of the model's first parameter."""
    reference: Callable[[], contextlib.AbstractContextManager] | None = None
    """A context factory inside which ``model`` is the reference policy; ``None`` = adapter disabled (base)."""
    reference_key: str = "base"
    reference_cache: dict[tuple[str, str], PairLogps] = field(default_factory=dict)
    """``(reference_key, task name) -> PairLogps``; may be shared across passes (the base never changes)."""
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    policy_cache: dict[str, PairLogps] = field(default_factory=dict)
    generations: dict[str, Generations] = field(default_factory=dict)
    shard: Shard = field(default_factory=Shard)
    """This process's rank among the evaluating processes; the default is a single process."""
    layout: str = "concat"
    """How held-out pairs go through the model for their log-probs (``data.collate.LAYOUTS``)."""
    pack_tokens: int | None = None

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return next(self.model.parameters()).device

    def reference_policy(self) -> contextlib.AbstractContextManager:
        """Enter to make ``model`` the reference policy."""
        return self.reference() if self.reference is not None else reference_context(self.model)

    def map_sharded(self, items: Sequence[T], compute: Callable[[list[T]], Sequence[R]]) -> list[R]:
        """``compute`` (one output per item) on this rank's slice of ``items``; every rank gets all outputs, in order.

        A single process computes everything. With several, an exception on any rank is re-raised on all of them
        as :class:`ShardError` (after the gather), instead of leaving the others blocked in a collective.
        """
        if self.shard.world_size == 1:
            return list(compute(list(items)))
        start, stop = self.shard.bounds(len(items))
        part = list(items[start:stop])
        local = _attempt(lambda: list(compute(part)) if part else [])
        parts = _all_gather(local, self.shard.world_size)
        _raise_if_any_failed(parts)
        return [out for _, outputs in parts for out in outputs]

    def on_main(self, compute: Callable[[], R]) -> R:
        """``compute()`` on rank 0 only, its result broadcast to every rank (calls that cost money or quota)."""
        if self.shard.world_size == 1:
            return compute()
        box: list[Any] = [_attempt(compute) if self.shard.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        _raise_if_any_failed([box[0]])
        return box[0][1]

    def new_pass(self) -> None:
        """Forget what depends on the current weights (call after training changed the model)."""
        self.policy_cache.clear()
        self.generations.clear()


class Scorer(ABC):
    """A named metric on one task. ``needs_generation`` scorers read :func:`task_generations`.

    A subclass implements :meth:`score_items`; :meth:`score` is the mean of every item metric (:meth:`summarize`,
    which a scorer may extend with counts). ``convention`` names how the metric is computed when there is more
    than one way (``bleu4``: ``"llamafactory"`` or ``"sacrebleu"``), for the run's records; ``None`` = one way.
    """

    name: ClassVar[str] = ""
    needs_generation: ClassVar[bool] = False
    convention: str | None = None

    @abstractmethod
    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        """``{self.name: items, <extra metric>: items, ...}``, items aligned with the held-out pairs or the
        generation prompts scored (ids = record ids); empty items when the task has nothing to score."""

    def summarize(self, items: Mapping[str, ItemScores]) -> dict[str, float]:
        """``{metric: items.mean()}``: the scores :meth:`score` reports for these items."""
        return {metric: values.mean() for metric, values in items.items()}

    def score(self, ctx: EvalContext, task: Task) -> dict[str, float]:
        """``{self.name: main score, <extra metric>: value, ...}``; NaN when the task has nothing to score."""
        return self.summarize(self.score_items(ctx, task))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and no autograd inside the block; the previous train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def eval_records(task: Task, limit: int | None) -> list[PreferencePair]:
    """The held-out pairs scored for ``task``: the first ``limit`` test records (all when ``limit`` is None)."""
    return list(task.test if limit is None else task.test[:limit])


def task_examples(ctx: EvalContext, task: Task) -> list[dict[str, Any]]:
    """Tokenized held-out pairs of ``task`` (first ``eval.max_examples``), cached in ``ctx.examples``."""
    if task.name not in ctx.examples:
        records = eval_records(task, ctx.eval.max_examples)
        ctx.examples[task.name] = list(tokenize_pairs(records, ctx.tokenizer, ctx.data).examples) if records else []
    return ctx.examples[task.name]


def task_generations(ctx: EvalContext, task: Task) -> Generations:
    """Greedy completions of the first ``eval.generation_examples`` test prompts, generated once per pass.

    Prompts are rendered and truncated as for training (``tokenize_prompts``: chat template, keep the last
    ``data.max_prompt_length`` tokens); references are the chosen responses.
    """
    if task.name in ctx.generations:
        return ctx.generations[task.name]
    records = eval_records(task, ctx.eval.generation_examples)
    prompt_ids = tokenize_prompts([r.prompt for r in records], ctx.tokenizer, ctx.data)
    with eval_mode(ctx.model):
        completions = ctx.map_sharded(
            prompt_ids,
            lambda part: generate_completions(
                ctx.model,
                ctx.tokenizer,
                part,
                max_new_tokens=ctx.eval.max_new_tokens,
                batch_size=ctx.eval.batch_size,
                device=ctx.resolved_device(),
            ),
        )
    gens = Generations(
        ids=[r.id for r in records],
        prompts=[r.prompt for r in records],
        completions=completions,
        references=[r.chosen for r in records],
    )
    ctx.generations[task.name] = gens
    return gens
