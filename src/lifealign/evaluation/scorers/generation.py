"""ROUGE-L and BLEU-4 of greedy generations against the chosen answer (LifeAlign Table 1's text metrics).

Both read the same cached generation pass (``task_generations``) on the first ``eval.generation_examples`` test
prompts, so asking for both costs one ``generate`` per task.

- ``rouge_l``: mean over examples of ROUGE-L F1 × 100, ``rouge_score.RougeScorer(["rougeL"])`` without stemming.
  Its default tokenizer lower-cases and keeps only ``[a-z0-9]`` runs, so it suits English text (the LifeAlign
  authors used rouge-chinese with jieba segmentation, METHODS.md §1.6).
- ``bleu4``: mean over examples of **sentence-level** sacrebleu BLEU (4-gram, ``13a`` tokenization, ``exp``
  smoothing, effective order), on sacrebleu's 0–100 scale. The mean of sentence scores matches the
  authors' LLaMA-Factory ``predict_bleu-4`` (per-sample nltk BLEU-4, averaged), not corpus BLEU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

from lifealign.data.records import Task
from lifealign.evaluation.scorers.base import EvalContext, Scorer, task_generations

__all__ = ["Bleu4", "RougeL", "mean_rouge_l", "mean_sentence_bleu4"]


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """``100 · mean_i F1_LCS(prediction_i, reference_i)``; NaN if empty.

    F1 = 2PR/(P+R) with P = LCS/|prediction|, R = LCS/|reference| (token counts).
    """
    if not predictions:
        return math.nan
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    f1 = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return 100.0 * sum(f1) / len(f1)


def mean_sentence_bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """``mean_i BLEU_sentence(prediction_i, [reference_i])`` on sacrebleu's 0–100 scale. NaN if empty.

    BLEU = BP · exp(¼ Σ_{n=1..4} log p_n), BP = min(1, exp(1 − |ref|/|hyp|)).
    """
    if not predictions:
        return math.nan
    bleu = BLEU(effective_order=True, smooth_method="exp")
    scores = [bleu.sentence_score(pred, [ref]).score for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


class RougeL(Scorer):
    """``rouge_l``: ROUGE-L F1 (0–100) of greedy completions against the chosen responses."""

    name = "rouge_l"
    needs_generation = True

    def score(self, ctx: EvalContext, task: Task) -> dict[str, float]:
        gens = task_generations(ctx, task)
        return {self.name: mean_rouge_l(gens.completions, gens.references)}


class Bleu4(Scorer):
    """``bleu4``: mean sentence BLEU-4 (0–100) of greedy completions against the chosen responses."""

    name = "bleu4"
    needs_generation = True

    def score(self, ctx: EvalContext, task: Task) -> dict[str, float]:
        gens = task_generations(ctx, task)
        return {self.name: mean_sentence_bleu4(gens.completions, gens.references)}
