"""Scorers: preference accuracy against a hand-written oracle, ROUGE-L/BLEU-4 against hand-computed values, and
greedy generation against a no-cache argmax loop."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.records import PreferencePair, Task
from lifealign.data.tokenize import tokenize_pairs
from lifealign.evaluation.generate import generate_completions, greedy_generate, left_pad, stop_token_ids
from lifealign.evaluation.scorers import SCORERS, build_scorers, evaluate_task
from lifealign.evaluation.scorers import base as scorers_base
from lifealign.evaluation.scorers.base import EvalContext, Generations, Scorer
from lifealign.evaluation.scorers.generation import Bleu4, RougeL, mean_rouge_l, mean_sentence_bleu4
from lifealign.evaluation.scorers.preference import PreferenceAccuracy, preference_accuracy
from lifealign.models.lora import reference_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    PreferencePair("What is 2+2?", "4", "5", id="p0"),
    PreferencePair("Name a colour.", "Blue.", "A number.", id="p1"),
    PreferencePair("Say hi", "Hi there!", "No.", id="p2"),
    PreferencePair("Capital of France?", "Paris", "Rome, I think", id="p3"),
    PreferencePair("Is fire cold?", "No, it is hot.", "Yes", id="p4"),
]
TASK = Task(name="toy", train=[], test=PAIRS)


def make_ctx(model: torch.nn.Module, tokenizer, **eval_kwargs) -> EvalContext:
    settings = {"max_examples": 4, "batch_size": 2, "generation_examples": 3, "max_new_tokens": 6} | eval_kwargs
    return EvalContext(
        model=model,
        tokenizer=tokenizer,
        data=DataSection(max_length=128, max_prompt_length=64),
        eval=EvalSection(**settings),
    )


def perturb_lora(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Give every lora_B a random value so the policy differs from the reference (peft starts lora_B at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def oracle_logps(model: torch.nn.Module, example: dict, side: str) -> float:
    """log π(response|prompt) from one unpadded forward: Σ_t log softmax(z_{t-1})[y_t] over the response."""
    prompt, response = example["prompt_ids"], example[f"{side}_ids"]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logp[len(prompt) + k - 1, tok].item() for k, tok in enumerate(response))


# ---------------------------------------------------------------------------------------------- pure metric functions


def test_preference_accuracy_hand_computed() -> None:
    """Δ = policy - reference. Chosen Δ = [1, 0, -1, 2], rejected Δ = [0, 0, 1, 3] -> win, tie, loss, loss.
    Accuracy = (1 + 0.5 + 0 + 0) / 4 = 37.5; margin = β·mean(Δc - Δr) = 0.1·(1 + 0 - 2 - 1)/4 = -0.05."""
    ref = torch.tensor([-5.0, -6.0, -7.0, -8.0])
    pc, pr = ref + torch.tensor([1.0, 0.0, -1.0, 2.0]), ref + torch.tensor([0.0, 0.0, 1.0, 3.0])
    acc, margin = preference_accuracy(pc, pr, ref, ref, beta=0.1)
    assert acc == pytest.approx(37.5) and margin == pytest.approx(-0.05)
    acc_big_beta, margin_big_beta = preference_accuracy(pc, pr, ref, ref, beta=2.0)
    assert acc_big_beta == acc and margin_big_beta == pytest.approx(-1.0)  # β rescales the margin only
    assert math.isnan(preference_accuracy(*(torch.zeros(0),) * 4)[0])
    with pytest.raises(ValueError):
        preference_accuracy(pc, pr, ref, ref, beta=0.0)


def test_rouge_l_hand_computed() -> None:
    """'the cat sat' vs 'the cat sat on the mat': LCS 3, P 3/3, R 3/6, F1 2·1·0.5/1.5 = 2/3; disjoint: 0.
    Mean ×100 = 33.33."""
    assert mean_rouge_l(["the cat sat", "a b"], ["the cat sat on the mat", "c d"]) == pytest.approx(100 / 3)
    assert math.isnan(mean_rouge_l([], []))


def test_bleu4_hand_computed() -> None:
    """'a b c d' vs 'a b c d e': every n-gram precision 1, BP = exp(1 - 5/4) -> 77.88; identical 5-word
    sentence -> 100; mean = 88.94."""
    expected = (100 * math.exp(1 - 5 / 4) + 100) / 2
    got = mean_sentence_bleu4(["a b c d", "the quick brown fox jumps"], ["a b c d e", "the quick brown fox jumps"])
    assert got == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_flags() -> None:
    assert {"pref_acc", "logp_acc", "rouge_l", "bleu4"} <= set(SCORERS)
    for key, cls in SCORERS.items():
        assert issubclass(cls, Scorer) and cls.name == key
    assert not SCORERS["pref_acc"].needs_generation and not SCORERS["logp_acc"].needs_generation
    assert SCORERS["rouge_l"].needs_generation and SCORERS["bleu4"].needs_generation
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorers(["pref_acc", "nope"])


# ---------------------------------------------------------------------------------------- preference accuracy


def test_fresh_adapter_scores_exactly_fifty(tiny_lora_model) -> None:
    """lora_B = 0: policy == reference bit for bit, every pair is a tie -> 50, margin 0."""
    model, tokenizer = tiny_lora_model
    out = PreferenceAccuracy().score(make_ctx(model, tokenizer), TASK)
    assert out == {"pref_acc": 50.0, "margin": 0.0}


def test_pref_acc_matches_unpadded_oracle(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    perturb_lora(model, seed=1)
    ctx = make_ctx(model, tokenizer)
    out = PreferenceAccuracy(beta=0.1).score(ctx, TASK)
    examples = tokenize_pairs(PAIRS[:4], tokenizer, ctx.data).examples
    assert [e["id"] for e in ctx.examples["toy"]] == ["p0", "p1", "p2", "p3"]  # max_examples = 4
    wins, margins = [], []
    for ex in examples:
        pol = {s: oracle_logps(model, ex, s) for s in ("chosen", "rejected")}
        with reference_context(model):
            ref = {s: oracle_logps(model, ex, s) for s in ("chosen", "rejected")}
        rc, rr = 0.1 * (pol["chosen"] - ref["chosen"]), 0.1 * (pol["rejected"] - ref["rejected"])
        wins.append(1.0 if rc > rr else 0.5 if rc == rr else 0.0)
        margins.append(rc - rr)
    assert 0 < sum(wins) < 4  # the perturbed policy wins some and loses some: a non-trivial check
    assert out["pref_acc"] == pytest.approx(100 * sum(wins) / 4)
    assert out["margin"] == pytest.approx(sum(margins) / 4, abs=1e-4)


def test_reference_logps_cached_across_passes_and_overridable(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    entered = []

    @contextlib.contextmanager
    def counting_reference():
        entered.append(1)
        with reference_context(model):
            yield

    ctx = make_ctx(model, tokenizer)
    ctx.reference = counting_reference
    scorer = PreferenceAccuracy()
    scorer.score(ctx, TASK)
    perturb_lora(model, seed=2)
    ctx.new_pass()
    second = scorer.score(ctx, TASK)
    assert len(entered) == 1  # one reference forward pass per task, reused after the policy changed
    assert second["pref_acc"] != 50.0 or second["margin"] != 0.0  # the policy cache was refreshed
    # A different reference (here: the policy itself) under its own key: every pair ties again.
    self_ref = make_ctx(model, tokenizer)
    self_ref.reference, self_ref.reference_key = contextlib.nullcontext, "self"
    assert scorer.score(self_ref, TASK) == {"pref_acc": 50.0, "margin": 0.0}


def test_scoring_restores_training_mode(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    model.train()
    PreferenceAccuracy().score(make_ctx(model, tokenizer), TASK)
    assert model.training


# ------------------------------------------------------------------------------------------------------ generation


def test_left_pad_right_aligns_rows() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def argmax_loop(model, prompt: list[int], stop_ids: list[int], n: int) -> list[int]:
    """Greedy decoding without KV cache or padding: the independent oracle for greedy_generate."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
            ids.append(token)
    return out


def test_batched_greedy_generation_matches_argmax_loop(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    prompts = [list(b"Hello, how are"), list(b"Hi"), list(b"The capital of France is")]
    stops = stop_token_ids(model, tokenizer)
    got = greedy_generate(model, prompts, pad_id=tokenizer.pad_token_id, stop_ids=stops, max_new_tokens=8, batch_size=3)
    assert got == [argmax_loop(model, p, stops, 8) for p in prompts]
    assert all(0 < len(g) <= 8 for g in got)
    # A stop token ends the completion and is not part of it.
    first_token = got[0][0]
    cut = greedy_generate(model, prompts[:1], pad_id=tokenizer.pad_token_id, stop_ids=[first_token], max_new_tokens=8)
    assert cut == [[]]


def test_generate_completions_is_deterministic_and_leaves_tokenizer_alone(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    perturb_lora(model, seed=3)
    prompts = ["Hello there", "Why is the sky blue?"]
    first = generate_completions(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    again = generate_completions(model, tokenizer, [list(p.encode()) for p in prompts], max_new_tokens=5, batch_size=1)
    assert first == again and len(first) == 2
    assert tokenizer.padding_side == "right"


def test_rouge_and_bleu_read_the_generation_cache(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    ctx = make_ctx(model, tokenizer)
    ctx.generations["toy"] = Generations(
        ids=["a", "b"],
        prompts=["x", "y"],
        completions=["the cat sat", "a b c d"],
        references=["the cat sat on the mat", "a b c d e"],
    )
    out = evaluate_task(ctx, TASK, [RougeL("rouge_score"), Bleu4("sacrebleu")])
    rouge_second = 2 * 0.8 / 1.8  # 'a b c d' vs 'a b c d e': P 1, R 0.8
    assert out["rouge_l"] == pytest.approx(100 * (2 / 3 + rouge_second) / 2)
    # BLEU with effective order: the 3-token hypothesis has no 4-gram, so only p1..p3 (all 1) count; BP = exp(1 - 6/3).
    assert out["bleu4"] == pytest.approx((100 * math.exp(1 - 6 / 3) + 100 * math.exp(1 - 5 / 4)) / 2, abs=1e-6)
    # The default (LLaMA-Factory) convention on the same pass: ROUGE-L on jieba words gives the same F here (up to
    # rouge-chinese's 1e-8 in the denominator); BLEU is on characters, and each hypothesis is a prefix of its
    # reference, so every precision is 1 and BLEU = BP = exp(1 - |ref|/|hyp|) in characters (22/11 and 9/7).
    default = evaluate_task(ctx, TASK, [RougeL(), Bleu4()])
    assert default["rouge_l"] == pytest.approx(100 * (2 / 3 + rouge_second) / 2, abs=1e-4)
    bleu_chars = [round(100 * math.exp(1 - 22 / 11), 4), round(100 * math.exp(1 - 9 / 7), 4)]
    assert default["bleu4"] == pytest.approx(sum(bleu_chars) / 2, abs=1e-9)


def test_one_generation_pass_shared_by_scorers(tiny_lora_model, monkeypatch) -> None:
    model, tokenizer = tiny_lora_model
    calls = []

    def counting_generate(*args, **kwargs):
        calls.append(len(args[2]))
        return generate_completions(*args, **kwargs)

    monkeypatch.setattr(scorers_base, "generate_completions", counting_generate)
    ctx = make_ctx(model, tokenizer)
    out = evaluate_task(ctx, TASK, build_scorers(["rouge_l", "bleu4", "pref_acc"]))
    assert calls == [3]  # generation_examples = 3, generated once for both text metrics
    assert set(out) == {"rouge_l", "bleu4", "pref_acc", "margin"}
    assert 0.0 <= out["rouge_l"] <= 100.0 and 0.0 <= out["bleu4"] <= 100.0
    gens = ctx.generations["toy"]
    assert gens.references == ["4", "Blue.", "Hi there!"] and gens.ids == ["p0", "p1", "p2"]
    ctx.new_pass()
    evaluate_task(ctx, TASK, build_scorers(["rouge_l"]))
    assert calls == [3, 3]


def test_task_without_test_pairs_scores_nan(tiny_lora_model) -> None:
    model, tokenizer = tiny_lora_model
    empty = Task(name="empty", train=PAIRS, test=[])
    out = evaluate_task(make_ctx(model, tokenizer), empty, build_scorers(["pref_acc", "rouge_l", "bleu4"]))
    assert set(out) == {"pref_acc", "margin", "rouge_l", "bleu4"} and all(math.isnan(v) for v in out.values())
