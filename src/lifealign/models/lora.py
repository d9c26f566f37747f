"""LoRA adapters with peft: attach, disable (the reference policy), snapshot/restore, save/load.

A LoRA'd linear layer computes ``h = W x + (alpha / r) * B A x`` with the base ``W`` frozen, ``A`` of shape
``(r, d_in)`` and ``B`` of shape ``(d_out, r)`` (peft initialises ``B = 0``, so a fresh adapter is the identity
update). LifeAlign's reference policy ``pi_ref`` is the base model, i.e. the same network with the adapter
disabled (METHODS.md §1.2), so no second copy of the weights is kept.

Tensor names are peft's parameter names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``):
they depend only on the architecture and adapter name, so they are stable across processes and usable as
checkpoint keys. Under FSDP1 or activation checkpointing, wrapper components (``_fsdp_wrapped_module.``) are
removed from the names this module returns (:func:`~lifealign.models.gather.canonical_name`), so the keys are the
same whatever wraps the model.

Sharded training (ZeRO-3, FSDP1, FSDP2): :func:`lora_state` and :func:`load_lora_state` gather the full adapter
weights themselves (:func:`gathered_lora`); code that reads or edits whole LoRA matrices through
:func:`lora_modules` must do so inside ``with gathered_lora(model, modify=...)`` and look the modules up inside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lifealign.config.schema import LoraSection
from lifealign.models.gather import canonical_name, gathered_parameters

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdapterError",
    "AdapterNotFoundError",
    "LoraStateError",
    "attach_lora",
    "check_adapter_dir",
    "enable_input_grads_if_checkpointing",
    "gathered_lora",
    "load_adapter",
    "load_lora_state",
    "lora_modules",
    "lora_parameters",
    "lora_state",
    "read_adapter_weights",
    "reference_context",
    "save_adapter",
]

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_LORA_WEIGHT = re.compile(r"\.lora_[AB]\.")


class LoraStateError(ValueError):
    """A LoRA state or saved adapter does not match the model's adapter (missing, unexpected or mis-shaped keys)."""


class AdapterError(LoraStateError):
    """A saved adapter folder cannot be loaded; the message names the folder or file and what is wrong."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """The adapter folder, or a file peft needs in it, does not exist."""


def attach_lora(model: nn.Module, cfg: LoraSection) -> PeftModel:
    """Wrap ``model`` in a peft LoRA adapter ``default``; only ``lora_A``/``lora_B`` stay trainable.

    Scale is ``alpha / r`` (plain LoRA, not rsLoRA); no bias is trained.
    """
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)


@contextmanager
def reference_context(model: PeftModel) -> Iterator[PeftModel]:
    """Inside the block ``model`` is the reference policy (adapter disabled: ``h = W x``); restored on exit."""
    with model.disable_adapter():
        yield model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable ``lora_A``/``lora_B`` weight parameters of ``model``, by peft parameter name.

    Under sharding these are the sharded parameters; read their values inside :func:`gathered_lora`.
    """
    return {
        canonical_name(name): param
        for name, param in model.named_parameters()
        if param.requires_grad and _LORA_WEIGHT.search(name) is not None
    }


@contextmanager
def gathered_lora(model: nn.Module, *, modify: bool) -> Iterator[None]:
    """Every ``lora_A``/``lora_B`` weight of ``model`` (trainable or not) at its full value inside the block; with
    ``modify=True`` edits are written back to the shards on exit (rank 0's win). A no-op on an unsharded model.

    See :func:`~lifealign.models.gather.gathered_parameters` for the sharding schemes and the rules: every rank
    enters it, and parameters are looked up again inside the block.
    """
    weights = [param for name, param in model.named_parameters() if _LORA_WEIGHT.search(name) is not None]
    with gathered_parameters(model, weights, modify=modify):
        yield


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached clones of the trainable LoRA weights (a snapshot that later training does not change).

    Full tensors on every rank, also under sharded training (gathered).
    """
    with gathered_lora(model, modify=False):
        return {name: param.detach().clone() for name, param in lora_parameters(model).items()}


def load_lora_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`lora_state`) into the trainable LoRA weights, in place (into every rank's shard
    under sharded training).

    Raises ``LoraStateError`` on any missing or unexpected key or shape mismatch, before changing anything.
    """
    with gathered_lora(model, modify=True):
        params = lora_parameters(model)
        _check_same_keys(set(params), set(state), what="LoRA state")
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise LoraStateError(f"LoRA state {name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])


def lora_modules(model: nn.Module, adapter_name: str | None = None) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Each LoRA'd module name -> its ``(lora_A.weight (r, d_in), lora_B.weight (d_out, r))`` parameters.

    The parameters themselves are returned (not copies), so a caller may edit them in place under ``no_grad``.
    ``adapter_name`` defaults to the model's active adapter. Under sharded training call it inside
    :func:`gathered_lora` to get full matrices (outside, they are shards or placeholders).
    """
    adapter = adapter_name or _active_adapter(model)
    return {
        canonical_name(name): (module.lora_A[adapter].weight, module.lora_B[adapter].weight)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


def save_adapter(model: PeftModel, path: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` to ``path`` (peft ``save_pretrained``).

    ``base_model_name_or_path`` in ``adapter_config.json`` is the base model's ``name_or_path``, which
    :mod:`lifealign.models.load` sets to something ``from_pretrained`` resolves to the same weights (the cached
    safetensors folder of the bundled SmolLM2 or of ``tiny``, a local folder's absolute path, or a hub id), so
    ``AutoPeftModelForCausalLM.from_pretrained(path)`` works without lifealign.
    """
    path = Path(path)
    # We never resize the vocabulary, so full embedding matrices never need saving; "auto" would also look the base
    # model's name up on the hub to decide, which is a network call (or a warning offline).
    model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    return path


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` as a folder holding a peft adapter, or an ``AdapterError`` naming what is missing or wrong.

    Cheap (no tensor is read): call it before loading a base model, so a wrong ``--adapter`` fails at once.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterNotFoundError(f"adapter folder not found: {path}")
    if not path.is_dir():
        hint = " (give the folder that holds it)" if path.name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE) else ""
        raise AdapterError(f"adapter path {path} is not a folder{hint}")
    config, weights = path / ADAPTER_CONFIG_FILE, path / ADAPTER_WEIGHTS_FILE
    if not config.is_file() and not weights.is_file():
        raise AdapterNotFoundError(
            f"no adapter in {path}: it has neither {ADAPTER_CONFIG_FILE} nor {ADAPTER_WEIGHTS_FILE} "
            "(expected a folder written by peft save_pretrained, such as RUN_DIR/adapter)"
        )
    if not config.is_file():
        raise AdapterNotFoundError(
            f"adapter folder {path} has no {ADAPTER_CONFIG_FILE} (peft needs it for the rank and target modules)"
        )
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"adapter folder {path} only has pickle weights (adapter_model.bin), which are refused because "
                f"loading them can run arbitrary code; re-save it with safe_serialization=True"
            )
        raise AdapterNotFoundError(f"adapter folder {path} has no {ADAPTER_WEIGHTS_FILE}")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterError(f"{config}: unreadable or not valid JSON ({err})") from None
    if not isinstance(settings, dict) or "peft_type" not in settings:
        raise AdapterError(f"{config}: not a peft adapter config (no 'peft_type')")
    return path


def read_adapter_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of ``path/adapter_model.safetensors``; a truncated or corrupt file is an ``AdapterError``."""
    weights = Path(path) / ADAPTER_WEIGHTS_FILE
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        size = weights.stat().st_size if weights.exists() else 0
        raise AdapterError(
            f"{weights} is not a valid safetensors file ({size} bytes; truncated or corrupt: {err}); "
            "save the adapter again or use an intact copy"
        ) from None


def load_adapter(base_model: nn.Module, path: str | Path, is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` on ``base_model``, then check every saved tensor landed unchanged.

    The folder is checked first (:func:`check_adapter_dir`) and a truncated or corrupt weights file, or an adapter
    that does not fit the base, is an ``AdapterError`` naming the folder or file. peft only warns on missing adapter
    keys (peft #2118); here a missing, unexpected or differing tensor raises ``LoraStateError``, so an adapter from
    a different base or a truncated file never loads silently.
    """
    path = check_adapter_dir(path)
    saved = read_adapter_weights(path)
    try:
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise AdapterError(f"adapter {path} does not fit the base model: {err}") from err
    loaded = get_peft_model_state_dict(model)
    _check_same_keys(set(loaded), set(saved), what=f"adapter {path}")
    for name, tensor in saved.items():
        if not torch.equal(loaded[name].to(tensor.dtype), tensor):
            raise LoraStateError(f"adapter {path}: tensor {name} differs from the file after loading")
    return model


def enable_input_grads_if_checkpointing(model: nn.Module) -> bool:
    """Make the embedding output require grad when activation checkpointing is on; returns whether it is on.

    With a frozen base, reentrant checkpointed blocks receive inputs that do not require grad, so the LoRA weights
    inside them would get no gradient. transformers 5 registers this hook itself in
    ``activation_checkpointing_enable``, but not when checkpointing was switched on another way or the hook was
    removed (``disable_input_require_grads``); calling this before training makes it certain, and is idempotent.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not _is_checkpointing(base):
        return False
    # transformers keeps the registered hooks here; registering twice would stack duplicate hooks.
    if not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()
    return True


def _is_checkpointing(model: nn.Module) -> bool:
    # ``is_gradient_checkpointing`` is deprecated (FutureWarning) in transformers 5; prefer the new name.
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _active_adapter(model: nn.Module) -> str:
    adapter = getattr(model, "active_adapter", None)
    if isinstance(adapter, list | tuple):  # peft returns a list when several adapters are active
        adapter = adapter[0]
    if not isinstance(adapter, str):
        raise LoraStateError("model has no active LoRA adapter (was attach_lora called?)")
    return adapter


def _check_same_keys(expected: set[str], given: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise LoraStateError(f"{what} does not match the model: missing keys {missing}, unexpected keys {unexpected}")
