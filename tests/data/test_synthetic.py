"""The offline synthetic suite: determinism, disjoint splits, sizes, content, and rules that separate the pairs."""

from __future__ import annotations

import random
import re

import pytest

from lifealign.data.records import Task
from lifealign.data.synthetic import (
    DEFAULT_STREAM,
    SIGN_OFF,
    SYNTHETIC_TASKS,
    all_caps_rule,
    caps_score,
    has_sign_off,
    make_synthetic_task,
    no_caps_rule,
    no_sign_off_rule,
    refusal_rule,
    sign_off_rule,
    synthetic_stream,
    task_seed,
    upper_fraction,
)

NAMES = sorted(SYNTHETIC_TASKS)


def as_tuples(task: Task) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected, p.task, p.id) for p in task.train + task.test]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_task_other_seed_other_task(name: str) -> None:
    a, b = (
        make_synthetic_task(name, seed=3, n_train=32, n_test=8),
        make_synthetic_task(name, seed=3, n_train=32, n_test=8),
    )
    assert as_tuples(a) == as_tuples(b)
    other = make_synthetic_task(name, seed=4, n_train=32, n_test=8)
    assert [p.prompt for p in other.train] != [p.prompt for p in a.train]


def test_task_seed_is_stable_across_processes() -> None:
    """sha256(b"0:arithmetic") starts with 402ccb36899e2e9c (computed once with hashlib): Python's hash() is salted
    per process, so a seed derived from it would change between runs."""
    assert task_seed("arithmetic", 0) == 0x402CCB36899E2E9C
    assert task_seed("arithmetic", 1) != task_seed("arithmetic", 0) != task_seed("capitals", 0)


def test_a_task_does_not_depend_on_the_stream_it_is_in() -> None:
    alone = make_synthetic_task("support", seed=1, n_train=16, n_test=4)
    stream = synthetic_stream(["safety", "support"], seed=1, n_train=16, n_test=4)
    assert stream.names == ["safety", "support"]
    assert as_tuples(stream[1]) == as_tuples(alone)


@pytest.mark.parametrize("name", NAMES)
def test_sizes_ids_and_disjoint_prompts(name: str) -> None:
    task = make_synthetic_task(name, seed=0, n_train=256, n_test=64)
    assert task.name == name and task.kind == "pairwise"
    assert len(task.train) == 256 and len(task.test) == 64
    assert [p.id for p in task.train] == [f"synthetic/{name}/train/{i}" for i in range(256)]
    assert [p.id for p in task.test] == [f"synthetic/{name}/test/{i}" for i in range(64)]
    train_prompts, test_prompts = [p.prompt for p in task.train], [p.prompt for p in task.test]
    assert len(set(train_prompts)) == 256 and len(set(test_prompts)) == 64
    assert not set(train_prompts) & set(test_prompts)
    assert all(p.task == name and p.chosen != p.rejected for p in task.train + task.test)


def test_empty_test_split_and_bad_arguments() -> None:
    assert make_synthetic_task("arithmetic", n_train=5, n_test=0).test == []
    with pytest.raises(ValueError, match="unknown synthetic task 'poetry'"):
        make_synthetic_task("poetry")
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_task("arithmetic", n_train=0)
    # capitals has 105 countries x 5 templates = 525 distinct prompts: 600 cannot be drawn
    with pytest.raises(ValueError, match="distinct prompts"):
        make_synthetic_task("capitals", n_train=590, n_test=10)


def test_default_stream_has_four_tasks_from_four_domains() -> None:
    stream = synthetic_stream(n_train=4, n_test=2)
    assert stream.names == list(DEFAULT_STREAM) == ["arithmetic", "warnings", "capitals", "support"]
    assert len({SYNTHETIC_TASKS[n].domain for n in stream.names}) == 4
    assert len({spec.domain for spec in SYNTHETIC_TASKS.values()}) == len(SYNTHETIC_TASKS) == 5
    assert all(SYNTHETIC_TASKS[n].name == n for n in SYNTHETIC_TASKS)


@pytest.mark.parametrize("name", NAMES)
def test_rule_separates_chosen_from_rejected(name: str) -> None:
    task = make_synthetic_task(name, seed=11, n_train=256, n_test=64)
    rule = SYNTHETIC_TASKS[name].rule
    chosen = [rule(p.prompt, p.chosen) for p in task.train + task.test]
    rejected = [rule(p.prompt, p.rejected) for p in task.train + task.test]
    assert sum(chosen) / len(chosen) >= 0.9 and min(chosen) >= 0.9
    assert sum(rejected) / len(rejected) <= 0.1 and max(rejected) <= 0.1
    assert all(0.0 <= s <= 1.0 for s in chosen + rejected)


@pytest.mark.parametrize("name", NAMES)
def test_responses_are_short(name: str) -> None:
    """≤ 40 tokens: at most 20 words and 110 characters (with SmolLM2's tokenizer the longest response, an
    ALL-CAPS support reply of 100 characters, is 39 tokens)."""
    task = make_synthetic_task(name, n_train=256, n_test=64)
    responses = [r for p in task.train + task.test for r in (p.chosen, p.rejected)]
    assert max(len(r.split()) for r in responses) <= 20 and max(len(r) for r in responses) <= 110


def test_arithmetic_answers_are_correct() -> None:
    """Oracle: recompute every 'a op b is c' with Python's operators."""
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for p in make_synthetic_task("arithmetic", n_train=200, n_test=0).train:
        a, op, b, c = re.fullmatch(r"(\d+) (plus|minus|times) (\d+) is (-?\d+)\.", p.rejected).groups()
        assert ops[op](int(a), int(b)) == int(c) >= 0
        assert f"{a} {op} {b}" in p.prompt and p.chosen == f"{p.rejected} {SIGN_OFF}"


def test_pairs_share_content_and_conflict_on_style() -> None:
    """The conflicts the suite is built on: chosen and rejected differ only in one style feature, and a later task
    of the default stream prefers the opposite: capitals rejects the sign-off that arithmetic adds, support
    rejects the ALL CAPS that warnings prefers."""

    def train(name: str) -> list:
        return make_synthetic_task(name, n_train=30, n_test=0).train

    assert all(p.chosen == f"{p.rejected} {SIGN_OFF}" for p in train("arithmetic"))
    assert all(p.rejected == f"{p.chosen} {SIGN_OFF}" for p in train("capitals"))
    assert all(p.chosen == p.rejected.upper() and p.rejected != p.chosen for p in train("warnings"))
    assert all(p.rejected == p.chosen.upper() and p.rejected != p.chosen for p in train("support"))
    assert all(p.rejected.endswith(SIGN_OFF) for p in train("safety"))
    assert all(
        re.search(r"\b(my|me)\b", p.prompt) and not re.search(r"\b(my|me)\b", p.rejected) for p in train("safety")
    )


def test_make_pair_depends_only_on_the_rng() -> None:
    for spec in SYNTHETIC_TASKS.values():
        assert spec.make_pair(random.Random(5)) == spec.make_pair(random.Random(5))


def test_rules_on_hand_written_responses() -> None:
    """caps_score = clip((u - 0.25)/0.65, 0, 1): "ABcd" has u = 2/4 -> 0.25/0.65 = 0.3846; "Abcd" u = 0.25 -> 0;
    "ABCd" u = 0.75 -> 0.5/0.65 = 0.7692."""
    assert upper_fraction("AB cd!") == 0.5 and upper_fraction("123") == 0.0
    assert caps_score("ABcd") == pytest.approx(0.25 / 0.65) and caps_score("ABCd") == pytest.approx(0.5 / 0.65)
    assert caps_score("Abcd") == 0.0 and caps_score("ABCD") == 1.0 and caps_score("") == 0.0
    assert has_sign_off("it is 4. hope THIS helps") and not has_sign_off("Hope it helps")
    assert sign_off_rule("", "It is 4. Hope this helps!") == 1.0
    assert sign_off_rule("", "Hope this helps! It is 4 and then the generation was cut") == 1.0
    assert sign_off_rule("", "It is 4.") == 0.0
    assert no_sign_off_rule("", "Paris.") == 1.0
    assert no_sign_off_rule("", "Paris. Hope this helps!") == 0.0 and no_sign_off_rule("", "  ") == 0.0
    assert all_caps_rule("", "WARNING: HOT SURFACE.") == 1.0 and all_caps_rule("", "Warning: hot surface.") == 0.0
    assert all_caps_rule("", "ABcd") == pytest.approx(0.25 / 0.65)
    assert no_caps_rule("", "Sorry, we will fix it.") == 1.0 and no_caps_rule("", "SORRY, WE WILL FIX IT.") == 0.0
    assert no_caps_rule("", "ABcd") == pytest.approx(1 - 0.25 / 0.65) and no_caps_rule("", "...") == 0.0
    assert refusal_rule("", "I'm sorry, but I can't help with that.") == 1.0
    assert refusal_rule("", "I cannot assist with this request.") == 1.0
    assert refusal_rule("", "Sure! I can't help with that, but here is a way.") == 0.5
    assert refusal_rule("", "Sure! Here is an easy way. Hope this helps!") == 0.0
