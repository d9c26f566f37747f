"""Fused elementwise kernels for a decoder's RMSNorm, SiLU-gated MLP and rotary embedding, built by ``torch.compile``.

In eager PyTorch every elementwise step of a decoder layer is its own pass over memory, forward and backward:
RMSNorm ``w * (x / sqrt(mean(x^2) + eps))`` is five (square, mean, rsqrt, two products), the gated MLP's
``silu(g) * u`` two (three in the backward), rotary ``x cos + rotate_half(x) sin`` five per tensor. On a CPU these
passes are memory-bound and, once the matmuls run near their peak, a sizeable share of a step (about 14 % of the U2A
scorer's time here, BENCHMARKS.md). ``fused_elementwise(model)`` swaps, for the duration of a ``with`` block, each
of them for one function compiled by inductor (``torch.compile``: one fused loop forward, one backward), the same
formula in the same precision (RMSNorm's statistics in fp32, as Llama's).

Only what provably computes the same is swapped. Each candidate is *probed*: its own forward and the fused one run
on a small random input and must agree to ``PROBE_RTOL``, so a norm with another formula (Gemma's ``(1 + w)``), an
MLP with another activation or layout, or a partial rotary is left alone. What was swapped, and why nothing was
(no C++ compiler, a failed compile), is returned as a :class:`FusedReport`; a model with nothing to fuse runs as
before. Everything is put back on exit, also after an exception.

Swapped: the ``forward`` of each RMSNorm (a module with a 1-D ``weight`` and a float ``variance_epsilon``, as
Llama, Mistral, Qwen2 and SmolLM define it) and of each MLP with ``gate_proj``, ``up_proj``, ``down_proj`` and
``act_fn`` (the projections are still called as modules, so their hooks and LoRA adapters run), as attributes of the
instance; and the ``apply_rotary_pos_emb`` of the attention modules' Python module (shared by every model of that
architecture in the process while the block runs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PROBE_RTOL", "FusedReport", "fused_elementwise", "rms_norm", "rotary", "swiglu"]

logger = logging.getLogger(__name__)

PROBE_RTOL = 1e-4
"""A fused forward must match the module's own within this, relative to the output's largest magnitude."""

ROTARY = "apply_rotary_pos_emb"
FUSED_MARK = "_lifealign_fused"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``w * (x / sqrt(mean(x^2) + eps))`` over the last dimension, the statistics in fp32, back in ``x``'s dtype
    before the weight (Llama's ``LlamaRMSNorm``)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, the gated MLP's hidden activation (Shazeer 2020, SwiGLU)."""
    return F.silu(gate) * up


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``x cos + rotate_half(x) sin`` for ``x = q, k``, ``rotate_half(x) = [-x2, x1]`` of the two halves of the last
    dimension (RoFormer, Su et al. 2021, in Llama's half-split layout); ``cos``, ``sin`` broadcast against both."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


_compile_failure: str | None = None
"""Why the first compile in this process failed (later blocks run eager at once instead of failing again)."""


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled once per process for any shape (``dynamic=True``: no recompile per batch length)."""
    return torch.compile(fn, dynamic=True)


@dataclass
class FusedReport:
    """What ``fused_elementwise`` swapped: counts per kind, and the reason when it swapped nothing it could have."""

    rms_norm: int = 0
    mlp: int = 0
    rotary: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def any(self) -> bool:
        return bool(self.rms_norm or self.mlp or self.rotary)


def compiler_missing() -> str | None:
    """Why inductor cannot build CPU kernels here (no C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 — any failure to find a compiler means: run eager
        return f"no C++ compiler for torch.compile ({type(exc).__name__}: {exc})"
    return None


def _agrees(own: Tensor, fused: Tensor) -> bool:
    scale = float(own.abs().max()) if own.numel() else 0.0
    return own.shape == fused.shape and bool(((own - fused).abs() <= PROBE_RTOL * max(scale, 1e-6)).all())


def _probe_input(module: nn.Module, width: int) -> Tensor:
    param = next(module.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(2, 3, width, generator=gen).to(param.device, param.dtype)


def _rms_norm_forward(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    fused = _compiled(rms_norm)
    return lambda x: fused(x, module.weight, eps)


def _mlp_forward(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if not all(isinstance(part, nn.Module) for part in parts):
        return None
    gate, up, down, _ = parts
    fused = _compiled(swiglu)
    return lambda x: down(fused(gate(x), up(x)))


def _swap_forward(module: nn.Module, fused: Callable[[Tensor], Tensor], width: int) -> bool:
    """Set ``module.forward = fused`` when both agree on a random input; False (nothing set) otherwise."""
    if "forward" in vars(module):  # someone else's wrapper (accelerate's hooks): leave it alone
        return False
    with torch.no_grad():
        x = _probe_input(module, width)
        try:
            own = type(module).forward(module, x)
        except Exception:  # noqa: BLE001 — a forward of another signature: not one of ours
            return False
        if not isinstance(own, Tensor) or not _agrees(own, fused(x)):  # a failure of fused() propagates
            return False
    module.forward = fused
    return True


def _rotary_namespaces(model: nn.Module) -> dict[str, ModuleType]:
    names = {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}
    return {name: sys.modules[name] for name in sorted(names) if callable(getattr(sys.modules.get(name), ROTARY, None))}


def _fused_rotary(original: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
    fused = _compiled(rotary)

    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any, **kwargs: Any) -> Any:
        unsqueeze_dim = kwargs.pop("unsqueeze_dim", args[0] if args else 1)
        if args[1:] or kwargs or cos.shape[-1] != q.shape[-1]:  # another signature, or a partial rotary
            return original(q, k, cos, sin, *args, **kwargs)
        return fused(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))

    apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _rotary_agrees(original: Callable[..., Any], fused: Callable[..., Any], head_dim: int) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = torch.randn(1, 2, 3, head_dim, generator=gen), torch.randn(1, 1, 3, head_dim, generator=gen)
    cos, sin = torch.randn(1, 3, head_dim, generator=gen), torch.randn(1, 3, head_dim, generator=gen)
    with torch.no_grad():
        try:
            own = original(q, k, cos, sin)
        except Exception:  # noqa: BLE001 — another signature: leave it
            return False
        return all(_agrees(a, b) for a, b in zip(own, fused(q, k, cos, sin)))


def _head_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and config is not None and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    return head_dim if isinstance(head_dim, int) and head_dim % 2 == 0 else None


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    """A warning the first time a reason comes up in this process, an info line after (U2A scores every round)."""
    logger.log(logging.INFO if reason in _warned else logging.WARNING, "fused kernels off: %s", reason)
    _warned.add(reason)


@contextlib.contextmanager
def fused_elementwise(model: nn.Module) -> Iterator[FusedReport]:
    """For the ``with`` block, run ``model``'s RMSNorms, gated MLPs and rotary embedding through fused kernels.

    Yields a :class:`FusedReport`. Nothing is swapped (and the report says why) when inductor has no C++ compiler
    or its first compile fails; each module is swapped only when its probe agrees. All is restored on exit.
    """
    global _compile_failure
    report = FusedReport()
    report.skipped = _compile_failure or compiler_missing()
    if report.skipped is not None:
        _warn_once(report.skipped)
        yield report
        return
    swapped: list[nn.Module] = []
    patched: list[tuple[ModuleType, Callable[..., Any]]] = []
    try:
        _swap_all(model, report, swapped, patched)
    except BaseException as exc:
        _restore(swapped, patched)
        if not isinstance(exc, Exception):
            raise
        _compile_failure = f"torch.compile failed ({type(exc).__name__}: {exc})"
        _warn_once(_compile_failure)
        yield FusedReport(skipped=_compile_failure)
        return
    logger.info("fused kernels: %d RMSNorm, %d MLP, rotary in %s", report.rms_norm, report.mlp, report.rotary)
    try:
        yield report
    finally:
        _restore(swapped, patched)


def _swap_all(
    model: nn.Module, report: FusedReport, swapped: list[nn.Module], patched: list[tuple[ModuleType, Callable]]
) -> None:
    for module in model.modules():
        norm = _rms_norm_forward(module)
        if norm is not None and _swap_forward(module, norm, module.weight.shape[0]):
            swapped.append(module)
            report.rms_norm += 1
            continue
        mlp = _mlp_forward(module)
        width = getattr(getattr(module, "gate_proj", None), "in_features", None)
        if mlp is not None and isinstance(width, int) and _swap_forward(module, mlp, width):
            swapped.append(module)
            report.mlp += 1
    head_dim = _head_dim(model)
    for name, namespace in _rotary_namespaces(model).items():
        original = getattr(namespace, ROTARY)
        if head_dim is None or getattr(original, FUSED_MARK, False):  # no even head size, or already fused
            continue
        fused = _fused_rotary(original)
        if _rotary_agrees(original, fused, head_dim):
            setattr(fused, FUSED_MARK, True)
            setattr(namespace, ROTARY, fused)
            patched.append((namespace, original))
            report.rotary.append(name)


def _restore(swapped: list[nn.Module], patched: list[tuple[ModuleType, Callable[..., Any]]]) -> None:
    for module in swapped:
        vars(module).pop("forward", None)
    for namespace, original in reversed(patched):
        setattr(namespace, ROTARY, original)
