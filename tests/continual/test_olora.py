"""O-LoRA: the penalties by hand, folding keeps the function and the base reference, lazy re-attachment on resume."""

import json

import pytest
import torch
import torch.nn.modules.module as torch_module

from lifealign.continual import bind_plugin
from lifealign.continual.olora import OLoRAPlugin, fold_factors, l2_penalty, orthogonality_penalty
from lifealign.data.records import Task
from lifealign.models.lora import load_lora_state, lora_modules, lora_state, reference_context
from lifealign.training.plugin import PluginContext
from tests.helpers import synthetic_tasks, tiny_config


def _ctx(model, tokenizer, tmp_path, task_index=0, n_tasks=2):
    return PluginContext(
        model=model,
        tokenizer=tokenizer,
        task=Task(name=f"t{task_index}", train=[], test=[]),
        task_index=task_index,
        n_tasks=n_tasks,
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_like(model, seed):
    """Give the adapter a non-zero update, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in lora_modules(model).values():
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            a.add_(0.1 * torch.randn(a.shape, generator=gen))


# ----- pure functions --------------------------------------------------------------------------------------------
def test_orthogonality_penalty_by_hand():
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[2.0, -1.0]])  # old @ aᵀ = [[2], [−1]]
    assert orthogonality_penalty(old, a, "squared").item() == pytest.approx(5.0)
    assert orthogonality_penalty(old, a, "abs").item() == pytest.approx(3.0)
    assert orthogonality_penalty(old, torch.tensor([[0.0, 0.0]]), "squared").item() == 0.0


def test_stacked_old_matrices_sum_the_per_task_penalties():
    gen = torch.Generator().manual_seed(0)
    a1, a2, a = (torch.randn(2, 5, generator=gen) for _ in range(3))
    both = orthogonality_penalty(torch.cat([a1, a2]), a)
    assert both.item() == pytest.approx((orthogonality_penalty(a1, a) + orthogonality_penalty(a2, a)).item())


def test_l2_penalty_by_hand():
    assert l2_penalty(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [0.5]])).item() == pytest.approx(14.25)


def test_folded_factors_reproduce_the_summed_updates():
    gen = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (
        torch.randn(2, 4, generator=gen),
        torch.randn(3, 2, generator=gen),
        torch.randn(2, 4, generator=gen),
        torch.randn(3, 2, generator=gen),
    )
    old_a, old_b = fold_factors(None, None, a1, b1, 2.0)
    old_a, old_b = fold_factors(old_a, old_b, a2, b2, 2.0)
    assert old_a.shape == (4, 4) and old_b.shape == (3, 4)
    assert torch.allclose(old_b @ old_a, 2.0 * (b1 @ a1 + b2 @ a2), atol=1e-6)


def test_bad_kwargs_name_the_key():
    with pytest.raises(ValueError, match=r"^plugin\.orth_norm: must be one of \['squared', 'abs'\]"):
        bind_plugin({"name": "olora", "orth_norm": "fro"})
    with pytest.raises(ValueError, match=r"^plugin\.lam_orth: must be in \[0, inf\]"):
        bind_plugin({"name": "olora", "lam_orth": -1})


# ----- the plugin on the tiny model ------------------------------------------------------------------------------
def test_fold_keeps_the_function_resets_the_adapter_and_keeps_the_base_reference(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    base = _logits(model, ids)
    _train_like(model, seed=1)
    before = _logits(model, ids)
    old = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in lora_modules(model).items()}
    plugin = OLoRAPlugin(seed=3)
    ctx = _ctx(model, tokenizer, tmp_path)
    plugin.before_task(ctx)
    plugin.after_task(ctx)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)
    with reference_context(model):
        assert torch.allclose(_logits(model, ids), base, atol=1e-6)
    for key, (a, b) in lora_modules(model).items():
        assert bool((b == 0).all()) and not torch.equal(a, old[key][0])
        assert float(a.abs().max()) <= 1 / a.shape[1] ** 0.5  # peft's kaiming-uniform bound
        assert torch.allclose(plugin.old_a[key], old[key][0])
    delta = plugin.merged_deltas(model)
    key = next(iter(old))
    assert torch.allclose(delta[key], 2.0 * old[key][1] @ old[key][0], atol=1e-6)  # alpha/r = 16/8
    plugin.close()
    assert not torch.allclose(_logits(model, ids), before, atol=1e-3)


def test_penalty_after_a_fold_matches_the_formula(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    _train_like(model, seed=1)
    plugin = OLoRAPlugin(lam_orth=0.1, lam_l2=0.01)
    ctx = _ctx(model, tokenizer, tmp_path)
    first = plugin.extra_loss(ctx, {}, {})
    expected_first = sum(0.01 * (a.pow(2).sum() + b.pow(2).sum()) for a, b in lora_modules(model).values())
    assert first.item() == pytest.approx(float(expected_first), rel=1e-5)
    plugin.after_task(ctx)
    _train_like(model, seed=2)
    expected = 0.0
    for key, (a, b) in lora_modules(model).items():
        expected += 0.1 * float((plugin.old_a[key] @ a.detach().T).pow(2).sum())
        expected += 0.01 * float(a.pow(2).sum() + b.pow(2).sum())
    second = plugin.extra_loss(_ctx(model, tokenizer, tmp_path, task_index=1), {}, {})
    assert second.item() == pytest.approx(expected, rel=1e-5)
    second.backward()
    a = next(iter(lora_modules(model).values()))[0]
    assert a.grad is not None and float(a.grad.abs().sum()) > 0


def test_last_task_is_not_folded_so_the_adapter_holds_it(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    _train_like(model, seed=1)
    state = lora_state(model)
    plugin = OLoRAPlugin()
    plugin.after_task(_ctx(model, tokenizer, tmp_path, task_index=1, n_tasks=2))
    assert plugin.folded == [] and plugin.old_a == {}
    assert all(torch.equal(v, state[k]) for k, v in lora_state(model).items())


def test_resume_reattaches_the_frozen_update_on_the_first_forward(tiny_lora_model, tmp_path):
    from lifealign.config.schema import LoraSection
    from lifealign.models.lora import attach_lora
    from lifealign.models.tiny import tiny_model_and_tokenizer

    model, tokenizer = tiny_lora_model
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    _train_like(model, seed=1)
    plugin = OLoRAPlugin()
    plugin.after_task(_ctx(model, tokenizer, tmp_path))
    _train_like(model, seed=2)
    expected = _logits(model, ids)
    state, adapter = plugin.state_dict(), lora_state(model)
    json.dumps(state["meta"])
    plugin.close()

    fresh, _ = tiny_model_and_tokenizer(seed=0)
    fresh = attach_lora(fresh, LoraSection())
    load_lora_state(fresh, adapter)
    hooks_before = len(torch_module._global_forward_pre_hooks)
    restored = OLoRAPlugin()
    restored.load_state_dict(state)
    assert len(torch_module._global_forward_pre_hooks) == hooks_before + 1
    assert torch.allclose(_logits(fresh, ids), expected, atol=1e-5)  # no plugin hook ran: lazy attachment
    assert len(torch_module._global_forward_pre_hooks) == hooks_before
    assert restored.folded == [0]
    restored.close()


@pytest.mark.slow
def test_end_to_end_interrupted_before_evaluation_resumes_to_the_same_scores(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import lifealign.engine.run as runner_module
    from lifealign.engine.experiment import run_experiment

    tasks = synthetic_tasks(2, max_train=6, max_test=4)

    def cfg(out):
        return tiny_config(
            out,
            tasks=tasks,
            train={"max_steps": 2, "save_every": 100},
            method={"name": "olora", "loss": {"name": "dpo"}, "plugins": [{"name": "olora"}]},
            eval={"scorers": ["pref_acc"], "max_examples": 4},
        )

    reference = run_experiment(cfg(tmp_path / "a"), report=False)

    class Interrupt(RuntimeError):
        pass

    def fault(point, **where):
        if point == "after_save" and where.get("phase") == "t0:after":
            raise Interrupt
        return False

    monkeypatch.setattr(runner_module, "maybe_fault", fault)
    with pytest.raises(Interrupt):
        run_experiment(cfg(tmp_path / "b"), report=False)
    monkeypatch.undo()
    resumed = run_experiment(cfg(tmp_path / "b"), resume=True, report=False)  # starts at t0:eval, fresh model
    assert json.dumps(resumed, sort_keys=True) == json.dumps(reference, sort_keys=True)
    saved = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    first = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == first.keys() and all(torch.equal(saved[k], first[k]) for k in saved)
    info = json.loads((tmp_path / "b" / "run" / "run_info.json").read_text())["memory"]["olora"]
    assert info["folded_tasks"] == [0] and info["frozen_rank"] == [8]
