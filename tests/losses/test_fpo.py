"""fpo_loss (LifeAlign Eq. 3), expected values derived by hand, gradients by autograd, FPO <= DPO by hypothesis."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifealign.losses.dpo import dpo_loss
from lifealign.losses.fpo import fpo_loss
from lifealign.losses.spec import LossInputs

LN2 = math.log(2)


def margins(d, requires_grad=False):
    """fp64 inputs whose log-ratio margin is d: chosen = d, everything else 0."""
    chosen = torch.tensor(d, dtype=torch.float64, requires_grad=requires_grad)
    zero = torch.zeros(len(d), dtype=torch.float64)
    return LossInputs(chosen_logps=chosen, rejected_logps=zero, ref_chosen_logps=zero, ref_rejected_logps=zero)


def test_zero_margin_is_a_quarter_of_dpo():
    """r = 0: sigma = 1/2, weight (1/2)^2 = 0.25, L = 0.25 ln 2 = 0.17329."""
    out = fpo_loss(margins([0.0, 0.0]))
    torch.testing.assert_close(out.losses, torch.full((2,), 0.25 * LN2, dtype=torch.float64))


def test_hand_computed_value_at_r_ln3():
    """beta = 1, d = ln 3: sigma = 3/4, weight (1/4)^2 = 1/16, -log sigma = ln(4/3): L = ln(4/3)/16 = 0.017980.

    Rewards: beta * d = ln 3 for chosen, 0 for rejected.
    """
    out = fpo_loss(margins([math.log(3)]), beta=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([math.log(4 / 3) / 16], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([math.log(3)], dtype=torch.float64))


def test_gamma_zero_is_dpo():
    inputs = margins([-3.0, 0.5, 4.0])
    torch.testing.assert_close(fpo_loss(inputs, beta=0.7, gamma=0.0).losses, dpo_loss(inputs, beta=0.7).losses)


def grad_wrt_r(loss_fn, r: float, **kwargs) -> float:
    """dL/dr with beta = 1 (so r = d = chosen_logps)."""
    inputs = margins([r], requires_grad=True)
    loss_fn(inputs, beta=1.0, **kwargs).losses.sum().backward()
    return inputs.chosen_logps.grad.item()


def test_gradient_ratio_to_dpo_at_zero_with_weight_not_detached():
    """dL_FPO/dr = -(1-s)^2 [(1-s) - 2 s log s]; at r = 0: -0.25 (0.5 + ln 2) = -0.29829. DPO: -(1-s) = -0.5.

    Ratio (0.5 + ln 2) / 2 = 0.59657 (METHODS.md §1.2: "about 0.60 at r = 0").
    """
    fpo, dpo = grad_wrt_r(fpo_loss, 0.0), grad_wrt_r(dpo_loss, 0.0)
    assert fpo == pytest.approx(-0.25 * (0.5 + LN2), rel=1e-12)
    assert dpo == pytest.approx(-0.5, rel=1e-12)
    assert fpo / dpo == pytest.approx((0.5 + LN2) / 2, rel=1e-12)


def test_gradient_ratio_to_dpo_at_zero_with_detached_weight_is_the_weight():
    """Detached: dL/dr = -(1-s)^2 (1-s) = -0.125 at r = 0: exactly 0.25 of DPO's -0.5."""
    ratio = grad_wrt_r(fpo_loss, 0.0, detach_weight=True) / grad_wrt_r(dpo_loss, 0.0)
    assert ratio == pytest.approx(0.25, rel=1e-12)


def test_gradient_ratio_tends_to_one_for_badly_ranked_pairs_and_zero_for_learned_ones():
    assert grad_wrt_r(fpo_loss, -20.0) / grad_wrt_r(dpo_loss, -20.0) > 0.999
    assert grad_wrt_r(fpo_loss, 10.0) / grad_wrt_r(dpo_loss, 10.0) < 1e-3


def test_extreme_margins_are_finite():
    inputs = margins([-1e4, 1e4], requires_grad=True)
    out = fpo_loss(inputs, beta=1.0)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(inputs.chosen_logps.grad).all()
    torch.testing.assert_close(out.losses, torch.tensor([1e4, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"gamma": -1.0}])
def test_out_of_range_hyper_parameters_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        fpo_loss(margins([0.0]), **kwargs)


@settings(max_examples=200, deadline=None)
@given(
    d=st.floats(-200, 200, allow_nan=False),
    beta=st.floats(0.01, 5.0),
    gamma=st.floats(0.0, 5.0),
)
def test_fpo_is_between_zero_and_dpo(d, beta, gamma):
    """0 <= (1 - s)^gamma <= 1 and -log s >= 0, so 0 <= L_FPO <= L_DPO pointwise."""
    inputs = margins([d])
    fpo = fpo_loss(inputs, beta=beta, gamma=gamma).losses.item()
    dpo = dpo_loss(inputs, beta=beta).losses.item()
    assert 0.0 <= fpo <= dpo * (1 + 1e-12)
