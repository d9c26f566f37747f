"""Reward-model scoring with a tiny random LlamaForSequenceClassification saved to disk by the test."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForSequenceClassification

from lifealign.evaluation.scorers.reward_model import (
    RewardModelScorer,
    load_reward_model,
    reward_input_ids,
    reward_scores,
)
from lifealign.models.tiny import save_tiny, tiny_config, tiny_tokenizer

IM_START, IM_END, NEWLINE = 258, 259, 10

PROMPTS = ["hi", "Please explain in detail why the sky looks blue at noon.", [{"role": "user", "content": "2+2?"}], "x"]
RESPONSES = ["hello there, friend", "ok", "It is 4.", "a much longer answer that goes on and on for a while"]


def save_reward_model(path, *, chat_template: bool = True, pad_in_config: bool = True, seed: int = 0):
    tokenizer = tiny_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer))
    config.num_labels = 1
    if not pad_in_config:
        config.pad_token_id = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    # A random head with std 0.02 gives near-zero rewards; scale it so score differences are far above fp noise.
    model.score.weight.data.mul_(50.0)
    if not chat_template:
        tokenizer.chat_template = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm"))


def chatml_ids(prompt, response: str) -> list[int]:
    """The tiny tokenizer's ChatML rendering built by hand (byte ids + special ids), independent of Jinja."""
    user = prompt if isinstance(prompt, str) else prompt[0]["content"]
    turn = lambda role, text: [IM_START, *f"{role}\n{text}".encode(), IM_END, NEWLINE]  # noqa: E731
    return turn("user", user) + turn("assistant", response)


def manual_reward(model, ids: list[int]) -> float:
    """Unpadded forward through the backbone, score head applied to the final position by hand."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(model.score(hidden)[0])


def test_rendering_uses_the_chat_template_and_truncates_from_the_left(reward_dir):
    _, tokenizer = load_reward_model(reward_dir)
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        assert reward_input_ids(tokenizer, prompt, response) == chatml_ids(prompt, response)
    assert reward_input_ids(tokenizer, "hi", "yo", max_length=5) == chatml_ids("hi", "yo")[-5:]


def test_scores_equal_a_manual_forward_and_do_not_depend_on_batch_size(reward_dir):
    model, tokenizer = load_reward_model(reward_dir)
    expected = [manual_reward(model, chatml_ids(p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert max(expected) - min(expected) > 0.05  # the examples are distinguishable
    for batch_size in (1, 3, 4, 16):
        got = reward_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-5), batch_size


def test_scores_are_deterministic_across_loads(reward_dir):
    first = reward_scores(*load_reward_model(reward_dir), PROMPTS, RESPONSES, batch_size=2)
    second = reward_scores(*load_reward_model(reward_dir), PROMPTS, RESPONSES, batch_size=2)
    assert first == second  # same load, same batching: bit-identical (other batch sizes are checked above to 1e-5)


def test_without_chat_template_prompt_and_response_are_concatenated(tmp_path):
    model, tokenizer = load_reward_model(save_reward_model(tmp_path, chat_template=False))
    prompts, responses = ["Question: why?", "Q2"], [" Because.", " A much longer second answer."]
    assert reward_input_ids(tokenizer, prompts[0], responses[0]) == list(b"Question: why? Because.")
    expected = [manual_reward(model, list((p + r).encode())) for p, r in zip(prompts, responses, strict=True)]
    assert reward_scores(model, tokenizer, prompts, responses, batch_size=2) == pytest.approx(expected, abs=1e-5)


def test_missing_pad_id_is_set_from_the_tokenizer(tmp_path):
    directory = save_reward_model(tmp_path, pad_in_config=False)
    raw = LlamaForSequenceClassification.from_pretrained(directory)
    assert raw.config.pad_token_id is None
    with pytest.raises(ValueError, match="pad_token_id"):
        reward_scores(raw, tiny_tokenizer(), PROMPTS[:2], RESPONSES[:2], batch_size=2)
    model, tokenizer = load_reward_model(directory)
    assert model.config.pad_token_id == tokenizer.pad_token_id == 257
    expected = [manual_reward(model, chatml_ids(p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert reward_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=4) == pytest.approx(expected, abs=1e-5)


def test_a_causal_lm_directory_is_not_a_reward_model(tmp_path):
    with pytest.raises(ValueError, match="not a trained reward model"):
        load_reward_model(save_tiny(tmp_path / "lm"))
    with pytest.raises(FileNotFoundError):
        load_reward_model(tmp_path / "nowhere")


def test_reward_model_scorer_averages_generation_rewards(reward_dir):
    base = pytest.importorskip("lifealign.evaluation.scorers.base", reason="scorers/base.py dependencies missing")
    from lifealign.config.schema import DataSection, EvalSection
    from lifealign.data.records import PreferencePair, Task

    task = Task(name="t", train=[], test=[PreferencePair(p, "c", "r") for p in PROMPTS])
    ctx = base.EvalContext(model=None, tokenizer=None, data=DataSection(), eval=EvalSection(), device="cpu")
    ctx.generations["t"] = base.Generations(
        ids=["0", "1", "2", "3"], prompts=PROMPTS, completions=RESPONSES, references=["c"] * 4
    )
    model, tokenizer = load_reward_model(reward_dir)
    expected = sum(manual_reward(model, chatml_ids(p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)) / 4
    assert RewardModelScorer(reward_dir, batch_size=3).score(ctx, task) == {
        "reward_model": pytest.approx(expected, abs=1e-5)
    }
    ctx.generations["t"] = base.Generations(ids=[], prompts=[], completions=[], references=[])
    assert math.isnan(RewardModelScorer(reward_dir).score(ctx, task)["reward_model"])
    with pytest.raises(ValueError, match="eval.reward_model"):
        RewardModelScorer().score(
            ctx.__class__(
                model=None,
                tokenizer=None,
                data=DataSection(),
                eval=EvalSection(),
                generations={"t": base.Generations(["0"], ["p"], ["g"], ["c"])},
            ),
            task,
        )


def test_reward_model_items_are_the_per_generation_rewards(reward_dir):
    from lifealign.config.schema import DataSection, EvalSection
    from lifealign.data.records import PreferencePair, Task
    from lifealign.evaluation.scorers.base import EvalContext, Generations

    task = Task(name="t", train=[], test=[PreferencePair(p, "c", "r", id=f"r{i}") for i, p in enumerate(PROMPTS)])
    ctx = EvalContext(model=None, tokenizer=None, data=DataSection(), eval=EvalSection(), device="cpu")
    ctx.generations["t"] = Generations(
        ids=["r0", "r1", "r2", "r3"], prompts=PROMPTS, completions=RESPONSES, references=["c"] * 4
    )
    model, tokenizer = load_reward_model(reward_dir)
    expected = reward_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=3)
    scorer = RewardModelScorer(reward_dir, batch_size=3)
    items = scorer.score_items(ctx, task)["reward_model"]
    assert items.ids == ["r0", "r1", "r2", "r3"] and items.values == pytest.approx(expected, abs=1e-6)
    assert scorer.score(ctx, task)["reward_model"] == pytest.approx(sum(expected) / 4, abs=1e-6)
    ctx.generations["t"] = Generations(ids=[], prompts=[], completions=[], references=[])
    assert scorer.score_items(ctx, task)["reward_model"].n == 0
