"""The inner objective's plugins: regulariser value, retain terms, the stop rule, and the data splits."""

from __future__ import annotations

import json

import pytest
import torch

from lifealign.config.unlearn import UnlearnSection
from lifealign.data.collate import collate_pairs
from lifealign.data.records import PreferencePair, Task
from lifealign.models.lora import lora_parameters, lora_state
from lifealign.training.plugin import PluginContext
from lifealign.unlearning.data import ceil_split, split_pool, stream_data
from lifealign.unlearning.evaluate import mean_token_nll
from lifealign.unlearning.inner import STAGE_PLUGINS, restore_stage_plugins, stage_plugin_states
from lifealign.unlearning.plugins import (
    AnchorPlugin,
    ForgetNLLGuard,
    RetainPlugin,
    optimizer_steps_taken,
    retain_kl,
)


def _ctx(model, optimizer=None) -> PluginContext:
    return PluginContext(model=model, tokenizer=None, task=Task("t", []), task_index=0, optimizer=optimizer)


def test_anchor_is_lambda_times_the_mean_over_tensors_of_squared_distances(lora_factory):
    model, _ = lora_factory()
    anchor = lora_state(model)
    params = lora_parameters(model)
    first = next(iter(params))
    with torch.no_grad():
        params[first] += 0.5  # only one tensor moves: ||d||^2 = 0.25 * numel
    plugin = AnchorPlugin(anchor, weight=0.1)
    expected = 0.1 * 0.25 * params[first].numel() / len(params)
    assert float(plugin.extra_loss(_ctx(model), {}, {})) == pytest.approx(expected, rel=1e-5)
    assert AnchorPlugin(anchor, weight=0.0).extra_loss(_ctx(model), {}, {}) is None


def _retain_examples(tokenize, tok, n=6):
    records = [PreferencePair(f"Question {i}?", "Fine, thanks." * (1 + i % 2), "", id=str(i)) for i in range(n)]
    return [dict(ex, index=i) for i, ex in enumerate(tokenize(records, tok, ("chosen",)))]


def test_retain_nll_term_is_the_token_weighted_nll_of_its_batch(lora_factory, tokenize):
    model, tok = lora_factory()
    examples = _retain_examples(tokenize, tok)
    plugin = RetainPlugin(examples, pad_id=tok.pad_token_id, mode="nll", weight=0.3, batch_size=6)
    term = plugin.extra_loss(_ctx(model), {}, {})
    # batch_size = n: the batch is the whole set (one permutation of it)
    expected = 0.3 * mean_token_nll(model, examples, "chosen", tok.pad_token_id)
    assert float(term) == pytest.approx(expected, rel=1e-5)
    assert term.requires_grad


def test_retain_kl_is_zero_at_the_reference_and_positive_after_a_change(lora_factory, tokenize):
    model, tok = lora_factory()
    batch = collate_pairs(_retain_examples(tokenize, tok), tok.pad_token_id, sides=("chosen",))
    state = lora_state(model)
    assert float(retain_kl(model, batch, reference_state=state)) == pytest.approx(0.0, abs=1e-6)
    assert float(retain_kl(model, batch, reference_state=None)) > 1e-6  # base (adapter off) != perturbed LoRA
    kl = retain_kl(model, batch, reference_state=state)
    kl.backward()  # the substituted reference modified no parameter in place
    assert all(p.grad is not None for p in lora_parameters(model).values())


def test_retain_batches_are_a_function_of_the_optimizer_step(lora_factory, tokenize):
    model, tok = lora_factory()
    examples = _retain_examples(tokenize, tok)
    param = next(iter(lora_parameters(model).values()))
    opt = torch.optim.AdamW([param], lr=1e-3)
    plugin = RetainPlugin(examples, pad_id=tok.pad_token_id, mode="nll", weight=1.0, batch_size=2, grad_accum=2)
    ctx = _ctx(model, opt)
    first = [plugin._next_indices(ctx), plugin._next_indices(ctx)]  # step 0, micro-batches 0 and 1
    assert optimizer_steps_taken(opt) == 0
    param.grad = torch.zeros_like(param)
    opt.step()
    assert optimizer_steps_taken(opt) == 1
    second = plugin._next_indices(ctx)
    fresh = RetainPlugin(examples, pad_id=tok.pad_token_id, mode="nll", weight=1.0, batch_size=2, grad_accum=2)
    assert fresh._next_indices(ctx) == second  # a resumed plugin draws the same batch at the same step
    # step 0 takes positions 0-3 of the epoch's permutation, step 1 positions 4-5: one epoch, no repeats
    assert sorted(first[0] + first[1] + second) == list(range(6))


def test_forget_guard_asks_to_stop_with_a_structured_event_after_patience():
    guard = ForgetNLLGuard(bound=2.0, patience=2, label="solve0")
    high = {"policy": {"rejected_logps": torch.tensor([-30.0]), "rejected_tokens": torch.tensor([10])}}
    low = {"policy": {"rejected_logps": torch.tensor([-10.0]), "rejected_tokens": torch.tensor([10])}}
    ctx = _ctx(None)
    assert guard.stop_request(ctx, {}, high) is None  # 3.0 > 2.0, count 1
    assert guard.stop_request(ctx, {}, low) is None  # 1.0: the count resets
    assert guard.stop_request(ctx, {}, high) is None
    event = guard.stop_request(ctx, {}, high)
    assert event["event"] == "unlearn_stopped" and event["reason"] == "forget_nll_above_bound"
    assert event["forget_nll"] == pytest.approx(3.0) and event["bound"] == 2.0 and event["where"] == "solve0"


def test_ceil_split_sizes_follow_hf_train_test_split():
    train, test = ceil_split(list(range(10)), 0.25, seed=0)
    assert len(test) == 3 and len(train) == 7  # ceil(2.5)
    assert sorted(train + test) == list(range(10))


def test_split_pool_follows_create_datasets_ratios():
    pairs = [PreferencePair(f"p{i}", f"good {i}", f"bad {i}", id=str(i)) for i in range(100)]
    data = split_pool(pairs, UnlearnSection(pa_ratio=0.2, negative_ratio=0.65, forget_ratio=0.65))
    # PO = ceil(20) = 20; rest 80 -> negatives ceil(52) = 52, positives 28; forget = ceil(0.65 * 52) = 34
    assert data.sizes() == {"candidates": 34, "preference": 20, "retain": 28, "original": 80, "test": 0}
    pa_ids = {p.id for p in data.preference}
    cand_ids = {p.id for p in data.candidates}
    retain_ids = {p.id for p in data.retain}
    assert not (pa_ids & cand_ids) and not (pa_ids & retain_ids) and not (cand_ids & retain_ids)
    assert all(c.chosen == "" and c.rejected.startswith("bad") for c in data.candidates)
    assert all(r.chosen.startswith("good") and r.rejected == "" for r in data.retain)
    # the original model sees positives' chosen and *all* negatives' rejected (forget + retained negatives)
    assert sum(o.chosen.startswith("bad") for o in data.original) == 52


def test_stream_data_uses_the_tasks_own_pairs_and_falls_back_to_earlier_tasks():
    section = UnlearnSection()
    own = [PreferencePair("q", "ok", "bad", id="a"), PreferencePair("r", "", "worse", id="b")]
    earlier = [Task("old", [PreferencePair("s", "kept", "x", id="c")])]
    data = stream_data(Task("neg", own, kind="negative"), own, earlier, section, None)
    assert [c.rejected for c in data.candidates] == ["bad", "worse"]
    assert [p.id for p in data.preference] == ["a"]
    assert [r.chosen for r in data.retain] == ["ok"]
    only_negative = [PreferencePair("r", "", "worse", id="b")]
    data = stream_data(Task("neg", only_negative, kind="negative"), only_negative, earlier, section, None)
    assert data.preference == [] and [r.chosen for r in data.retain] == ["kept"]


def test_forget_guard_count_survives_a_mid_stage_checkpoint():
    """A resumed stage keeps the count its checkpoint carried, so it stops where the uninterrupted run stops."""
    high = {"policy": {"rejected_logps": torch.tensor([-30.0]), "rejected_tokens": torch.tensor([10])}}
    ctx = _ctx(None)
    first = ForgetNLLGuard(bound=2.0, patience=3)
    first.before_stage(ctx)
    first.stop_request(ctx, {}, high)
    first.stop_request(ctx, {}, high)  # count 2 of 3, then the run is killed after a checkpoint
    saved = stage_plugin_states([first, AnchorPlugin({}, 0.1)])
    assert saved == {"forget_guard": {"count": 2}}  # the stateless anchor is left out
    resumed = ForgetNLLGuard(bound=2.0, patience=3)
    restore_stage_plugins([resumed], {STAGE_PLUGINS: json.loads(json.dumps(saved))})
    resumed.before_stage(ctx)
    assert resumed.stop_request(ctx, {}, high) is not None  # the third high batch in a row, as without the kill
    fresh = ForgetNLLGuard(bound=2.0, patience=3)
    restore_stage_plugins([fresh], None)
    fresh.before_stage(ctx)
    assert fresh.stop_request(ctx, {}, high) is None and fresh.count == 1
