"""ga, grad_diff, npo, simnpo on 2-3 element tensors, expected values derived by hand."""

import math

import pytest
import torch

from lifealign.losses.spec import LossInputs
from lifealign.losses.unlearn import ga_loss, grad_diff_loss, npo_loss, simnpo_loss

LN2 = math.log(2)
SOFTPLUS_MINUS_1 = math.log1p(math.exp(-1))  # -log sigma(1)


def f64(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def test_ga_is_mean_token_log_likelihood_of_the_forget_response():
    """logps [-6, -2] over [2, 4] tokens: [-3, -0.5]; dL/dlogp = 1/n, so descent lowers the log-likelihood."""
    inputs = LossInputs(rejected_logps=f64([-6.0, -2.0], requires_grad=True), rejected_tokens=torch.tensor([2, 4]))
    out = ga_loss(inputs)
    torch.testing.assert_close(out.losses, f64([-3.0, -0.5]))
    out.losses.sum().backward()
    torch.testing.assert_close(inputs.rejected_logps.grad, f64([0.5, 0.25]))


def test_grad_diff_adds_weighted_retain_nll():
    """forget -6/2 = -3; retain NLL 4/4 = 1; retain_weight 0.5: -3 + 0.5 * 1 = -2.5 (weight 1: -2)."""
    inputs = LossInputs(
        rejected_logps=f64([-6.0]),
        rejected_tokens=torch.tensor([2]),
        chosen_logps=f64([-4.0]),
        chosen_tokens=torch.tensor([4]),
    )
    torch.testing.assert_close(grad_diff_loss(inputs, retain_weight=0.5).losses, f64([-2.5]))
    torch.testing.assert_close(grad_diff_loss(inputs).losses, f64([-2.0]))


def test_npo_at_reference_is_two_over_beta_ln2():
    """logp = ref: L = -(2/beta) log sigma(0) = (2/beta) ln 2 = 20 ln 2 for beta = 0.1 (RELIABILITY F24)."""
    out = npo_loss(LossInputs(rejected_logps=f64([-5.0, -9.0]), ref_rejected_logps=f64([-5.0, -9.0])))
    torch.testing.assert_close(out.losses, f64([20 * LN2, 20 * LN2]))
    torch.testing.assert_close(out.rejected_rewards, f64([0.0, 0.0]))
    assert out.chosen_rewards is None


def test_npo_hand_computed_and_its_gradient():
    """beta = 1, x = logp - ref = ln 3: L = -2 log sigma(-ln 3) = 2 ln 4; reward ln 3.

    dL/dx = 2 sigma(beta x): 2 * 3/4 = 1.5 here, and 1 at x = 0 (GA's gradient, shrinking as x falls).
    """
    inputs = LossInputs(rejected_logps=f64([math.log(3), 0.0], requires_grad=True), ref_rejected_logps=f64([0.0, 0.0]))
    out = npo_loss(inputs, beta=1.0)
    torch.testing.assert_close(out.losses, f64([2 * math.log(4), 2 * LN2]))
    torch.testing.assert_close(out.rejected_rewards, f64([math.log(3), 0.0]))
    out.losses.sum().backward()
    torch.testing.assert_close(inputs.rejected_logps.grad, f64([1.5, 1.0]))


def test_simnpo_hand_computed():
    """beta = 2.5 (2/beta = 0.8). logp 0: 0.8 ln 2. logp -2 over 5 tokens: reward 2.5 * -0.4 = -1,
    L = -0.8 log sigma(1) = 0.8 * 0.31326. With delta = 1 the second becomes -0.8 log sigma(0) = 0.8 ln 2.
    """
    inputs = LossInputs(rejected_logps=f64([0.0, -2.0]), rejected_tokens=torch.tensor([3, 5]))
    out = simnpo_loss(inputs)
    torch.testing.assert_close(out.losses, f64([0.8 * LN2, 0.8 * SOFTPLUS_MINUS_1]))
    torch.testing.assert_close(out.rejected_rewards, f64([0.0, -1.0]))
    torch.testing.assert_close(simnpo_loss(inputs, delta=1.0).losses[1], torch.tensor(0.8 * LN2, dtype=torch.float64))


def test_simnpo_needs_no_reference():
    simnpo_loss(LossInputs(rejected_logps=f64([-1.0]), rejected_tokens=torch.tensor([1])))


@pytest.mark.parametrize(
    ("fn", "missing"),
    [(ga_loss, "rejected_tokens"), (npo_loss, "ref_rejected_logps"), (grad_diff_loss, "chosen_logps")],
)
def test_missing_inputs_are_named(fn, missing):
    with pytest.raises(ValueError, match=missing):
        fn(LossInputs(rejected_logps=f64([-1.0])))


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [(npo_loss, {"beta": 0.0}), (simnpo_loss, {"beta": -1.0}), (grad_diff_loss, {"retain_weight": -0.1})],
)
def test_out_of_range_hyper_parameters_raise(fn, kwargs):
    one = f64([1.0])
    inputs = LossInputs(one, one, torch.tensor([1]), torch.tensor([1]), one, one)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        fn(inputs, **kwargs)
