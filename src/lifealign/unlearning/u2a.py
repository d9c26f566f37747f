"""U2A, unlearning to align (METHODS.md §2.3 with the ADDENDUM B.3 corrections): the bi-level procedure.

::

    s      = impact scores of every candidate at theta_0            (influence.py; dJ/dw_i = -s_i)
    S      = top-k of s with s_i > 0;  w_S = 1 (mean weight 1)      (selection.py)
    solve  : minimise mean_b(w_b l_u(x_b)) + [retain] + lambda R    (inner.py -> train_task, warm start)
    repeat T = unlearn.rounds times:
        s_S  = impact scores of S at the current theta
        w_S <- w_S * exp(-eta g_S) / Z,  g_i = -s_i/std(s_S) + beta_s / (2 sqrt w_i)   (sum w = |S|)
        solve again (warm start from the current theta, as the code does)
    stop rule (unlearn.stop_scope): epoch (U2A's code) = leave the current epoch of the solve; solve = end the
    solve; run = end the procedure (also when the forget NLL of S exceeds the bound after a solve)

A solve is ``steps_per_solve`` optimizer steps counted on the global batch (``world`` processes, from the solver's
accelerator), so ``inner_epochs`` means the same passes over S on any number of processes. The regulariser's weight
(also the curvature it adds to the Hessian of the scores) is ``objectives.inner_reg_weight``: ``reg_weight`` for the
objectives of ``unlearn.reg_objectives`` (U2A's code: GA only), else 0.

The procedure is resumable: its whole position is the JSON-able ``U2AProgress`` plus the adapter, committed by the
caller's ``commit`` after every scoring, weight update and solve; a solve interrupted between two of those resumes
from the loop's own mid-stage checkpoint (``resume_loop``).

``lifealign unlearn`` (``lifealign.engine.unlearn``) runs U2A and the baselines under the same step budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lifealign.config.schema import TrainSection
from lifealign.config.unlearn import UnlearnSection
from lifealign.data.records import Task
from lifealign.losses import CombinedLoss
from lifealign.training.plugin import Plugin
from lifealign.unlearning.evaluate import mean_token_nll
from lifealign.unlearning.influence import ScoreResult, impact_scores
from lifealign.unlearning.inner import InnerSolver
from lifealign.unlearning.objectives import inner_reg_weight, steps_per_solve
from lifealign.unlearning.selection import choose_k, select_top_k, update_weights, weight_stats
from lifealign.utils.jsonio import nan_to_null

__all__ = ["U2A", "U2AInputs", "U2AProgress", "score_stats", "u2a_budget"]


@dataclass
class U2AProgress:
    """The procedure's position: initial scores, selection, weights, finished solves, rounds and stop events."""

    scores: list[float] | None = None
    selected: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    solves_done: int = 0
    reweighted: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    finished: bool = False

    def to_json(self) -> dict[str, Any]:
        return nan_to_null(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> U2AProgress:
        data = data or {}
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class U2AInputs:
    """Tokenised candidates (``rejected`` = forget response) and preference pairs, ``index`` = position, with
    the reference log-probs: ``pref_ref (n_pa, 2)`` (chosen, rejected), ``cand_ref (n, 1)`` when the loss needs it."""

    candidates: list[dict[str, Any]]
    preference: list[dict[str, Any]]
    pref_ref: Tensor
    cand_ref: Tensor | None = None


def score_stats(scores: Tensor) -> dict[str, float]:
    """Summary of a score vector: count, fraction positive, mean, std, min, max."""
    s = scores.double()
    if s.numel() == 0:
        return {"n": 0}
    return {
        "n": int(s.numel()),
        "positive_fraction": float((s > 0).double().mean()),
        "mean": float(s.mean()),
        "std": float(s.std()) if s.numel() > 1 else 0.0,
        "min": float(s.min()),
        "max": float(s.max()),
    }


def u2a_budget(section: UnlearnSection, train: TrainSection, n_selected: int, world: int = 1) -> int:
    """Optimizer steps U2A plans in total: ``(rounds + 1)`` solves of ``steps_per_solve`` each on ``world``
    processes."""
    return (section.rounds + 1) * steps_per_solve(section, train, n_selected, world)


class U2A:
    """The U2A procedure on one set of inputs; training goes through ``solver`` (one ``train_task`` per solve)."""

    def __init__(
        self,
        section: UnlearnSection,
        train: TrainSection,
        model: nn.Module,
        pad_id: int,
        loss: CombinedLoss,
        solver: InnerSolver,
        plugins: Callable[[str], list[Plugin]],
        task: Task,
    ):
        self.section, self.train, self.model, self.pad_id = section, train, model, pad_id
        self.loss, self.solver, self.plugins, self.task = loss, solver, plugins, task

    def steps_per_solve(self, n_selected: int) -> int:
        """Optimizer steps of one solve over ``n_selected`` examples on the solver's number of processes."""
        return steps_per_solve(self.section, self.train, n_selected, self.solver.world)

    def budget(self, n_selected: int) -> int:
        """``u2a_budget`` on the solver's number of processes (the step budget of the baselines)."""
        return u2a_budget(self.section, self.train, n_selected, self.solver.world)

    # ----- scores ------------------------------------------------------------------------------------------------
    def scores(
        self, inputs: U2AInputs, subset: list[int] | None = None, weights: list[float] | None = None
    ) -> ScoreResult:
        """Impact scores of ``subset`` (all candidates when None) at the current parameters."""
        sec = self.section
        idx = list(range(len(inputs.candidates))) if subset is None else subset
        cands = [inputs.candidates[i] for i in idx]
        cand_ref = inputs.cand_ref[idx] if inputs.cand_ref is not None else None
        h_idx = list(range(min(sec.hessian_examples, len(idx))))
        h_weights = torch.tensor([weights[i] for i in h_idx] if weights else [1.0] * len(h_idx))
        return impact_scores(
            self.model,
            cands,
            inputs.preference,
            self.loss,
            pad_id=self.pad_id,
            pref_ref_logps=inputs.pref_ref,
            cand_ref_logps=cand_ref,
            beta=sec.dpo_beta,
            batch_size=sec.score_batch_size,
            precision=sec.score_precision,
            hessian=sec.hessian,
            hessian_examples=[cands[i] for i in h_idx],
            hessian_weights=h_weights,
            hessian_ref_logps=cand_ref[h_idx] if cand_ref is not None else None,
            reg_weight=inner_reg_weight(sec, sec.objective),
            damping=sec.hessian_damping,
            iters=sec.hessian_iters,
            lissa_scale=sec.lissa_scale,
            fused=sec.score_fused,
        )

    def _select(self, inputs: U2AInputs, progress: U2AProgress) -> None:
        result = self.scores(inputs)
        k = choose_k(len(inputs.candidates), self.section.k, self.section.k_fraction)
        progress.scores = result.scores.tolist()
        progress.selected = select_top_k(result.scores, k, self.section.positive_only)
        progress.weights = [1.0] * len(progress.selected)
        progress.rounds.append(
            {
                "round": 0,
                "objective": result.objective,
                "grad_norm": result.grad_norm,
                "k": k,
                "selected": len(progress.selected),
                "scores": score_stats(result.scores),
            }
        )
        if not progress.selected:
            progress.events.append(
                {
                    "event": "nothing_selected",
                    "reason": "no candidate has a positive score",
                    "k": k,
                    "candidates": len(inputs.candidates),
                }
            )
            progress.finished = True

    def _reweight(self, inputs: U2AInputs, progress: U2AProgress, r: int) -> None:
        sec = self.section
        result = self.scores(inputs, progress.selected, progress.weights)
        new = update_weights(
            torch.tensor(progress.weights, dtype=torch.float64),
            result.scores,
            lr=sec.weights_lr,
            sparsity=sec.sparsity,
            sign=sec.weight_sign,
            standardize=sec.standardize,
        )
        progress.weights = new.tolist()
        progress.reweighted = r
        progress.rounds.append(
            {
                "round": r,
                "objective": result.objective,
                "grad_norm": result.grad_norm,
                "scores": score_stats(result.scores),
                "weights": weight_stats(new),
            }
        )

    def _solve(self, inputs: U2AInputs, progress: U2AProgress, r: int, resume: dict[str, Any] | None) -> None:
        examples = [dict(inputs.candidates[i], index=j) for j, i in enumerate(progress.selected)]
        outcome = self.solver.solve(
            self.task,
            examples,
            self.loss,
            max_steps=self.steps_per_solve(len(examples)),
            plugins=self.plugins(f"solve{r}"),
            weights=torch.tensor(progress.weights, dtype=torch.float32),
            resume=resume,
        )
        progress.solves_done = r + 1
        progress.rounds[-1]["solve"] = outcome.to_json()
        progress.events.extend(outcome.events)
        ends_run = self.section.stop_scope == "run"
        if outcome.stopped is not None and ends_run:
            progress.stopped = True
            return
        bound = self.section.max_forget_nll
        if bound is not None:
            nll = mean_token_nll(self.model, examples, "rejected", self.pad_id, self.section.score_batch_size)
            progress.rounds[-1]["forget_nll"] = nll
            if nll > bound and ends_run:
                progress.events.append(
                    {
                        "event": "unlearn_stopped",
                        "reason": "forget_nll_above_bound_after_round",
                        "round": r,
                        "forget_nll": nll,
                        "bound": bound,
                    }
                )
                progress.stopped = True

    # ----- the procedure -----------------------------------------------------------------------------------------
    def run(
        self,
        inputs: U2AInputs,
        progress: U2AProgress,
        commit: Callable[[U2AProgress], None],
        resume_loop: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> U2AProgress:
        """Score, select, then alternate solves and weight updates from wherever ``progress`` stands."""
        if progress.scores is None:
            self._select(inputs, progress)
            commit(progress)
        while not (progress.finished or progress.stopped) and progress.solves_done <= self.section.rounds:
            r = progress.solves_done
            if r > progress.reweighted:
                self._reweight(inputs, progress, r)
                commit(progress)
            self._solve(inputs, progress, r, resume_loop())
            commit(progress)
        if not progress.finished:
            progress.finished = True
            commit(progress)
        return progress
