"""Base model + tokenizer loading, LoRA adapters, and the tiny test model."""

from lifealign.models.load import (
    BUNDLED_SMOLLM2_NAMES,
    ModelLoadError,
    ModelPathNotFoundError,
    ensure_pad_token,
    load_model_and_tokenizer,
    smollm2_cache_dir,
)
from lifealign.models.lora import (
    LoraStateError,
    attach_lora,
    enable_input_grads_if_checkpointing,
    load_adapter,
    load_lora_state,
    lora_modules,
    lora_parameters,
    lora_state,
    reference_context,
    save_adapter,
)
from lifealign.models.tiny import save_tiny, tiny_model_and_tokenizer

__all__ = [
    "BUNDLED_SMOLLM2_NAMES",
    "LoraStateError",
    "ModelLoadError",
    "ModelPathNotFoundError",
    "attach_lora",
    "enable_input_grads_if_checkpointing",
    "ensure_pad_token",
    "load_adapter",
    "load_lora_state",
    "load_model_and_tokenizer",
    "lora_modules",
    "lora_parameters",
    "lora_state",
    "reference_context",
    "save_adapter",
    "save_tiny",
    "smollm2_cache_dir",
    "tiny_model_and_tokenizer",
]
