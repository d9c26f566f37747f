"""The ``rule`` scorer: the pure mean of the synthetic rules (hand-computed), task resolution, and the scorer on a
cached and on a real (tiny-model) generation pass."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.records import PreferencePair, Task
from lifealign.data.synthetic import SYNTHETIC_TASKS, make_synthetic_task
from lifealign.evaluation.scorers.base import EvalContext, Generations
from lifealign.evaluation.scorers.rule import RuleScorer, prompt_text, rule_items, rule_score, synthetic_name


def test_rule_score_hand_computed() -> None:
    """arithmetic (sign-off rule): 1 + 1 + 0 + 0 = 2 over 4 -> 50.
    warnings (caps rule): "ABcd" -> (0.5 - 0.25)/0.65 = 0.3846, "PARIS." -> 1 -> mean 0.6923 -> 69.23."""
    responses = ["4. Hope this helps!", "Hope this helps! 4.", "4.", "Hope it helps."]
    assert rule_score("arithmetic", ["q"] * 4, responses) == pytest.approx(50.0)
    assert rule_score("warnings", ["q", "q"], ["ABcd", "PARIS."]) == pytest.approx(100 * (0.25 / 0.65 + 1) / 2)
    assert math.isnan(rule_score("safety", [], []))


def test_rule_score_rejects_unknown_task_and_length_mismatch() -> None:
    with pytest.raises(ValueError, match="no rule for task 'poetry'"):
        rule_score("poetry", ["q"], ["a"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rule_score("safety", ["q", "q"], ["a"])


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_rule_score_is_100_on_chosen_and_0_on_rejected(name: str) -> None:
    test = make_synthetic_task(name, n_train=1, n_test=32).test
    prompts = [p.prompt for p in test]
    assert rule_score(name, prompts, [p.chosen for p in test]) == 100.0
    assert rule_score(name, prompts, [p.rejected for p in test]) == 0.0


def test_prompt_text_reads_the_last_user_turn() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "last"},
    ]
    assert prompt_text(conversation) == "last" and prompt_text("plain") == "plain" and prompt_text([]) == ""


def test_synthetic_name_from_task_name_or_record_ids() -> None:
    """The loader renames a synthetic task's records to the configured task name but keeps the ids."""
    task = make_synthetic_task("support", n_train=2, n_test=2)
    assert synthetic_name(task) == "support"
    renamed = Task(
        name="stage_3",
        train=[replace(p, task="stage_3") for p in task.train],
        test=[replace(p, task="stage_3") for p in task.test],
    )
    assert synthetic_name(renamed) == "support"
    assert synthetic_name(Task(name="file_task", train=[PreferencePair("q", "a", "b", id="x/1")])) is None


def cached_ctx(task_name: str, prompts: list[str], completions: list[str]) -> EvalContext:
    """A context whose generation pass for ``task_name`` is already cached, so no model runs."""
    ctx = EvalContext(model=torch.nn.Linear(1, 1), tokenizer=None, data=DataSection(), eval=EvalSection())
    ctx.generations[task_name] = Generations(
        ids=[str(i) for i in range(len(prompts))],
        prompts=prompts,
        completions=completions,
        references=[""] * len(prompts),
    )
    return ctx


def test_scorer_scores_the_cached_generations_of_a_renamed_task() -> None:
    """Safety rule on ["I can't help with that." (1), "Sure! Here is how." (0)] -> 50."""
    task = make_synthetic_task("safety", n_train=1, n_test=2)
    task = Task(name="harm", train=task.train, test=task.test)
    ctx = cached_ctx("harm", ["q1", "q2"], ["I can't help with that.", "Sure! Here is how."])
    assert RuleScorer.name == "rule" and RuleScorer.needs_generation
    assert RuleScorer().score(ctx, task) == {"rule": pytest.approx(50.0)}


def test_scorer_is_nan_outside_the_synthetic_suite() -> None:
    task = Task(name="file_task", train=[], test=[PreferencePair("q", "a", "b", id="f/0")])
    ctx = cached_ctx("file_task", ["q"], ["Hope this helps!"])
    assert math.isnan(RuleScorer().score(ctx, task)["rule"])


def test_scorer_runs_a_real_generation_pass(tiny_model_and_tokenizer) -> None:
    """On the tiny random model: the score is the rule mean of exactly the completions the pass generated."""
    model, tokenizer = tiny_model_and_tokenizer
    task = make_synthetic_task("arithmetic", n_train=1, n_test=3)
    ctx = EvalContext(
        model=model,
        tokenizer=tokenizer,
        data=DataSection(max_length=128, max_prompt_length=64),
        eval=EvalSection(generation_examples=2, max_new_tokens=4, batch_size=2),
    )
    result = RuleScorer().score(ctx, task)
    gens = ctx.generations["arithmetic"]
    assert gens.prompts == [p.prompt for p in task.test[:2]] and len(gens.completions) == 2
    assert result == {"rule": rule_score("arithmetic", gens.prompts, gens.completions)}
    assert 0.0 <= result["rule"] <= 100.0


def test_rule_items_are_the_per_completion_rule_values() -> None:
    """Safety rule per completion: 100, 0 -> the mean 50 of test_scorer_scores_the_cached_generations..."""
    task = make_synthetic_task("safety", n_train=1, n_test=2)
    task = Task(name="harm", train=task.train, test=task.test)
    ctx = cached_ctx("harm", ["q1", "q2"], ["I can't help with that.", "Sure! Here is how."])
    items = RuleScorer().score_items(ctx, task)["rule"]
    assert items.ids == ["0", "1"] and items.values == [100.0, 0.0] and items.mean() == 50.0
    assert rule_items("safety", ["q1", "q2"], ["I can't help with that.", "Sure! Here is how."]) == [100.0, 0.0]
