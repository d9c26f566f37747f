"""hinge_loss = relu(1 - beta d), expected values derived by hand."""

import pytest
import torch

from lifealign.losses.hinge import hinge_loss
from lifealign.losses.spec import LossInputs


def margins(d, requires_grad=False):
    """Inputs whose log-ratio margin is d: chosen = d, everything else 0."""
    chosen = torch.tensor(d, requires_grad=requires_grad)
    zero = torch.zeros(len(d))
    return LossInputs(chosen_logps=chosen, rejected_logps=zero, ref_chosen_logps=zero, ref_rejected_logps=zero)


def test_hand_computed_values():
    """beta = 0.5: d = 2 -> max(0, 1 - 1) = 0; d = 1 -> 0.5; d = -2 -> 2. Rewards 0.5 d and 0."""
    out = hinge_loss(margins([2.0, 1.0, -2.0]), beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 0.5, 2.0]))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([1.0, 0.5, -1.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.zeros(3))


def test_no_gradient_beyond_the_margin_and_minus_beta_inside():
    inputs = margins([3.0, 1.0], requires_grad=True)
    hinge_loss(inputs, beta=0.5).losses.sum().backward()
    torch.testing.assert_close(inputs.chosen_logps.grad, torch.tensor([0.0, -0.5]))


def test_beta_must_be_positive():
    with pytest.raises(ValueError, match="beta"):
        hinge_loss(margins([0.0]), beta=0.0)
