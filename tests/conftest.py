"""Shared fixtures: offline hub, seeded torch, fp32 default dtype, and the tiny model (plain and with LoRA)."""

from __future__ import annotations

import os
import tempfile

# Before transformers / huggingface_hub are imported anywhere: they read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's on-disk cache for the tests alone: graphs compiled under pytest pickle references to this
# conftest, which other processes cannot unpickle (they recompile, with a warning, when they share the cache).
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"lifealign-tests-inductor-{os.getuid()}")
)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_fp32_torch():
    """Every test starts from torch seed 0 and fp32 default dtype, and leaves the default dtype as it found it."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def one_torch_thread():
    """Run the test on one torch thread: tiny-model forwards take milliseconds on one thread but many times longer
    with two threads contending on the 2-core CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model_and_tokenizer():
    """A fresh tiny random Llama model (seed 0, fp32, eval mode) and its byte-level ChatML tokenizer."""
    from lifealign.models.tiny import tiny_model_and_tokenizer as build

    return build(seed=0)


@pytest.fixture
def tiny_lora_model(tiny_model_and_tokenizer):
    """``(peft_model, tokenizer)``: the tiny model with a fresh default LoRA (r=8, alpha=16, q_proj/v_proj).

    peft starts ``lora_B`` at zero, so the adapter is the identity until trained or perturbed.
    """
    from lifealign.config.schema import LoraSection
    from lifealign.models.lora import attach_lora

    model, tokenizer = tiny_model_and_tokenizer
    return attach_lora(model, LoraSection()), tokenizer
