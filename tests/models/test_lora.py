"""Tests for lifealign.models.lora on the tiny model (hidden 64, q_proj 64->64, v_proj 64->32, 2 layers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lifealign.config.schema import LoraSection
from lifealign.models.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterError,
    AdapterNotFoundError,
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
from lifealign.models.tiny import tiny_model_and_tokenizer
from tests.helpers import perturb_lora_b

IDS = torch.tensor(
    [[258, 117, 115, 101, 114, 10, 104, 105, 259, 10], [104, 101, 108, 108, 111, 32, 119, 111, 114, 100]]
)
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_attach_lora_trains_only_lora_weights(tiny_lora_model):
    """Trainable count, by hand: per layer q_proj A (8x64) + B (64x8) = 1024 and v_proj A (8x64) + B (32x8) = 768,
    so 2 layers x 1792 = 3584."""
    model, _ = tiny_lora_model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 3584
    assert set(trainable) == set(lora_parameters(model))
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("q_proj.base_layer.weight") for n in frozen)
    assert any(n.endswith("embed_tokens.weight") for n in frozen)


def test_attach_lora_uses_config(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    peft_model = attach_lora(model, LoraSection(r=4, alpha=12, dropout=0.1, target_modules=["k_proj"]))
    modules = lora_modules(peft_model)
    assert sorted(modules) == [f"base_model.model.model.layers.{i}.self_attn.k_proj" for i in range(2)]
    layer = peft_model.base_model.model.model.layers[0].self_attn.k_proj
    assert layer.scaling["default"] == 3.0  # alpha / r = 12 / 4
    assert layer.lora_dropout["default"].p == 0.1


def test_fresh_adapter_is_identity(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    base = _logits(model)
    assert torch.equal(_logits(attach_lora(model, LoraSection())), base)


def test_reference_context_reproduces_base_logits(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    base = _logits(model)
    peft_model = attach_lora(model, LoraSection())
    perturb_lora_b(peft_model, std=0.5)
    adapted = _logits(peft_model)
    assert (adapted - base).abs().max() > 1e-3
    with reference_context(peft_model) as ref:
        assert ref is peft_model
        assert torch.equal(_logits(peft_model), base)
    assert torch.equal(_logits(peft_model), adapted)


def test_lora_state_is_a_detached_snapshot_and_round_trips(tiny_lora_model):
    model, _ = tiny_lora_model
    perturb_lora_b(model, seed=1, std=0.5)
    snapshot = lora_state(model)
    before = _logits(model)
    assert len(snapshot) == 8 and Q_A in snapshot
    assert all(not t.requires_grad for t in snapshot.values())
    perturb_lora_b(model, seed=2, std=0.5)
    assert not torch.equal(_logits(model), before)
    assert not torch.equal(
        snapshot[Q_A.replace("lora_A", "lora_B")], lora_parameters(model)[Q_A.replace("lora_A", "lora_B")]
    )
    load_lora_state(model, snapshot)
    assert torch.equal(_logits(model), before)


def test_lora_state_names_are_stable_across_builds():
    """Two independent builds (as in two processes) give the same keys, so a state from one loads into the other."""
    a = attach_lora(tiny_model_and_tokenizer(seed=0)[0], LoraSection())
    b = attach_lora(tiny_model_and_tokenizer(seed=0)[0], LoraSection())
    perturb_lora_b(a, std=0.5)
    load_lora_state(b, lora_state(a))
    assert torch.equal(_logits(a), _logits(b))


def test_load_lora_state_rejects_mismatches_without_changing_anything(tiny_lora_model):
    model, _ = tiny_lora_model
    original = lora_state(model)
    bad_missing = {k: v + 1 for k, v in original.items() if k != Q_A}
    bad_extra = {**{k: v + 1 for k, v in original.items()}, "base_model.model.x.lora_A.default.weight": torch.zeros(1)}
    bad_shape = {**{k: v + 1 for k, v in original.items()}, Q_A: torch.zeros(4, 64)}
    with pytest.raises(LoraStateError, match="missing keys \\['" + Q_A):
        load_lora_state(model, bad_missing)
    with pytest.raises(LoraStateError, match="unexpected keys"):
        load_lora_state(model, bad_extra)
    with pytest.raises(LoraStateError, match="shape"):
        load_lora_state(model, bad_shape)
    assert all(torch.equal(v, original[k]) for k, v in lora_state(model).items())


def test_lora_modules_maps_each_module_to_its_live_a_b(tiny_lora_model):
    model, _ = tiny_lora_model
    modules = lora_modules(model)
    prefix = "base_model.model.model.layers"
    assert sorted(modules) == sorted(f"{prefix}.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj"))
    a, b = modules[f"{prefix}.0.self_attn.q_proj"]
    assert a.shape == (8, 64) and b.shape == (64, 8)
    a, b = modules[f"{prefix}.1.self_attn.v_proj"]
    assert a.shape == (8, 64) and b.shape == (32, 8)
    with torch.no_grad():
        b.fill_(0.25)  # edits through lora_modules are edits of the model
    assert torch.equal(
        lora_state(model)[f"{prefix}.1.self_attn.v_proj.lora_B.default.weight"], torch.full((32, 8), 0.25)
    )


def test_save_and_load_adapter_gives_identical_logits(tiny_lora_model, tmp_path):
    model, _ = tiny_lora_model
    perturb_lora_b(model, std=0.5)
    expected = _logits(model)
    path = save_adapter(model, tmp_path / "adapter")
    assert (path / ADAPTER_WEIGHTS_FILE).is_file() and (path / "adapter_config.json").is_file()
    loaded = load_adapter(tiny_model_and_tokenizer(seed=0)[0], path)
    assert torch.equal(_logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(tiny_model_and_tokenizer(seed=0)[0], path, is_trainable=True)
    assert set(lora_parameters(trainable)) == set(lora_parameters(model))


def test_load_adapter_with_missing_tensor_is_an_error(tiny_lora_model, tmp_path):
    model, _ = tiny_lora_model
    path = save_adapter(model, tmp_path / "adapter")
    tensors = load_file(str(path / ADAPTER_WEIGHTS_FILE))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path / ADAPTER_WEIGHTS_FILE))
    with pytest.raises(LoraStateError, match="missing keys"):
        load_adapter(tiny_model_and_tokenizer(seed=0)[0], path)


def test_load_adapter_without_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS_FILE):
        load_adapter(tiny_model_and_tokenizer()[0], tmp_path)


def _lora_a_grads_after_backward(model) -> list[torch.Tensor | None]:
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return [p.grad for n, p in lora_parameters(model).items() if ".lora_A." in n]


def test_input_grads_for_reentrant_checkpointing(tiny_lora_model):
    """Reentrant checkpointing with a frozen base: without input grads the backward fails; after the helper every
    lora_A gets a non-zero gradient (dL/dA = B^T dL/dh x^T, so lora_B is made non-zero first)."""
    model, _ = tiny_lora_model
    assert enable_input_grads_if_checkpointing(model) is False
    base = model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()  # as if checkpointing had been switched on without the hook
    perturb_lora_b(model, std=0.5)
    with pytest.raises(RuntimeError, match="does not require grad"):
        _lora_a_grads_after_backward(model)
    assert enable_input_grads_if_checkpointing(model) is True
    assert enable_input_grads_if_checkpointing(model) is True
    assert len(base._require_grads_hooks) == 1  # idempotent: one hook, not one per call
    grads = _lora_a_grads_after_backward(model)
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------- a broken adapter is a clear error


@pytest.fixture
def saved_adapter(tiny_lora_model, tmp_path):
    return save_adapter(tiny_lora_model[0], tmp_path / "adapter")


def test_truncated_adapter_weights_name_the_file_and_the_problem(saved_adapter):
    weights = saved_adapter / ADAPTER_WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=rf"{weights} is not a valid safetensors file \(\d+ bytes; truncated or"):
        load_adapter(tiny_model_and_tokenizer()[0], saved_adapter)
    weights.write_bytes(b"")
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(tiny_model_and_tokenizer()[0], saved_adapter)


def test_adapter_folder_problems_each_have_their_own_message(saved_adapter, tmp_path):
    base = tiny_model_and_tokenizer()[0]
    with pytest.raises(AdapterNotFoundError, match=r"adapter folder not found: .*nowhere"):
        load_adapter(base, tmp_path / "nowhere")
    with pytest.raises(AdapterError, match=r"is not a folder \(give the folder that holds it\)"):
        load_adapter(base, saved_adapter / ADAPTER_WEIGHTS_FILE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterNotFoundError, match=rf"no adapter in {empty}: it has neither {ADAPTER_CONFIG_FILE}"):
        load_adapter(base, empty)
    config = saved_adapter / ADAPTER_CONFIG_FILE
    text = config.read_text()
    config.write_text("{not json")
    with pytest.raises(AdapterError, match=rf"{config}: unreadable or not valid JSON"):
        load_adapter(base, saved_adapter)
    config.write_text(json.dumps({**json.loads(text), "target_modules": ["no_such_proj"]}))
    with pytest.raises(AdapterError, match=rf"adapter {saved_adapter} does not fit the base model"):
        load_adapter(tiny_model_and_tokenizer()[0], saved_adapter)
    config.unlink()
    with pytest.raises(AdapterNotFoundError, match=rf"adapter folder {saved_adapter} has no {ADAPTER_CONFIG_FILE}"):
        load_adapter(base, saved_adapter)
