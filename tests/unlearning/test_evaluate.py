"""Evaluation against the original model: values at the reference, after a change, and generation scorers."""

from __future__ import annotations

import math

import pytest
import torch

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.synthetic import make_synthetic_task
from lifealign.evaluation.scorers import build_scorers
from lifealign.models.lora import lora_parameters
from lifealign.unlearning.evaluate import evaluate_unlearning, mean_token_nll, prepare_eval_sets

DATA = DataSection(max_length=96, max_prompt_length=48)


def test_metrics_at_the_reference_after_a_change_and_with_a_generation_scorer(lora_factory, tokenize):
    model, tok = lora_factory()
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.zero_()  # policy == original model
    task = make_synthetic_task("safety", n_train=6, n_test=3)
    forget = tokenize(task.train[:3], tok, ("rejected",))
    retain = tokenize(task.train[3:], tok, ("chosen",))
    sets = prepare_eval_sets(model, tok, DATA, task.test, forget, retain, limit=None, batch_size=2)
    cfg = EvalSection(max_new_tokens=4, generation_examples=2, batch_size=2)
    evaluation = evaluate_unlearning(
        model, tok, sets, beta=0.3, data=DATA, eval_cfg=cfg, scorers=build_scorers(["pref_acc", "rouge_l"])
    )
    metrics = evaluation.metrics
    assert metrics["pref_acc"] == 50.0 and metrics["margin"] == 0.0
    # per held-out pair, at the reference: a tie (50), margin 0, J = ln 2, delta_J = 0
    ids = [str(ex["id"]) for ex in sets.test]
    assert set(evaluation.items) == {"pref_acc", "J", "delta_J", "margin"}
    assert all(evaluation.items[m].ids == ids for m in evaluation.items)
    assert evaluation.items["pref_acc"].values == [50.0] * 3 and evaluation.items["margin"].values == [0.0] * 3
    assert evaluation.items["J"].values == pytest.approx([math.log(2)] * 3, abs=1e-6)
    assert metrics["J"] == pytest.approx(math.log(2), abs=1e-6) and metrics["delta_J"] == pytest.approx(0, abs=1e-6)
    assert 0.0 <= metrics["rouge_l"] <= 100.0
    # forget NLL is token-weighted: -sum log p / sum |y| over the forget responses
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for ex in forget:  # an independent oracle: log-softmax of the unpadded sequence, response tokens only
            ids = torch.tensor([ex["prompt_ids"] + ex["rejected_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            start = len(ex["prompt_ids"])
            total -= float(logp[start - 1 :, :].gather(1, ids[0, start:, None]).sum())
            n_tokens += len(ex["rejected_ids"])
    assert metrics["forget_nll"] == pytest.approx(total / n_tokens, rel=1e-5)
    assert mean_token_nll(model, forget, "rejected", tok.pad_token_id, 1) == pytest.approx(total / n_tokens, rel=1e-5)
    assert metrics["retain_nll"] > 0
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(0.05)
    moved = evaluate_unlearning(model, tok, sets, beta=0.3, data=DATA, eval_cfg=cfg)
    assert moved.metrics["J"] != pytest.approx(math.log(2), abs=1e-4)
    assert "rouge_l" not in moved.metrics
    # the table's values are the means of the per-pair values; J_i = -log sigmoid(margin_i), delta_J_i = J_i - ln 2
    items = {m: torch.tensor(v.values, dtype=torch.float64) for m, v in moved.items.items()}
    for m in ("pref_acc", "J", "delta_J", "margin"):
        assert moved.metrics[m] == pytest.approx(float(items[m].mean()), abs=1e-12)
    assert items["J"].tolist() == pytest.approx((-torch.nn.functional.logsigmoid(items["margin"])).tolist(), rel=1e-5)
    assert (items["delta_J"] - items["J"]).tolist() == pytest.approx([-math.log(2)] * 3, abs=1e-12)
    assert items["pref_acc"].tolist() == [100.0 * (m > 0) + 50.0 * (m == 0) for m in items["margin"].tolist()]
