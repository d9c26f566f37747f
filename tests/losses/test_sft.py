"""sft_loss: NLL of the chosen response, per token (default) or summed."""

import pytest
import torch

from lifealign.losses.sft import sft_loss
from lifealign.losses.spec import LossInputs


def chosen_only(logps, n_tokens, requires_grad=False):
    return LossInputs(
        chosen_logps=torch.tensor(logps, requires_grad=requires_grad), chosen_tokens=torch.tensor(n_tokens)
    )


def test_mean_is_per_token_nll():
    """logps [-6, -1] over [3, 4] tokens: per-token NLL [2, 0.25]; no rewards."""
    out = sft_loss(chosen_only([-6.0, -1.0], [3, 4]))
    torch.testing.assert_close(out.losses, torch.tensor([2.0, 0.25]))
    assert out.chosen_rewards is None and out.rejected_rewards is None


def test_sum_is_sequence_nll_and_needs_no_counts():
    out = sft_loss(LossInputs(chosen_logps=torch.tensor([-6.0, -1.0])), reduction="sum")
    torch.testing.assert_close(out.losses, torch.tensor([6.0, 1.0]))


def test_gradient_is_minus_one_over_length():
    inputs = chosen_only([-6.0, -1.0], [3, 4], requires_grad=True)
    sft_loss(inputs).losses.sum().backward()
    torch.testing.assert_close(inputs.chosen_logps.grad, torch.tensor([-1 / 3, -1 / 4]))


def test_bad_reduction_raises():
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(chosen_only([-1.0], [1]), reduction="avg")


def test_needs_chosen_side():
    with pytest.raises(ValueError, match="chosen_logps"):
        sft_loss(LossInputs(rejected_logps=torch.zeros(1)))
