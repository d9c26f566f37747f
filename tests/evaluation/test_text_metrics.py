"""BLEU-4 and ROUGE-L under both conventions: hand-computed values, LLaMA-Factory's procedure called directly on the
libraries, and the scorers' ``convention``."""

from __future__ import annotations

import math

import jieba
import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from lifealign.config.schema import DataSection, EvalSection
from lifealign.data.records import PreferencePair, Task
from lifealign.evaluation.scorers import evaluate_task_with_items
from lifealign.evaluation.scorers.base import EvalContext, Generations
from lifealign.evaluation.scorers.generation import (
    BLEU_CONVENTIONS,
    ROUGE_CONVENTIONS,
    Bleu4,
    RougeL,
    bleu4_items,
    llamafactory_bleu4,
    llamafactory_rouge_l,
    rouge_l_items,
    rouge_score_rouge_l,
    sacrebleu_bleu4,
)

EXAMPLES = [  # (prediction, reference)
    ("The model answered the question.", "The model answers questions well."),
    ("今天天气很好，我们去公园散步。", "今天天气不错，我们去散步吧。"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
]


def llamafactory_reference(prediction: str, reference: str) -> tuple[float, float]:
    """LLaMA-Factory's ``ComputeSimilarity`` steps for one pair, written out on the libraries: ``(rouge-l, bleu-4)``."""
    hyp, ref = list(jieba.cut(prediction)), list(jieba.cut(reference))
    if len(" ".join(hyp).split()) == 0 or len(" ".join(ref).split()) == 0:
        rouge_f = 0.0
    else:
        rouge_f = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]["rouge-l"]["f"]
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return round(rouge_f * 100, 4), round(bleu * 100, 4)


# ------------------------------------------------------------------------------------------------ LLaMA-Factory


def test_llamafactory_bleu4_hand_computed() -> None:
    """BLEU is on characters. 'ab' vs 'abc' (two tokens): p1 = 2/2, p2 = 1/1; no trigram or 4-gram in the
    hypothesis (0 matches over max(1, 0) = 1 n-grams), so method 3 gives p3 = 1/2^1, p4 = 1/2^2;
    BP = exp(1 - 3/2). BLEU = e^(-1/2) · (1 · 1 · 1/2 · 1/4)^(1/4) = e^(-1/2) · 2^(-3/4) = 0.360645.
    'the cat' vs 'the cat sat': a 7-character prefix of an 11-character reference, every precision 1,
    BLEU = BP = exp(1 - 11/7) = 0.564718. No shared character -> no unigram match -> 0; empty -> 0."""
    assert llamafactory_bleu4("ab", "abc") == round(100 * math.exp(-0.5) * 2**-0.75, 4) == 36.0645
    assert llamafactory_bleu4("the cat", "the cat sat") == round(100 * math.exp(1 - 11 / 7), 4) == 56.4718
    assert llamafactory_bleu4("xyz", "abc") == 0.0
    assert llamafactory_bleu4("", "abc") == 0.0 and llamafactory_bleu4("abc", "") == 0.0


def test_llamafactory_rouge_l_hand_computed() -> None:
    """ROUGE-L is on jieba words. 'the cat' vs 'the cat sat' -> [the, cat] vs [the, cat, sat]: LCS 2, P = 1,
    R = 2/3, F = 2PR / (P + R + 1e-8) = 0.8 (to 1e-8) -> 80.0 after rounding to 4 decimals.
    '我爱北京' vs '我爱北京天安门' -> [我, 爱, 北京] vs [我, 爱, 北京, 天安门]: LCS 3, P = 1, R = 3/4, F = 6/7 -> 85.7143.
    An empty (or whitespace-only) side scores 0 instead of raising."""
    assert list(jieba.cut("我爱北京天安门")) == ["我", "爱", "北京", "天安门"]
    assert llamafactory_rouge_l("the cat", "the cat sat") == 80.0
    assert llamafactory_rouge_l("我爱北京", "我爱北京天安门") == round(100 * 6 / 7, 4) == 85.7143
    assert llamafactory_rouge_l("", "the cat") == 0.0 and llamafactory_rouge_l("   ", "the cat") == 0.0
    assert llamafactory_rouge_l("the cat", "") == 0.0


def test_llamafactory_matches_its_procedure_on_the_libraries() -> None:
    expected = [llamafactory_reference(pred, ref) for pred, ref in EXAMPLES]
    preds, refs = [p for p, _ in EXAMPLES], [r for _, r in EXAMPLES]
    assert rouge_l_items(preds, refs) == [rouge for rouge, _ in expected]
    assert bleu4_items(preds, refs) == [bleu for _, bleu in expected]
    assert all(0 < rouge < 100 and 0 < bleu < 100 for rouge, bleu in expected)


# ---------------------------------------------------------------------------------------- sacrebleu / rouge-score


def test_sacrebleu_and_rouge_score_hand_computed() -> None:
    """Words this time. sacrebleu 'the cat' vs 'the cat sat': p1 = 2/2, p2 = 1/1, no 3- or 4-gram in the
    hypothesis so the effective order is 2; BP = exp(1 - 3/2) -> 100·e^(-1/2) = 60.65. rouge-score: F = 0.8
    exactly. rouge-score keeps only [a-z0-9] runs, so Chinese text has no tokens and scores 0."""
    assert sacrebleu_bleu4("the cat", "the cat sat") == pytest.approx(100 * math.exp(-0.5), abs=1e-9)
    assert rouge_score_rouge_l("the cat", "the cat sat") == pytest.approx(80.0, abs=1e-12)
    assert rouge_score_rouge_l("我爱北京", "我爱北京天安门") == 0.0


def test_the_two_conventions_differ_on_english() -> None:
    """LLaMA-Factory's character BLEU is well above word-level sacrebleu on the same English pair."""
    pred, ref = EXAMPLES[0]
    assert llamafactory_bleu4(pred, ref) > 1.5 * sacrebleu_bleu4(pred, ref)


# ------------------------------------------------------------------------------------------------ scorers


def test_scorers_report_and_validate_their_convention() -> None:
    assert BLEU_CONVENTIONS[0] == ROUGE_CONVENTIONS[0] == "llamafactory"
    assert Bleu4().convention == RougeL().convention == "llamafactory"
    assert Bleu4("sacrebleu").convention == "sacrebleu" and RougeL("rouge_score").convention == "rouge_score"
    with pytest.raises(ValueError, match="unknown bleu4 convention 'rouge_score'"):
        Bleu4("rouge_score")
    with pytest.raises(ValueError, match="unknown rouge_l convention"):
        RougeL("sacrebleu")


def test_scorers_average_the_llamafactory_items_like_np_mean() -> None:
    """LLaMA-Factory reports ``np.mean`` of the rounded per-sentence values; the scorers' means agree."""
    task = Task(name="t", train=[], test=[PreferencePair("q", r, "x", id=f"r{i}") for i, (_, r) in enumerate(EXAMPLES)])
    ctx = EvalContext(model=torch.nn.Linear(1, 1), tokenizer=None, data=DataSection(), eval=EvalSection())
    ctx.generations["t"] = Generations(
        ids=["r0", "r1", "r2"],
        prompts=["q"] * 3,
        completions=[p for p, _ in EXAMPLES],
        references=[r for _, r in EXAMPLES],
    )
    scores, items = evaluate_task_with_items(ctx, task, [RougeL(), Bleu4()])
    expected = [llamafactory_reference(p, r) for p, r in EXAMPLES]
    assert items["rouge_l"].ids == items["bleu4"].ids == ["r0", "r1", "r2"]
    assert scores["rouge_l"] == pytest.approx(float(np.mean([e[0] for e in expected])), rel=1e-12)
    assert scores["bleu4"] == pytest.approx(float(np.mean([e[1] for e in expected])), rel=1e-12)
