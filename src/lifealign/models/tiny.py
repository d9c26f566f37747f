"""A tiny random Llama-architecture model and a byte-level ChatML tokenizer, for tests and smoke runs.

The model has the same module names as SmolLM2 / Llama (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ...),
grouped-query attention (4 query heads, 2 key/value heads) and tied embeddings, so LoRA targeting, SLMC and the
training loop exercise the same code paths as on the real model, in milliseconds.

The tokenizer maps every byte to its own id (id == byte value, 0..255, via GPT-2's printable byte alphabet), then
four special tokens: ``<|endoftext|>`` (eos, 256), ``<|pad|>`` (257), ``<|im_start|>`` (258), ``<|im_end|>`` (259).
Any UTF-8 text round-trips exactly, so tests can compute expected token counts by hand (``len(text.encode())``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "save_tiny",
    "tiny_config",
    "tiny_model_and_tokenizer",
    "tiny_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TINY_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)
"""Special tokens, in id order after the 256 byte tokens."""

# SmolLM2's ChatML template without its default system prompt: with one token per byte a 70-character default
# system message would dominate every test sequence.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's ``bytes_to_unicode``: byte value b -> a printable character, listed in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return [mapping[b] for b in range(256)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: id of byte b is b; specials at 256..259; a ChatML chat template; no BOS."""
    vocab = {char: byte for byte, char in enumerate(_byte_alphabet())}
    for offset, token in enumerate(TINY_SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: split nothing, so every byte (spaces included) is one token and ids equal byte values.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=TINY_CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=1024,
    )


def tiny_config(vocab_size: int) -> LlamaConfig:
    """Llama config: hidden 64, 2 layers, 4 query heads / 2 key-value heads, MLP 128, tied embeddings."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=257,
        dtype="float32",
    )


def tiny_model_and_tokenizer(seed: int = 0, vocab_extra: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random fp32 Llama model (in eval mode) and the byte-level tokenizer; identical weights for the same seed.

    ``vocab_extra`` adds that many embedding rows no token maps to, as real checkpoints often have
    (``vocab_size > len(tokenizer)``). The global torch RNG is left untouched.
    """
    tokenizer = tiny_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer) + vocab_extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = model.name_or_path = "tiny"
    return model.eval(), tokenizer


def save_tiny(path: str | Path, seed: int = 0, vocab_extra: int = 0) -> Path:
    """Write the tiny model (safetensors) and tokenizer with ``save_pretrained``; returns the directory."""
    path = Path(path)
    model, tokenizer = tiny_model_and_tokenizer(seed=seed, vocab_extra=vocab_extra)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
