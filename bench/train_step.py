"""Training-step benchmark: lifealign's ``train_task`` against trl 1.16's ``DPOTrainer``, alternating in one process.

Configurations (same model, LoRA r=8 on q_proj/v_proj with the same initial adapter, same batch of synthetic pairs
of exactly ``--seq-len`` tokens, same lr, DPO beta 0.1, max grad norm 1, AdamW, cosine schedule without warm-up):

- ``trl``             trl's default DPOConfig (bf16 autocast and gradient checkpointing are its defaults),
                      reference log-probs recomputed every step (adapter disabled);
- ``trl_precompute``  the same with ``precompute_ref_log_probs=True``;
- ``trl_fp32``        trl with ``bf16=False, gradient_checkpointing=False``: the like-for-like fp32 baseline;
- ``ours_recompute``  our loop, fp32, ``train.cache_reference: false``;
- ``ours``            our loop, fp32, cached reference log-probs (the default);
- ``ours_bf16``       our loop, bf16 mixed precision through accelerate, cached reference log-probs;
- ``ours_shared``     ``ours`` with batch layout ``shared``: one ``prompt | chosen | rejected`` row per pair (prefix
                      sharing, ``lifealign.data.packing``), rows padded to the longest pair;
- ``ours_packed``     ``ours`` with layout ``packed``: the micro-batch's pairs in one row (``--pack-tokens`` sets a
                      row budget), no padding; ``ours_packed_bf16`` the same in bf16;
- ``trl_padding_free`` trl's default with ``padding_free=True`` (trl 1.16 warns and falls back to padding; the
                      report says whether trl kept it). trl 1.16's DPOConfig has no ``use_logits_to_keep``.

``--data TASK`` trains on real pairs instead: a seeded sample of ``--data-root/TASK/train.json`` through the
project's loader and tokenizer with ``data.max_length = --max-length`` (512), so lengths vary as in the task. Every
configuration sees the same pairs in its step k (our loop's order, ``micro_batch_indices``; trl gets the same token
ids in that order through a sequential sampler, bypassing its own tokenisation). Before the timed rounds the fp32
log-probs of every step's batch in ``shared`` and ``packed`` are compared with today's concatenated path
(``max_abs_logp_diff``), and the LoRA gradients of one batch. Our layouts reach the loop through ``train.pair_layout``
when the config schema has it, else through a wrapper of the loop's ``collate_pairs`` (``patch_loop_collate``).

Each configuration runs in its own thread, but only one runs at a time: the main thread hands out turns in
rotation (one optimizer step per turn, with the order rotated every round), so every configuration sees the same
machine load. A turn ends inside the framework's own per-step hook (our ``write_metrics`` callback, trl's
``on_step_end``), so a step's time covers batch collation, forwards, backward, clipping and the optimizer step.
The reference pre-computation (ours: the start of ``train_task`` up to the ``before_stage`` hook; trl: its
``_precompute_ref_logps``) is timed separately and never counted in a step. fp32 and bf16 matmul peaks are measured
between rounds in the same run.

Usage: ``python bench/train_step.py [--model smollm2-135m-instruct|tiny] [--pairs 4] [--seq-len 128] [--steps 4]
[--warmup 1] [--precision fp32|bf16|both] [--configs a,b] [--data TASK [--max-length 512]] [--quick]``. The last
lines are ``speedup_vs_trl: X``, ``max_abs_logp_diff: Y`` (fp32, shared/packed vs concat) and
``speedup_prefix_sharing: Z`` (``ours`` / ``ours_packed``: total step time over the timed steps, same pairs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # trl's pre-computation progress bar

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RssSampler,
    cpu_features,
    load_average,
    machine_report,
    matmul_peak_gflops,
    max_rss_bytes,
    summarize,
)

ALL_CONFIGS = (
    "trl",
    "trl_precompute",
    "trl_fp32",
    "trl_padding_free",
    "ours_recompute",
    "ours",
    "ours_bf16",
    "ours_shared",
    "ours_packed",
    "ours_packed_bf16",
)
BETA = 0.1
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
DEMO_TASK_PAIRS = 256
"""Train pairs of one task of the 4-task synthetic demo stream (``make_synthetic_task``'s default ``n_train``)."""
MiB = 1 << 20
PACK_TOKENS: int | None = None
"""Row budget of the ``packed`` layout (``--pack-tokens``; None = every pair of a micro-batch in one row, which
measured fastest on CPU: with segment attention a row's length costs nothing extra, and one row has no padding)."""
TASKS_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference-tasks"


# ----- configurations ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    name: str
    framework: str  # "trl" | "ours"
    precision: str  # "fp32" | "bf16" (autocast)
    reference: str  # "recomputed" | "cached"
    gradient_checkpointing: bool
    note: str
    layout: str = "concat"  # ours: the batch layout (lifealign.data.collate.collate)


CONFIGS = {
    "trl": Config(
        "trl", "trl", "bf16", "recomputed", True, "trl default DPOConfig (bf16 autocast, grad checkpointing)"
    ),
    "trl_precompute": Config("trl_precompute", "trl", "bf16", "cached", True, "trl default + precompute_ref_log_probs"),
    "trl_fp32": Config("trl_fp32", "trl", "fp32", "recomputed", False, "trl, bf16=False, gradient_checkpointing=False"),
    "ours_recompute": Config("ours_recompute", "ours", "fp32", "recomputed", False, "ours, cache_reference: false"),
    "ours": Config("ours", "ours", "fp32", "cached", False, "ours, default (cached reference)"),
    "ours_bf16": Config("ours_bf16", "ours", "bf16", "cached", False, "ours, precision: bf16 (accelerate autocast)"),
    "trl_padding_free": Config(
        "trl_padding_free", "trl", "bf16", "recomputed", True, "trl default + padding_free=True (see the report)"
    ),
    "ours_shared": Config(
        "ours_shared", "ours", "fp32", "cached", False, "ours, layout shared (prefix sharing)", layout="shared"
    ),
    "ours_packed": Config(
        "ours_packed", "ours", "fp32", "cached", False, "ours, layout packed (prefix sharing + packing)", "packed"
    ),
    "ours_packed_bf16": Config(
        "ours_packed_bf16", "ours", "bf16", "cached", False, "ours bf16, layout packed", layout="packed"
    ),
}


def selected_configs(args: argparse.Namespace) -> list[Config]:
    """``--configs`` if given, else trl's two defaults plus the fp32 and/or bf16 ones that ``--precision`` asks for."""
    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = sorted(set(names) - set(ALL_CONFIGS))
        if unknown:
            raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(ALL_CONFIGS)}")
    elif args.data:  # real pairs: today's path against prefix sharing (+ packing), trl's default and fp32 for scale
        names = ["trl", "trl_fp32", "ours", "ours_shared", "ours_packed"]
        if args.precision in ("bf16", "both"):
            names += ["ours_bf16", "ours_packed_bf16"]
    else:
        names = ["trl", "trl_precompute"]
        if args.precision in ("fp32", "both"):
            names += ["trl_fp32", "ours_recompute", "ours"]
        if args.precision in ("bf16", "both"):
            names += ["ours_bf16"]
    return [CONFIGS[n] for n in ALL_CONFIGS if n in names]


# ----- data: synthetic pairs of exact token lengths -------------------------------------------------------------------
@dataclass
class BenchData:
    """The same pairs as text (for trl, which tokenises and appends EOS itself) and as token ids (for our loop)."""

    prompt_len: int
    response_len: int
    texts: dict[str, list[str]]
    examples: list[dict[str, Any]]


def _word_tokens(tokenizer: Any) -> tuple[list[int], bool]:
    """Single-token words that re-tokenise to themselves: `` word`` tokens (BPE) or single letters (byte-level)."""
    vocab = len(tokenizer)
    spaced, letters = [], []
    for token_id in range(vocab):
        text = tokenizer.decode([token_id])
        if re.fullmatch(r" [a-z]{2,10}", text):
            spaced.append(token_id)
        elif re.fullmatch(r"[a-z]", text):
            letters.append(token_id)
    if len(spaced) >= 200:
        return spaced, True
    if letters:
        return letters, False
    raise SystemExit("the tokenizer has no single-token words to build synthetic text from")


def make_data(tokenizer: Any, pairs: int, seq_len: int, seed: int) -> BenchData:
    """``pairs`` pairs whose prompt + response is exactly ``seq_len`` tokens on both sides (response ends with EOS).

    Prompt ``seq_len // 2`` tokens, each response ``seq_len - seq_len // 2`` tokens including the EOS. The text is
    built from single-token words and checked to tokenise back to exactly these ids, prompt as a prefix.
    """
    prompt_len, response_len = seq_len // 2, seq_len - seq_len // 2
    if prompt_len < 1 or response_len < 2:
        raise SystemExit("--seq-len must be at least 4")
    words, _ = _word_tokens(tokenizer)
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    texts: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    examples: list[dict[str, Any]] = []

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for index in range(pairs):
        for _attempt in range(20):
            ids = {
                k: [rng.choice(words) for _ in range(n)]
                for k, n in (("prompt", prompt_len), ("chosen", response_len - 1), ("rejected", response_len - 1))
            }
            text = {k: tokenizer.decode(v) for k, v in ids.items()}
            if all(encode(text["prompt"] + text[side]) == ids["prompt"] + ids[side] for side in ("chosen", "rejected")):
                break
        else:
            raise SystemExit("could not build text that tokenises to exact lengths with this tokenizer")
        for k in texts:
            texts[k].append(text[k])
        examples.append(
            {
                "id": f"bench/{index}",
                "index": index,
                "prompt_ids": ids["prompt"],
                "chosen_ids": ids["chosen"] + [eos],
                "rejected_ids": ids["rejected"] + [eos],
            }
        )
    return BenchData(prompt_len, response_len, texts, examples)


def make_real_data(tokenizer: Any, args: argparse.Namespace, n_pairs: int) -> BenchData:
    """``n_pairs`` pairs of ``--data``'s train.json (a seeded sample), through the project's loader and tokenizer with
    ``data.max_length = --max-length`` (prompt end kept, response start kept, ``lifealign.data.tokenize``)."""
    from lifealign.config.schema import DataSection, TaskSection
    from lifealign.data.sources import load_task
    from lifealign.data.tokenize import tokenize_pairs

    path = Path(args.data_root) / args.data / "train.json"
    if not path.is_file():
        raise SystemExit(f"--data {args.data}: {path} does not exist (--data-root)")
    data = DataSection(max_length=args.max_length, max_prompt_length=min(256, args.max_length // 2))
    records = load_task(TaskSection(name=args.data, train=str(path)), data).train
    sample = random.Random(args.seed).sample(records, min(len(records), 2 * n_pairs))
    examples = tokenize_pairs(sample, tokenizer, data).examples[:n_pairs]
    if len(examples) < n_pairs:
        raise SystemExit(f"--data {args.data}: only {len(examples)} usable pairs, {n_pairs} needed")
    for index, ex in enumerate(examples):
        ex["index"], ex["id"] = index, f"{args.data}/{ex['id']}"
    mean = lambda key: statistics.fmean(len(ex[key]) for ex in examples)  # noqa: E731
    return BenchData(round(mean("prompt_ids")), round((mean("chosen_ids") + mean("rejected_ids")) / 2), {}, examples)


def loop_step_indices(n: int, pairs: int, steps: int, seed: int) -> list[list[int]]:
    """The example indices of each step of our loop's preference stage (task 0), as ``train_task`` draws them."""
    from lifealign.training.loop import micro_batch_indices, stage_seed

    stage = stage_seed(seed, 0, "pref")
    return [micro_batch_indices(n, stage, step, 0, 1, pairs, 0, 1) for step in range(steps)]


# ----- FLOPs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    body_linear_params: int  # frozen linear weights of the transformer body (embedding lookups cost no FLOPs)
    head_params: int  # hidden x vocab
    lora_params: int  # r * (d_in + d_out) summed over adapted layers
    layers: int
    attn_width: int  # query heads x head dim


def model_shape(model: torch.nn.Module) -> ModelShape:
    head = model.get_output_embeddings()
    body = sum(
        m.in_features * m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in n
    )
    lora = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in LORA_TARGETS:
            lora += LORA_R * (m.in_features + m.out_features)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelShape(
        body, head.in_features * head.out_features, lora, c.num_hidden_layers, c.num_attention_heads * head_dim
    )


def step_flops(shape: ModelShape, rows: int, seq_len: int, scored: int, reference_forward: bool) -> dict[str, float]:
    """FLOPs of the work one DPO step needs (the MFU convention: recomputation is not credited).

    forward  F = 2 * tokens * (P_body + P_lora) + 2 * rows * layers * T^2 * d_attn (causal QK^T and PV, half the
             square each) + 2 * scored * P_head (the LM head only where a response token is predicted);
    policy   F (forward) + F (backward of the activations through the frozen weights: one matmul per forward
             matmul) + the attention term again (its backward is two matmuls per forward one) + 2 * tokens * P_lora
             (LoRA weight gradients);
    step     policy + F for the reference forward when it is recomputed every step.
    The usual 6 * params * tokens assumes every weight gets a gradient; with LoRA the frozen weights need only the
    activation half of the backward, so a step is about 4 * params * tokens (+ 2 * params * tokens for a reference).
    """
    tokens = rows * seq_len
    attention = 2.0 * rows * shape.layers * seq_len**2 * shape.attn_width
    forward = (
        2.0 * tokens * (shape.body_linear_params + shape.lora_params) + attention + 2.0 * scored * shape.head_params
    )
    policy = 2 * forward + attention + 2.0 * tokens * shape.lora_params
    return {"forward": forward, "step": policy + (forward if reference_forward else 0.0)}


def layout_work(examples: list[dict[str, Any]], layout: str) -> dict[str, float]:
    """The token and attention work of one micro-batch in ``layout`` (trl's batches are ``concat``).

    ``tokens``: positions the model runs, padding included (rows x width); ``pair_tokens``: prompt + chosen +
    rejected; ``concat_tokens``: the concatenated rows without padding (2 x prompt + chosen + rejected);
    ``scored``: positions the LM head projects; ``attention_square``: the causal attention work in units of one
    ``L^2`` square per sequence (a ``[prompt; chosen]`` block is ``(P+C)^2``, rejected queries over the prompt and
    causally over themselves ``R (2P + R)``).
    """
    from lifealign.data.collate import collate

    p = [len(ex["prompt_ids"]) for ex in examples]
    c = [len(ex["chosen_ids"]) for ex in examples]
    r = [len(ex["rejected_ids"]) for ex in examples]
    work = {
        "pair_tokens": float(sum(p) + sum(c) + sum(r)),
        "concat_tokens": float(2 * sum(p) + sum(c) + sum(r)),
        "scored": float(sum(c) + sum(r)),
    }
    if layout == "concat":
        work["tokens"] = 2.0 * len(examples) * max(max(a + b, a + d) for a, b, d in zip(p, c, r))
        work["attention_square"] = float(sum((a + b) ** 2 + (a + d) ** 2 for a, b, d in zip(p, c, r)))
    else:
        work["tokens"] = float(collate(examples, 0, layout=layout, pack_tokens=PACK_TOKENS)["input_ids"].numel())
        work["attention_square"] = float(sum((a + b) ** 2 + d * (2 * a + d) for a, b, d in zip(p, c, r)))
    return work


def work_flops(shape: ModelShape, work: dict[str, float], reference_forward: bool) -> float:
    """``step_flops`` for a batch of ragged sequences: the same convention, tokens and attention from
    ``layout_work`` (padding positions count: the model runs them)."""
    attention = 2.0 * shape.layers * work["attention_square"] * shape.attn_width
    forward = (
        2.0 * work["tokens"] * (shape.body_linear_params + shape.lora_params)
        + attention
        + 2.0 * work["scored"] * shape.head_params
    )
    policy = 2 * forward + attention + 2.0 * work["tokens"] * shape.lora_params
    return policy + (forward if reference_forward else 0.0)


# ----- log-prob equality on the bench's batches ------------------------------------------------------------------------
def check_layouts(args: argparse.Namespace, data: BenchData, steps: list[list[int]], init_adapter: dict) -> dict:
    """fp32 log-probs of every step's batch in ``shared`` and ``packed`` against ``concat`` (today's path), and the
    LoRA gradient of the first batch's DPO-like sum ``sum(chosen - rejected)``. The adapter is the bench's initial one
    with ``lora_B`` drawn N(0, 0.01^2) (seeded): at peft's zero ``lora_B`` the adapter would not touch the values."""
    from lifealign.config.schema import LoraSection, ModelSection
    from lifealign.data.collate import collate
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora, load_lora_state
    from lifealign.training.forward import batch_logps

    model, tokenizer = load_model_and_tokenizer(ModelSection(name_or_path=args.model))
    model = attach_lora(model, LoraSection(r=LORA_R, alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS)))
    gen = torch.Generator().manual_seed(args.seed)
    load_lora_state(
        model, {k: torch.randn(v.shape, generator=gen) * 0.01 if "lora_B" in k else v for k, v in init_adapter.items()}
    )
    model.train()
    pad = tokenizer.pad_token_id
    diffs = {"shared": 0.0, "packed": 0.0}
    rel = {"shared": 0.0, "packed": 0.0}
    started = time.perf_counter()
    for k, idx in enumerate(steps[: args.check_steps]):
        examples = [data.examples[i] for i in idx]
        with torch.no_grad():
            want = batch_logps(model, collate(examples, pad))
            for layout in diffs:
                got = batch_logps(model, collate(examples, pad, layout=layout, pack_tokens=PACK_TOKENS))
                for key in want:
                    if key.endswith("_tokens") and not torch.equal(got[key], want[key]):
                        raise RuntimeError(f"{layout} counts other response tokens than concat ({key}, step {k})")
                    if key.endswith("_logps"):
                        diffs[layout] = max(diffs[layout], (got[key] - want[key]).abs().max().item())
                        rel[layout] = max(rel[layout], ((got[key] - want[key]).abs() / want[key].abs()).max().item())
    grads: dict[str, torch.Tensor] = {}
    first = [data.examples[i] for i in steps[0]]
    for layout in ("concat", "shared", "packed"):
        model.zero_grad()
        out = batch_logps(model, collate(first, pad, layout=layout, pack_tokens=PACK_TOKENS))
        (out["chosen_logps"] - out["rejected_logps"]).sum().backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    scale = grads["concat"].abs().max().item()
    return {
        "max_abs_logp_diff": max(diffs.values()),
        "abs_logp_diff": diffs,
        "rel_logp_diff": rel,
        "grad_max_abs_diff_rel_to_max": {
            layout: (grads[layout] - grads["concat"]).abs().max().item() / scale for layout in ("shared", "packed")
        },
        "batches": min(args.check_steps, len(steps)),
        "seconds": time.perf_counter() - started,
    }


# ----- one-at-a-time workers ------------------------------------------------------------------------------------------
def set_accelerate_precision(precision: str) -> None:
    """Point accelerate's process-wide state at this configuration's mixed precision.

    ``AcceleratorState`` is a singleton that ``Accelerator.autocast`` reads on every call; configurations of
    different precision share the process, so the state is switched at every turn (only one worker runs at a time).
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if "_mixed_precision" in shared:
        shared["_mixed_precision"] = "bf16" if precision == "bf16" else "no"


@dataclass
class Segment:
    label: str
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


class Worker:
    """Runs ``body(worker)`` in a thread that only makes progress during its turns.

    The body calls ``worker.pause(label)`` at the end of each segment (set-up, reference pre-computation, every
    optimizer step); the time since the turn began is recorded for that segment.
    """

    def __init__(self, config: Config, body: Callable[[Worker], None]):
        self.config, self.body = config, body
        self.segments: list[Segment] = []
        self.records: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.finished = False
        self._resume, self._paused = threading.Event(), threading.Event()
        self._start = 0.0
        self._thread = threading.Thread(target=self._run, name=config.name, daemon=True)
        self._thread.start()

    def _wait_turn(self) -> None:
        self._resume.wait()
        self._resume.clear()
        self._start = time.perf_counter()

    def _run(self) -> None:
        self._wait_turn()
        try:
            self.body(self)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            self.error = err
        finally:
            self.segments.append(Segment("finish", time.perf_counter() - self._start))
            self.finished = True
            self._paused.set()

    def pause(self, label: str, **info: Any) -> None:
        self.segments.append(Segment(label, time.perf_counter() - self._start, info))
        self._paused.set()
        self._wait_turn()

    def turn(self) -> Segment:
        """Let the worker run until its next pause; re-raise its error."""
        set_accelerate_precision(self.config.precision)
        self._paused.clear()
        self._resume.set()
        self._paused.wait()
        if self.error is not None:
            raise RuntimeError(f"configuration {self.config.name} failed") from self.error
        return self.segments[-1]

    def step_times(self) -> list[float]:
        return [s.seconds for s in self.segments if s.label == "step"]


# ----- the two frameworks ---------------------------------------------------------------------------------------------
@dataclass
class Shared:
    args: argparse.Namespace
    data: BenchData
    init_adapter: dict[str, torch.Tensor]
    total_steps: int
    out_dir: Path
    step_indices: list[list[int]] = field(default_factory=list)
    """Example indices of every step, in the order our loop visits them (``micro_batch_indices``)."""


def run_config(config: Config, shared: Shared) -> Callable[[Worker], None]:
    return (lambda w: run_trl(w, shared)) if config.framework == "trl" else (lambda w: run_ours(w, shared))


def run_ours(worker: Worker, shared: Shared) -> None:
    """Our loop through its public pieces: RunConfig -> accelerator, model + LoRA, StagePlan, StageContext."""
    from lifealign.config import config_from_dict
    from lifealign.data.records import Task
    from lifealign.engine.experiment import load_base_with_adapter, make_accelerator
    from lifealign.losses import bind_losses
    from lifealign.models.lora import load_lora_state
    from lifealign.training.loop import StageContext, StagePlan, train_task
    from lifealign.training.plugin import Plugin, PluginContext

    config, args = worker.config, shared.args
    train = {
        "lr": args.lr,
        "max_steps": shared.total_steps,
        "batch_size": args.pairs,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "seed": args.seed,
        "precision": config.precision,
        "cache_reference": config.reference == "cached",
        "progress": False,
        "save_every": 10**6,
        **layout_fields(config),
    }
    cfg = config_from_dict(
        {
            "output_dir": str(shared.out_dir / config.name),
            "model": {
                "name_or_path": args.model,
                "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "target_modules": list(LORA_TARGETS)},
            },
            "tasks": [{"name": "bench", "train": "synthetic:arithmetic"}],
            "method": {"name": "dpo", "loss": {"name": "dpo", "beta": BETA}},
            "train": train,
        }
    )
    accelerator = make_accelerator(cfg)
    model, tokenizer = load_base_with_adapter(cfg)
    load_lora_state(model, shared.init_adapter)
    model = accelerator.prepare(model)

    class StageStart(Plugin):
        name = "bench_timer"

        def before_stage(self, ctx: PluginContext) -> None:
            worker.pause("reference")  # train_task start -> here: optimizer set-up + reference pre-computation

    def write_metrics(record: dict[str, Any]) -> None:
        worker.records.append({"loss": record.get("loss"), "grad_norm": record.get("grad_norm")})
        worker.pause("step")

    loss = bind_losses(cfg.method.loss)
    stage = StageContext(
        model=model,
        tokenizer=tokenizer,
        accelerator=accelerator,
        train=cfg.train,
        data=cfg.data,
        loss=loss,
        plugins=[StageStart()],
        metrics=write_metrics,
        commit=lambda checkpoint: None,
        method_name=config.name,
        layout=cfg.train.pair_layout,
        pack_tokens=cfg.train.pack_tokens,
    )
    task = Task("bench", [], [], "pairwise", {})
    plan = StagePlan(0, task, "pref", loss, cfg.train.lr, 1.0, shared.total_steps)
    ctx = PluginContext(model=accelerator.unwrap_model(model), tokenizer=tokenizer, task=task, task_index=0)
    worker.pause("setup")
    train_task(model, shared.data.examples, plan, stage, ctx)


# ----- batch layouts in our loop -------------------------------------------------------------------------------------
LAYOUT_BY_THREAD: dict[str, Config] = {}
"""Worker thread name (= configuration name) -> configuration, for the loop's collate while it has no layout field."""


def layout_fields(config: Config) -> dict[str, Any]:
    """``train.pair_layout`` (+ ``train.pack_tokens``) when the config schema has the field; otherwise the loop's
    ``collate_pairs`` is wrapped (``patch_loop_collate``) and these stay out of the config."""
    from lifealign.config.schema import TrainSection

    if "pair_layout" not in TrainSection.model_fields:
        return {}
    fields: dict[str, Any] = {"pair_layout": config.layout}
    if "pack_tokens" in TrainSection.model_fields:
        fields["pack_tokens"] = PACK_TOKENS
    return fields


def patch_loop_collate(configs: list[Config]) -> None:
    """Route the loop's ``collate_pairs`` through ``collate(..., layout)`` of the configuration whose worker thread
    calls it, and its ``compute_reference_logps`` through the same layout (one worker runs at a time;
    configurations in ``concat`` get both unchanged)."""
    from lifealign.config.schema import TrainSection
    from lifealign.data.collate import collate
    from lifealign.training import loop

    if "pair_layout" in TrainSection.model_fields or getattr(loop.collate_pairs, "_bench_layout", False):
        return
    original = loop.collate_pairs
    LAYOUT_BY_THREAD.update({c.name: c for c in configs})

    def collate_pairs(examples: Any, pad_id: int, sides: Any = ("chosen", "rejected")) -> dict[str, Any]:
        config = LAYOUT_BY_THREAD.get(threading.current_thread().name)
        if config is None or config.layout == "concat":
            return original(examples, pad_id, sides=sides)
        return collate(examples, pad_id, sides=sides, layout=config.layout, pack_tokens=PACK_TOKENS)

    reference_logps = loop.compute_reference_logps

    def compute_reference_logps(*a: Any, **k: Any) -> Any:
        config = LAYOUT_BY_THREAD.get(threading.current_thread().name)
        if config is not None and config.layout != "concat":
            k = {**k, "layout": config.layout, "pack_tokens": PACK_TOKENS}
        return reference_logps(*a, **k)

    collate_pairs._bench_layout = True  # type: ignore[attr-defined]
    loop.collate_pairs = collate_pairs
    loop.compute_reference_logps = compute_reference_logps


def _time_trl_precompute() -> None:
    """Record how long trl's reference pre-computation takes (on the trainer, as ``_bench_precompute_s``)."""
    from trl import DPOTrainer

    original = DPOTrainer._precompute_ref_logps
    if getattr(original, "_bench_timed", False):
        return

    def timed(self: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        out = original(self, *a, **k)
        self._bench_precompute_s = getattr(self, "_bench_precompute_s", 0.0) + time.perf_counter() - start
        return out

    timed._bench_timed = True  # type: ignore[attr-defined]
    DPOTrainer._precompute_ref_logps = timed


def run_trl(worker: Worker, shared: Shared) -> None:
    """trl's DPOTrainer with its defaults except the shared batch/lr/schedule/length and the named switches."""
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from lifealign.config.schema import ModelSection
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import load_lora_state

    config, args = worker.config, shared.args
    model, tokenizer = load_model_and_tokenizer(ModelSection(name_or_path=args.model))
    overrides: dict[str, Any] = {}
    if config.name == "trl_fp32":
        overrides = {"bf16": False, "gradient_checkpointing": False}
    if config.name == "trl_padding_free":
        overrides = {"padding_free": True}
    dpo_args = DPOConfig(
        output_dir=str(shared.out_dir / config.name),
        per_device_train_batch_size=args.pairs,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_steps=shared.total_steps,
        max_length=args.max_length if args.data else args.seq_len,
        beta=BETA,
        max_grad_norm=1.0,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        precompute_ref_log_probs=config.reference == "cached",
        **overrides,
    )
    peft_config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )

    class Pauses(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            worker.pause("train_begin")

        def on_step_end(self, *a: Any, **k: Any) -> None:
            worker.pause("step")

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict[str, Any] | None = None, **k: Any) -> None:
            if logs and "grad_norm" in logs:
                worker.records[len(grad_norms)]["grad_norm"] = float(logs["grad_norm"])
                grad_norms.append(float(logs["grad_norm"]))

    grad_norms: list[float] = []
    if args.data:  # our tokenised, truncated ids, in the order our loop visits them (see _trl_takes_token_ids)
        order = [shared.data.examples[i] for step in shared.step_indices for i in step]
        dataset = datasets.Dataset.from_dict(
            {k: [ex[k] for ex in order] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        )
    else:
        dataset = datasets.Dataset.from_dict(shared.data.texts)
    trainer = DPOTrainer(
        model=model,
        args=dpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Pauses()],
    )
    load_lora_state(trainer.model, shared.init_adapter)  # the same initial adapter as ours
    if args.data:
        from torch.utils.data import SequentialSampler

        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    else:
        for i, ours in enumerate(shared.data.examples):
            row = trainer.train_dataset[i]
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                if list(row[key]) != ours[key]:
                    raise RuntimeError(f"trl tokenised pair {i} {key} differently from the bench's ids")
    worker.info["padding_free"] = bool(getattr(trainer, "padding_free", False))
    compute_loss = trainer.compute_loss

    def recorded_loss(*a: Any, **k: Any) -> Any:
        out = compute_loss(*a, **k)
        loss = out[0] if isinstance(out, tuple) else out
        worker.records.append({"loss": float(loss.detach()), "grad_norm": None})
        return out

    trainer.compute_loss = recorded_loss
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict
    worker.pause("setup", precompute=getattr(trainer, "_bench_precompute_s", 0.0))
    trainer.train()


def _trl_takes_token_ids() -> None:
    """With ``--data``, trl gets our token ids (prompt kept at its end, responses at their start, EOS / end of turn
    included: ``lifealign.data.tokenize``) instead of text, so every configuration trains on the same tokens:
    ``DPOTrainer._prepare_dataset`` passes a dataset that already has ``prompt_ids`` through unchanged (trl's own
    truncation keeps the start of prompt+response, a different policy)."""
    from trl import DPOTrainer

    original = DPOTrainer._prepare_dataset
    if getattr(original, "_bench_ids", False):
        return

    def prepare(self: Any, dataset: Any, *a: Any, **k: Any) -> Any:
        if "prompt_ids" in (getattr(dataset, "column_names", None) or []):
            return dataset
        return original(self, dataset, *a, **k)

    prepare._bench_ids = True  # type: ignore[attr-defined]
    DPOTrainer._prepare_dataset = prepare


# ----- the run ------------------------------------------------------------------------------------------------------
@dataclass
class Peaks:
    fp32: list[float] = field(default_factory=list)
    bf16: list[float] = field(default_factory=list)

    def sample(self) -> None:
        self.fp32.append(matmul_peak_gflops(torch.float32))
        self.bf16.append(matmul_peak_gflops(torch.bfloat16))


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def initial_adapter(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], ModelShape, Any]:
    """The seeded initial LoRA state every configuration starts from, the model's shape, and its tokenizer."""
    from lifealign.config.schema import LoraSection, ModelSection
    from lifealign.models.load import load_model_and_tokenizer
    from lifealign.models.lora import attach_lora, lora_state

    model, tokenizer = load_model_and_tokenizer(ModelSection(name_or_path=args.model))
    shape = model_shape(model)
    torch.manual_seed(args.seed)
    model = attach_lora(model, LoraSection(r=LORA_R, alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS)))
    return lora_state(model), shape, tokenizer


def run_rounds(workers: list[Worker], peaks: Peaks, measure_peaks: bool) -> None:
    """Turns in rotation until every worker has finished; matmul peaks are sampled once per round."""
    round_index = 0
    while not all(w.finished for w in workers):
        order = workers[round_index % len(workers) :] + workers[: round_index % len(workers)]
        for worker in order:
            if not worker.finished:
                worker.turn()
        if measure_peaks:
            peaks.sample()
        done = ", ".join(f"{w.config.name} {w.segments[-1].label} {w.segments[-1].seconds:.2f}s" for w in order)
        print(f"round {round_index}: {done}; load {load_average()[0]:.2f}", file=sys.stderr, flush=True)
        round_index += 1


def probe_memory(worker: Worker) -> dict[str, Any]:
    """Run one worker alone: its RSS before the first step, the RSS increase during its steps, the process peak."""
    while not worker.finished and (
        not worker.segments or worker.segments[-1].label not in ("reference", "train_begin")
    ):
        worker.turn()
    sampler = RssSampler()
    before_steps = sampler.current()
    with sampler:
        while not worker.finished:
            worker.turn()
    return {
        "peak_rss_mib": max_rss_bytes() / MiB,
        "rss_before_steps_mib": before_steps / MiB,
        "step_rss_increase_mib": (sampler.peak - before_steps) / MiB if sampler.available else None,
    }


def memory_probe(args: argparse.Namespace, config: Config) -> dict[str, Any] | None:
    """Peak RSS of a fresh process that runs only ``config`` for one step (the bench itself, ``--probe``)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--probe",
        "--configs",
        config.name,
        "--model",
        args.model,
        "--pairs",
        str(args.pairs),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        "1",
        "--warmup",
        "0",
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.data:
        cmd += ["--data", args.data, "--data-root", args.data_root, "--max-length", str(args.max_length)]
        cmd += ["--pool", str(args.pool), "--pack-tokens", str(args.pack_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("MEMPROBE "):
            return json.loads(line[len("MEMPROBE ") :])
    print(f"  memory probe for {config.name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return None


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def report(
    args: argparse.Namespace,
    configs: list[Config],
    workers: dict[str, Worker],
    peaks: Peaks,
    shape: ModelShape,
    data: BenchData,
    memory: dict[str, dict[str, Any] | None],
    load_start: tuple,
    wall: float,
    step_indices: list[list[int]],
    checks: dict[str, Any] | None,
) -> dict[str, Any]:
    rows, seq = 2 * args.pairs, args.seq_len
    timed = step_indices[args.warmup :]
    works = {
        layout: [layout_work([data.examples[i] for i in idx], layout) for idx in timed]
        for layout in ("concat", "shared", "packed")
    }
    totals = {layout: {k: sum(w[k] for w in ws) for k in ws[0]} for layout, ws in works.items()} if timed else {}
    tokens = totals["concat"]["concat_tokens"] / max(1, len(timed)) if timed else rows * seq
    scored = totals["concat"]["scored"] / max(1, len(timed)) if timed else rows * data.response_len
    peak32 = statistics.median(peaks.fp32) if peaks.fp32 else float("nan")
    peak16 = statistics.median(peaks.bf16) if peaks.bf16 else float("nan")
    results: dict[str, Any] = {}
    for c in configs:
        w = workers[c.name]
        times = w.step_times()[args.warmup :]
        s = summarize(times)
        recomputed = c.reference == "recomputed"
        step_work = [work_flops(shape, x, recomputed) for x in works[c.layout]] if timed else [0.0]
        flops = {"step": statistics.fmean(step_work)}
        flops["forward"] = statistics.fmean(work_flops(shape, x, False) / 2 for x in works[c.layout]) if timed else 0.0
        total_time = sum(times[: len(step_work)])
        reference_s = None
        if c.framework == "ours" and c.reference == "cached":
            reference_s = next((x.seconds for x in w.segments if x.label == "reference"), None)
        elif c.framework == "trl" and c.reference == "cached":
            reference_s = next((x.info.get("precompute") for x in w.segments if x.label == "setup"), None)
        losses = [r["loss"] for r in w.records]
        norms = [r["grad_norm"] for r in w.records]
        results[c.name] = {
            "config": c.__dict__,
            "step_seconds": s,
            "step_times": w.step_times(),
            "tokens_per_s": tokens * len(times) / total_time if s["n"] else float("nan"),
            "flops_step": flops["step"],
            "flops_forward": flops["forward"],
            "fraction_fp32_peak": sum(step_work) / total_time / (peak32 * 1e9) if s["n"] else float("nan"),
            "fraction_bf16_peak": sum(step_work) / total_time / (peak16 * 1e9) if s["n"] else float("nan"),
            "total_step_seconds": total_time,
            "padding_free_kept": w.info.get("padding_free"),
            "reference_precompute_s": reference_s,
            "losses": losses,
            "grad_norms": norms,
            "memory": memory.get(c.name),
        }

    print()
    if args.data:
        print(
            f"## train_step: {args.model}, {args.data} (max_length {args.max_length}), {args.pairs} pairs per step "
            f"(mean prompt {data.prompt_len}, mean response {data.response_len} tokens), {args.steps} timed steps "
            f"after {args.warmup} warm-up, lr {args.lr}; the same pairs in every configuration's step k"
        )
    else:
        print(
            f"## train_step: {args.model}, {args.pairs} pairs x {seq} tokens (prompt {data.prompt_len} + response "
            f"{data.response_len} incl. EOS), {args.steps} timed steps after {args.warmup} warm-up, lr {args.lr}"
        )
    print(machine_report())
    print(f"load average at start {load_start[0]:.2f}, at end {load_average()[0]:.2f}; wall {wall:.0f} s")
    print(
        f"matmul peak (median of {len(peaks.fp32)} samples, 1536^2): fp32 {fmt(peak32, '.1f')} GFLOP/s "
        f"[{fmt(min(peaks.fp32, default=float('nan')), '.1f')}-{fmt(max(peaks.fp32, default=float('nan')), '.1f')}], "
        f"bf16 {fmt(peak16, '.1f')} GFLOP/s [{fmt(min(peaks.bf16, default=float('nan')), '.1f')}-"
        f"{fmt(max(peaks.bf16, default=float('nan')), '.1f')}] (bf16/fp32 {fmt(ratio(peak16, peak32), '.2f')}x)"
    )
    print(
        f"tokens/step {tokens:.0f} (concatenated rows, no padding; {rows} sequences); scored (response) positions "
        f"{scored:.0f}; FLOP formula: see step_flops / work_flops (forward F, policy 2F + attention + LoRA grads, "
        "+ F for a recomputed reference; the positions a layout runs, padding included); tokens/s = these tokens / s"
    )
    if timed:
        t = totals
        print(
            f"tokens run per step (timed steps, mean): concat {t['concat']['tokens'] / len(timed):.0f} (padding "
            f"included), shared {t['shared']['tokens'] / len(timed):.0f}, packed {t['packed']['tokens'] / len(timed):.0f}"
            f" (pack_tokens {PACK_TOKENS}); prompt+chosen+rejected {t['concat']['pair_tokens'] / len(timed):.0f}"
        )
        print(
            "token_bound (concatenated-row tokens incl. padding / prompt+chosen+rejected): "
            f"{t['concat']['tokens'] / t['concat']['pair_tokens']:.2f}; without padding "
            f"{t['concat']['concat_tokens'] / t['concat']['pair_tokens']:.2f}; prompt+chosen+rejected / concatenated "
            f"rows without padding {t['concat']['pair_tokens'] / t['concat']['concat_tokens']:.3f}; "
            f"FLOP bound (concat step / packed step) {sum(work_flops(shape, x, False) for x in works['concat']) / sum(work_flops(shape, x, False) for x in works['packed']):.2f}"
        )
    print()
    print(
        "| config | precision | reference | s/step median (min-max) | tokens/s | GFLOP/step | % fp32 peak | "
        "% bf16 peak | peak RSS MiB | step +RSS MiB | loss step 0 | grad norm step 0 | loss last |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        r = results[c.name]
        s = r["step_seconds"]
        mem = r["memory"] or {}
        print(
            f"| {c.name} | {c.precision}{' +ckpt' if c.gradient_checkpointing else ''} | {c.reference} | "
            f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])}) | {fmt(r['tokens_per_s'], '.0f')} | "
            f"{r['flops_step'] / 1e9:.1f} | {fmt(100 * r['fraction_fp32_peak'], '.1f')} | "
            f"{fmt(100 * r['fraction_bf16_peak'], '.1f') if c.precision == 'bf16' else '-'} | "
            f"{fmt(mem.get('peak_rss_mib'), '.0f')} | {fmt(mem.get('step_rss_increase_mib'), '.0f')} | "
            f"{fmt(r['losses'][0] if r['losses'] else None, '.6f')} | "
            f"{fmt(r['grad_norms'][0] if r['grad_norms'] else None, '.6f')} | "
            f"{fmt(r['losses'][-1] if r['losses'] else None, '.6f')} |"
        )
    print()

    steps_per_epoch = math.ceil(DEMO_TASK_PAIRS / args.pairs)
    n_ref = len(data.examples)  # the pre-computation covers the whole pool
    for name in ("ours", "ours_bf16", "ours_shared", "ours_packed", "ours_packed_bf16", "trl_precompute"):
        r = results.get(name)
        if r and r["reference_precompute_s"] is not None:
            per_pair = r["reference_precompute_s"] / n_ref
            print(
                f"reference pre-computation {name}: {r['reference_precompute_s']:.3f} s for {n_ref} pairs = "
                f"{per_pair:.3f} s/pair; amortised over one epoch of a {DEMO_TASK_PAIRS}-pair demo task "
                f"({steps_per_epoch} steps of {args.pairs}): {per_pair * args.pairs:.3f} s/step "
                f"(precompute time per pair x pairs per step: the epoch size cancels)"
            )

    def paired(num: str, den: str) -> float | None:
        """Median over rounds of the per-round ratio: both steps ran in the same round, under the same load."""
        if num not in results or den not in results:
            return None
        a, b = workers[num].step_times()[args.warmup :], workers[den].step_times()[args.warmup :]
        ratios = [x / y for x, y in zip(a, b) if y > 0]
        return statistics.median(ratios) if ratios else None

    def median(name: str) -> float | None:
        r = results.get(name)
        return r["step_seconds"]["median"] if r and r["step_seconds"]["n"] else None

    print()
    ln2 = math.log(2)
    for c in configs:
        r = results[c.name]
        if r["losses"]:
            print(f"equal loss {c.name}: step-0 loss - ln 2 = {r['losses'][0] - ln2:+.2e}")
    for a, b in (
        ("ours", "trl_fp32"),
        ("ours", "ours_recompute"),
        ("ours_bf16", "trl"),
        ("ours", "ours_bf16"),
        ("ours_shared", "ours"),
        ("ours_packed", "ours"),
        ("ours_packed_bf16", "ours_bf16"),
    ):
        ra, rb = results.get(a), results.get(b)
        if ra and rb and ra["grad_norms"] and rb["grad_norms"] and ra["grad_norms"][0] and rb["grad_norms"][0]:
            g_a, g_b = ra["grad_norms"][0], rb["grad_norms"][0]
            n = min(len(ra["losses"]), len(rb["losses"]))
            print(
                f"equal loss {a} vs {b}: step-0 grad norm {g_a:.6f} vs {g_b:.6f} (rel diff {abs(g_a - g_b) / g_b:.1e}); "
                f"loss after {n} steps {ra['losses'][n - 1]:.6f} vs {rb['losses'][n - 1]:.6f} "
                f"(diff {ra['losses'][n - 1] - rb['losses'][n - 1]:+.1e})"
            )
    print()
    ours = median("ours") or median("ours_bf16")
    ours_label = "ours" if median("ours") else "ours_bf16"
    floor = results[ours_label]["flops_step"] / (peak32 * 1e9) if ours_label in results else None
    print(f"floor of the {ours_label} step at the measured fp32 peak: {fmt(floor)} s")
    lines = {
        "speedup_vs_trl_precomputed": ratio(median("trl_precompute"), ours),
        "speedup_vs_trl_fp32": ratio(median("trl_fp32"), ours),
        "cache_speedup": ratio(median("ours_recompute"), median("ours")),
        "cache_step_time_cut": (1 - median("ours") / median("ours_recompute"))
        if median("ours") and median("ours_recompute")
        else None,
        "bf16_speedup": ratio(median("ours"), median("ours_bf16")),
        "speedup_vs_trl": ratio(median("trl"), ours),
    }
    pairs_of = {
        "speedup_vs_trl_precomputed": ("trl_precompute", ours_label),
        "speedup_vs_trl_fp32": ("trl_fp32", ours_label),
        "cache_speedup": ("ours_recompute", "ours"),
        "bf16_speedup": ("ours", "ours_bf16"),
        "speedup_vs_trl": ("trl", ours_label),
        "bf16_speedup_vs_trl": ("trl", "ours_bf16"),
        "bf16_speedup_vs_trl_precomputed": ("trl_precompute", "ours_bf16"),
    }
    lines["bf16_speedup_vs_trl"] = ratio(median("trl"), median("ours_bf16"))
    lines["bf16_speedup_vs_trl_precomputed"] = ratio(median("trl_precompute"), median("ours_bf16"))
    paired_lines = {key: paired(*pair) for key, pair in pairs_of.items()}
    for key, value in lines.items():
        if key != "speedup_vs_trl":
            extra = f" (median of per-round ratios {fmt(paired_lines[key], '.2f')})" if key in paired_lines else ""
            print(f"{key}: {fmt(value, '.2f')}{extra}")
    print(f"(speedup_vs_trl median of per-round ratios: {fmt(paired_lines['speedup_vs_trl'], '.2f')})")
    if ours_label != "ours":
        print("(speedups use ours_bf16: fp32 was not run)")
    print(f"speedup_vs_trl: {fmt(lines['speedup_vs_trl'], '.2f')}")

    layout_lines, layout_paired = layout_summary(args, results, paired)
    if "trl_padding_free" in results:
        kept = results["trl_padding_free"]["padding_free_kept"]
        print(
            "trl padding_free=True: "
            + ("kept by trl" if kept else "dropped by trl 1.16 (warns and falls back to padding: a padded run)")
        )
    if checks:
        print(
            f"log-prob check (fp32, {checks['batches']} bench batches, adapter with lora_B ~ N(0, 0.01^2), "
            f"{checks['seconds']:.0f} s): max |logp - concat| shared {checks['abs_logp_diff']['shared']:.2e}, packed "
            f"{checks['abs_logp_diff']['packed']:.2e} (relative {max(checks['rel_logp_diff'].values()):.1e}); "
            "LoRA gradient of sum(chosen - rejected), max |diff| / max |grad|: "
            + ", ".join(f"{k} {v:.1e}" for k, v in checks["grad_max_abs_diff_rel_to_max"].items())
        )
    print(f"max_abs_logp_diff: {fmt(checks['max_abs_logp_diff'], '.2e') if checks else 'n/a'}")
    print(f"speedup_prefix_sharing: {fmt(layout_lines['speedup_prefix_sharing'], '.2f')}")
    return {
        "results": results,
        "peaks": {"fp32": peaks.fp32, "bf16": peaks.bf16},
        "summary": {**lines, **layout_lines},
        "paired_summary": {**paired_lines, **layout_paired},
        "checks": checks,
        "token_totals": totals,
        "cpu": cpu_features().__dict__,
        "load_start": load_start,
        "load_end": load_average(),
        "args": vars(args),
    }


def layout_summary(
    args: argparse.Namespace, results: dict[str, Any], paired: Callable[[str, str], float | None]
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """The batch-layout ratios: total time over the timed steps (the same pairs in every configuration's step k),
    and the median of per-round ratios."""

    def total(name: str) -> float | None:
        r = results.get(name)
        return r["total_step_seconds"] if r and r["step_seconds"]["n"] else None

    pairs_of = {
        "speedup_shared_only": ("ours", "ours_shared"),
        "speedup_packed_vs_trl": ("trl", "ours_packed"),
        "speedup_packed_vs_trl_fp32": ("trl_fp32", "ours_packed"),
        "bf16_speedup_prefix_sharing": ("ours_bf16", "ours_packed_bf16"),
        "speedup_prefix_sharing": ("ours", "ours_packed"),
    }
    lines = {key: ratio(total(a), total(b)) for key, (a, b) in pairs_of.items()}
    per_round = {key: paired(a, b) for key, (a, b) in pairs_of.items()}
    print()
    print("batch layouts (ratio of total step time over the timed steps; median of per-round ratios):")
    for key, value in lines.items():
        a, b = pairs_of[key]
        print(f"  {key} ({a} / {b}): {fmt(value, '.2f')} ({fmt(per_round[key], '.2f')})")
    return lines, per_round


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="smollm2-135m-instruct (default) or tiny (default with --quick)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2x sequences)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (prompt half, response half)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 4, --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per configuration")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both", help="which of our loops to run")
    p.add_argument("--configs", default="", help=f"comma-separated subset of {','.join(ALL_CONFIGS)}")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument(
        "--memory",
        choices=["probe", "none"],
        default=None,
        help="probe: peak RSS per configuration in a fresh process (default; none with --quick)",
    )
    p.add_argument(
        "--data",
        default="",
        help="real pairs: a task under --data-root (hh-rlhf-helpful-base, hh-rlhf-harmless-base, safe-rlhf, TruthfulQA)",
    )
    p.add_argument("--data-root", default=str(TASKS_ROOT), help="folder of <task>/train.json files")
    p.add_argument("--max-length", type=int, default=512, help="data.max_length for --data (prompt + response)")
    p.add_argument("--pool", type=int, default=0, help="pairs drawn for --data (default pairs x (warm-up + steps))")
    p.add_argument(
        "--pack-tokens", type=int, default=0, help="row budget of the packed layout (0: one row per micro-batch)"
    )
    p.add_argument(
        "--check-steps", type=int, default=None, help="batches of the fp32 log-prob check (default all; 0: skip)"
    )
    p.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps, no memory probes")
    p.add_argument("--json", default="", help="also write every number to this JSON file")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "smollm2-135m-instruct")
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 4)
    args.memory = args.memory or ("none" if args.quick or args.probe else "probe")
    if args.pairs < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--pairs and --steps must be >= 1, --warmup >= 0")
    args.pool = args.pool or args.pairs * (args.warmup + args.steps)
    if args.check_steps is None:
        args.check_steps = 0 if args.probe else args.warmup + args.steps
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    _time_trl_precompute()
    configs = selected_configs(args)
    load_start = load_average()
    started = time.perf_counter()
    global PACK_TOKENS
    PACK_TOKENS = args.pack_tokens or None
    init_adapter, shape, tokenizer = initial_adapter(args)
    if args.data:
        data = make_real_data(tokenizer, args, args.pool)
        _trl_takes_token_ids()
    else:
        data = make_data(tokenizer, args.pairs, args.seq_len, args.seed)
    total_steps = args.warmup + args.steps
    step_indices = loop_step_indices(len(data.examples), args.pairs, total_steps, args.seed)
    patch_loop_collate(configs)
    checks = None
    if args.check_steps and any(c.layout != "concat" for c in configs):
        checks = check_layouts(args, data, step_indices, init_adapter)
        print(f"log-prob check done: max_abs_logp_diff {checks['max_abs_logp_diff']:.2e}", file=sys.stderr, flush=True)
    peaks = Peaks()
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        shared = Shared(args, data, init_adapter, total_steps, Path(tmp), step_indices)
        workers = {c.name: Worker(c, run_config(c, shared)) for c in configs}
        if args.probe:
            print("MEMPROBE " + json.dumps(probe_memory(workers[configs[0].name])))
            return 0
        print(machine_report(), flush=True)
        peaks.sample()
        run_rounds(list(workers.values()), peaks, measure_peaks=True)
    wall = time.perf_counter() - started
    memory: dict[str, dict[str, Any] | None] = {}
    if args.memory == "probe":
        for c in configs:
            memory[c.name] = memory_probe(args, c)
    summary = report(args, configs, workers, peaks, shape, data, memory, load_start, wall, step_indices, checks)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    print(f"bench process peak RSS (every configuration resident): {max_rss_bytes() / MiB:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
