"""O-LoRA (Wang et al. 2023): one LoRA subspace per task, kept orthogonal to the earlier tasks' subspaces.

Training task t adds to the method's loss (in every stage: the authors' code adds it in the SFT and DPO trainers)

    λ1 Σ_modules Σ_{j<t} ‖A_j A_tᵀ‖²  +  λ2 Σ_modules (‖A_t‖² + ‖B_t‖²)

with ``A_t`` (r, d_in), ``B_t`` (d_out, r) the current task's LoRA factors and ``A_j`` the earlier tasks' (frozen)
``A`` matrices; ``A_j A_tᵀ`` is (r, r). ``orth_norm="squared"`` is the O-LoRA paper's squared Frobenius norm;
``"abs"`` is the sum of absolute entries that both the O-LoRA code and the LifeAlign code compute. Defaults are the
LifeAlign code's λ1 = 0.1, λ2 = 0.01.

One trainable peft adapter serves every task, as one loop with one optimizer requires:

- ``after_task`` (every task but the stream's last) *folds* the task's update into frozen per-module factors:
  ``A_old ← [A_old; A_t]`` (Σr, d_in) and ``B_old ← [B_old, s·B_t]`` (d_out, Σr) with ``s = alpha/r`` the LoRA
  scale, so the frozen update is ``ΔW_frozen = B_old A_old = Σ_{j≤t} s B_j A_j`` exactly (the O-LoRA code's
  concatenated "merged" adapter). It then re-initialises the adapter for the next task as peft does (``A`` uniform in
  ``±1/√d_in``, i.e. kaiming-uniform with a = √5, from a generator seeded by ``(seed, task)``; ``B = 0``), so the
  next task starts from a new random subspace and the function is unchanged.
- A forward hook on every LoRA'd linear layer adds ``(x A_oldᵀ) B_oldᵀ = x ΔW_frozenᵀ`` to its output, unless the
  layer's adapters are disabled: inside ``reference_context`` (peft ``disable_adapter``) the model is exactly the
  base model, so the DPO reference stays the base. With ``reference: previous`` the loop swaps only the trainable
  adapter, and the previous policy is ``base + frozen + (fresh adapter = 0)``, which is also exact.
- The last task is not folded, so the adapter the runner saves (``adapter/``, peft format) holds the **last task's
  LoRA only**; the model evaluated after every task is ``base + ΔW_frozen + current adapter``. The frozen factors
  (the whole ``ΔW_frozen`` of the earlier tasks) live in the plugin's checkpoint state (``a_old/<module>``,
  ``b_old/<module>``) and ``merged_deltas(model)`` returns the total dense ``ΔW`` per module for export.

Resume: the frozen factors are plugin state; the hooks are re-attached from any hook that receives the model, and
``load_state_dict`` also arms a one-shot process-wide forward pre-hook that attaches them on the first forward of a
model with the same LoRA modules, so an evaluation resumed before any training hook still sees them.

The model carries the hooks until ``close()`` is called: a run that trains another method on the same model object
afterwards must call it (the runner has no end-of-stream hook).

Sharded training: folding and ``merged_deltas`` run inside ``gathered_lora`` (full matrices; rank 0's re-initialised
adapter is written to every shard, see ``lifealign.models.gather``). The penalty needs the factors outside the
forward with gradients: under FSDP2 (DTensor) it uses ``full_tensor()``, which is differentiable; under ZeRO-3 and
FSDP1 there is no differentiable gather, so ``extra_loss`` raises ``ShardingError`` (use FSDP2, DDP or ZeRO-2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from lifealign.models.gather import canonical_name, full_value_for_loss
from lifealign.models.lora import gathered_lora, lora_modules
from lifealign.training.plugin import Plugin, PluginContext
from lifealign.utils.kwargs import check_range

__all__ = [
    "ORTH_NORMS",
    "OLoRAPlugin",
    "bind_on_first_forward",
    "fold_factors",
    "l2_penalty",
    "lora_layers",
    "orthogonality_penalty",
]

logger = logging.getLogger(__name__)

OrthNorm = Literal["squared", "abs"]
ORTH_NORMS: tuple[str, ...] = ("squared", "abs")


# ----- pure functions --------------------------------------------------------------------------------------------
def orthogonality_penalty(old_a: Tensor, a: Tensor, norm: str = "squared") -> Tensor:
    """``‖A_old Aᵀ‖²_F`` (``squared``) or ``Σ|A_old Aᵀ|`` (``abs``) for stacked old ``A`` rows (k, d) and ``a`` (r, d).

    With ``A_old = [A_1; …; A_{t−1}]`` this equals ``Σ_j ‖A_j Aᵀ‖`` over the blocks (the norm sums entries).
    """
    prod = old_a.to(a.dtype) @ a.T
    return prod.pow(2).sum() if norm == "squared" else prod.abs().sum()


def l2_penalty(a: Tensor, b: Tensor) -> Tensor:
    """``‖A‖²_F + ‖B‖²_F``."""
    return a.pow(2).sum() + b.pow(2).sum()


def fold_factors(
    old_a: Tensor | None, old_b: Tensor | None, a: Tensor, b: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``([A_old; A], [B_old, scale·B])``, so that ``B_new A_new = B_old A_old + scale · B A`` (float32, CPU)."""
    a32, b32 = a.detach().float().cpu(), (scale * b.detach().float()).cpu()
    if old_a is None or old_b is None:
        return a32.clone(), b32.clone()
    return torch.cat([old_a, a32], dim=0), torch.cat([old_b, b32], dim=1)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every peft LoRA layer of ``model`` by module name (without FSDP1 / checkpoint wrapper components, as
    ``lora_modules`` names them)."""
    return {canonical_name(name): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def match_module_names(available: dict[str, nn.Module], wanted: list[str]) -> dict[str, nn.Module] | None:
    """Map every wanted (checkpoint) name to the available module whose name equals it or is a dotted suffix of it
    (a wrapped model's names carry extra prefixes); None unless every wanted name has exactly one match."""
    out = {}
    for key in wanted:
        hits = [m for name, m in available.items() if key == name or key.endswith("." + name)]
        if len(hits) != 1:
            return None
        out[key] = hits[0]
    return out


def bind_on_first_forward(bind: Callable[[nn.Module], bool]) -> RemovableHandle:
    """A process-wide forward pre-hook that offers every top-level model (peft or transformers) it sees to ``bind``
    until ``bind`` returns True, then removes itself (lazy attachment after a resume, before any plugin hook)."""
    handle: RemovableHandle | None = None

    def hook(module: nn.Module, args: Any) -> None:
        if isinstance(module, PeftModel | PreTrainedModel) and bind(module):
            assert handle is not None
            handle.remove()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    return handle


def _adapters_off(layer: LoraLayer) -> bool:
    return bool(layer.disable_adapters)


# ----- the plugin ------------------------------------------------------------------------------------------------
class OLoRAPlugin(Plugin):
    """O-LoRA on one peft adapter: fold each task into frozen factors, penalise overlap with them."""

    name = "olora"

    def __init__(self, *, lam_orth: float = 0.1, lam_l2: float = 0.01, orth_norm: OrthNorm = "squared", seed: int = 0):
        self.lam_orth = check_range("lam_orth", lam_orth, low=0)
        self.lam_l2 = check_range("lam_l2", lam_l2, low=0)
        self.orth_norm = orth_norm
        self.seed = seed
        self.old_a: dict[str, Tensor] = {}
        """Module name -> stacked A of the folded tasks (Σr, d_in), CPU float32."""
        self.old_b: dict[str, Tensor] = {}
        """Module name -> scaled, stacked B of the folded tasks (d_out, Σr), CPU float32."""
        self.folded: list[int] = []
        self._model: nn.Module | None = None
        self._handles: list[RemovableHandle] = []
        self._pending: RemovableHandle | None = None
        self._cache: dict[tuple[str, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    # ----- attachment ----------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> bool:
        """Hook the frozen update into ``model``'s LoRA layers (idempotent); False if its layers do not match."""
        if self._model is model:
            return True
        layers = match_module_names(lora_layers(model), sorted(self.old_a)) if self.old_a else {}
        if layers is None:
            return False
        self.close()
        for key, layer in layers.items():
            self._handles.append(layer.register_forward_hook(self._frozen_hook(key, layer)))
        self._model = model
        return True

    def close(self) -> None:
        """Remove every hook this plugin put on a model (and a pending lazy attachment)."""
        for h in self._handles:
            h.remove()
        self._handles, self._model = [], None
        if self._pending is not None:
            self._pending.remove()
            self._pending = None

    def _ensure_attached(self, model: nn.Module) -> None:
        if self._model is not model and not self.attach(model):
            raise ValueError("olora: the model's LoRA modules do not match the plugin's frozen factors")

    def _frozen_hook(self, key: str, layer: LoraLayer) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            if _adapters_off(layer):
                return output
            x = args[0]
            a, b = self._factors_on(key, x.device, x.dtype)
            return output + ((x @ a.T) @ b.T).to(output.dtype)

        return hook

    def _factors_on(self, key: str, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cached = self._cache.get((key, device, dtype))
        if cached is None:
            cached = (self.old_a[key].to(device=device, dtype=dtype), self.old_b[key].to(device=device, dtype=dtype))
            self._cache[(key, device, dtype)] = cached
        return cached

    # ----- hooks ---------------------------------------------------------------------------------------------
    def before_task(self, ctx: PluginContext) -> None:
        self._ensure_attached(ctx.model)

    def train_data(self, ctx: PluginContext, records: list) -> list:
        self._ensure_attached(ctx.model)
        return records

    def extra_loss(self, ctx: PluginContext, batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor | None:
        self._ensure_attached(ctx.model)
        total: Tensor | None = None
        for key, (sharded_a, sharded_b) in lora_modules(ctx.model).items():
            a, b = full_value_for_loss(sharded_a), full_value_for_loss(sharded_b)
            term = self.lam_l2 * l2_penalty(a.float(), b.float())
            if key in self.old_a:
                old, _ = self._factors_on(key, a.device, torch.float32)
                term = term + self.lam_orth * orthogonality_penalty(old, a.float(), self.orth_norm)
            total = term if total is None else total + term
        return total

    def after_task(self, ctx: PluginContext) -> None:
        self._ensure_attached(ctx.model)
        if ctx.task_index in self.folded:
            logger.warning("olora: task %d already folded; not folded twice", ctx.task_index)
            return
        if self._is_last_task(ctx):
            return
        with gathered_lora(ctx.model, modify=True), torch.no_grad():
            layers = lora_layers(ctx.model)
            for i, (key, (a, b)) in enumerate(sorted(lora_modules(ctx.model).items())):
                scale = float(layers[key].scaling[_adapter_name(layers[key], a)])
                self.old_a[key], self.old_b[key] = fold_factors(self.old_a.get(key), self.old_b.get(key), a, b, scale)
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + (ctx.task_index + 1) * 1009 + i)
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=gen).to(device=a.device, dtype=a.dtype))
                b.zero_()
        self.folded.append(ctx.task_index)
        self._cache = {}
        self.close()  # re-hook: a module folded for the first time needs its hook
        self._ensure_attached(ctx.model)

    @staticmethod
    def _is_last_task(ctx: PluginContext) -> bool:
        return ctx.task_index == ctx.n_tasks - 1

    # ----- export, reporting and resume ----------------------------------------------------------------------
    def merged_deltas(self, model: nn.Module) -> dict[str, Tensor]:
        """Module name -> the total dense update ``ΔW_frozen + s·B A`` (d_out, d_in) the evaluated model applies."""
        out = {}
        with gathered_lora(model, modify=False):
            layers = lora_layers(model)
            for key, (a, b) in lora_modules(model).items():
                scale = float(layers[key].scaling[_adapter_name(layers[key], a)])
                delta = scale * (b.detach().float().cpu() @ a.detach().float().cpu())
                if key in self.old_a:
                    delta = delta + self.old_b[key] @ self.old_a[key]
                out[key] = delta
        return out

    def report(self) -> dict[str, Any]:
        n = sum(v.numel() for v in self.old_a.values()) + sum(v.numel() for v in self.old_b.values())
        ranks = sorted({v.shape[0] for v in self.old_a.values()})
        return {"folded_tasks": list(self.folded), "frozen_rank": ranks, "frozen_bytes": 4 * n}

    def state_dict(self) -> dict[str, Any]:
        tensors = {f"a_old/{k}": v for k, v in self.old_a.items()}
        tensors.update({f"b_old/{k}": v for k, v in self.old_b.items()})
        meta = {"settings": {"orth_norm": self.orth_norm}, "folded": list(self.folded)}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, meta = state.get("tensors", {}), state.get("meta", {})
        old_a = {k[len("a_old/") :]: v.float().cpu().clone() for k, v in tensors.items() if k.startswith("a_old/")}
        old_b = {k[len("b_old/") :]: v.float().cpu().clone() for k, v in tensors.items() if k.startswith("b_old/")}
        if set(old_a) != set(old_b):
            raise ValueError("olora: checkpoint has A and B factors for different modules")
        for k in old_a:
            if old_a[k].shape[0] != old_b[k].shape[1]:
                raise ValueError(f"olora: {k}: frozen A has {old_a[k].shape[0]} rows but B {old_b[k].shape[1]} columns")
        self.close()
        self.old_a, self.old_b = old_a, old_b
        self.folded = [int(t) for t in meta.get("folded", [])]
        self._cache = {}
        if self.old_a:
            self._pending = bind_on_first_forward(self._bind_lazily)

    def _bind_lazily(self, module: nn.Module) -> bool:
        if self._model is not None:
            return True
        pending, self._pending = self._pending, None
        ok = self.attach(module)
        self._pending = None if ok else pending
        return ok


def _adapter_name(layer: LoraLayer, weight: Tensor) -> str:
    """The adapter name under which ``weight`` is ``layer``'s ``lora_A`` (peft keeps one entry per adapter)."""
    for name, lin in layer.lora_A.items():
        if lin.weight is weight:
            return name
    return next(iter(layer.lora_A.keys()))
