"""Typed, validated run configuration: the one place where defaults live.

Every section is a pydantic model with ``extra="forbid"`` so an unknown key is an error that names its dotted
path. Numeric strings such as ``1e-5`` (which PyYAML reads as ``str``) are accepted for float fields. This module
must not import torch.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from lifealign.config.base import Section, nonfinite_keys
from lifealign.config.judge import JudgeSection
from lifealign.config.unlearn import UnlearnSection


class LoraSection(Section):
    """LoRA adapter attached with peft (LLaMA-Factory defaults, as the LifeAlign code uses)."""

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class ModelSection(Section):
    """Which base model to load and how."""

    name_or_path: str = "smollm2-135m-instruct"
    """A hub id, a local directory, ``smollm2-135m-instruct`` (the bundled GGUF) or ``tiny`` (random, for tests)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the base weights. Mixed precision is ``train.precision``."""
    trust_remote_code: bool = False
    lora: LoraSection = Field(default_factory=LoraSection)


class LossTerm(Section):
    """One weighted term of the training objective, e.g. ``{name: fpo, beta: 0.1}``.

    ``name`` picks an entry of ``lifealign.losses.LOSSES``; the other keys are keyword arguments of that loss and
    are checked against its signature when the run starts (``lifealign.losses.bind_loss``).
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "dpo"
    weight: float = 1.0

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSection(Section):
    """Tokenisation and record-validation policy shared by every task."""

    max_length: int = Field(512, ge=8)
    """Maximum prompt + response tokens. Truncation keeps the end of the prompt and the start of the response."""
    max_prompt_length: int = Field(256, ge=1)
    min_response_tokens: int = Field(1, ge=1)
    on_invalid: Literal["error", "skip"] = "error"
    """What to do with a schema violation (bad JSON, missing field, wrong type): stop, or skip and count."""
    max_skipped_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Abort a task when more than this fraction of its records is skipped."""
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (with the generation prompt) when it has one."""
    max_record_bytes: int = Field(1 << 20, gt=0)
    """Largest record a data file may hold, in bytes (1 MiB); a longer one is a schema violation
    (``record_too_large``), so a file without newlines cannot be read into memory whole as one record."""

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataSection:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length")
        return self


class TaskSection(Section):
    """One alignment task of a stream."""

    name: str
    train: str | None = None
    """A JSON/JSONL file, ``hub:<dataset name>``, or ``synthetic:<task>``."""
    test: str | None = None
    kind: Literal["pairwise", "negative"] = "pairwise"
    columns: dict[str, str] = Field(default_factory=dict)
    """Column mapping from the file's keys to ours, e.g. ``{query: prompt}``."""
    max_train: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v.startswith(".") or ".." in v:
            raise ValueError(f"task name {v!r} must be a plain name (no path separators or '..')")
        return v


class TrainSection(Section):
    """Optimisation budget and loop behaviour for one stage."""

    lr: float = Field(5e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps per stage; overrides ``epochs`` when set."""
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = Field(None, gt=0)
    """``torch.set_num_threads`` for the run; 1 is faster on a CPU shared with other jobs (default: torch's)."""
    pair_layout: Literal["concat", "shared", "packed"] = "packed"
    """How a batch of pairs goes through the model: ``concat`` (trl's: a chosen row and a rejected row, each with the
    prompt), ``shared`` (one row per pair, ``prompt | chosen | rejected``, the prompt computed once) or ``packed``
    (``shared`` rows packed without padding). All three give the same log-probs and gradients up to float rounding
    (tests/training/test_packed.py); a method whose plugins need plain rows (L2P, CPPO) runs ``concat``."""
    pack_tokens: int | None = Field(None, gt=0)
    """Row budget of ``packed`` in tokens; ``None`` = each micro-batch in one row."""
    cache_reference: bool = True
    """Compute reference log-probs once per dataset (the reference never changes within a stage)."""
    save_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_consecutive_nonfinite: int = Field(3, ge=1)
    log_every: int = Field(1, gt=0)
    tensorboard: bool = False
    progress: bool = True
    """tqdm bars (method, task and stage; evaluation; U2A scoring) with an ETA from measured step times. They turn
    themselves off when the output is not a terminal (a log file, CI), so configs can leave this on."""


class SFTSection(Section):
    """The optional SFT stage on the chosen responses before the preference stage of each task."""

    enabled: bool = False
    lr: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)


def _component_name(component: Any) -> str | None:
    """The ``name`` of a loss term or plugin spec given as a mapping or as a section."""
    return component.get("name") if isinstance(component, dict) else getattr(component, "name", None)


class PluginSpec(Section):
    """One continual-learning plugin of a method, e.g. ``{name: slmc, theta: 0.9, lam: 0.5}``.

    ``name`` picks an entry of ``lifealign.continual.METHODS``; the other keys are arguments of that plugin's
    constructor, checked against its signature when the config is bound (``lifealign.engine.specs``).
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MethodSection(Section):
    """A continual method: a named list of plugins plus the loss, e.g. LifeAlign = fpo + [replay, slmc]."""

    name: str = "seqft"
    """The key under which this method's scores are stored (``seqft``, ``lifealign``, ...). Left out, it is made
    from the loss and plugin names (``dpo``, ``fpo+replay+slmc``), so an override of the loss relabels the run."""
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="dpo")])
    plugins: list[PluginSpec] = Field(default_factory=list)
    """``[{name: replay, buffer_size: 3000}, {name: slmc, theta: 0.9, lam: 0.5}]``; run in this order."""
    runner: Literal["sequential", "mtl", "stl"] = "sequential"
    reference: Literal["base", "previous"] = "base"
    """``base``: the model with the adapter disabled (LifeAlign); ``previous``: the policy after the previous task."""

    @field_validator("loss", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="before")
    @classmethod
    def _name_from_components(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "name" in data or "loss" not in data:
            return data
        loss = data["loss"] if isinstance(data["loss"], list) else [data["loss"]]
        parts = [_component_name(c) for c in [*loss, *data.get("plugins", [])]]
        return {**data, "name": "+".join(p for p in parts if p)} if all(parts) else data


class ConventionsSection(Section):
    """How the summary metrics and the text metrics are computed; each choice is recorded in scores.json.

    The names are those of ``lifealign.evaluation.matrix.CONVENTIONS`` and ``lifealign.evaluation.scorers.CONVENTIONS``
    (a test keeps them equal); docs/METHODS.md says where each comes from.
    """

    bwt: Literal["lifealign", "n_tasks"] = "lifealign"
    """``lifealign``: BWT averaged over the first N−1 tasks (the paper); ``n_tasks``: over N (the last adds 0)."""
    forgetting: Literal["chaudhry", "final"] = "chaudhry"
    """``chaudhry``: the best score since learning minus the final one; ``final``: the diagonal minus the final."""
    fwt: Literal["untrained", "all_prior"] = "untrained"
    """``untrained``: score before learning minus the untrained model's; ``all_prior``: mean over every earlier row."""
    bleu4: Literal["llamafactory", "sacrebleu"] = "llamafactory"
    """``llamafactory``: the LifeAlign paper's numbers (LLaMA-Factory's per-sentence nltk BLEU-4 on characters,
    smoothing method 3, ×100); ``sacrebleu``: sentence BLEU with the 13a tokenizer and exp smoothing."""
    rouge_l: Literal["llamafactory", "rouge_score"] = "llamafactory"
    """``llamafactory``: rouge-chinese ROUGE-L F on jieba words (the paper's); ``rouge_score``: Google's rouge-score."""


class EvalSection(Section):
    """Which scorers run after every task and on what."""

    scorers: list[str] = Field(default_factory=lambda: ["pref_acc"])
    on: Literal["seen", "all"] = "seen"
    max_examples: int | None = Field(64, gt=0)
    generation_examples: int = Field(16, ge=0)
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(8, gt=0)
    drift: bool = True
    judge: JudgeSection | None = None
    """The LLM judge's endpoint (scorer ``judge``); the key is read from the env variable ``judge.api_key_env``."""
    reward_model: str | None = None
    """Local path of a sequence-classification reward model (scorer ``reward_model``)."""
    conventions: ConventionsSection = Field(default_factory=ConventionsSection)
    n_boot: int = Field(2000, ge=100)
    """Bootstrap replicates behind every standard error, interval and paired test (``lifealign.evaluation.stats``)."""
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    """Level of every interval; comparisons test at ``1 − ci_level``."""
    baseline: str = "seqft"
    """The method every other one is compared with (paired tests); LifeAlign is a second reference when present."""


class RunConfig(Section):
    """A whole run: model, data policy, tasks, method(s), optimisation and evaluation.

    Set ``method`` (one method) or ``methods`` (a comparison), not both: ``lifealign.config.load_config`` refuses a
    file that sets both, and a dump of a config with ``methods`` leaves the unused ``method`` out, so a run folder's
    ``config.yaml`` loads again. ``output_dir`` expands ``~``. No number anywhere in the config may be NaN or infinite,
    including the untyped loss keyword arguments and plugin options.
    """

    output_dir: str = "runs/default"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    tasks: list[TaskSection] = Field(default_factory=list)
    method: MethodSection = Field(default_factory=MethodSection)
    methods: list[MethodSection] = Field(default_factory=list)
    """Several methods compared on the same stream (each gets its own sub-folder); empty = just ``method``."""
    train: TrainSection = Field(default_factory=TrainSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    unlearn: UnlearnSection = Field(default_factory=UnlearnSection)
    """U2A (``lifealign unlearn``) and the negative-only tasks of a stream."""
    orders: list[list[str]] = Field(default_factory=list)
    """Named task orders for ``lifealign run --orders K`` (each a permutation of the tasks' names), e.g. the LifeAlign
    paper's forward, reverse and 3→1→6→4→2→5 orders; past them, ``--orders`` draws seeded permutations."""

    @model_validator(mode="after")
    def _orders_are_permutations(self) -> RunConfig:
        names = sorted(t.name for t in self.tasks)
        for i, order in enumerate(self.orders):
            if sorted(order) != names:
                raise ValueError(f"orders.{i}: {order} is not a permutation of the task names {names}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        bad = nonfinite_keys(data)
        if bad:
            listed = ", ".join(f"{'.'.join(str(k) for k in key)} = {value}" for key, value in bad)
            raise ValueError(f"every number must be finite; got {listed}")
        return data

    @field_validator("output_dir")
    @classmethod
    def _expand_home(cls, v: str) -> str:
        return os.path.expanduser(v)

    @model_serializer(mode="wrap")
    def _without_unused_method(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.methods and isinstance(data, dict):
            data.pop("method", None)
        return data

    def all_methods(self) -> list[MethodSection]:
        return list(self.methods) if self.methods else [self.method]
