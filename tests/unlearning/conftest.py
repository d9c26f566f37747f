"""Fixtures for the U2A tests: one torch thread (the CI box is 2 shared cores; 2 contended threads are ~30x slower
on the tiny model), and a tiny LoRA model whose A and B are both non-zero so every LoRA gradient is non-trivial."""

from __future__ import annotations

import pytest
import torch

from lifealign.config.schema import DataSection, LoraSection
from lifealign.data.records import PreferencePair
from lifealign.data.tokenize import tokenize_pairs
from lifealign.models.lora import attach_lora, lora_parameters
from lifealign.models.tiny import tiny_model_and_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every U2A test on one torch thread (see ``one_torch_thread``)."""


DATA = DataSection(max_length=96, max_prompt_length=48)


def perturbed_tiny_lora(seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.05):
    """``(peft model, tokenizer)``: the tiny model + LoRA with A and B drawn N(0, std^2) (peft starts B at 0)."""
    model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    model = attach_lora(model, LoraSection())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in lora_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model.to(dtype), tokenizer


def tokenized(records: list[PreferencePair], tokenizer, sides=("chosen", "rejected")) -> list[dict]:
    return tokenize_pairs(records, tokenizer, DATA, sides=sides).examples


@pytest.fixture
def lora_factory():
    """``perturbed_tiny_lora`` as a fixture (test modules cannot import this conftest under importlib mode)."""
    return perturbed_tiny_lora


@pytest.fixture
def tokenize():
    return tokenized
