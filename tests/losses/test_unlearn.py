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


def test_npo_mean_reduction_is_npo_on_the_mean_token_log_likelihood():
    """reduction="mean" (U2A's code): ell = logp / |y|. logp -6, ref -3 over 3 tokens, beta 1: ell - ref_ell =
    -2 - (-1) = -1, L = -2 log sigma(1) = 2 softplus(-1) = 2 ln(1 + e^-1); reward -1.

    dL/dlogp = (1/|y|) * 2 sigma(beta x) = (1/3) * 2 sigma(-1) = (2/3) / (1 + e).
    The summed form on the same inputs: x = -3, L = 2 ln(1 + e^-3).
    """
    inputs = LossInputs(
        rejected_logps=f64([-6.0], requires_grad=True),
        ref_rejected_logps=f64([-3.0]),
        rejected_tokens=torch.tensor([3]),
    )
    out = npo_loss(inputs, beta=1.0, reduction="mean")
    torch.testing.assert_close(out.losses, f64([2 * SOFTPLUS_MINUS_1]))
    torch.testing.assert_close(out.rejected_rewards, f64([-1.0]))
    out.losses.sum().backward()
    torch.testing.assert_close(inputs.rejected_logps.grad, f64([(2 / 3) / (1 + math.e)]))
    summed = npo_loss(inputs, beta=1.0, reduction="sum")
    torch.testing.assert_close(summed.losses, f64([2 * math.log1p(math.exp(-3))]))


def test_npo_summed_gradient_is_length_times_the_mean_ones_at_the_reference():
    """At policy = reference both forms are (2/beta) ln 2 and dL/d ell = 2 sigma(0) = 1, so with
    ``ell = logp`` (sum) or ``logp/|y|`` (mean) the gradients with respect to the parameters are
    ``grad logp_i`` and ``grad logp_i / |y_i|``: their ratio is |y_i| per example, in every coordinate (which makes
    the summed form's impact score |y_i| times the mean form's). Here ``logp_i = f_i . theta`` on a shared theta."""
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    features = f64([[1.0, 2.0], [-3.0, 0.5], [0.25, -1.0]])
    n_tokens = torch.tensor([2, 5, 7])
    for i in range(3):
        grads = {}
        for reduction in ("sum", "mean"):
            logp = (features[i] @ theta).reshape(1)
            inputs = LossInputs(
                rejected_logps=logp, ref_rejected_logps=logp.detach(), rejected_tokens=n_tokens[i : i + 1]
            )
            out = npo_loss(inputs, beta=0.1, reduction=reduction)
            torch.testing.assert_close(out.losses, f64([20 * LN2]))
            (grads[reduction],) = torch.autograd.grad(out.losses.sum(), theta)
        torch.testing.assert_close(grads["sum"], features[i])  # dL/dlogp = 1
        torch.testing.assert_close(grads["sum"], int(n_tokens[i]) * grads["mean"])


def test_npo_mean_needs_the_token_counts_and_reduction_is_checked():
    inputs = LossInputs(rejected_logps=f64([-1.0]), ref_rejected_logps=f64([-1.0]))
    with pytest.raises(ValueError, match="rejected_tokens"):
        npo_loss(inputs, reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        npo_loss(inputs, reduction="max")


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
