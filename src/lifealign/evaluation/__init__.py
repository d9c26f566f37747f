"""Evaluation: the score matrix and its metrics (pure, numpy only), scorers, generation and drift diagnostics.

Only the matrix layer is imported here, so ``lifealign.report`` can read results without importing torch. The
model-facing parts are in ``lifealign.evaluation.scorers`` (``SCORERS``, ``EvalContext``, ``build_scorers``,
``evaluate_task``), ``lifealign.evaluation.generate`` and ``lifealign.evaluation.drift``.
"""

from lifealign.evaluation.matrix import ScoreMatrix, ap, bwt, forgetting, fwt, last, record_scores

__all__ = ["ScoreMatrix", "ap", "bwt", "forgetting", "fwt", "last", "record_scores"]
