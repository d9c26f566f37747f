"""Learning without Forgetting (Li & Hoiem, TPAMI 2017) for preference streams: distil the previous task's policy on
the current task's data.

Li & Hoiem train the new task with ``λ_o L_old(Y_o, Ŷ_o) + L_new`` where ``Y_o`` are the old network's outputs on
the *new* task's inputs, recorded before training, and ``L_old`` is the knowledge-distillation cross-entropy between
temperature-softened distributions (``T = 2``, ``λ_o = 1``); against fixed old outputs that cross-entropy is
``KL(p_old^T ‖ p_θ^T)`` plus a constant. A causal LM classifies the next token at every position, so here the
"outputs" are the next-token distributions at the response positions of the current batch (teacher-forced), and
``extra_loss`` returns

    lam · T² · mean_{t ∈ R} KL( softmax(z_old,t / T) ‖ softmax(z_θ,t / T) )

with ``R`` every position that predicts a response token of the micro-batch (chosen and rejected rows of the
preference stage, chosen rows of the SFT stage: the rows the method's loss scores), ``z`` the logits over the whole
vocabulary, and ``T²`` Hinton's factor that keeps the gradient scale independent of ``T`` (the gradient with respect
to ``z_θ,t`` is ``T · (softmax(z_θ,t/T) − softmax(z_old,t/T)) / |R|``). The mean over tokens is EasyCL's
``kl_div(..., reduction="batchmean")`` over the flattened valid tokens (``lwf.py`` of ECNU-ICALK/EasyCL, the LifeAlign
lab's toolkit, with ``lwf_temperature = 2.0`` and ``lwf_alpha = 0.5`` weighting ``(1 − α) CE + α KD``, i.e. the
same 1:1 ratio as ``lam = 1`` here).

Why this direction and these tokens: forward KL with the old policy as the target is LwF's objective (cross-entropy
against the recorded soft targets); it keeps probability mass wherever ``π_old`` put it over the whole vocabulary,
where matching summed log-probs of the two responses (CPPO's knowledge-retention term, ``continual/cppo.py``)
constrains one scalar per sequence and leaves the rest of each distribution free. Both responses are inputs of the
new task, so both are distilled; prompt tokens are not scored by any loss of the loop and are left out.

``π_old`` is the adapter at ``before_task`` (the policy at the end of the previous task). During the first task there
is nothing to distil and no term. The teacher's logits come from a no-grad forward with the snapshot's LoRA tensors
swapped in by ``torch.func.functional_call`` (the live parameters are untouched), in eval mode (no LoRA dropout:
the recorded outputs of the old network) and under the run's autocast. The student's logits are not recomputed:
a forward hook on the LM head, attached for the stages the plugin acts in, keeps the head's output of the loop's own
policy forward (the only forward of the micro-batch that requires grad before ``extra_loss``), which
``lifealign.training.forward.scored_logits`` restricts to exactly the positions ``R`` in row-major order; the teacher
goes through the same function, so the two row sets are aligned (and equal logits give exactly zero).

Where we differ from EasyCL: its LwF is an SFT method that also replaces the task loss by ``(1 − α) CE``; here the
method's loss (DPO, FPO, ...) is untouched and the KD term is added with weight ``lam``. The teacher is the previous
task's adapter held in memory (EasyCL loads ``previous_task_model`` from disk or caches its logits per sample).
Under ZeRO-3 / FSDP1 the swapped-in forward cannot run on sharded parameters; the plugin refuses them (use DDP,
ZeRO-2 or FSDP2).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lifealign.models.gather import is_sharded
from lifealign.models.lora import lora_state
from lifealign.training.forward import scored_logits
from lifealign.training.head import output_head
from lifealign.training.plugin import TRAINING_STAGES, Plugin, PluginContext, TrainingStage
from lifealign.utils.kwargs import check_distinct, check_range

__all__ = ["LwFPlugin", "distillation_kl", "teacher_logits"]

logger = logging.getLogger(__name__)


# ----- pure functions --------------------------------------------------------------------------------------------
def distillation_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) ‖ softmax(student / T))`` per row: logits ``(M, V)`` -> ``(M,)``, in fp32.

    Equal rows give exactly 0 (the two log-softmaxes are bitwise equal); the teacher carries no gradient.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        log_q = F.log_softmax(student.float() / temperature, dim=-1)
        log_p = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class _Scored(nn.Module):
    """``scored_logits`` of ``model`` as a module, so that ``functional_call`` can swap LoRA tensors into it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, scored: Tensor) -> Tensor:
        return scored_logits(self.model, input_ids, attention_mask, scored)


@torch.no_grad()
def teacher_logits(model: nn.Module, batch: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """Logits ``(M, V)`` of ``model`` with its LoRA tensors replaced by ``state``, at the positions that predict a
    response token of a ``concat`` batch (row-major, as ``batch_logps`` scores them); eval mode, no grad, the model's
    own parameters untouched."""
    if batch.get("layout", "concat") != "concat":
        raise ValueError(f"lwf: batches in layout {batch['layout']!r} are not supported (the loop collates concat)")
    wrapper = _Scored(model)
    names = {n for n, _ in wrapper.named_parameters()}
    params = {f"model.{k}": v for k, v in state.items()}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"lwf: snapshot tensors {unknown[:3]} are not parameters of the model")
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    scored = batch["completion_mask"].to(device)[:, 1:].bool()  # (N, T-1): position t-1 predicts token t
    was_training = model.training
    model.eval()
    try:
        return torch.func.functional_call(
            wrapper,
            {k: v.to(device) for k, v in params.items()},
            args=(input_ids, batch["attention_mask"].to(device), scored),
            strict=False,
        )
    finally:
        model.train(was_training)


# ----- the plugin ------------------------------------------------------------------------------------------------
class LwFPlugin(Plugin):
    """LwF: token-level distillation of the previous task's policy on the current task's responses."""

    name = "lwf"
    plain_rows_only = True  # teacher and student logits on plain rows: functional_call of scored_logits

    def __init__(
        self, *, lam: float = 1.0, temperature: float = 2.0, stages: tuple[TrainingStage, ...] = TRAINING_STAGES
    ):
        self.lam = check_range("lam", lam, low=0)
        self.temperature = check_range("temperature", temperature, low=0, low_open=True)
        self.stages = check_distinct("stages", stages)
        self.old_state: dict[str, Tensor] | None = None
        """π_old: the LoRA tensors at ``before_task`` of a task after the first (CPU)."""
        self.snapshot_task: int | None = None
        self.stats: dict[str, dict[str, float]] = {}
        """``t<i>:<stage>`` -> running ``kl_mean`` (the mean of the per-micro-batch token-mean KL) and counts."""
        self._handle: RemovableHandle | None = None
        self._captured: Tensor | None = None
        self._teacher_pass = False

    # ----- hooks ---------------------------------------------------------------------------------------------
    def before_task(self, ctx: PluginContext) -> None:
        if ctx.task_index == 0:
            self.old_state, self.snapshot_task = None, None
            return
        self.old_state = {k: v.detach().cpu().clone() for k, v in lora_state(ctx.model).items()}
        self.snapshot_task = ctx.task_index

    def before_stage(self, ctx: PluginContext) -> None:
        self._detach()
        if ctx.stage not in self.stages or self.old_state is None or self.lam == 0:
            return
        if is_sharded(ctx.model):
            raise ValueError("lwf: the teacher forward cannot run on ZeRO-3/FSDP-sharded parameters; use DDP or ZeRO-2")
        head = output_head(ctx.model)
        if head is None:
            raise ValueError("lwf: the model has no output embedding module to read the student's logits from")
        self._handle = head.register_forward_hook(self._keep_student_logits)

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        if self._handle is None or ctx.stage not in self.stages or self.old_state is None:
            return None
        student, self._captured = self._captured, None
        n_scored = int(batch["completion_mask"][:, 1:].sum())
        if student is None or student.dim() != 2 or student.shape[0] != n_scored:
            got = None if student is None else tuple(student.shape)
            raise RuntimeError(
                f"lwf: expected the policy forward's logits for {n_scored} response positions, got {got}"
            )
        self._teacher_pass = True
        try:
            with ctx.autocast():
                teacher = teacher_logits(ctx.model, batch, self.old_state)
        finally:
            self._teacher_pass = False
        if n_scored == 0:
            return student.sum() * 0.0
        kl = distillation_kl(student, teacher.to(student.device), self.temperature).mean()
        self._record(ctx, float(kl.detach()), n_scored)
        return self.lam * self.temperature**2 * kl

    def after_stage(self, ctx: PluginContext) -> None:
        self._detach()

    def close(self) -> None:
        self._detach()

    def _keep_student_logits(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._teacher_pass and isinstance(output, Tensor) and output.requires_grad:
            self._captured = output

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._captured = None, None

    def _record(self, ctx: PluginContext, kl: float, tokens: int) -> None:
        entry = self.stats.setdefault(
            f"t{ctx.task_index}:{ctx.stage}", {"kl_mean": 0.0, "micro_batches": 0, "tokens": 0}
        )
        n = entry["micro_batches"] + 1
        entry["kl_mean"] += (kl - entry["kl_mean"]) / n
        entry["micro_batches"], entry["tokens"] = n, entry["tokens"] + tokens

    # ----- reporting and resume ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Settings, the task whose start is the teacher, and the mean token KL per task and stage."""
        return {
            "lam": self.lam,
            "temperature": self.temperature,
            "snapshot_task": self.snapshot_task,
            "teacher_parameters": sum(v.numel() for v in (self.old_state or {}).values()),
            "kl": {k: dict(v) for k, v in self.stats.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        tensors = {f"old/{k}": v for k, v in (self.old_state or {}).items()}
        return {"tensors": tensors, "meta": {"snapshot_task": self.snapshot_task, "stats": self.stats}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, meta = state.get("tensors", {}), state.get("meta", {})
        old = {k[len("old/") :]: v.clone() for k, v in tensors.items() if k.startswith("old/")}
        self.old_state = old or None
        self.snapshot_task = meta.get("snapshot_task")
        self.stats = {k: dict(v) for k, v in (meta.get("stats") or {}).items()}
