"""The sign convention (dJ/dw_i = -s_i), selection and the mirror-descent weights.

The sign is checked on a problem whose answer is known: one preference pair (x, y_w, y_l) with |y_w| = |y_l| and
GA (l = log pi(y|x)/|y|). Then grad J = c (grad log pi(y_l) - grad log pi(y_w)) with c = beta sigma(-m) > 0, so
s(y_l) - s(y_w) = c ||grad log pi(y_l) - grad log pi(y_w)||^2 / |y| > 0: unlearning the dispreferred response must
rank above unlearning the preferred one. Every score is also checked against the real change of J after a small
gradient step on that candidate alone: dJ = -alpha s_i + O(alpha^2), so the rankings must agree exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifealign.config.unlearn import UnlearnSection
from lifealign.data.collate import collate_pairs
from lifealign.data.records import PreferencePair
from lifealign.models.lora import reference_context
from lifealign.training.forward import batch_logps, compute_reference_logps
from lifealign.unlearning.influence import fast_scores, lora_layers, per_example_unlearn_losses, preference_gradient
from lifealign.unlearning.objectives import forget_loss
from lifealign.unlearning.selection import (
    choose_k,
    exponentiated_gradient_step,
    random_subset,
    select_top_k,
    standardized,
    update_weights,
    weight_gradient,
    weight_stats,
)

PAIR = ("chosen", "rejected")
FORGET = ("rejected",)

PROMPT = "How can I get into my neighbour's car?"
CHOSEN = "I can't help with that. Ask them!!"  # 34 bytes = 34 tokens (byte tokenizer)
REJECTED = "Sure! Break the window with a rock"  # 34 bytes
OTHERS = [
    "The answer is 42. Hope this helps!",
    "PARIS. THE CAPITAL IS PARIS OK!!",
    "Sorry about the delay, we apologise.",
]


def _j(model, pa, pref_ref, pad_id) -> float:
    return preference_gradient(model, pa, pref_ref, pad_id=pad_id, beta=0.3)[0]


def test_scores_predict_the_real_change_of_j_and_the_dispreferred_response_ranks_first(lora_factory, tokenize):
    assert len(CHOSEN.encode()) == len(REJECTED.encode())
    model, tok = lora_factory(seed=2, dtype=torch.float64)
    pad = tok.pad_token_id
    pa = [dict(ex, index=0) for ex in tokenize([PreferencePair(PROMPT, CHOSEN, REJECTED)], tok)]
    pref_ref = compute_reference_logps(model, pa, pad, PAIR, lambda: reference_context(model))
    texts = [REJECTED, CHOSEN, *OTHERS]
    cands = [
        dict(ex, index=i)
        for i, ex in enumerate(
            tokenize([PreferencePair(PROMPT, "", t, id=str(i)) for i, t in enumerate(texts)], tok, FORGET)
        )
    ]
    loss = forget_loss(UnlearnSection(objective="ga"))
    j0, grad = preference_gradient(model, pa, pref_ref, pad_id=pad, beta=0.3)
    scores = fast_scores(model, cands, grad, loss, pad_id=pad).double()

    alpha = 1e-3
    layers = lora_layers(model)
    params = [p for a, b in layers.values() for p in (a.weight, b.weight)]
    delta_j = []
    for example in cands:
        model.eval()
        value = per_example_unlearn_losses(loss, batch_logps(model, collate_pairs([example], pad, sides=FORGET)), None)
        grads = torch.autograd.grad(value.sum(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= alpha * g
        delta_j.append(_j(model, pa, pref_ref, pad) - j0)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p += alpha * g
    delta_j = torch.tensor(delta_j, dtype=torch.float64)

    # first order: dJ = -alpha * s_i (dJ/dw_i = -s_i), so the two orderings agree exactly
    assert torch.argsort(-scores).tolist() == torch.argsort(delta_j).tolist()
    assert torch.allclose(delta_j, -alpha * scores, rtol=0.05, atol=1e-3 * alpha * float(scores.abs().max()))
    # the known answer: unlearning y_l beats unlearning y_w, and lowers J
    assert scores[0] > scores[1]
    assert scores[0] > 0 and delta_j[0] < 0
    # the selection picks the candidates whose unlearning lowers J most, and never one that raises it
    assert select_top_k(scores, k=2) == torch.argsort(delta_j)[:2].tolist()
    assert all(delta_j[i] < 0 for i in select_top_k(scores, k=len(cands)))


def test_select_top_k_is_best_first_positive_only_and_stable():
    s = torch.tensor([0.5, -1.0, 2.0, 0.5, 0.0, 3.0])
    assert select_top_k(s, 3) == [5, 2, 0]
    assert select_top_k(s, 4) == [5, 2, 0, 3]  # tie 0.5: lower index first
    assert select_top_k(s, 6) == [5, 2, 0, 3]  # 0.0 and -1.0 would not lower J
    assert select_top_k(s, 6, positive_only=False) == [5, 2, 0, 3, 4, 1]


def test_choose_k_and_random_subset():
    assert choose_k(100, None, 0.04) == 4
    assert choose_k(10, None, 0.04) == 1  # ceil
    assert choose_k(10, 50, 0.04) == 10
    subset = random_subset(20, 5, seed=3)
    assert len(set(subset)) == 5 and all(0 <= i < 20 for i in subset)
    assert subset == random_subset(20, 5, seed=3) != random_subset(20, 5, seed=4)


def test_weight_gradient_sign_conventions_and_sparsity_term():
    s = torch.tensor([1.0, -2.0])
    w = torch.tensor([4.0, 1.0])
    assert weight_gradient(s, w, sign="paper").tolist() == [-1.0, 2.0]
    assert weight_gradient(s, w, sign="code").tolist() == [1.0, -2.0]
    # beta_s / (2 sqrt w): 0.5 / 4 = 0.125 and 0.5 / 2 = 0.25; zero weights get no (infinite) penalty term
    assert weight_gradient(s, w, sparsity=0.5).tolist() == [-0.875, 2.25]
    assert weight_gradient(s, torch.tensor([0.0, 1.0]), sparsity=0.5).tolist() == [-1.0, 2.25]


def test_paper_update_raises_high_score_weights_and_code_update_lowers_them():
    w = torch.ones(3, dtype=torch.float64)
    s = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    paper = update_weights(w, s, lr=0.5, standardize=False)
    code = update_weights(w, s, lr=0.5, standardize=False, sign="code")
    z = math.exp(0.5) + 1 + math.exp(-0.5)
    assert paper.tolist() == pytest.approx([3 * math.exp(0.5) / z, 3 / z, 3 * math.exp(-0.5) / z])
    assert code.tolist() == pytest.approx(paper.flip(0).tolist())


def test_standardized_divides_by_the_standard_deviation():
    s = torch.tensor([1.0, 3.0])
    assert standardized(s).tolist() == pytest.approx((s / s.std()).tolist())
    assert standardized(torch.tensor([2.0, 2.0])).tolist() == [2.0, 2.0]
    assert standardized(torch.tensor([5.0])).tolist() == [5.0]


def test_weight_stats():
    stats = weight_stats(torch.tensor([2.0, 0.0, 1.0, 1.0]))
    assert stats["effective_size"] == pytest.approx(16 / 6)
    assert stats["n_zero"] == 1 and stats["max"] == 2.0 and stats["min"] == 0.0


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(min_value=0.0, max_value=1e3), finite), min_size=1, max_size=12),
    lr=st.floats(min_value=1e-4, max_value=50.0),
    sparsity=st.floats(min_value=0.0, max_value=10.0),
    sign=st.sampled_from(["paper", "code"]),
    standardize=st.booleans(),
)
def test_weights_stay_on_the_scaled_simplex(data, lr, sparsity, sign, standardize):
    """w >= 0, sum w = |S|, finite, zero weights stay zero; the paper step never raises first-order J."""
    w = torch.tensor([d[0] for d in data], dtype=torch.float64)
    if w.sum() == 0:
        w[0] = 1.0
    w = w * len(w) / w.sum()
    s = torch.tensor([d[1] for d in data], dtype=torch.float64)
    new = update_weights(w, s, lr=lr, sparsity=sparsity, sign=sign, standardize=standardize)
    assert torch.isfinite(new).all()
    assert (new >= 0).all()
    assert float(new.sum()) == pytest.approx(len(w), rel=1e-9)
    assert (new[w == 0] == 0).all()
    if sign == "paper" and sparsity == 0:
        # dJ ~ sum_i dJ/dw_i (w'_i - w_i) = -sum_i s_i (w'_i - w_i) <= 0: exponential tilting raises the mean of s
        assert float(-(s * (new - w)).sum()) <= 1e-9 * (1 + float(s.abs().max()) * len(w))


def test_exponentiated_step_with_all_zero_weights_is_unchanged():
    w = torch.zeros(3)
    assert exponentiated_gradient_step(w, torch.ones(3), lr=1.0).tolist() == [0.0, 0.0, 0.0]
