"""Drift diagnostics: token-level KL to the reference and log-likelihood displacement since a task was learned."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.records import PreferencePair, Task
from lifealign.evaluation.drift import (
    DriftTracker,
    displacement_items,
    kl_rows,
    kl_to_reference,
    mean_displacement,
    measure_drift,
    measure_drift_items,
    measure_drift_with_items,
    token_kl,
)
from lifealign.evaluation.scorers.base import EvalContext, PairLogps, task_examples
from lifealign.evaluation.scorers.preference import pair_logps
from lifealign.models.lora import reference_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    PreferencePair("What is 2+2?", "It is 4.", "5", id="p0"),
    PreferencePair("Name a colour.", "Blue.", "A number.", id="p1"),
    PreferencePair("Capital of France?", "Paris", "Rome, I think", id="p2"),
]
TASK = Task(name="toy", train=[], test=PAIRS)


def make_ctx(model, tokenizer) -> EvalContext:
    return EvalContext(
        model=model,
        tokenizer=tokenizer,
        data=DataSection(max_length=128, max_prompt_length=64),
        eval=EvalSection(max_examples=3, batch_size=2),
    )


def perturb_lora(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def test_token_kl_hand_computed() -> None:
    """V = 2, one response token at t = 2 (predicted by position 1): p = softmax(0, 0) = (1/2, 1/2),
    q = softmax(0, ln 3) = (1/4, 3/4); KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3). Other positions are ignored."""
    policy = torch.tensor([[[5.0, -5.0], [0.0, 0.0], [9.0, 1.0]]])
    ref = torch.tensor([[[-5.0, 5.0], [0.0, math.log(3.0)], [1.0, 9.0]]])
    kl_sum, n = token_kl(policy, ref, torch.tensor([[0, 0, 1]]))
    assert kl_sum.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6) and n.tolist() == [1]
    same, _ = token_kl(policy, policy, torch.tensor([[0, 1, 1]]))
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_token_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(2, 6, 11, generator=gen), torch.randn(2, 6, 11, generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    kl_sum, n = token_kl(policy, ref, mask)
    per_pos = kl_divergence(Categorical(logits=policy[:, :-1]), Categorical(logits=ref[:, :-1]))  # (2, 5)
    expected = (per_pos * mask[:, 1:]).sum(dim=-1)
    assert torch.allclose(kl_sum, expected, atol=1e-5) and n.tolist() == [3, 5]
    assert (kl_sum >= 0).all()


def test_rows_kl_is_the_same_in_chunks_and_empty_for_no_rows(monkeypatch) -> None:
    import lifealign.evaluation.drift as drift

    gen = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(7, 11, generator=gen), torch.randn(7, 11, generator=gen)
    whole = drift.rows_kl(policy, ref)
    expected = kl_divergence(Categorical(logits=policy), Categorical(logits=ref))
    assert torch.allclose(whole, expected, atol=1e-6)
    monkeypatch.setattr(drift, "CHUNK_ELEMENTS", 25)  # two rows of 11 logits per chunk
    assert torch.equal(drift.rows_kl(policy, ref), whole)
    assert drift.rows_kl(policy[:0], ref[:0]).shape == (0,)


def test_mean_displacement_by_position_and_by_id() -> None:
    """chosen Δ = (-1 - -1.5, -2 - -1) = (0.5, -1) -> -0.25; rejected Δ = (-4 - -3, -3 - -3) = (-1, 0) -> -0.5."""
    then = PairLogps(["a", "b"], torch.tensor([-1.5, -1.0]), torch.tensor([-3.0, -3.0]))
    now = PairLogps(["a", "b"], torch.tensor([-1.0, -2.0]), torch.tensor([-4.0, -3.0]))
    assert mean_displacement(now, then) == pytest.approx((-0.25, -0.5))
    reordered = PairLogps(["b", "c", "a"], torch.tensor([-2.0, 7.0, -1.0]), torch.tensor([-3.0, 7.0, -4.0]))
    assert mean_displacement(reordered, then) == pytest.approx((-0.25, -0.5))  # 'c' was not there at learning
    disjoint = PairLogps(["z"], torch.tensor([0.0]), torch.tensor([0.0]))
    assert all(math.isnan(v) for v in mean_displacement(disjoint, then))


def test_tracker_state_round_trips_through_json() -> None:
    tracker = DriftTracker()
    tracker.record("t1", PairLogps(["a"], torch.tensor([-1.25]), torch.tensor([-3.5])))
    restored = DriftTracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    now = PairLogps(["a"], torch.tensor([-2.0]), torch.tensor([-3.0]))
    assert restored.displacement("t1", now) == pytest.approx(
        {"chosen_displacement": -0.75, "rejected_displacement": 0.5}
    )
    assert all(math.isnan(v) for v in restored.displacement("never-learned", now).values())


def test_kl_is_zero_for_fresh_adapter_and_matches_oracle_after_update(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    ctx = make_ctx(model, tokenizer)
    examples = task_examples(ctx, TASK)
    assert kl_to_reference(ctx, examples) == 0.0  # lora_B = 0: the policy is the reference
    perturb_lora(model, seed=1)
    got = kl_to_reference(ctx, examples)
    total, count = 0.0, 0
    for ex in examples:  # unpadded, one sequence at a time, KL from torch.distributions
        ids = torch.tensor([ex["prompt_ids"] + ex["chosen_ids"]])
        with torch.no_grad():
            pol = model(input_ids=ids).logits[0]
            with reference_context(model):
                ref = model(input_ids=ids).logits[0]
        start = len(ex["prompt_ids"]) - 1  # logits at start..T-2 predict the response tokens
        kl = kl_divergence(Categorical(logits=pol[start:-1]), Categorical(logits=ref[start:-1]))
        total, count = total + kl.sum().item(), count + kl.numel()
    assert got > 0 and got == pytest.approx(total / count, rel=1e-4)


def test_measure_drift_records_at_learning_then_reports_displacement(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    perturb_lora(model, seed=2)
    tracker = DriftTracker()
    ctx = make_ctx(model, tokenizer)
    at_learning = measure_drift(ctx, TASK, tracker, just_learned=True)
    assert at_learning["chosen_displacement"] == 0.0 and at_learning["rejected_displacement"] == 0.0
    assert at_learning["kl"] > 0
    then = tracker.at_learning["toy"]
    perturb_lora(model, seed=3)  # "training the next task" moves the policy
    ctx.new_pass()
    later = measure_drift(ctx, TASK, tracker, just_learned=False)
    with torch.no_grad():
        now = pair_logps(model, task_examples(ctx, TASK), tokenizer.pad_token_id, batch_size=3)
    expected_chosen = (now.chosen - then.chosen).mean().item()
    assert later["chosen_displacement"] == pytest.approx(expected_chosen, abs=1e-4)
    assert later["rejected_displacement"] == pytest.approx((now.rejected - then.rejected).mean().item(), abs=1e-4)
    assert later["chosen_displacement"] != 0.0


def test_displacement_items_by_id() -> None:
    """Per matched pair: chosen Δ b = -2 - -1 = -1, a = -1 - -1.5 = 0.5; rejected Δ b = 0, a = -1 ('c' unmatched)."""
    then = PairLogps(["a", "b"], torch.tensor([-1.5, -1.0]), torch.tensor([-3.0, -3.0]))
    now = PairLogps(["b", "c", "a"], torch.tensor([-2.0, 7.0, -1.0]), torch.tensor([-3.0, 7.0, -4.0]))
    items = displacement_items(now, then)
    assert items["chosen_displacement"].ids == items["rejected_displacement"].ids == ["b", "a"]
    assert items["chosen_displacement"].values == [-1.0, 0.5] and items["rejected_displacement"].values == [0.0, -1.0]
    tracker = DriftTracker()
    assert all(v.n == 0 for v in tracker.displacement_items("never-learned", now).values())


def test_drift_items_recover_measure_drift(tiny_lora_model) -> None:
    """kl items: per-pair per-token KL weighted by the pair's response tokens; the weighted mean is the
    token-weighted KL of measure_drift. Displacement items average to its displacements."""
    model, tokenizer = tiny_lora_model
    perturb_lora(model, seed=2)
    ctx = make_ctx(model, tokenizer)
    tracker = DriftTracker()
    scores, items = measure_drift_with_items(ctx, TASK, tracker, just_learned=True)
    assert items["kl"].ids == ["p0", "p1", "p2"] and items["chosen_displacement"].values == [0.0, 0.0, 0.0]
    examples = task_examples(ctx, TASK)
    assert items["kl"].weights == [float(len(e["chosen_ids"])) for e in examples]
    rows = kl_rows(ctx, examples)
    assert items["kl"].values == pytest.approx([kl / n for kl, n in rows], rel=1e-12)
    assert scores["kl"] == kl_to_reference(ctx, examples)  # the same rows, pooled the same way as before
    perturb_lora(model, seed=3)
    ctx.new_pass()
    scores, items = measure_drift_with_items(ctx, TASK, tracker, just_learned=False)
    assert scores == measure_drift(ctx, TASK, tracker, just_learned=False)
    for key, values in items.items():
        assert values.n == 3 and values.n_failed == 0
        assert values.mean() == pytest.approx(scores[key], rel=1e-12)
    assert measure_drift_items(ctx, TASK, tracker, just_learned=False)["kl"].values == items["kl"].values
    assert scores["chosen_displacement"] != 0.0
