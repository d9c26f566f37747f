"""ipo_loss (trl 1.16's per-token-averaged form), expected values derived by hand."""

import pytest
import torch

from lifealign.losses.ipo import ipo_loss
from lifealign.losses.spec import LossInputs


def pairs(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected):
    f = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return LossInputs(
        chosen_logps=f(chosen),
        rejected_logps=f(rejected),
        ref_chosen_logps=f(ref_chosen),
        ref_rejected_logps=f(ref_rejected),
        chosen_tokens=torch.tensor(n_chosen),
        rejected_tokens=torch.tensor(n_rejected),
    )


def test_hand_computed_per_token_margin():
    """beta = 0.5, target 1/(2 beta) = 1.

    Pair 0: chosen (-4 - -6)/2 = 1, rejected (-9 - -6)/3 = -1: h = 2, L = (2 - 1)^2 = 1.
    Pair 1: same sums but one token each: h = 2 - (-3) = 5, L = 16 (so the averaging matters).
    Rewards stay summed: 0.5 * 2 = 1 and 0.5 * -3 = -1.5.
    """
    out = ipo_loss(pairs([-4.0, -4.0], [-9.0, -9.0], [-6.0, -6.0], [-6.0, -6.0], [2, 1], [3, 1]), beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([1.0, 16.0], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.5, -1.5], dtype=torch.float64))


@pytest.mark.parametrize(("beta", "expected"), [(0.5, 1.0), (0.1, 25.0)])
def test_zero_margin_gives_target_squared(beta, expected):
    """h = 0: L = (1/(2 beta))^2."""
    out = ipo_loss(pairs([-3.0], [-2.0], [-3.0], [-2.0], [4], [5]), beta=beta)
    torch.testing.assert_close(out.losses, torch.tensor([expected], dtype=torch.float64))


def test_loss_is_minimal_at_the_target_margin():
    """h = 1/(2 beta) = 5 for beta 0.1: L = 0, and the gradient vanishes."""
    inputs = pairs([0.0], [-10.0], [-5.0], [-10.0], [1], [1])
    inputs.chosen_logps.requires_grad_()
    out = ipo_loss(inputs, beta=0.1)
    out.losses.sum().backward()
    assert out.losses.item() == 0.0 and inputs.chosen_logps.grad.item() == 0.0


def test_zero_length_is_clamped_to_one():
    out = ipo_loss(pairs([-2.0], [-2.0], [-1.0], [-1.0], [0], [0]), beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([1.0], dtype=torch.float64))


def test_needs_token_counts():
    inputs = pairs([0.0], [0.0], [0.0], [0.0], [1], [1])
    inputs.rejected_tokens = None
    with pytest.raises(ValueError, match="rejected_tokens"):
        ipo_loss(inputs)
