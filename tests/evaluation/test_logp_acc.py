"""``logp_acc``: likelihood preference accuracy, raw and length-normalised, by hand and against an independent
unpadded forward on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.evaluation.scorers import build_scorers, evaluate_task_with_items
from lifealign.evaluation.scorers import preference as preference_module
from lifealign.evaluation.scorers.base import EvalContext
from lifealign.evaluation.scorers.logp_acc import LogpAccuracy, likelihood_wins
from lifealign.evaluation.scorers.preference import pair_logps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    PreferencePair("What is 2+2?", "It is 4.", "5", id="p0"),
    PreferencePair("Name a colour.", "Blue.", "A number, like seven.", id="p1"),
    PreferencePair("Say hi", "Hi there!", "No.", id="p2"),
    PreferencePair("Capital of France?", "Paris", "Rome, I think", id="p3"),
    PreferencePair("Is fire cold?", "No, it is hot.", "Yes", id="p4"),
    PreferencePair("Spell cat.", "C-A-T", "K", id="p5"),
]
TASK = Task(name="toy", train=[], test=PAIRS)


def make_ctx(model, tokenizer) -> EvalContext:
    return EvalContext(
        model=model,
        tokenizer=tokenizer,
        data=DataSection(max_length=128, max_prompt_length=64),
        eval=EvalSection(max_examples=6, batch_size=4),
    )


def oracle_logps(model: torch.nn.Module, example: dict, side: str) -> tuple[float, int]:
    """``(Σ_t log softmax(z_{t-1})[y_t], |y|)`` over the response, from one unpadded fp64 forward."""
    prompt, response = example["prompt_ids"], example[f"{side}_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) + k - 1, tok].item() for k, tok in enumerate(response)), len(response)


def test_likelihood_wins_hand_computed() -> None:
    """(summed logp, tokens) chosen vs rejected, per-token mean in brackets:
    p0: (-3, 3) [-1]   vs (-5, 2) [-2.5] -> raw win,  norm win
    p1: (-4, 2) [-2]   vs (-4, 4) [-1]   -> raw tie,  norm loss
    p2: (-6, 6) [-1]   vs (-3, 1) [-3]   -> raw loss, norm win  (the longer chosen pays for its length)
    p3: (-1, 1) [-1]   vs (-3, 2) [-1.5] -> raw win,  norm win
    raw = 100·(1 + ½ + 0 + 1)/4 = 62.5; normalised = 100·(1 + 0 + 1 + 1)/4 = 75."""
    chosen, rejected = torch.tensor([-3.0, -4.0, -6.0, -1.0]), torch.tensor([-5.0, -4.0, -3.0, -3.0])
    raw, norm = likelihood_wins(chosen, rejected, torch.tensor([3, 2, 6, 1]), torch.tensor([2, 4, 1, 2]))
    assert raw.tolist() == [100.0, 50.0, 0.0, 100.0] and raw.mean().item() == 62.5
    assert norm.tolist() == [100.0, 0.0, 100.0, 100.0] and norm.mean().item() == 75.0
    # A side without tokens has no per-token mean: the normalised item is NaN (a failed item), the raw one is not.
    raw0, norm0 = likelihood_wins(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0]), torch.tensor([2]))
    assert raw0.tolist() == [100.0] and math.isnan(norm0.item())


def test_pair_logps_carry_response_token_counts(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    ctx = make_ctx(model, tokenizer)
    examples = tokenize_pairs(PAIRS, tokenizer, ctx.data).examples
    logps = pair_logps(model, examples, tokenizer.pad_token_id, batch_size=4)
    assert logps.chosen_tokens.tolist() == [len(e["chosen_ids"]) for e in examples]
    assert logps.rejected_tokens.tolist() == [len(e["rejected_ids"]) for e in examples]


@pytest.mark.parametrize("perturb", [False, True], ids=["fresh_adapter", "perturbed_adapter"])
def test_logp_acc_matches_an_independent_forward(tiny_lora_model, perturb: bool) -> None:
    """With a fresh adapter pref_acc is 50 by construction (policy = reference); logp_acc still measures the
    model: per pair the oracle's summed and per-token log-likelihoods decide win / tie / loss."""
    model, tokenizer = tiny_lora_model
    if perturb:
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    ctx = make_ctx(model, tokenizer)
    scores, items = evaluate_task_with_items(ctx, TASK, build_scorers(["pref_acc", "logp_acc"]))
    examples = tokenize_pairs(PAIRS, tokenizer, ctx.data).examples
    raw, norm = [], []
    for ex in examples:
        (lc, nc), (lr, nr) = oracle_logps(model, ex, "chosen"), oracle_logps(model, ex, "rejected")
        assert abs(lc - lr) > 1e-3 and abs(lc / nc - lr / nr) > 1e-3  # no near-ties: fp32 vs fp64 cannot flip one
        raw.append(100.0 if lc > lr else 0.0)
        norm.append(100.0 if lc / nc > lr / nr else 0.0)
    assert items["logp_acc"].ids == [e["id"] for e in examples] == [p.id for p in PAIRS]
    assert items["logp_acc"].values == raw and items["logp_acc_norm"].values == norm
    assert scores["logp_acc"] == pytest.approx(sum(raw) / len(raw))
    assert scores["logp_acc_norm"] == pytest.approx(sum(norm) / len(norm))
    assert 0 < sum(raw) < 100 * len(raw) and raw != norm  # wins and losses; normalising changes some verdicts
    if not perturb:
        assert scores["pref_acc"] == 50.0


def test_logp_acc_reuses_the_policy_log_probs_of_the_pass(tiny_lora_model, monkeypatch) -> None:
    model, tokenizer = tiny_lora_model
    calls = []
    original = preference_module.sharded_pair_logps
    monkeypatch.setattr(preference_module, "sharded_pair_logps", lambda *a: calls.append(1) or original(*a))
    ctx = make_ctx(model, tokenizer)
    evaluate_task_with_items(ctx, TASK, build_scorers(["pref_acc", "logp_acc"]))
    assert len(calls) == 2  # the policy once and the reference once; logp_acc added no forward
    assert LogpAccuracy.name == "logp_acc" and not LogpAccuracy.needs_generation
