"""Impact scores: the batched per-example inner products equal the per-example-backward oracle, the DPO gradient
is the gradient of J, and the inverse-Hessian machinery solves what it claims to."""

from __future__ import annotations

import math

import pytest
import torch

from lifealign.config.unlearn import UnlearnSection
from lifealign.data.collate import collate_pairs
from lifealign.data.synthetic import make_synthetic_task
from lifealign.models.lora import lora_parameters, reference_context
from lifealign.training.forward import batch_logps, compute_reference_logps
from lifealign.unlearning.influence import (
    conjugate_gradient,
    direction_dot,
    fast_scores,
    flatten_direction,
    impact_scores,
    lissa,
    lora_layers,
    naive_scores,
    per_example_unlearn_losses,
    preference_gradient,
    unflatten_direction,
    unlearn_hvp,
)
from lifealign.unlearning.objectives import forget_loss

PAIR = ("chosen", "rejected")
FORGET = ("rejected",)


@pytest.fixture
def setup(lora_factory, tokenize):
    model, tok = lora_factory()
    task = make_synthetic_task("safety", n_train=16, n_test=1)
    # Candidates of different lengths (arithmetic + safety), so the batched path is padded.
    other = make_synthetic_task("arithmetic", n_train=6, n_test=1)
    pa = [dict(ex, index=i) for i, ex in enumerate(tokenize(task.train[:6], tok))]
    cands = [dict(ex, index=i) for i, ex in enumerate(tokenize(task.train[6:] + other.train, tok, FORGET))]
    ref = lambda: reference_context(model)  # noqa: E731
    pref_ref = compute_reference_logps(model, pa, tok.pad_token_id, PAIR, ref)
    cand_ref = compute_reference_logps(model, cands, tok.pad_token_id, FORGET, ref)
    return model, tok, pa, cands, pref_ref, cand_ref


def _rel_diff(fast: torch.Tensor, naive: torch.Tensor) -> float:
    return float((fast - naive).abs().max() / naive.abs().max())


@pytest.mark.parametrize("objective", ["ga", "grad_diff", "npo", "simnpo"])
def test_fast_scores_equal_naive_per_example_scores(setup, objective):
    """max|fast - naive| / max|naive| <= 1e-4 in fp32, for every unlearning loss and a padded batch of mixed lengths."""
    model, tok, pa, cands, pref_ref, cand_ref = setup
    loss = forget_loss(UnlearnSection(objective=objective))
    ref = cand_ref if loss.needs_reference else None
    _, grad_j = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3)
    fast = fast_scores(model, cands, grad_j, loss, pad_id=tok.pad_token_id, ref_logps=ref, batch_size=5)
    naive = naive_scores(model, cands, grad_j, loss, pad_id=tok.pad_token_id, ref_logps=ref)
    assert fast.shape == (len(cands),)
    assert naive.abs().max() > 0
    assert _rel_diff(fast, naive) <= 1e-4
    assert len({len(c["rejected_ids"]) for c in cands}) > 1  # the batch really mixed lengths


def test_fast_scores_with_an_arbitrary_direction_and_bf16_option(setup):
    """Any direction (not only grad J) is contracted exactly; bf16 autocast stays close (a few percent)."""
    model, tok, _, cands, _, _ = setup
    loss = forget_loss(UnlearnSection(objective="ga"))
    gen = torch.Generator().manual_seed(3)
    direction = {
        n: (torch.randn(a.weight.shape, generator=gen), torch.randn(b.weight.shape, generator=gen))
        for n, (a, b) in lora_layers(model).items()
    }
    naive = naive_scores(model, cands, direction, loss, pad_id=tok.pad_token_id)
    assert _rel_diff(fast_scores(model, cands, direction, loss, pad_id=tok.pad_token_id), naive) <= 1e-4
    bf16 = fast_scores(model, cands, direction, loss, pad_id=tok.pad_token_id, precision="bf16")
    assert _rel_diff(bf16, naive) <= 5e-2


def test_preference_gradient_is_the_gradient_of_the_mean_dpo_loss(setup):
    """J at policy == reference (B = 0) is ln 2; a small step along -grad J lowers J by ~ eps * ||grad J||^2."""
    model, tok, pa, _, pref_ref, _ = setup
    j0, grad = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3, batch_size=4)
    eps = 1e-3
    with torch.no_grad():
        for name, (a, b) in lora_layers(model).items():
            a.weight -= eps * grad[name][0]
            b.weight -= eps * grad[name][1]
    j1, _ = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3)
    assert (j1 - j0) == pytest.approx(-eps * direction_dot(grad, grad), rel=0.05)
    with torch.no_grad():
        for _, b in lora_layers(model).values():
            b.weight.zero_()
    j_ref, grad_ref = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3)
    assert j_ref == pytest.approx(math.log(2), abs=1e-6)
    assert direction_dot(grad_ref, grad_ref) > 0  # the gradient on B is not zero at B = 0


def test_flatten_round_trips(setup):
    model, tok, pa, _, pref_ref, _ = setup
    _, grad = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3)
    back = unflatten_direction(flatten_direction(grad), grad)
    assert all(torch.equal(back[k][0], grad[k][0]) and torch.equal(back[k][1], grad[k][1]) for k in grad)
    assert flatten_direction(grad).numel() == sum(p.numel() for p in lora_parameters(model).values())


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=torch.float64)) @ q.T


def test_conjugate_gradient_and_lissa_solve_a_known_spd_system():
    """(A + dI) x = b on an explicit SPD matrix: CG exact in n steps; LiSSA converges for scale > lambda_max."""
    a = _spd(6, seed=1)
    b = torch.arange(1.0, 7.0, dtype=torch.float64)
    damping = 0.1
    exact = torch.linalg.solve(a + damping * torch.eye(6, dtype=torch.float64), b)
    cg = conjugate_gradient(lambda v: a @ v, b, damping=damping, iters=6)
    assert torch.allclose(cg, exact, atol=1e-8)
    ls = lissa(lambda v: a @ v, b, damping=damping, scale=5.0, iters=400)
    assert torch.allclose(ls, exact, atol=1e-6)


def test_unlearn_hvp_matches_finite_differences_of_the_gradient(lora_factory, tokenize):
    """H v of F = mean_i w_i l_i + lambda mean_p ||theta_p - theta_0||^2 against central differences (fp64)."""
    model, tok = lora_factory(dtype=torch.float64)
    task = make_synthetic_task("safety", n_train=4, n_test=1)
    cands = tokenize(task.train, tok, FORGET)
    loss = forget_loss(UnlearnSection(objective="ga"))
    weights = torch.tensor([0.5, 1.5, 1.0, 1.0])
    params = list(lora_parameters(model).values())
    reg = 0.3
    hvp = unlearn_hvp(model, cands, weights, loss, pad_id=tok.pad_token_id, reg_weight=reg, batch_size=3)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def grad_f() -> torch.Tensor:
        model.eval()
        batch = collate_pairs(cands, tok.pad_token_id, sides=FORGET)
        losses = per_example_unlearn_losses(loss, batch_logps(model, batch), None)
        f = (weights.double() * losses).sum() / len(cands)
        grads = torch.autograd.grad(f, params)
        return torch.cat([g.reshape(-1) for g in grads])

    eps = 1e-4  # sequence_logps works in fp32, so gradients carry ~1e-9 noise: smaller eps amplifies it
    with torch.no_grad():
        for p, dv in zip(params, torch.split(v, [p.numel() for p in params])):
            p += eps * dv.view_as(p)
    plus = grad_f()
    with torch.no_grad():
        for p, dv in zip(params, torch.split(v, [p.numel() for p in params])):
            p -= 2 * eps * dv.view_as(p)
    minus = grad_f()
    with torch.no_grad():
        for p, dv in zip(params, torch.split(v, [p.numel() for p in params])):
            p += eps * dv.view_as(p)
    expected = (plus - minus) / (2 * eps) + (2 * reg / len(params)) * v
    got = hvp(v)
    assert float((got.double() - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_impact_scores_with_cg_use_the_inverse_hessian_direction(setup):
    """hessian=cg scores equal <(H + dI)^-1 grad J, grad l_i> computed by a separate CG solve + naive scores."""
    model, tok, pa, cands, pref_ref, _ = setup
    loss = forget_loss(UnlearnSection(objective="ga"))
    hess = cands[:4]
    common = dict(
        pad_id=tok.pad_token_id,
        pref_ref_logps=pref_ref,
        beta=0.3,
        hessian_examples=hess,
        reg_weight=0.1,
        damping=1.0,
        iters=3,
    )
    result = impact_scores(model, cands, pa, loss, hessian="cg", **common)
    _, grad = preference_gradient(model, pa, pref_ref, pad_id=tok.pad_token_id, beta=0.3)
    hvp = unlearn_hvp(model, hess, torch.ones(4), loss, pad_id=tok.pad_token_id, reg_weight=0.1)
    solved = unflatten_direction(conjugate_gradient(hvp, flatten_direction(grad), damping=1.0, iters=3), grad)
    naive = naive_scores(model, cands, solved, loss, pad_id=tok.pad_token_id)
    assert _rel_diff(result.scores, naive) <= 1e-3
    identity = impact_scores(model, cands, pa, loss, hessian="identity", **common)
    assert not torch.allclose(identity.scores, result.scores)
    assert identity.objective == pytest.approx(result.objective)
