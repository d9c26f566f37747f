"""dpo_loss on 2-3 element tensors, expected values derived by hand."""

import math

import pytest
import torch

from lifealign.losses.dpo import dpo_loss, logratio_margin
from lifealign.losses.spec import LossInputs, weighted_mean

SOFTPLUS_MINUS_1 = math.log1p(math.exp(-1))  # -log sigma(1) = ln(1 + e^-1) = 0.3132617


def pairs(chosen, rejected, ref_chosen, ref_rejected, requires_grad=False):
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)  # noqa: E731
    return LossInputs(
        chosen_logps=t(chosen),
        rejected_logps=t(rejected),
        ref_chosen_logps=t(ref_chosen),
        ref_rejected_logps=t(ref_rejected),
    )


def test_zero_margin_gives_ln2_and_zero_rewards():
    """Policy == reference: d = 0, L = -log sigma(0) = ln 2 for every pair (RELIABILITY F24)."""
    out = dpo_loss(pairs([-3.0, -7.0], [-4.0, -1.0], [-3.0, -7.0], [-4.0, -1.0]))
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2), dtype=torch.float64))
    assert out.chosen_rewards.tolist() == [0.0, 0.0] and out.rejected_rewards.tolist() == [0.0, 0.0]


def test_hand_computed_margin_loss_and_rewards():
    """beta = 0.5; chosen -1 vs ref -2 (+1), rejected -3 vs ref -2 (-1): d = 2, beta d = 1.

    L = -log sigma(1) = ln(1 + e^-1) = 0.31326; rewards 0.5 * (+1) = 0.5 and 0.5 * (-1) = -0.5.
    Second pair mirrored (d = -2): L = ln(1 + e) = 1 + 0.31326.
    """
    out = dpo_loss(pairs([-1.0, -3.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]), beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([SOFTPLUS_MINUS_1, 1 + SOFTPLUS_MINUS_1], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5, 0.5], dtype=torch.float64))


def test_label_smoothing_adds_eps_times_beta_d():
    """-(1-e) log s(x) - e log s(-x) = -log s(x) + e x, since log s(x) - log s(-x) = x. beta d = 1, e = 0.1:

    0.31326 + 0.1 = 0.41326.
    """
    out = dpo_loss(pairs([-1.0], [-3.0], [-2.0], [-2.0]), beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([SOFTPLUS_MINUS_1 + 0.1], dtype=torch.float64))


def test_gradient_at_zero_margin_is_minus_beta_over_two():
    """dL/d logp_w = -beta sigma(-beta d) = -beta/2 at d = 0; dL/d logp_l = +beta/2."""
    inputs = pairs([-2.0], [-2.0], [-2.0], [-2.0], requires_grad=True)
    dpo_loss(inputs, beta=0.3).losses.sum().backward()
    torch.testing.assert_close(inputs.chosen_logps.grad, torch.tensor([-0.15], dtype=torch.float64))
    torch.testing.assert_close(inputs.rejected_logps.grad, torch.tensor([0.15], dtype=torch.float64))


def test_rewards_are_detached():
    inputs = pairs([-1.0], [-3.0], [-2.0], [-2.0], requires_grad=True)
    out = dpo_loss(inputs)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad


def test_per_example_weights_scale_each_pair():
    """Losses [ln(1+e^-1), 1 + ln(1+e^-1)] with weights [2, 0]: sum_i w_i l_i / B = 2 * 0.31326 / 2."""
    out = dpo_loss(pairs([-1.0, -3.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]), beta=0.5)
    got = weighted_mean(out.losses, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor(SOFTPLUS_MINUS_1, dtype=torch.float64))


def test_margin_is_chosen_log_ratio_minus_rejected_log_ratio():
    d = logratio_margin(pairs([-1.0, 0.0], [-5.0, -1.0], [-2.0, -1.0], [-3.0, -1.0]))
    torch.testing.assert_close(d, torch.tensor([1.0 - (-2.0), 1.0 - 0.0], dtype=torch.float64))


def test_missing_reference_is_an_error_naming_the_fields():
    with pytest.raises(ValueError, match="ref_chosen_logps, ref_rejected_logps"):
        dpo_loss(LossInputs(chosen_logps=torch.zeros(1), rejected_logps=torch.zeros(1)))


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"beta": -1.0}, {"label_smoothing": 0.5}, {"label_smoothing": -0.1}])
def test_out_of_range_hyper_parameters_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        dpo_loss(pairs([0.0], [0.0], [0.0], [0.0]), **kwargs)
