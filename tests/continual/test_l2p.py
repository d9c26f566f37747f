"""L2P: prompt selection and the surrogate by hand, the prepend/strip hooks against a manual forward, generation,
the base reference, the optimizer seeing the pool, and lazy re-attachment on resume."""

import json

import pytest
import torch

from lifealign.continual import bind_plugin
from lifealign.continual.l2p import (
    L2PPlugin,
    generation_header,
    prompt_query,
    query_end,
    select_prompts,
    surrogate_loss,
)
from lifealign.data.records import Task
from lifealign.data.tokenize import chat_ids
from lifealign.models.lora import lora_parameters, reference_context
from lifealign.training.plugin import PluginContext
from tests.helpers import synthetic_tasks, tiny_config


def _ctx(model, tokenizer, tmp_path, task_index=0):
    return PluginContext(
        model=model,
        tokenizer=tokenizer,
        task=Task(name="t", train=[], test=[]),
        task_index=task_index,
        data=tiny_config(tmp_path).data,
    )


def _prompt_ids(tokenizer, text):
    return chat_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


# ----- pure functions --------------------------------------------------------------------------------------------
def test_top_k_by_cosine_on_hand_keys():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[1.0, 0.1], [0.0, -2.0]])
    indices, cos = select_prompts(query, keys, top_k=2)
    # row 0: cos = (0.995, 0.0995, 0.774, −0.995); row 1: (0, −1, −0.707, 0) -> ties at 0 between keys 0 and 3
    assert indices[0].tolist() == [0, 2]
    assert cos[0].tolist() == pytest.approx([1 / 1.01**0.5, 1.1 / (1.01**0.5 * 2**0.5)], rel=1e-6)
    assert sorted(indices[1].tolist()) == [0, 3] and cos[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_surrogate_is_lambda_times_mean_row_sum_of_one_minus_cosine():
    cos = torch.tensor([[1.0, 0.5], [0.0, 0.25]])
    # rows: (0 + 0.5) and (1 + 0.75); mean 1.125; λ = 0.5
    assert surrogate_loss(cos, 0.5).item() == pytest.approx(0.5625)


def test_query_ends_after_the_last_attended_header():
    ids = torch.tensor([[5, 1, 2, 9, 1, 2, 7, 1], [5, 6, 7, 8, 9, 9, 9, 9], [1, 2, 3, 0, 0, 0, 1, 2]])
    mask = torch.tensor([[1] * 8, [1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]])
    assert query_end(ids, mask, [1, 2]).tolist() == [6, -1, 2]  # row 2's second header sits in padding
    assert query_end(ids, mask, []).tolist() == [-1, -1, -1]


def test_prompt_query_averages_attended_prompt_positions():
    embeds = torch.arange(12.0).reshape(2, 3, 2)  # row 0 positions: (0,1) (2,3) (4,5)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    query = prompt_query(embeds, mask, torch.tensor([2, -1]))
    assert query[0].tolist() == [1.0, 2.0]  # mean of positions 0, 1
    assert query[1].tolist() == [7.0, 8.0]  # no header: every attended position (6,7) (8,9)


def test_generation_header_of_the_tiny_chat_template(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    assert generation_header(tokenizer) == tokenizer("<|im_start|>assistant\n")["input_ids"]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"top_k": 11}, "top_k"),
        ({"key_mode": "max"}, "key_mode"),
        ({"train_lora": 1}, "train_lora"),
        ({"pool_size": 0}, "pool_size"),
    ],
)
def test_bad_kwargs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^plugin\.{key}\b"):
        bind_plugin({"name": "l2p", **kwargs})


# ----- the plugin on the tiny model ------------------------------------------------------------------------------
def _manual_logits(model, plugin, ids, mask):
    """The L2P forward built by hand: [selected prompts; embeddings] through the model, prefix logits dropped."""
    hf = model.get_base_model()
    embeds = hf.get_input_embeddings()(ids)
    end = query_end(ids, mask, plugin.header)
    indices, _ = select_prompts(prompt_query(embeds, mask, end), plugin.pool.key_matrix(), plugin.top_k)
    prefix = plugin.pool.prompts[indices].reshape(ids.shape[0], plugin.prefix_length, -1)
    full_mask = torch.cat([torch.ones(ids.shape[0], plugin.prefix_length, dtype=mask.dtype), mask], dim=1)
    plugin.close()
    try:
        logits = model(inputs_embeds=torch.cat([prefix, embeds], dim=1), attention_mask=full_mask).logits
    finally:
        plugin.attach(model)
    return logits[:, plugin.prefix_length :], indices


def test_hooks_prepend_selected_prompts_and_keep_the_callers_length(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    model.eval()
    prompt = _prompt_ids(tokenizer, "What is 2+2?")
    rows = [prompt + list(b"4<|im_end|>"), prompt + list(b"five, surely")]  # a chosen and a rejected row
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    plugin = L2PPlugin(pool_size=6, prompt_length=2, top_k=2)
    plugin.before_task(_ctx(model, tokenizer, tmp_path))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        manual, indices = _manual_logits(model, plugin, ids, mask)
        with reference_context(model):
            reference = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == base.shape
    assert torch.allclose(logits * mask[..., None], manual * mask[..., None], atol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-3)
    assert torch.equal(reference, base)  # adapters disabled: no prompt, the base model
    assert indices[0].tolist() == indices[1].tolist()  # the pair shares its prompt, so its selection
    plugin.close()


def test_generation_matches_a_manual_no_cache_forward(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    model.eval()
    plugin = L2PPlugin(pool_size=4, prompt_length=3, top_k=2)
    plugin.before_task(_ctx(model, tokenizer, tmp_path))
    ids = torch.tensor([_prompt_ids(tokenizer, "Name a colour.")])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        for step, step_logits in enumerate(out.logits):
            prefix = out.sequences[:, : ids.shape[1] + step]
            # the query is the prompt (up to the header) whatever has been generated after it
            manual, _ = _manual_logits(model, plugin, prefix, torch.ones_like(prefix))
            assert torch.allclose(step_logits, manual[:, -1], atol=1e-5), step
    plugin.close()


def test_pool_is_in_the_optimizer_set_and_lora_gradients_are_dropped(tiny_lora_model, tmp_path):
    model, tokenizer = tiny_lora_model
    plugin = L2PPlugin(pool_size=4, prompt_length=2, top_k=2, lam=0.5)
    ctx = _ctx(model, tokenizer, tmp_path)
    plugin.before_task(ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]  # what train_task hands AdamW
    assert any(p is plugin.pool.prompts for p in trainable) and any(p is plugin.pool.keys for p in trainable)
    assert all("l2p" not in k for k in lora_parameters(model))  # not in lora_state / the saved adapter
    model.train()
    ids = torch.tensor([_prompt_ids(tokenizer, "hi") + list(b"hello")])
    logits = model(input_ids=ids).logits
    surrogate = plugin.extra_loss(ctx, {}, {})
    assert surrogate is not None and plugin.extra_loss(ctx, {}, {}) is None  # consumed once per forward
    (logits.logsumexp(-1).mean() + surrogate).backward()
    assert plugin.pool.prompts.grad is not None and plugin.pool.keys.grad is not None
    plugin.after_backward(ctx)
    assert all(p.grad is None for p in lora_parameters(model).values())
    assert int(plugin.counts.sum()) == 2  # one row, top-2
    plugin.close()
    assert not hasattr(model.get_base_model(), "l2p_pool")


def test_resume_restores_the_pool_and_reattaches_on_the_first_forward(tiny_lora_model, tmp_path):
    from lifealign.config.schema import LoraSection
    from lifealign.models.lora import attach_lora
    from lifealign.models.tiny import tiny_model_and_tokenizer

    model, tokenizer = tiny_lora_model
    model.eval()
    plugin = L2PPlugin(pool_size=4, prompt_length=2, top_k=2, key_mode="prompt_mean")
    plugin.before_task(_ctx(model, tokenizer, tmp_path))
    with torch.no_grad():
        plugin.pool.prompts.add_(0.5)  # as if trained
    ids = torch.tensor([_prompt_ids(tokenizer, "Say yes.")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    state = plugin.state_dict()
    json.dumps(state["meta"])
    plugin.close()

    fresh, _ = tiny_model_and_tokenizer(seed=0)
    fresh = attach_lora(fresh, LoraSection()).eval()
    restored = L2PPlugin(pool_size=4, prompt_length=2, top_k=2, key_mode="prompt_mean")
    restored.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, expected, atol=1e-6)  # attached lazily
    assert torch.equal(restored.pool.prompts.detach(), state["tensors"]["prompts"])
    restored.close()
    with pytest.raises(ValueError, match="pool_size"):
        L2PPlugin(pool_size=5).load_state_dict(state)


@pytest.mark.slow
def test_end_to_end_interrupted_mid_stage_resumes_to_the_same_pool(tmp_path, monkeypatch):
    import lifealign.training.loop as loop_module
    from lifealign.engine.experiment import run_experiment
    from lifealign.training.checkpoint import Checkpointer

    tasks = synthetic_tasks(2, max_train=6, max_test=4)

    def cfg(out):
        return tiny_config(
            out,
            tasks=tasks,
            train={"max_steps": 2, "save_every": 1},
            method={
                "name": "l2p",
                "loss": {"name": "dpo"},
                "plugins": [{"name": "l2p", "pool_size": 4, "prompt_length": 2, "top_k": 2}],
            },
            eval={"scorers": ["pref_acc"], "max_examples": 4},
        )

    reference = run_experiment(cfg(tmp_path / "a"), report=False)

    class Interrupt(RuntimeError):
        pass

    def fault(point, **where):
        if point == "step" and (where["task"], where["stage"], where["step"]) == (1, "pref", 1):
            raise Interrupt
        return False

    monkeypatch.setattr(loop_module, "maybe_fault", fault)
    with pytest.raises(Interrupt):
        run_experiment(cfg(tmp_path / "b"), report=False)
    monkeypatch.undo()
    resumed = run_experiment(cfg(tmp_path / "b"), resume=True, report=False)  # mid-stage: optimizer holds the pool
    assert json.dumps(resumed, sort_keys=True) == json.dumps(reference, sort_keys=True)
    pools = [Checkpointer(tmp_path / d / "run" / "checkpoints").latest().tensors("plugins") for d in ("a", "b")]
    assert pools[0].keys() == pools[1].keys() == {"0.prompts", "0.keys"}
    assert all(torch.equal(pools[0][k], pools[1][k]) for k in pools[0])
