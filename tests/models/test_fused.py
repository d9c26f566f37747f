"""Tests for lifealign.models.fused: compiled RMSNorm / SwiGLU / rotary kernels swapped in only where they agree."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama

import lifealign.models.fused as fused_module
from lifealign.models.fused import fused_elementwise, rms_norm, rotary, swiglu
from tests.helpers import perturb_lora_b

LLAMA = modeling_llama.__name__


def test_pure_kernels_equal_transformers_llama_modules():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, generator=gen), torch.randn(8, generator=gen)
    norm = modeling_llama.LlamaRMSNorm(8, eps=1e-5)
    norm.weight.data.copy_(w)
    assert torch.allclose(rms_norm(x, w, 1e-5), norm(x), rtol=0, atol=1e-6)
    row = torch.tensor([3.0, 4.0])  # mean square 12.5: the row divided by sqrt(12.5 + eps)
    assert torch.allclose(rms_norm(row, torch.ones(2), 0.0), row / 12.5**0.5)
    g, u = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([5.0, 2.0, 3.0])
    assert torch.allclose(swiglu(g, u), torch.tensor([0.0, 2.0 / (1 + torch.e**-1), 3.0 * -2.0 / (1 + torch.e**2)]))
    q, k = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 1, 3, 8, generator=gen)
    cos, sin = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 3, 8, generator=gen)
    for ours, theirs in zip(
        rotary(q, k, cos[:, None], sin[:, None]), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    ):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    half = torch.tensor([1.0, 2.0, 3.0, 4.0])  # cos 0, sin 1: x -> rotate_half(x) = [-3, -4, 1, 2]
    assert torch.equal(rotary(half, half, torch.zeros(4), torch.ones(4))[0], torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    weights = torch.linspace(-1.0, 1.0, logits.numel()).view_as(logits)
    loss = (logits * weights).sum()
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_fused_model_gives_the_eager_logits_and_lora_gradients_and_is_restored(tiny_lora_model):
    model, _ = tiny_lora_model
    perturb_lora_b(model)
    ids = torch.tensor([[258, 117, 115, 101, 114, 10, 104, 105], [104, 101, 108, 108, 111, 32, 119, 111]])
    logits, grads = _loss_and_grads(model, ids)
    original_rotary = modeling_llama.apply_rotary_pos_emb
    with fused_elementwise(model) as report:
        assert (report.rms_norm, report.mlp, report.rotary, report.skipped) == (5, 2, [LLAMA], None)
        decoder = model.get_decoder()
        assert "forward" in vars(decoder.norm) and "forward" in vars(decoder.layers[0].mlp)
        assert modeling_llama.apply_rotary_pos_emb is not original_rotary
        fused_logits, fused_grads = _loss_and_grads(model, ids)
    assert torch.allclose(fused_logits, logits, rtol=0, atol=1e-5 * logits.abs().max())
    for got, want in zip(fused_grads, grads, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max())
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert not any("forward" in vars(m) for m in model.modules())


class _GemmaNorm(nn.Module):
    """Gemma's RMSNorm: the same attributes as Llama's, another formula (``(1 + w)``)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class _GeluMLP(nn.Module):
    """A gated MLP with GELU: Llama's layout, another activation."""

    def __init__(self, width: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(width, 16), nn.Linear(width, 16), nn.Linear(16, width)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_the_probe_leaves_other_formulas_alone():
    model = nn.Sequential(_GemmaNorm(8), _GeluMLP(8), modeling_llama.LlamaRMSNorm(8))
    x = torch.randn(2, 3, 8)
    want = model(x)
    with fused_elementwise(model) as report:
        assert (report.rms_norm, report.mlp, report.rotary) == (1, 0, [])  # only the Llama norm
        assert "forward" not in vars(model[0]) and "forward" not in vars(model[1]) and "forward" in vars(model[2])
        assert torch.allclose(model(x), want, rtol=0, atol=1e-6)
    assert "forward" not in vars(model[2])


def test_everything_is_restored_after_an_error_in_the_block(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    original_rotary = modeling_llama.apply_rotary_pos_emb
    with pytest.raises(OSError, match="boom"), fused_elementwise(model) as report:
        assert report.any
        raise OSError("boom")
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert not any("forward" in vars(m) for m in model.modules())


def test_without_a_compiler_or_after_a_failed_compile_the_model_runs_eager(
    tiny_model_and_tokenizer, monkeypatch, caplog
):
    model, _ = tiny_model_and_tokenizer
    original_rotary = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(fused_module, "_compile_failure", None)
    monkeypatch.setattr(fused_module, "_warned", set())
    caplog.set_level(logging.INFO, logger=fused_module.__name__)
    with monkeypatch.context() as patch:
        patch.setattr(fused_module, "compiler_missing", lambda: "no C++ compiler for torch.compile (test)")
        with fused_elementwise(model) as report:
            assert report.skipped == "no C++ compiler for torch.compile (test)" and not report.any
            assert not any("forward" in vars(m) for m in model.modules())

    calls = []

    def broken(fn):
        def run(*args):
            calls.append(fn.__name__)
            if fn.__name__ == "swiglu":  # the norms were swapped before this fails: they must be put back
                raise RuntimeError("inductor: cannot build")
            return fn(*args)

        return run

    monkeypatch.setattr(fused_module, "_compiled", broken)
    for _ in range(2):
        with fused_elementwise(model) as report:
            assert report.skipped == "torch.compile failed (RuntimeError: inductor: cannot build)" and not report.any
            assert not any("forward" in vars(m) for m in model.modules())
            assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert calls.count("swiglu") == 1  # the second block ran eager at once, without trying again
    levels = [(r.levelname, "compile failed" in r.message) for r in caplog.records if "fused kernels off" in r.message]
    assert levels == [("WARNING", False), ("WARNING", True), ("INFO", True)]  # each reason warned once


def test_fused_rotary_hands_partial_rotary_and_other_signatures_to_the_original():
    seen = []

    def original(q, k, cos, sin, *args, **kwargs):
        seen.append((cos.shape[-1], args, kwargs))
        return q, k

    fused = fused_module._fused_rotary(original)
    q = k = torch.randn(1, 2, 3, 8)
    fused(q, k, torch.randn(1, 3, 4), torch.randn(1, 3, 4))  # rotary on half the head only
    fused(q, k, torch.randn(1, 3, 8), torch.randn(1, 3, 8), 1, "position_ids")
    assert seen == [(4, (), {}), (8, (1, "position_ids"), {})]
    full = fused(q, k, torch.zeros(1, 3, 8), torch.ones(1, 3, 8), unsqueeze_dim=1)
    assert len(seen) == 2 and torch.equal(full[0], torch.cat((-q[..., 4:], q[..., :4]), dim=-1))
