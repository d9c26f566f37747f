"""ROUGE-L and BLEU-4 of greedy generations against the chosen answer (LifeAlign Table 1's text metrics).

Both read the same cached generation pass (``task_generations``) on the first ``eval.generation_examples`` test
prompts, so asking for both costs one ``generate`` per task. Each is the mean over examples of a per-sentence
score on a 0–100 scale (the items), computed under one of two conventions, picked per scorer (``convention=``):

``"llamafactory"`` (the default; what the LifeAlign numbers are: LLaMA-Factory's ``ComputeSimilarity`` in
``src/llamafactory/train/sft/metric.py``, the same from v0.3 to 2025, METHODS.md §1.6):

- ``rouge_l``: both texts are segmented with ``jieba.cut``, the tokens joined with spaces, and scored with
  ``rouge_chinese.Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]`` (summary-level LCS over whitespace words,
  ``F = 2PR / (P + R + 1e-8)``, no lower-casing, no stemming); 0 when either side has no word after segmentation.
- ``bleu4``: nltk ``sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction()
  .method3)`` with the default weights ``(¼, ¼, ¼, ¼)`` — on **characters**, not on jieba words: LLaMA-Factory
  passes ``list(text)`` of the raw strings. Method 3 (NIST geometric smoothing) replaces the k-th zero n-gram
  precision by ``1 / (2^k · max(1, #hypothesis n-grams))``; no unigram match gives 0.
- each per-sentence value is ``round(100 · score, 4)``, as LLaMA-Factory stores it before averaging.

``"sacrebleu"`` / ``"rouge_score"`` (this project's earlier metrics, kept for comparison with older runs):

- ``rouge_l``: ``rouge_score.RougeScorer(["rougeL"])`` F1 × 100 without stemming; its tokenizer lower-cases and
  keeps only ``[a-z0-9]`` runs, so it suits English only.
- ``bleu4``: sentence-level sacrebleu BLEU (4-gram, ``13a`` tokenization, ``exp`` smoothing, effective order).

On English text the character-level BLEU of LLaMA-Factory is typically about twice the word-level sacrebleu one
(character n-grams match far more often), so numbers are comparable only under the same convention; every scorer
reports its ``convention`` for the run's records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

from lifealign.data.records import Task
from lifealign.evaluation.scorers.base import EvalContext, ItemScores, Scorer, task_generations

__all__ = [
    "BLEU_CONVENTIONS",
    "ROUGE_CONVENTIONS",
    "Bleu4",
    "RougeL",
    "bleu4_items",
    "llamafactory_bleu4",
    "llamafactory_rouge_l",
    "mean_rouge_l",
    "mean_sentence_bleu4",
    "rouge_l_items",
    "sacrebleu_bleu4",
    "rouge_score_rouge_l",
]

BLEU_CONVENTIONS = ("llamafactory", "sacrebleu")
"""Names accepted by ``Bleu4(convention=...)``; the first is the default."""
ROUGE_CONVENTIONS = ("llamafactory", "rouge_score")
"""Names accepted by ``RougeL(convention=...)``; the first is the default."""


# ------------------------------------------------------------------------------ LLaMA-Factory (the paper's numbers)


def llamafactory_rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F × 100 (rounded to 4 decimals) of jieba-segmented texts with rouge-chinese; 0 if a side is empty."""
    hypothesis, ref = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    if not hypothesis.split() or not ref.split():
        return 0.0  # rouge-chinese raises on an empty side
    f = Rouge(metrics=["rouge-l"]).get_scores(hypothesis, ref)[0]["rouge-l"]["f"]
    return round(f * 100, 4)


def llamafactory_bleu4(prediction: str, reference: str) -> float:
    """Character-level nltk sentence BLEU-4 with smoothing method 3, × 100 and rounded to 4 decimals."""
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return round(bleu * 100, 4)


# ------------------------------------------------------------------------------ sacrebleu / rouge-score (earlier runs)


def rouge_score_rouge_l(prediction: str, reference: str) -> float:
    """``100 · F1_LCS`` with F1 = 2PR/(P+R), P = LCS/|prediction|, R = LCS/|reference| (rouge-score tokens)."""
    return 100.0 * RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"].fmeasure


def sacrebleu_bleu4(prediction: str, reference: str) -> float:
    """sacrebleu sentence BLEU on its 0–100 scale: BP · exp(¼ Σ_{n=1..4} log p_n), BP = min(1, exp(1 − |ref|/|hyp|))."""
    return BLEU(effective_order=True, smooth_method="exp").sentence_score(prediction, [reference]).score


_ROUGE: dict[str, Callable[[str, str], float]] = {
    "llamafactory": llamafactory_rouge_l,
    "rouge_score": rouge_score_rouge_l,
}
_BLEU: dict[str, Callable[[str, str], float]] = {"llamafactory": llamafactory_bleu4, "sacrebleu": sacrebleu_bleu4}


def _checked(convention: str, known: dict[str, Callable[[str, str], float]], metric: str) -> str:
    if convention not in known:
        raise ValueError(f"unknown {metric} convention {convention!r}; known: {sorted(known)}")
    return convention


def rouge_l_items(
    predictions: Sequence[str], references: Sequence[str], convention: str = ROUGE_CONVENTIONS[0]
) -> list[float]:
    """Per-sentence ROUGE-L F (0–100) of each prediction against its reference, under ``convention``."""
    score = _ROUGE[_checked(convention, _ROUGE, "rouge_l")]
    return [score(pred, ref) for pred, ref in zip(predictions, references, strict=True)]


def bleu4_items(
    predictions: Sequence[str], references: Sequence[str], convention: str = BLEU_CONVENTIONS[0]
) -> list[float]:
    """Per-sentence BLEU-4 (0–100) of each prediction against its reference, under ``convention``."""
    score = _BLEU[_checked(convention, _BLEU, "bleu4")]
    return [score(pred, ref) for pred, ref in zip(predictions, references, strict=True)]


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """``100 · mean_i F1_LCS(prediction_i, reference_i)`` with rouge-score (the ``"rouge_score"`` convention);
    NaN if empty. F1 = 2PR/(P+R) with P = LCS/|prediction|, R = LCS/|reference| (token counts)."""
    if not predictions:
        return math.nan
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    f1 = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return 100.0 * sum(f1) / len(f1)


def mean_sentence_bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """``mean_i BLEU_sentence(prediction_i, [reference_i])`` with sacrebleu (the ``"sacrebleu"`` convention) on its
    0–100 scale; NaN if empty. BLEU = BP · exp(¼ Σ_{n=1..4} log p_n), BP = min(1, exp(1 − |ref|/|hyp|))."""
    if not predictions:
        return math.nan
    return sum(bleu4_items(predictions, references, "sacrebleu")) / len(predictions)


class RougeL(Scorer):
    """``rouge_l``: ROUGE-L F (0–100) of greedy completions against the chosen responses, per ``convention``."""

    name = "rouge_l"
    needs_generation = True

    def __init__(self, convention: str = ROUGE_CONVENTIONS[0]) -> None:
        self.convention = _checked(convention, _ROUGE, "rouge_l")

    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        gens = task_generations(ctx, task)
        values = rouge_l_items(gens.completions, gens.references, self.convention)
        return {self.name: ItemScores(list(gens.ids), values)}


class Bleu4(Scorer):
    """``bleu4``: mean sentence BLEU-4 (0–100) of greedy completions against the chosen answers, per ``convention``."""

    name = "bleu4"
    needs_generation = True

    def __init__(self, convention: str = BLEU_CONVENTIONS[0]) -> None:
        self.convention = _checked(convention, _BLEU, "bleu4")

    def score_items(self, ctx: EvalContext, task: Task) -> dict[str, ItemScores]:
        gens = task_generations(ctx, task)
        values = bleu4_items(gens.completions, gens.references, self.convention)
        return {self.name: ItemScores(list(gens.ids), values)}
