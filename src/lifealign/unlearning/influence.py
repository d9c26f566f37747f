"""Impact scores: how unlearning each candidate moves the preference objective J (METHODS.md §2.2, ADDENDUM B).

Inner problem ``F(theta, w) = sum_i w_i l_i(theta) + lambda R(theta)`` with ``l_i`` the *minimised* unlearning loss of
candidate i (GA: ``log pi(y_i|x_i) / |y_i|``; NPO; SimNPO; GradDiff's forget term). By the implicit function
theorem at a stationary point ``theta*(w)``::

    dJ(theta*)/dw_i = -grad J^T H^-1 grad l_i,      H = d^2 F / d theta^2,

and this module returns the *score* ``s_i = <H^-1 grad J, grad l_i>`` (``H = I`` by default, U2A's code; LiSSA or
conjugate gradient over exact Hessian-vector products by option), so ``dJ/dw_i = -s_i``: a positive score means
unlearning candidate i lowers J (see ``selection.py`` for the sign discussion). J is the DPO loss (beta 0.3) on the
preference set with the original model as reference (adapter disabled), averaged over pairs.

All gradients are over the trainable LoRA parameters only. For one LoRA linear layer ``y = W x + s B A x`` with
``A (r, d_in)``, ``B (d_out, r)``, ``h = A x`` and ``u = B h`` (the output of ``lora_B``), let ``g_t = dL/du_t``
(this already carries the scaling ``s``). Then ``grad_B = sum_t g_t h_t^T`` and ``grad_A = sum_t (B^T g_t) x_t^T``,
so for a direction ``(G_A, G_B)``::

    <G_B, grad_B l_i> + <G_A, grad_A l_i> = sum_{t in i} g_t^T (G_B h_t + B G_A x_t) = sum_t (g_t^T [G_B | B]) . [h_t ; G_A x_t]

``fast_scores`` captures ``h`` and ``q = G_A x`` with forward hooks and the ``g_t`` of every example with ONE
``autograd.grad`` of the summed per-example losses (examples are independent in a batch, so the output gradients of
example i's tokens are those of ``l_i``), then contracts per token and sums each example's tokens: no per-example
backward. In fp32 every LoRA layer runs merged for the scoring, ``y = (W + s B A) x`` as one matmul
(``_merged_lora``; the original weights are put back untouched), and the hooks take ``[h ; q] = x [A ; G_A]^T`` and
``g = s dL/dy`` there: the same numbers without the adapter path's memory-bound rank-``r`` passes. With
``fused=True`` (U2A's ``unlearn.score_fused``) the model's RMSNorms, SwiGLU and rotary embedding run there as fused
compiled kernels (``models/fused.py``). By default the candidates are *packed* (``packed.py``): several per row up to
a token budget, each with its own positions and attention, so no FLOP is spent on padding and each score is still
that of its candidate alone; ``packing=False`` pads every batch to its longest candidate instead. ``naive_scores`` is
the reference implementation (one backward per example). Scores are taken in eval mode (LoRA dropout off), so both
compute the gradient of the same deterministic loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from lifealign.data.collate import collate_pairs
from lifealign.data.packing import pack_rows
from lifealign.losses import LOSSES, CombinedLoss
from lifealign.models.fused import fused_elementwise
from lifealign.training.forward import batch_logps, loss_inputs
from lifealign.unlearning.packed import Attention, pack_examples, packed_logps, packing_unsupported

__all__ = [
    "Direction",
    "ScoreResult",
    "conjugate_gradient",
    "direction_dot",
    "fast_scores",
    "flatten_direction",
    "impact_scores",
    "inverse_hvp",
    "lissa",
    "lora_layers",
    "naive_scores",
    "per_example_unlearn_losses",
    "preference_gradient",
    "unflatten_direction",
    "unlearn_hvp",
]

Direction = dict[str, tuple[Tensor, Tensor]]
"""A vector on the LoRA parameters: module name -> ``(on A (r, d_in), on B (d_out, r))``."""

logger = logging.getLogger(__name__)

FORGET = ("rejected",)
PAIR = ("chosen", "rejected")
Precision = Literal["fp32", "bf16"]


# ----- LoRA layers and directions ---------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Each LoRA'd module name -> its active adapter's ``(lora_A, lora_B)`` linear modules (plain LoRA only)."""
    layers: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = module.active_adapters[0]
            if adapter in module.lora_A:
                if adapter in getattr(module, "lora_variant", {}):
                    raise ValueError(f"{name}: LoRA variants (DoRA, ...) are not supported by the fast scores")
                layers[name] = (module.lora_A[adapter], module.lora_B[adapter])
    if not layers:
        raise ValueError("the model has no LoRA layer: impact scores are over LoRA parameters")
    return layers


def _params(layers: dict[str, tuple[nn.Module, nn.Module]]) -> list[nn.Parameter]:
    return [p for a, b in layers.values() for p in (a.weight, b.weight)]


def _as_direction(layers: dict[str, tuple[nn.Module, nn.Module]], tensors: Sequence[Tensor]) -> Direction:
    it = iter(tensors)
    return {name: (next(it), next(it)) for name in layers}


def flatten_direction(d: Direction) -> Tensor:
    """All tensors of ``d`` concatenated (fp32), in the direction's key order."""
    return torch.cat([t.reshape(-1).float() for pair in d.values() for t in pair])


def unflatten_direction(flat: Tensor, like: Direction) -> Direction:
    """The inverse of ``flatten_direction`` with the shapes of ``like``."""
    out: Direction = {}
    pos = 0
    for name, (a, b) in like.items():
        na, nb = a.numel(), b.numel()
        out[name] = (flat[pos : pos + na].view_as(a), flat[pos + na : pos + na + nb].view_as(b))
        pos += na + nb
    return out


def direction_dot(d1: Direction, d2: Direction) -> float:
    """``<d1, d2>`` in fp64 (both directions over the same LoRA layers)."""
    return float(torch.dot(flatten_direction(d1).double(), flatten_direction(d2).double()))


@contextlib.contextmanager
def _scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) with autograd on; the training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _autocast(precision: Precision, model: nn.Module) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device for ``precision="bf16"``; the contractions stay fp32 regardless."""
    if precision == "bf16":
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----- losses ----------------------------------------------------------------------------------------------------


def per_example_unlearn_losses(loss: CombinedLoss, policy: dict[str, Tensor], ref_logps: Tensor | None) -> Tensor:
    """``l_i`` for each example ``(B,)``: the weighted sum of the loss's terms, un-reduced (the minimised loss)."""
    inputs = loss_inputs(policy, ref_logps, FORGET)
    return torch.stack([term.weight * term(inputs).losses for term in loss.terms]).sum(0)


def _ref_rows(ref_logps: Tensor | None, idx: slice) -> Tensor | None:
    return None if ref_logps is None else ref_logps[idx]


def preference_gradient(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    ref_logps: Tensor,
    *,
    pad_id: int,
    beta: float,
    batch_size: int = 8,
    precision: Precision = "fp32",
) -> tuple[float, Direction]:
    """``(J, grad J)``: the mean DPO loss over the preference pairs (``ref_logps (n, 2)``: chosen, rejected of the
    reference) and its gradient on the LoRA parameters."""
    layers = lora_layers(model)
    params = _params(layers)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    total, n = 0.0, len(examples)
    dpo = LOSSES["dpo"].fn
    with _scoring_mode(model):
        for start in range(0, n, batch_size):
            batch = collate_pairs(examples[start : start + batch_size], pad_id, sides=PAIR)
            with _autocast(precision, model):
                policy = batch_logps(model, batch)
            losses = dpo(loss_inputs(policy, ref_logps[start : start + batch_size], PAIR), beta=beta).losses
            part = losses.sum() / n
            for acc, g in zip(grads, torch.autograd.grad(part, params)):
                acc += g.float()
            total += float(part.detach())
    return total, _as_direction(layers, grads)


# ----- per-example scores -----------------------------------------------------------------------------------------


def _contract(g: Tensor, m: Tensor, z: Tensor) -> Tensor:
    """Per-token ``(g_t^T m) . z_t``: ``g (N, T, d_out)``, ``m (d_out, 2r)``, ``z (N, T, 2r)`` -> ``(N, T)`` fp32."""
    return ((g.float() @ m.to(g.device)) * z).sum(-1)


_H = TypeVar("_H", bound="_Hooks")


class _Hooks:
    """Forward hooks registered for one forward + backward (``with``); ``u`` keeps, per LoRA layer, the output whose
    gradient the scores contract."""

    def __init__(self) -> None:
        self.u: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def _register(self) -> Iterator[Any]:
        raise NotImplementedError

    def __enter__(self: _H) -> _H:
        self._handles = list(self._register())
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _LoraCapture(_Hooks):
    """Forward hooks that keep, per LoRA layer, ``h = A x`` (lora_B's input), ``q = G_A x`` and ``u = B h``."""

    def __init__(self, layers: dict[str, tuple[nn.Module, nn.Module]], direction: Direction):
        super().__init__()
        self.layers, self.direction = layers, direction
        self.h: dict[str, Tensor] = {}
        self.q: dict[str, Tensor] = {}

    def _register(self) -> Iterator[Any]:
        for name, (lora_a, lora_b) in self.layers.items():
            yield lora_a.register_forward_hook(self._on_a(name))
            yield lora_b.register_forward_hook(self._on_b(name))

    def _on_a(self, name: str) -> Callable[..., None]:
        g_a = self.direction[name][0]

        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if name in self.q:
                raise RuntimeError(f"{name}: LoRA layer called twice in one forward; fast scores need one call")
            x = args[0]
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                self.q[name] = x.float() @ g_a.t().to(x.device)  # (N, T, r)

        return hook

    def _on_b(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            self.h[name] = args[0].detach().float()  # (N, T, r)
            self.u[name] = out  # (N, T, d_out), its gradient is g

        return hook

    def contract(self, grads: Sequence[Tensor | None]) -> Tensor:
        """Per-token ``sum_layers (g_t^T [G_B | B]) . [h_t ; q_t]``, shape ``(N, T)``, fp32."""
        total: Tensor | None = None
        for name, g in zip(self.u, grads):
            if g is None:  # the layer does not reach the loss
                continue
            g_b = self.direction[name][1]
            b = self.layers[name][1].weight.detach()
            part = _contract(g, torch.cat([g_b, b.float()], dim=1), torch.cat([self.h[name], self.q[name]], dim=-1))
            total = part if total is None else total + part
        if total is None:
            raise RuntimeError("no LoRA layer received a gradient from the unlearning loss")
        return total


@dataclass
class _Merged:
    """One LoRA layer run as a single linear layer ``y = (W + s B A) x`` while scoring."""

    base: nn.Linear  # the wrapped layer, its weight swapped for the merged one
    weight: nn.Parameter  # the layer's own weight, put back untouched after
    adapter: str
    az: Tensor  # (d_in, 2r): [A ; G_A]^T, so x az = [h ; q]
    m: Tensor  # (d_out, 2r): s [G_B | B], since dL/du = s dL/dy


def _mergeable(module: nn.Module, adapter: str) -> bool:
    """A plain fp32 ``nn.Linear`` LoRA layer with one active adapter, not merged: merging it changes no digit that
    matters (a bf16 weight would round the small ``s B A`` away, so those keep the adapter path)."""
    base = module.get_base_layer()
    return (
        type(base) is nn.Linear
        and base.weight.dtype == torch.float32
        and not getattr(module, "fan_in_fan_out", False)
        and not module.merged
        and len(module.active_adapters) == 1
        and not getattr(module, "lora_bias", {}).get(adapter, False)
    )


@contextlib.contextmanager
def _merged_lora(model: nn.Module, direction: Direction, precision: Precision) -> Iterator[dict[str, _Merged] | None]:
    """Every LoRA layer as ONE linear layer ``W + s B A`` for the duration, or None (nothing changed) when some
    layer cannot be merged or ``precision`` is bf16 (autocast would round the merged weight to bf16).

    The adapter path of a LoRA layer costs, per token, two rank-``r`` matmuls that each read or write a ``d``-wide
    row, a scaling and an add, and as much again in the backward: a few percent of the step, all memory-bound. The
    scores need only ``x``, ``h = A x`` and ``dL/du = s dL/dy`` at each layer, which the merged layer gives as well
    (``[h ; q] = x [A ; G_A]^T``, one matmul). peft's own merge is emulated without its in-place add: the layer's
    weight is swapped for ``W + s B A`` and peft is told the adapter is merged, so its forward calls the base layer
    alone; both are put back after, the original weight untouched (an unmerge would leave rounding in ``W``).
    """
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in lora_layers(model)}
    adapters = {name: layer.active_adapters[0] for name, layer in layers.items()}
    if precision != "fp32" or not all(_mergeable(layer, adapters[name]) for name, layer in layers.items()):
        yield None
        return
    merged: dict[str, _Merged] = {}
    try:
        for name, layer in layers.items():
            adapter = adapters[name]
            base = layer.get_base_layer()
            a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
            s = float(layer.scaling[adapter])
            g_a, g_b = (t.to(a.device, torch.float32) for t in direction[name])
            entry = _Merged(
                base=base,
                weight=base.weight,
                adapter=adapter,
                az=torch.cat([a.float(), g_a], dim=0).t().contiguous(),
                m=torch.cat([g_b, b.float()], dim=1) * s,
            )
            base.weight = nn.Parameter(torch.addmm(base.weight.detach(), b, a, alpha=s), requires_grad=False)
            layer.merged_adapters.append(adapter)
            merged[name] = entry
        yield merged
    finally:
        for name, entry in merged.items():
            entry.base.weight = entry.weight
            layers[name].merged_adapters.remove(entry.adapter)


class _MergedCapture(_Hooks):
    """Forward hooks on the merged layers that keep ``z = [h ; q] = x [A ; G_A]^T`` and the output ``u = y``."""

    def __init__(self, merged: dict[str, _Merged]):
        super().__init__()
        self.merged = merged
        self.z: dict[str, Tensor] = {}

    def _register(self) -> Iterator[Any]:
        for name, entry in self.merged.items():
            yield entry.base.register_forward_hook(self._on_layer(name))

    def _on_layer(self, name: str) -> Callable[..., None]:
        az = self.merged[name].az

        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if name in self.z:
                raise RuntimeError(f"{name}: LoRA layer called twice in one forward; fast scores need one call")
            with torch.no_grad():
                self.z[name] = args[0].float() @ az.to(args[0].device)  # (N, T, 2r)
            if not out.requires_grad:  # below the first LoRA layer nothing is trainable: the graph starts here
                out.requires_grad_()
            self.u[name] = out  # (N, T, d_out), its gradient is dL/dy

        return hook

    def contract(self, grads: Sequence[Tensor | None]) -> Tensor:
        """Per-token ``sum_layers (dL/dy_t^T s [G_B | B]) . [h_t ; q_t]``, shape ``(N, T)``, fp32."""
        parts = [_contract(g, self.merged[name].m, self.z[name]) for name, g in zip(self.u, grads) if g is not None]
        if not parts:
            raise RuntimeError("no LoRA layer received a gradient from the unlearning loss")
        return torch.stack(parts).sum(0)


def _capture(
    layers: dict[str, tuple[nn.Module, nn.Module]], direction: Direction, merged: dict[str, _Merged] | None
) -> _LoraCapture | _MergedCapture:
    return _LoraCapture(layers, direction) if merged is None else _MergedCapture(merged)


def _fused(model: nn.Module, merged: dict[str, _Merged] | None, fused: bool) -> contextlib.AbstractContextManager:
    """The fused elementwise kernels on the fp32 merged path when asked for; the model as it is otherwise."""
    return fused_elementwise(model) if fused and merged is not None else contextlib.nullcontext()


def _progress(batches: Sequence[Any], n_examples: int) -> Any:
    """A tqdm bar over the scoring batches (with its ETA); off when the output is not a terminal."""
    return tqdm(batches, desc=f"U2A impact scores ({n_examples} candidates)", unit="batch", leave=False, disable=None)


def fast_scores(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    direction: Direction,
    loss: CombinedLoss,
    *,
    pad_id: int,
    ref_logps: Tensor | None = None,
    batch_size: int = 8,
    precision: Precision = "fp32",
    packing: bool = True,
    token_budget: int | None = None,
    attention: Attention = "segments",
    fused: bool = False,
) -> Tensor:
    """``s_i = <direction, grad l_i>`` for every example ``(n,)`` fp32, one forward + one backward per row or batch.

    ``examples`` carry ``rejected_ids`` (the forget response); ``ref_logps (n, 1)`` the reference log-probs when
    the loss needs them (NPO). Packed (default): rows of at most ``token_budget`` tokens, by default
    ``batch_size`` times the longest candidate, i.e. never more tokens than a padded batch would hold; ``attention``
    picks the packed attention (``packed.py``). A model that cannot be packed (``packing_unsupported``) is padded.
    ``packing=False``: batches of ``batch_size`` padded to their longest candidate. ``fused``: on the fp32 merged
    path, the model's RMSNorms, gated MLPs and rotary embedding run as compiled fused kernels
    (``models/fused.py``; eager where they cannot be built).
    """
    if not examples:
        return torch.zeros(0)
    reason = packing_unsupported(model) if packing else None
    if reason is not None:
        logger.info("impact scores padded, not packed: %s", reason)
    if packing and reason is None:
        lengths = [len(ex["prompt_ids"]) + len(ex["rejected_ids"]) for ex in examples]
        budget = token_budget if token_budget is not None else batch_size * max(lengths)
        rows = pack_rows(lengths, budget)
        return _scores_by_row(model, examples, direction, loss, rows, ref_logps, precision, attention, fused)
    layers = lora_layers(model)
    out: list[Tensor] = []
    with _scoring_mode(model), _merged_lora(model, direction, precision) as merged, _fused(model, merged, fused):
        for start in _progress(range(0, len(examples), batch_size), len(examples)):
            batch = collate_pairs(examples[start : start + batch_size], pad_id, sides=FORGET)
            with _capture(layers, direction, merged) as cap:
                with _autocast(precision, model):
                    policy = batch_logps(model, batch)
                total = per_example_unlearn_losses(loss, policy, _ref_rows(ref_logps, slice(start, start + batch_size)))
                outputs = list(cap.u.values())
                grads = torch.autograd.grad(total.sum(), outputs, allow_unused=True)
                out.append(cap.contract(grads).sum(1).detach().cpu())  # padding tokens contribute g = 0
    return torch.cat(out)


def _scores_by_row(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    direction: Direction,
    loss: CombinedLoss,
    rows: list[list[int]],
    ref_logps: Tensor | None,
    precision: Precision,
    attention: Attention,
    fused: bool,
) -> Tensor:
    """``fast_scores`` over packed rows: each row's token contributions summed per segment, then put in place."""
    layers = lora_layers(model)
    scores = torch.zeros(len(examples))
    with _scoring_mode(model), _merged_lora(model, direction, precision) as merged, _fused(model, merged, fused):
        for row in _progress(rows, len(examples)):
            packed = pack_examples([examples[i] for i in row])
            index = torch.tensor(row)
            with _capture(layers, direction, merged) as cap:
                with _autocast(precision, model):
                    logps, n_tokens = packed_logps(model, packed, attention)
                policy = {"rejected_logps": logps, "rejected_tokens": n_tokens}
                total = per_example_unlearn_losses(loss, policy, None if ref_logps is None else ref_logps[index])
                outputs = list(cap.u.values())
                grads = torch.autograd.grad(total.sum(), outputs, allow_unused=True)
                per_token = cap.contract(grads)[0].detach()  # (T,)
            segment = packed.segment.to(per_token.device)
            sums = per_token.new_zeros(len(row), dtype=torch.float64).index_add(0, segment, per_token.double())
            scores[index] = sums.float().cpu()
    return scores


def naive_scores(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    direction: Direction,
    loss: CombinedLoss,
    *,
    pad_id: int,
    ref_logps: Tensor | None = None,
    precision: Precision = "fp32",
) -> Tensor:
    """The reference implementation of ``fast_scores``: one backward per example and a flat dot product."""
    layers = lora_layers(model)
    params = _params(layers)
    flat_dir = flatten_direction(direction)
    scores = torch.zeros(len(examples))
    with _scoring_mode(model):
        for i, example in enumerate(examples):
            batch = collate_pairs([example], pad_id, sides=FORGET)
            with _autocast(precision, model):
                policy = batch_logps(model, batch)
            value = per_example_unlearn_losses(loss, policy, _ref_rows(ref_logps, slice(i, i + 1))).sum()
            grads = torch.autograd.grad(value, params)
            scores[i] = torch.dot(torch.cat([g.reshape(-1).float() for g in grads]), flat_dir.to(grads[0].device))
    return scores


# ----- Hessian-vector products and the inverse ---------------------------------------------------------------------


def unlearn_hvp(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    weights: Tensor,
    loss: CombinedLoss,
    *,
    pad_id: int,
    reg_weight: float = 0.0,
    ref_logps: Tensor | None = None,
    batch_size: int = 8,
) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` (flat fp32) for ``F = mean_i w_i l_i + lambda_reg mean_p ||theta_p - theta_0,p||^2``.

    Exact (Pearlmutter) products by double backward, with the math attention kernel (the fused CPU/flash kernels
    have no second derivative). The regulariser adds ``(2 lambda / P) v`` with P the number of LoRA tensors.
    """
    layers = lora_layers(model)
    params = _params(layers)
    n = len(examples)
    reg_curvature = 2.0 * reg_weight / len(params)

    def hvp(v: Tensor) -> Tensor:
        vs = [t.to(p.dtype) for t, p in zip(_split_flat(v, params), params)]
        out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        with _scoring_mode(model), sdpa_kernel([SDPBackend.MATH]):
            for start in range(0, n, batch_size):
                batch = collate_pairs(examples[start : start + batch_size], pad_id, sides=FORGET)
                policy = batch_logps(model, batch)
                losses = per_example_unlearn_losses(
                    loss, policy, _ref_rows(ref_logps, slice(start, start + batch_size))
                )
                part = (weights[start : start + batch_size].to(losses) * losses).sum() / n
                grads = torch.autograd.grad(part, params, create_graph=True)
                dot = sum((g * t).sum() for g, t in zip(grads, vs))
                for acc, hv in zip(out, torch.autograd.grad(dot, params)):
                    acc += hv.float()
        return torch.cat([o.reshape(-1) for o in out]) + reg_curvature * v

    return hvp


def _split_flat(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, pos = [], 0
    for p in params:
        out.append(flat[pos : pos + p.numel()].view_as(p))
        pos += p.numel()
    return out


def conjugate_gradient(
    hvp: Callable[[Tensor], Tensor], b: Tensor, *, damping: float = 0.0, iters: int = 10, tol: float = 1e-10
) -> Tensor:
    """Solve ``(H + damping I) x = b`` by conjugate gradient (H symmetric positive definite after damping)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    for _ in range(iters):
        if rs.sqrt() <= tol * max(1.0, float(b.norm())):
            break
        hp = hvp(p) + damping * p
        alpha = rs / torch.dot(p, hp)
        x = x + alpha * p
        r = r - alpha * hp
        rs_new = torch.dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def lissa(
    hvp: Callable[[Tensor], Tensor], b: Tensor, *, damping: float = 0.0, scale: float = 10.0, iters: int = 10
) -> Tensor:
    """LiSSA (Agarwal et al. 2017): ``v_{j+1} = b + (I - (H + damping I)/scale) v_j``, result ``v_J / scale``.

    Converges to ``(H + damping I)^-1 b`` when the damped Hessian's eigenvalues lie in ``(0, 2 scale)``.
    """
    v = b.clone()
    for _ in range(iters):
        v = b + v - (hvp(v) + damping * v) / scale
    return v / scale


def inverse_hvp(
    method: Literal["identity", "lissa", "cg"],
    hvp: Callable[[Tensor], Tensor] | None,
    b: Tensor,
    *,
    damping: float,
    iters: int,
    scale: float,
) -> Tensor:
    """``H^-1 b`` by the configured method (``identity`` returns ``b``)."""
    if method == "identity":
        return b
    if hvp is None:
        raise ValueError(f"hessian={method!r} needs a Hessian-vector product")
    if method == "cg":
        return conjugate_gradient(hvp, b, damping=damping, iters=iters)
    return lissa(hvp, b, damping=damping, scale=scale, iters=iters)


# ----- the whole score ----------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Scores ``s (n,)``, the objective J at the current parameters and ``||grad J||``."""

    scores: Tensor
    objective: float
    grad_norm: float


def impact_scores(
    model: nn.Module,
    candidates: Sequence[dict[str, Any]],
    preference: Sequence[dict[str, Any]],
    loss: CombinedLoss,
    *,
    pad_id: int,
    pref_ref_logps: Tensor,
    cand_ref_logps: Tensor | None = None,
    beta: float = 0.3,
    batch_size: int = 8,
    precision: Precision = "fp32",
    hessian: Literal["identity", "lissa", "cg"] = "identity",
    hessian_examples: Sequence[dict[str, Any]] = (),
    hessian_weights: Tensor | None = None,
    hessian_ref_logps: Tensor | None = None,
    reg_weight: float = 0.0,
    damping: float = 0.01,
    iters: int = 10,
    lissa_scale: float = 10.0,
    packing: bool = True,
    token_budget: int | None = None,
    fused: bool = False,
) -> ScoreResult:
    """``s_i = <H^-1 grad J, grad l_i>`` for every candidate (``dJ/dw_i = -s_i``), by ``fast_scores`` (packed by
    default; ``packing``, ``token_budget``, ``fused`` as there)."""
    objective, grad_j = preference_gradient(
        model, preference, pref_ref_logps, pad_id=pad_id, beta=beta, batch_size=batch_size, precision=precision
    )
    direction = grad_j
    if hessian != "identity":
        weights = hessian_weights if hessian_weights is not None else torch.ones(len(hessian_examples))
        hvp = unlearn_hvp(
            model,
            hessian_examples,
            weights,
            loss,
            pad_id=pad_id,
            reg_weight=reg_weight,
            ref_logps=hessian_ref_logps,
            batch_size=batch_size,
        )
        solved = inverse_hvp(hessian, hvp, flatten_direction(grad_j), damping=damping, iters=iters, scale=lissa_scale)
        direction = unflatten_direction(solved, grad_j)
    scores = fast_scores(
        model,
        candidates,
        direction,
        loss,
        pad_id=pad_id,
        ref_logps=cand_ref_logps,
        batch_size=batch_size,
        precision=precision,
        packing=packing,
        token_budget=token_budget,
        fused=fused,
    )
    return ScoreResult(scores=scores, objective=objective, grad_norm=float(flatten_direction(grad_j).norm()))
