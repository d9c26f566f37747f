"""The ``unlearn:`` config section: U2A (unlearning to align) and its baselines (METHODS.md §2 and its ADDENDUM).

Torch-free, like the rest of ``lifealign.config``. ``lifealign unlearn`` reads every key; a negative-only task of a
``lifealign run`` stream reads the inner-problem, selection and scoring keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lifealign.config.base import Section

__all__ = ["UnlearnSection"]


class UnlearnSection(Section):
    """U2A: choose and weight negatives to unlearn by their estimated effect on a preference objective J."""

    # ----- inner problem: weighted unlearning -----
    objective: str = "npo"
    """The minimised unlearning loss on a negative (forget) response: any unlearning loss of ``lifealign.losses``
    (``ga``, ``grad_diff`` = ``ga`` + a retain term, ``npo``, ``simnpo``; checked when the config is bound)."""
    loss_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the forget loss (``npo``: ``beta``, ``reduction``; ``simnpo``: ``beta``, ``delta``),
    checked at bind."""
    forget_reduction: Literal["mean", "sum"] = "mean"
    """How a forget loss with a ``reduction`` argument (NPO) reduces the forget response's log-likelihood: ``mean``
    per response token (U2A's code, which takes NPO on ``outputs.loss``, the mean token NLL) or ``sum`` (the NPO
    paper). Applies to the objective and the full-set baselines; ``loss_args.reduction`` overrides it for the
    objective. GA, GradDiff and SimNPO always use the per-token mean (U2A's code too)."""
    retain: Literal["kl", "nll"] = "kl"
    """GradDiff's retain term: token KL(original || policy) on retain sequences (U2A's code) or their NLL."""
    retain_weight: float = Field(0.3, ge=0.0)
    """Weight ``c`` of the retain term (0.3 in U2A's ``u2a_gradiff.py``)."""
    reg_weight: float = Field(0.1, ge=0.0)
    """``lambda_reg`` of the pull toward the starting adapter, ``mean_p ||theta_p - theta_0,p||^2`` (U2A: 0.1)."""
    reg_objectives: list[str] = Field(default_factory=lambda: ["ga"])
    """The objectives whose inner problem has the regulariser: U2A's code adds it to GA only (``u2a.py``;
    ``u2a_gradiff.py`` backpropagates GA + 0.3 KL without it, NPO never has it). List every objective
    (``[ga, grad_diff, npo, simnpo]``) to regularise all; checked when the config is bound."""
    lr: float | None = Field(None, gt=0)
    """Inner learning rate; ``None`` = ``train.lr``."""
    inner_epochs: float = Field(1.0, gt=0)
    """Epochs over the selected set per inner solve."""
    inner_max_steps: int | None = Field(None, gt=0)
    """Optimizer steps per inner solve; overrides ``inner_epochs``."""
    max_forget_nll: float | None = Field(None, gt=0)
    """Stop unlearning once the forget batch's NLL (mean per response token) exceeds this bound for ``stop_patience``
    consecutive micro-batches (RELIABILITY R6); what the stop ends is ``stop_scope``; None = never."""
    stop_patience: int = Field(4, ge=1)
    """Consecutive micro-batches above ``max_forget_nll`` before the stop fires (U2A's code: 4)."""
    stop_scope: Literal["epoch", "solve", "run"] = "epoch"
    """What the forget-NLL stop ends. ``epoch`` (U2A's code, whose ``break`` leaves only the batch loop): the rest of
    the current epoch of the solve; the solve goes on with its next epoch (the count of consecutive micro-batches
    above the bound carries over, as in the code), and every later round still runs. ``solve``: the rest of the
    solve; later rounds still run. ``run``: the whole U2A procedure (also when the forget NLL of the selected set
    exceeds the bound after a solve). A full-set baseline is one solve, so ``solve`` and ``run`` agree there."""

    # ----- outer problem: selection and weights -----
    selection: Literal["u2a", "all"] = "u2a"
    """For negative tasks of a stream: ``u2a`` scores, selects and re-weights; ``all`` unlearns every candidate with
    equal weights. ``lifealign unlearn`` always runs U2A (the full-set objectives are its baselines)."""
    k: int | None = Field(None, gt=0)
    """Size of the selected set; ``None`` = ``ceil(k_fraction * candidates)``."""
    k_fraction: float = Field(0.04, gt=0.0, le=1.0)
    """U2A's top-1024 assumes tens of thousands of candidates; ~4 % of the pool at small scale (ADDENDUM C.1)."""
    positive_only: bool = True
    """Keep only candidates whose unlearning is predicted to lower J (``s_i > 0``)."""
    rounds: int = Field(3, ge=0)
    """Outer rounds T: re-score the selected set, update the weights, solve again (U2A: 3)."""
    weights_lr: float = Field(0.5, gt=0)
    """Mirror-descent step ``eta``. With ``standardize`` the step on a weight is ``eta * s_i / std(s_S)``."""
    standardize: bool = True
    """Divide the scores by their standard deviation over the selected set before the weight step (ADDENDUM B.3)."""
    sparsity: float = Field(0.0, ge=0.0)
    """``beta_s`` of the penalty ``beta_s * sum_i sqrt(w_i)`` (0 in every released U2A script)."""
    weight_sign: Literal["paper", "code"] = "paper"
    """``paper``: the derived-correct step ``w * exp(+eta s)``; ``code``: the released code's ``w * exp(-eta s)``."""
    dpo_beta: float = Field(0.3, gt=0)
    """beta of the DPO loss J on the preference set (U2A: 0.3, hard-coded)."""

    # ----- impact scores -----
    hessian: Literal["identity", "lissa", "cg"] = "identity"
    """``identity``: s_i = <grad J, grad l_i> (U2A's code); ``lissa``/``cg``: s_i = <H^-1 grad J, grad l_i>."""
    hessian_damping: float = Field(0.01, ge=0.0)
    hessian_iters: int = Field(10, gt=0)
    lissa_scale: float = Field(10.0, gt=0)
    """LiSSA needs ``scale`` above the largest eigenvalue of the damped Hessian."""
    hessian_examples: int = Field(32, gt=0)
    """Candidates (of the current weighted set) on which the Hessian-vector products are taken."""
    score_batch_size: int = Field(8, gt=0)
    score_precision: Literal["fp32", "bf16"] = "fp32"
    score_fused: bool = True
    """Score with the model's RMSNorms, gated MLPs and rotary embedding as fused kernels built by ``torch.compile``
    (fp32 only; ``models/fused.py``): the same formulas, fewer passes over memory. Where inductor cannot build (no
    C++ compiler) the scores run eager, with a warning. Speed only: a run may resume with the other value."""

    # ----- data (METHODS.md ADDENDUM C.1) -----
    pa_ratio: float = Field(0.2, gt=0.0, lt=1.0)
    """Fraction of the pool's pairs kept as the preference set D_pa (the objective J)."""
    negative_ratio: float = Field(0.65, gt=0.0, lt=1.0)
    """Of the rest: the fraction whose rejected responses are negatives (the others give positives)."""
    forget_ratio: float = Field(0.65, gt=0.0, le=1.0)
    """Of the negatives: the fraction that are forget candidates (the others are retained negatives)."""
    split_seed: int = 42
    max_preference: int | None = Field(None, gt=0)
    """Cap on D_pa (the cost of grad J grows with it)."""
    preference: str | None = None
    """D_pa from a file / ``synthetic:`` / ``hub:`` source instead of a split (needed for negative-only tasks)."""
    retain_data: str | None = None
    """Retain sequences (GradDiff, utility) from a source; default: the positives (``_remain2.json``)."""

    # ----- the "original" model and the comparison -----
    original_sft_steps: int = Field(0, ge=0)
    """Steps of SFT on positives' chosen + negatives' rejected, merged into the base: the original model."""
    original_sft_lr: float = Field(1e-4, gt=0)
    baselines: list[str] = Field(default_factory=lambda: ["ga", "grad_diff", "npo", "random", "topk", "dpo"])
    """Comparisons ``lifealign unlearn`` runs under U2A's step budget: any unlearning objective on the full candidate
    set, ``random`` (a random subset of U2A's size), ``topk`` (U2A's first top-k, not re-weighted) and ``dpo`` (DPO
    on the preference pairs); checked when the config is bound."""

    @model_validator(mode="after")
    def _distinct_baselines(self) -> UnlearnSection:
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"unlearn.baselines: names must be distinct, got {self.baselines}")
        if len(set(self.reg_objectives)) != len(self.reg_objectives):
            raise ValueError(f"unlearn.reg_objectives: names must be distinct, got {self.reg_objectives}")
        return self
