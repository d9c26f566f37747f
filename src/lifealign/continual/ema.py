"""I-LoRA-style EMA adapters (Ren et al., 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter
Efficient Tuning", arXiv 2402.18865): a fast adapter trained as usual and a slow one that follows it by an
exponential moving average; the slow one is the model that is evaluated and that the next task starts from.

After every optimizer step ``n`` (counted from the start of the task) each LoRA tensor ``θ`` (every ``lora_A`` and
``lora_B``, as the authors' code averages adapter parameters) of the slow copy moves towards the fast one:

    θ_slow ← d_n θ_slow + (1 − d_n) θ_fast,    d_n = min(n / (n + 1), decay)  (warmup)  or  d_n = decay

so after ``k`` steps from ``θ_slow,0`` (constant ``d``): ``θ_slow,k = d^k θ_slow,0 + (1 − d) Σ_{i=1..k} d^{k−i}
θ_fast,i`` with ``θ_fast,i`` the weights after step ``i``. The warm-up ``min(1 − 1/(n+1), decay)`` and the default
``decay = 0.25`` (the weight kept on the slow copy) are the authors' code (which47/LLMCL ``method/ILORA.py``,
``update_ema_weights`` at every ``on_step_end``); with ``decay ≤ 0.5`` the warm-up never binds.

The loop has no hook after the optimizer step (``after_backward`` runs before it), so the update for step ``n`` is
applied at the next hook that sees the weights as step ``n`` left them: the next micro-batch's ``extra_loss``, the
next ``after_backward`` or ``after_stage`` (the last step). Whether a step happened is read from the stage optimizer's
own step count (AdamW's per-parameter ``state["step"]``): a step skipped for a non-finite loss or gradient, or cut by
a stop request, moves nothing, and the EMA is updated exactly once per applied step. A mid-stage checkpoint is taken
after step ``n`` and before that update, so the plugin state records the optimizer step count it has caught up to;
on resume the restored optimizer is one step ahead and the first hook applies the update with the restored
weights, which are the weights after step ``n`` — the resumed EMA equals the uninterrupted one bit for bit.

The slow copy starts each task from the adapter the task starts from (the previous task's slow copy, written at
``after_task``), in fp32; at ``after_task`` it is written into the adapter (cast to the adapter's dtype), so the
evaluation after the task, the saved ``adapter/`` and the next task all use it. A task in which no configured stage
trained (a negative-only task's unlearning stage) leaves the adapter alone.

Consistency loss (optional, ``lam > 0``, from the second task on): I-LoRA adds ``lam · L_cons(h_fast, h_slow)``
between the fast and slow models' hidden states, the slow side without gradient. Here ``h`` is the last hidden state
(the LM head's input, EasyCL's default ``hidden_state_layers = [-1]``) at every non-padding position of the
micro-batch, ``consistency="mse"`` is ``mean (h_fast − h_slow)²`` (EasyCL, ECNU-ICALK/EasyCL ``cl/ilora/ilora.py``)
and ``"one_sided"`` is the authors' code's ``MSE(h_fast, max(h_fast, h_slow))`` = ``mean max(h_slow − h_fast, 0)²``.
The fast hidden states are kept from the loop's own policy forward by a pre-hook on the LM head (attached for the
configured stages only); the slow ones come from a no-grad forward with the slow tensors swapped in by
``torch.func.functional_call`` (the head is skipped in that pass: it needs no logits). ``lam = 1`` is the authors'
``reg_weight`` (EasyCL's ``consistency_weight``).

Where we differ from the authors' code:

- their consistency term runs on a separate batch drawn from a reservoir buffer of 500 earlier samples (whose task
  loss is also averaged in) and on every layer's hidden states; here it runs on the micro-batch itself, on the last
  hidden state, and replay is the ``replay`` plugin (``configs/baselines/ema.yaml`` composes the two, so the
  replayed pairs are in the micro-batches the term sees);
- their task loop saves the fast adapter after each task and then calls a ``load_ema_model`` their class does not
  define; we evaluate and continue from the slow adapter, which is I-LoRA's slow learner as the paper describes it;
- EasyCL applies its ``ema_alpha = 0.999`` to the *fast* weights (``ema = α·default + (1 − α)·ema``), i.e.
  ``decay = 0.001`` in our convention; we follow the authors' convention (``decay`` is the slow weight);
- the EMA is over the factors ``A`` and ``B`` (as both codes do), so the slow update ``B_slow A_slow`` is not the
  average of the fast products.

Sharded training: reading and writing the adapter go through ``lora_state``/``load_lora_state`` (gathered); the
consistency term's swapped-in forward cannot run on ZeRO-3 / FSDP-sharded parameters and is refused there.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lifealign.models.gather import is_sharded
from lifealign.models.lora import load_lora_state, lora_state
from lifealign.training.head import output_head
from lifealign.training.plugin import TRAINING_STAGES, Plugin, PluginContext, TrainingStage
from lifealign.utils.kwargs import check_distinct, check_range

__all__ = ["EMAPlugin", "consistency_loss", "ema_decay", "ema_update", "optimizer_steps"]

logger = logging.getLogger(__name__)

Consistency = Literal["mse", "one_sided"]


# ----- pure functions --------------------------------------------------------------------------------------------
def ema_decay(n: int, decay: float, warmup: bool) -> float:
    """The weight kept on the slow copy at update ``n`` (1-based): ``min(n / (n + 1), decay)`` or ``decay``."""
    return min(n / (n + 1), decay) if warmup else decay


@torch.no_grad()
def ema_update(slow: dict[str, Tensor], fast: dict[str, Tensor], d: float) -> None:
    """``slow[k] ← d · slow[k] + (1 − d) · fast[k]`` in place (fp32; ``slow`` moves to ``fast``'s device)."""
    for key, value in fast.items():
        target = slow[key] if slow[key].device == value.device else slow[key].to(value.device)
        target.mul_(d).add_(value.float(), alpha=1.0 - d)
        slow[key] = target


def consistency_loss(fast: Tensor, slow: Tensor, form: str) -> Tensor:
    """``mean (fast − slow)²`` (``mse``) or ``mean max(slow − fast, 0)²`` (``one_sided``), in fp32; ``slow``
    carries no gradient. Shapes ``(P, H)``."""
    gap = fast.float() - slow.detach().float()
    if form == "one_sided":
        gap = gap.clamp_max(0.0)
    return gap.pow(2).mean()


def optimizer_steps(optimizer: torch.optim.Optimizer | None) -> int:
    """How many steps ``optimizer`` has applied: the largest per-parameter ``state["step"]`` (Adam/AdamW keep one),
    0 before the first step."""
    if optimizer is None:
        return 0
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)


# ----- the plugin ------------------------------------------------------------------------------------------------
class EMAPlugin(Plugin):
    """A slow EMA copy of the adapter, updated after every optimizer step and written into the adapter per task."""

    name = "ema"
    plain_rows_only = True  # the consistency term reads plain rows' hidden states and attention mask

    def __init__(
        self,
        *,
        decay: float = 0.25,
        warmup: bool = True,
        lam: float = 1.0,
        consistency: Consistency = "mse",
        stages: tuple[TrainingStage, ...] = TRAINING_STAGES,
    ):
        self.decay = check_range("decay", decay, low=0, high=1, high_open=True)
        self.warmup = warmup
        self.lam = check_range("lam", lam, low=0)
        self.consistency = consistency
        self.stages = check_distinct("stages", stages)
        self.slow: dict[str, Tensor] | None = None
        """The slow LoRA tensors (fp32), by peft parameter name."""
        self.slow_task: int | None = None
        """The task the slow copy was (re)started for."""
        self.task_updates = 0
        """EMA updates applied in ``slow_task`` (``n`` of the warm-up)."""
        self.following: tuple[int, str] | None = None
        """The (task, stage) whose optimizer's steps the EMA follows."""
        self.synced_steps = 0
        """That optimizer's step count when the EMA last caught up."""
        self.total_updates = 0
        self.reports: list[dict[str, Any]] = []
        self._cons: dict[str, float] = {"sum": 0.0, "n": 0}
        self._handle: RemovableHandle | None = None
        self._fast_hidden: Tensor | None = None
        self._slow_hidden: Tensor | None = None
        self._slow_pass = False

    # ----- hooks ---------------------------------------------------------------------------------------------
    def before_stage(self, ctx: PluginContext) -> None:
        self._detach()
        if ctx.stage not in self.stages:
            return
        if self.slow_task != ctx.task_index:  # the task's first configured stage: start from the adapter as it is
            self.slow = {k: v.detach().float().clone() for k, v in lora_state(ctx.model).items()}
            self.slow_task, self.task_updates, self._cons = ctx.task_index, 0, {"sum": 0.0, "n": 0}
        if self.following != (ctx.task_index, ctx.stage):  # a fresh stage (a resumed one keeps its restored count)
            self.following, self.synced_steps = (ctx.task_index, ctx.stage), optimizer_steps(ctx.optimizer)
        if self.lam > 0 and ctx.task_index > 0:
            if is_sharded(ctx.model):
                raise ValueError("ema: the consistency term cannot run on ZeRO-3/FSDP-sharded parameters; set lam: 0")
            head = output_head(ctx.model)
            if head is None:
                raise ValueError("ema: the model has no output embedding module to read hidden states from")
            self._handle = head.register_forward_pre_hook(self._head_input)

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        if ctx.stage not in self.stages:
            return None
        self._catch_up(ctx)  # the weights of this forward are those after the previous step
        if self._handle is None:
            return None
        fast, self._fast_hidden = self._fast_hidden, None
        mask = batch["attention_mask"].to(torch.bool)
        if fast is None or fast.shape[:2] != mask.shape:
            got = None if fast is None else tuple(fast.shape)
            raise RuntimeError(
                f"ema: expected the policy forward's hidden states of shape {tuple(mask.shape)}, got {got}"
            )
        slow = self._slow_forward(ctx, batch)
        mask = mask.to(fast.device)
        loss = consistency_loss(fast[mask], slow.to(fast.device)[mask], self.consistency)
        self._cons["sum"] += float(loss.detach())
        self._cons["n"] += 1
        return self.lam * loss

    def after_backward(self, ctx: PluginContext) -> None:
        if ctx.stage in self.stages:
            self._catch_up(ctx)

    def after_stage(self, ctx: PluginContext) -> None:
        if ctx.stage in self.stages:
            self._catch_up(ctx)  # the stage's last step
        self._detach()

    def after_task(self, ctx: PluginContext) -> None:
        if self.slow is None or self.slow_task != ctx.task_index or self.task_updates == 0:
            return
        fast = lora_state(ctx.model)
        num = sum(float((fast[k].float() - v.to(fast[k].device)).pow(2).sum()) for k, v in self.slow.items())
        den = sum(float(v.float().pow(2).sum()) for v in fast.values())
        load_lora_state(ctx.model, {k: v.to(dtype=fast[k].dtype) for k, v in self.slow.items()})
        n = max(int(self._cons["n"]), 1)
        self.reports.append(
            {
                "task_index": ctx.task_index,
                "task": ctx.task.name,
                "updates": self.task_updates,
                "fast_slow_distance": (num / den) ** 0.5 if den > 0 else 0.0,
                "consistency_mean": self._cons["sum"] / n if self._cons["n"] else None,
            }
        )
        logger.info("ema %s: %d updates, slow adapter written", ctx.task.name, self.task_updates)

    def close(self) -> None:
        self._detach()

    # ----- the EMA and the slow forward ----------------------------------------------------------------------
    def _catch_up(self, ctx: PluginContext) -> None:
        """Apply the EMA update of the optimizer step taken since the last call, if there was one."""
        if self.following != (ctx.task_index, ctx.stage) or self.slow is None:
            return
        steps = optimizer_steps(ctx.optimizer)
        pending = steps - self.synced_steps
        if pending == 0:
            return
        if pending != 1:
            raise RuntimeError(f"ema: {pending} optimizer steps since the last EMA update (expected at most one)")
        self.task_updates += 1
        self.total_updates += 1
        ema_update(self.slow, lora_state(ctx.model), ema_decay(self.task_updates, self.decay, self.warmup))
        self.synced_steps = steps

    @torch.no_grad()
    def _slow_forward(self, ctx: PluginContext, batch: dict[str, Any]) -> Tensor:
        """The last hidden states ``(N, T, H)`` of the slow model on the batch (eval mode, no logits computed)."""
        assert self.slow is not None
        live = dict(ctx.model.named_parameters())
        device = next(ctx.model.parameters()).device
        params = {k: v.to(device=device, dtype=live[k].dtype) for k, v in self.slow.items()}
        was_training = ctx.model.training
        ctx.model.eval()
        self._slow_pass, self._slow_hidden = True, None
        try:
            with ctx.autocast():
                torch.func.functional_call(
                    ctx.model,
                    params,
                    args=(),
                    kwargs={
                        "input_ids": batch["input_ids"].to(device),
                        "attention_mask": batch["attention_mask"].to(device),
                        "use_cache": False,
                    },
                    strict=False,
                )
        finally:
            self._slow_pass = False
            ctx.model.train(was_training)
        hidden, self._slow_hidden = self._slow_hidden, None
        if hidden is None:
            raise RuntimeError("ema: the slow forward did not reach the LM head")
        return hidden

    def _head_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if not isinstance(hidden, Tensor):
            return None
        if self._slow_pass:
            self._slow_hidden = hidden.detach()
            return (hidden[..., :0, :], *args[1:])  # no logits needed from the slow pass
        if hidden.requires_grad:
            self._fast_hidden = hidden
        return None

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._fast_hidden, self._slow_hidden = None, None, None

    # ----- reporting and resume ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Settings, total updates, and per task: updates, ``‖θ_fast − θ_slow‖ / ‖θ_fast‖`` when the slow adapter
        was written, and the mean consistency term."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "lam": self.lam,
            "consistency": self.consistency,
            "updates": self.total_updates,
            "tasks": list(self.reports),
        }

    def state_dict(self) -> dict[str, Any]:
        tensors = {f"slow/{k}": v.detach().cpu().clone() for k, v in (self.slow or {}).items()}
        meta = {
            "settings": {"decay": self.decay, "warmup": self.warmup},
            "slow_task": self.slow_task,
            "task_updates": self.task_updates,
            "following": list(self.following) if self.following is not None else None,
            "synced_steps": self.synced_steps,
            "total_updates": self.total_updates,
            "consistency": dict(self._cons),
            "reports": list(self.reports),
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, meta = state.get("tensors", {}), state.get("meta", {})
        slow = {k[len("slow/") :]: v.float().clone() for k, v in tensors.items() if k.startswith("slow/")}
        self.slow = slow or None
        self.slow_task = meta.get("slow_task")
        self.task_updates = int(meta.get("task_updates", 0))
        following = meta.get("following")
        self.following = (int(following[0]), str(following[1])) if following is not None else None
        self.synced_steps = int(meta.get("synced_steps", 0))
        self.total_updates = int(meta.get("total_updates", 0))
        cons = meta.get("consistency") or {}
        self._cons = {"sum": float(cons.get("sum", 0.0)), "n": int(cons.get("n", 0))}
        self.reports = list(meta.get("reports", []))
