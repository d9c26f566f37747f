"""Training-step benchmark: lifealign's ``train_task`` against trl 1.16's ``DPOTrainer``, alternating in one process.

Configurations (same model, LoRA r=8 on q_proj/v_proj with the same initial adapter, same batch of synthetic pairs
of exactly ``--seq-len`` tokens, same lr, DPO beta 0.1, max grad norm 1, AdamW, cosine schedule without warm-up):

- ``trl``             trl's default DPOConfig (bf16 autocast and gradient checkpointing are its defaults),
                      reference log-probs recomputed every step (adapter disabled);
- ``trl_precompute``  the same with ``precompute_ref_log_probs=True``;
- ``trl_fp32``        trl with ``bf16=False, gradient_checkpointing=False``: the like-for-like fp32 baseline;
- ``ours_recompute``  our loop, fp32, ``train.cache_reference: false``;
- ``ours``            our loop, fp32, cached reference log-probs (the default);
- ``ours_bf16``       our loop, bf16 mixed precision through accelerate, cached reference log-probs.

Each configuration runs in its own thread, but only one runs at a time: the main thread hands out turns in
rotation (one optimizer step per turn, with the order rotated every round), so every configuration sees the same
machine load. A turn ends inside the framework's own per-step hook (our ``write_metrics`` callback, trl's
``on_step_end``), so a step's time covers batch collation, forwards, backward, clipping and the optimizer step.
The reference pre-computation (ours: the start of ``train_task`` up to the ``before_stage`` hook; trl: its
``_precompute_ref_logps``) is timed separately and never counted in a step. fp32 and bf16 matmul peaks are measured
between rounds in the same run.

Usage: ``python bench/train_step.py [--model smollm2-135m-instruct|tiny] [--pairs 4] [--seq-len 128] [--steps 4]
[--warmup 1] [--precision fp32|bf16|both] [--quick]``. The last line is ``speedup_vs_trl: X``.
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

ALL_CONFIGS = ("trl", "trl_precompute", "trl_fp32", "ours_recompute", "ours", "ours_bf16")
BETA = 0.1
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
DEMO_TASK_PAIRS = 256
"""Train pairs of one task of the 4-task synthetic demo stream (``make_synthetic_task``'s default ``n_train``)."""
MiB = 1 << 20


# ----- configurations ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    name: str
    framework: str  # "trl" | "ours"
    precision: str  # "fp32" | "bf16" (autocast)
    reference: str  # "recomputed" | "cached"
    gradient_checkpointing: bool
    note: str


CONFIGS = {
    "trl": Config(
        "trl", "trl", "bf16", "recomputed", True, "trl default DPOConfig (bf16 autocast, grad checkpointing)"
    ),
    "trl_precompute": Config("trl_precompute", "trl", "bf16", "cached", True, "trl default + precompute_ref_log_probs"),
    "trl_fp32": Config("trl_fp32", "trl", "fp32", "recomputed", False, "trl, bf16=False, gradient_checkpointing=False"),
    "ours_recompute": Config("ours_recompute", "ours", "fp32", "recomputed", False, "ours, cache_reference: false"),
    "ours": Config("ours", "ours", "fp32", "cached", False, "ours, default (cached reference)"),
    "ours_bf16": Config("ours_bf16", "ours", "bf16", "cached", False, "ours, precision: bf16 (accelerate autocast)"),
}


def selected_configs(args: argparse.Namespace) -> list[Config]:
    """``--configs`` if given, else trl's two defaults plus the fp32 and/or bf16 ones that ``--precision`` asks for."""
    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = sorted(set(names) - set(ALL_CONFIGS))
        if unknown:
            raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(ALL_CONFIGS)}")
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


def run_config(config: Config, shared: Shared) -> Callable[[Worker], None]:
    return (lambda w: run_trl(w, shared)) if config.framework == "trl" else (lambda w: run_ours(w, shared))


def run_ours(worker: Worker, shared: Shared) -> None:
    """Our loop through its public pieces: RunConfig -> accelerator, model + LoRA, StagePlan, LoopServices."""
    from lifealign.config import config_from_dict
    from lifealign.data.records import Task
    from lifealign.losses import bind_losses
    from lifealign.models.lora import load_lora_state
    from lifealign.pipeline import load_base_with_adapter, make_accelerator
    from lifealign.training.loop import LoopServices, StagePlan, train_task
    from lifealign.training.plugin import Plugin, PluginContext

    config, args = worker.config, shared.args
    cfg = config_from_dict(
        {
            "output_dir": str(shared.out_dir / config.name),
            "model": {
                "name_or_path": args.model,
                "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "target_modules": list(LORA_TARGETS)},
            },
            "tasks": [{"name": "bench", "train": "synthetic:arithmetic"}],
            "method": {"name": "dpo", "loss": {"name": "dpo", "beta": BETA}},
            "train": {
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
            },
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

    services = LoopServices(
        accelerator, tokenizer, cfg.train, [StageStart()], write_metrics, lambda *a: None, method_name=config.name
    )
    task = Task("bench", [], [], "pairwise", {})
    plan = StagePlan(0, task, "pref", bind_losses(cfg.method.loss), cfg.train.lr, 1.0, shared.total_steps)
    ctx = PluginContext(model=accelerator.unwrap_model(model), tokenizer=tokenizer, task=task, task_index=0, config=cfg)
    worker.pause("setup")
    train_task(model, shared.data.examples, plan, services, ctx)


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
    dpo_args = DPOConfig(
        output_dir=str(shared.out_dir / config.name),
        per_device_train_batch_size=args.pairs,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_steps=shared.total_steps,
        max_length=args.seq_len,
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
    trainer = DPOTrainer(
        model=model,
        args=dpo_args,
        train_dataset=datasets.Dataset.from_dict(shared.data.texts),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Pauses()],
    )
    load_lora_state(trainer.model, shared.init_adapter)  # the same initial adapter as ours
    for i, ours in enumerate(shared.data.examples):
        row = trainer.train_dataset[i]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(row[key]) != ours[key]:
                raise RuntimeError(f"trl tokenised pair {i} {key} differently from the bench's ids")
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
) -> dict[str, Any]:
    rows, seq = 2 * args.pairs, args.seq_len
    tokens = rows * seq
    scored = rows * data.response_len  # every response token (incl. EOS) is predicted by the position before it
    peak32 = statistics.median(peaks.fp32) if peaks.fp32 else float("nan")
    peak16 = statistics.median(peaks.bf16) if peaks.bf16 else float("nan")
    results: dict[str, Any] = {}
    for c in configs:
        w = workers[c.name]
        times = w.step_times()[args.warmup :]
        s = summarize(times)
        flops = step_flops(shape, rows, seq, scored, reference_forward=c.reference == "recomputed")
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
            "tokens_per_s": tokens / s["median"] if s["n"] else float("nan"),
            "flops_step": flops["step"],
            "flops_forward": flops["forward"],
            "fraction_fp32_peak": flops["step"] / s["median"] / (peak32 * 1e9) if s["n"] else float("nan"),
            "fraction_bf16_peak": flops["step"] / s["median"] / (peak16 * 1e9) if s["n"] else float("nan"),
            "reference_precompute_s": reference_s,
            "losses": losses,
            "grad_norms": norms,
            "memory": memory.get(c.name),
        }

    print()
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
        f"tokens/step {tokens} ({rows} sequences); scored (response) positions {scored}; FLOP formula: see "
        "step_flops (forward F, policy 2F + attention + LoRA grads, + F for a recomputed reference)"
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
    for name in ("ours", "ours_bf16", "trl_precompute"):
        r = results.get(name)
        if r and r["reference_precompute_s"] is not None:
            per_pair = r["reference_precompute_s"] / args.pairs
            print(
                f"reference pre-computation {name}: {r['reference_precompute_s']:.3f} s for {args.pairs} pairs = "
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
    for a, b in (("ours", "trl_fp32"), ("ours", "ours_recompute"), ("ours_bf16", "trl"), ("ours", "ours_bf16")):
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
    return {
        "results": results,
        "peaks": {"fp32": peaks.fp32, "bf16": peaks.bf16},
        "summary": lines,
        "paired_summary": paired_lines,
        "cpu": cpu_features().__dict__,
        "load_start": load_start,
        "load_end": load_average(),
        "args": vars(args),
    }


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
    p.add_argument("--quick", action="store_true", help="tiny model, 2 timed steps, no memory probes")
    p.add_argument("--json", default="", help="also write every number to this JSON file")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "smollm2-135m-instruct")
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 4)
    args.memory = args.memory or ("none" if args.quick or args.probe else "probe")
    if args.pairs < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--pairs and --steps must be >= 1, --warmup >= 0")
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
    init_adapter, shape, tokenizer = initial_adapter(args)
    data = make_data(tokenizer, args.pairs, args.seq_len, args.seed)
    total_steps = args.warmup + args.steps
    peaks = Peaks()
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        shared = Shared(args, data, init_adapter, total_steps, Path(tmp))
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
    summary = report(args, configs, workers, peaks, shape, data, memory, load_start, wall)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    print(f"bench process peak RSS (every configuration resident): {max_rss_bytes() / MiB:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
