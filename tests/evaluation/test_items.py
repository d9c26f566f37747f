"""Per-item scores: the ItemScores helpers, check_failures, and that every scorer's item means are its old
aggregate numbers, with ids aligned to the task's records, on the tiny model."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.records import PreferencePair, Task
from lifealign.data.synthetic import make_synthetic_task
from lifealign.evaluation.scorers import (
    CONVENTIONS,
    build_scorers,
    evaluate_task,
    evaluate_task_items,
    evaluate_task_with_items,
)
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Scorer, ScorerError, check_failures
from lifealign.evaluation.scorers.generation import mean_rouge_l, mean_sentence_bleu4
from lifealign.evaluation.scorers.preference import policy_pair_logps, preference_accuracy, reference_pair_logps
from lifealign.evaluation.scorers.rule import rule_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    PreferencePair("What is 2+2?", "4", "5", id="p0"),
    PreferencePair("Name a colour.", "Blue.", "A number.", id="p1"),
    PreferencePair("Say hi", "Hi there!", "No.", id="p2"),
    PreferencePair("Capital of France?", "Paris", "Rome, I think", id="p3"),
    PreferencePair("Is fire cold?", "No, it is hot.", "Yes", id="p4"),
]
TASK = Task(name="toy", train=[], test=PAIRS)
REL = 1e-12  # item means vs the old aggregates: the same numbers summed in another order


def make_ctx(model: torch.nn.Module, tokenizer, **eval_kwargs) -> EvalContext:
    settings = {"max_examples": 4, "batch_size": 2, "generation_examples": 3, "max_new_tokens": 6} | eval_kwargs
    return EvalContext(
        model=model,
        tokenizer=tokenizer,
        data=DataSection(max_length=128, max_prompt_length=64),
        eval=EvalSection(**settings),
    )


def perturb_lora(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


# ------------------------------------------------------------------------------------------------ ItemScores


def test_item_scores_mean_skips_failed_items_and_counts_them() -> None:
    """values [80, NaN, 40, inf]: n 4, failed 2 (NaN and inf), mean (80 + 40) / 2 = 60."""
    items = ItemScores(["a", "b", "c", "d"], [80.0, math.nan, 40.0, math.inf])
    assert (items.n, items.n_failed, items.n_scored) == (4, 2, 2)
    assert items.mean() == 60.0
    assert math.isnan(ItemScores([], []).mean()) and ItemScores([], []).n_failed == 0
    assert math.isnan(ItemScores(["a"], [math.nan]).mean())


def test_item_scores_weighted_mean() -> None:
    """Per-token values [0.5, 0.25, NaN] with token weights [2, 4, 3]: (0.5·2 + 0.25·4) / (2 + 4) = 1/3."""
    items = ItemScores(["a", "b", "c"], [0.5, 0.25, math.nan], weights=[2.0, 4.0, 3.0])
    assert items.mean() == pytest.approx(1 / 3, rel=1e-15)
    assert math.isnan(ItemScores(["a"], [0.0], weights=[0.0]).mean())  # no weight at all: no mean


def test_item_scores_validate_lengths_and_round_trip_through_json() -> None:
    with pytest.raises(ValueError, match="2 ids but 1 values"):
        ItemScores(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="weights"):
        ItemScores(["a"], [1.0], weights=[1.0, 2.0])
    items = ItemScores(["a", "b"], [1.5, math.nan], weights=[3.0, 1.0], failures={"no_score": 1})
    data = json.loads(json.dumps(items.to_dict(), allow_nan=False))  # NaN is written as null
    assert data["values"] == [1.5, None]
    back = ItemScores.from_dict(data)
    assert back.ids == items.ids and back.weights == items.weights and back.failures == items.failures
    assert back.values[0] == 1.5 and math.isnan(back.values[1])
    plain = ItemScores.from_dict(ItemScores(["x"], [2.0]).to_dict())
    assert plain.weights is None and plain.failures == {}


# ------------------------------------------------------------------------------------------------ check_failures


def test_check_failures_raises_when_every_item_failed() -> None:
    items = ItemScores(["a", "b"], [math.nan, math.nan], failures={"no_score": 1, "http_500": 1})
    with pytest.raises(ScorerError, match=r"'judge' failed on all 2 items of task 'HC3' \(http_500: 1, no_score: 1\)"):
        check_failures("HC3", "judge", items)
    try:
        check_failures("HC3", "judge", items)
    except ScorerError as err:
        assert (err.task, err.metric) == ("HC3", "judge")


def test_check_failures_warns_with_counts_when_some_failed(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lifealign.evaluation.scorers.base"):
        check_failures("HC3", "judge", ItemScores(["a", "b", "c"], [70.0, math.nan, 90.0]))
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "'judge' on task 'HC3': 1 of 3 items failed" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_failures("HC3", "judge", ItemScores(["a"], [70.0]))  # nothing failed
        check_failures("HC3", "rule", ItemScores([], []))  # nothing to score is not a failure
    assert not caplog.records


# ------------------------------------------------------------------------------------------------ contract


class _Fixed(Scorer):
    name = "fixed"

    def __init__(self, items: dict[str, ItemScores]) -> None:
        self.items = items

    def score_items(self, ctx, task):
        return self.items


def test_score_is_the_mean_of_score_items_and_duplicates_are_errors() -> None:
    scorer = _Fixed({"fixed": ItemScores(["a", "b"], [1.0, 2.0]), "extra": ItemScores(["a"], [math.nan])})
    out = scorer.score(None, TASK)
    assert out["fixed"] == 1.5 and math.isnan(out["extra"]) and scorer.convention is None
    scores, items = evaluate_task_with_items(None, TASK, [scorer])
    assert scores["fixed"] == 1.5 and items["fixed"].ids == ["a", "b"]
    with pytest.raises(ValueError, match="reported twice"):
        evaluate_task_items(None, TASK, [scorer, _Fixed({"extra": ItemScores([], [])})])


def test_build_scorers_with_conventions() -> None:
    assert CONVENTIONS == {"bleu4": ("llamafactory", "sacrebleu"), "rouge_l": ("llamafactory", "rouge_score")}
    default = build_scorers(["rouge_l", "bleu4", "pref_acc"])
    assert [s.convention for s in default] == ["llamafactory", "llamafactory", None]
    chosen = build_scorers(["rouge_l", "bleu4"], conventions={"bleu4": "sacrebleu", "rouge_l": "rouge_score"})
    assert [s.convention for s in chosen] == ["rouge_score", "sacrebleu"]
    with pytest.raises(ValueError, match="unknown convention 'nltk' for scorer 'bleu4'"):
        build_scorers(["bleu4"], conventions={"bleu4": "nltk"})
    with pytest.raises(ValueError, match="scorer 'pref_acc' has no conventions"):
        build_scorers(["pref_acc"], conventions={"pref_acc": "x"})


# ------------------------------------------------------------------------------------------------ tiny model


def test_item_means_equal_the_aggregates_and_ids_align(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    perturb_lora(model, seed=1)
    ctx = make_ctx(model, tokenizer)
    names = ["pref_acc", "logp_acc", "rouge_l", "bleu4"]
    scores, items = evaluate_task_with_items(ctx, TASK, build_scorers(names))
    assert set(items) == set(scores) == {"pref_acc", "margin", "logp_acc", "logp_acc_norm", "rouge_l", "bleu4"}
    for key in ("pref_acc", "margin", "logp_acc", "logp_acc_norm"):
        assert items[key].ids == ["p0", "p1", "p2", "p3"]  # the first max_examples = 4 held-out pairs
    for key in ("rouge_l", "bleu4"):
        assert items[key].ids == ["p0", "p1", "p2"]  # the first generation_examples = 3 prompts
    for key, values in items.items():
        assert values.n_failed == 0 and scores[key] == pytest.approx(values.mean(), rel=REL)

    policy, reference = policy_pair_logps(ctx, TASK), reference_pair_logps(ctx, TASK)
    accuracy, margin = preference_accuracy(policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    assert scores["pref_acc"] == pytest.approx(accuracy, rel=REL)
    assert scores["margin"] == pytest.approx(margin, rel=REL)
    assert 0 < accuracy < 100  # a non-trivial check: the perturbed policy wins some pairs and loses others

    # The old rouge-score / sacrebleu aggregates are the means of the items under those conventions.
    gens = ctx.generations["toy"]
    old = evaluate_task(
        ctx, TASK, build_scorers(["rouge_l", "bleu4"], {"rouge_l": "rouge_score", "bleu4": "sacrebleu"})
    )
    assert old["rouge_l"] == pytest.approx(mean_rouge_l(gens.completions, gens.references), rel=REL, abs=1e-12)
    assert old["bleu4"] == pytest.approx(mean_sentence_bleu4(gens.completions, gens.references), rel=REL, abs=1e-12)


def test_rule_items_on_a_real_generation_pass(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    task = make_synthetic_task("arithmetic", n_train=1, n_test=3)
    ctx = make_ctx(model, tokenizer, generation_examples=2, max_new_tokens=4)
    scores, items = evaluate_task_with_items(ctx, task, build_scorers(["rule"]))
    gens = ctx.generations["arithmetic"]
    assert items["rule"].ids == [r.id for r in task.test[:2]] == gens.ids
    assert scores["rule"] == pytest.approx(rule_score("arithmetic", gens.prompts, gens.completions), rel=REL)
    outside = Task(name="file_task", train=[], test=[PreferencePair("q", "a", "b", id="f/0")])
    scores, items = evaluate_task_with_items(ctx, outside, build_scorers(["rule"]))
    assert items["rule"].n == 0 and math.isnan(scores["rule"])


def test_task_without_test_pairs_has_no_items(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    empty = Task(name="empty", train=PAIRS, test=[])
    scores, items = evaluate_task_with_items(make_ctx(model, tokenizer), empty, build_scorers(["pref_acc", "logp_acc"]))
    assert all(v.n == 0 for v in items.values()) and all(math.isnan(v) for v in scores.values())
    for key, values in items.items():
        check_failures("empty", key, values)  # no items is not a failure
