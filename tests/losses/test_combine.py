"""CombinedLoss: weighted sum of terms, per-example weights, declared needs, primary output."""

import math

import pytest
import torch

from lifealign.losses import LOSSES, BoundLoss, CombinedLoss, weighted_mean
from lifealign.losses.spec import LossInputs

LN2 = math.log(2)


def term(name, weight=1.0, **kwargs):
    return BoundLoss(name, LOSSES[name], weight, kwargs)


def batch(requires_grad=False):
    """Two pairs at the reference (d = 0); chosen per-token NLL [2, 1]."""
    chosen = torch.tensor([-6.0, -4.0], requires_grad=requires_grad)
    return LossInputs(
        chosen_logps=chosen,
        rejected_logps=torch.tensor([-5.0, -5.0]),
        chosen_tokens=torch.tensor([3, 4]),
        rejected_tokens=torch.tensor([5, 5]),
        ref_chosen_logps=torch.tensor([-6.0, -4.0]),
        ref_rejected_logps=torch.tensor([-5.0, -5.0]),
    )


def test_fpo_plus_tenth_sft():
    """FPO at d = 0 is 0.25 ln 2 per pair; SFT mean [2, 1] -> 1.5. Total 0.25 ln 2 + 0.1 * 1.5 = 0.32329."""
    total, parts, primary = CombinedLoss([term("fpo"), term("sft", 0.1)])(batch())
    torch.testing.assert_close(total, torch.tensor(0.25 * LN2 + 0.15))
    torch.testing.assert_close(parts["fpo"], torch.tensor(0.25 * LN2))
    torch.testing.assert_close(parts["sft"], torch.tensor(1.5))
    torch.testing.assert_close(primary.losses, torch.full((2,), 0.25 * LN2))


def test_per_example_weights_apply_to_every_term():
    """weights [2, 0]: FPO (2 * 0.25 ln 2)/2 = 0.25 ln 2; SFT (2 * 2)/2 = 2. Total 0.25 ln 2 + 0.5 * 2."""
    total, parts, _ = CombinedLoss([term("fpo"), term("sft", 0.5)])(batch(), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(parts["sft"], torch.tensor(2.0))
    torch.testing.assert_close(total, torch.tensor(0.25 * LN2 + 1.0))


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # sum_i w_i l_i / B with l = [2, 1] (SFT's per-token NLL), B = 2; dividing by sum w would give 7/4 and 2.
        ([3.0, 1.0], (3 * 2 + 1 * 1) / 2),
        ([1.0, 0.0], (1 * 2 + 0 * 1) / 2),
    ],
)
def test_per_example_weights_are_divided_by_the_batch_size_not_their_sum(weights, expected):
    """U2A's inner loss is ``mean_b(w_b l_b)`` (``(losses * weights).mean()`` in its code): weights that do not sum
    to B scale the loss, they are not renormalised (sum w = 4 and 1 here, B = 2)."""
    w = torch.tensor(weights)
    total, parts, _ = CombinedLoss([term("sft")])(batch(), w)
    torch.testing.assert_close(parts["sft"], torch.tensor(expected))
    torch.testing.assert_close(total, torch.tensor(expected))
    torch.testing.assert_close(weighted_mean(torch.tensor([2.0, 1.0]), w), torch.tensor(expected))


def test_primary_is_the_first_term_with_rewards():
    _, _, primary = CombinedLoss([term("sft"), term("dpo", beta=0.5)])(batch())
    assert primary.chosen_rewards is not None
    torch.testing.assert_close(primary.losses, torch.full((2,), LN2))
    _, _, only_sft = CombinedLoss([term("sft")])(batch())
    torch.testing.assert_close(only_sft.losses, torch.tensor([2.0, 1.0]))


def test_gradient_flows_through_total_and_parts_are_detached():
    """d total / d chosen_logps: DPO -beta/2 / B + SFT weight * (-1/n) / B, beta 0.1, B 2, weight 1."""
    inputs = batch(requires_grad=True)
    total, parts, _ = CombinedLoss([term("dpo"), term("sft")])(inputs)
    total.backward()
    torch.testing.assert_close(inputs.chosen_logps.grad, torch.tensor([-0.025 - 1 / 6, -0.025 - 1 / 8]))
    assert not any(p.requires_grad for p in parts.values())


def test_declared_needs_are_the_union():
    assert CombinedLoss([term("sft")]).uses == ("chosen",)
    assert not CombinedLoss([term("sft")]).needs_reference
    mixed = CombinedLoss([term("ga"), term("sft")])
    assert mixed.uses == ("chosen", "rejected") and not mixed.needs_reference and not mixed.paired
    assert CombinedLoss([term("npo"), term("sft")]).needs_reference
    assert CombinedLoss([term("sft"), term("fpo")]).paired


def test_empty_or_duplicate_terms_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        CombinedLoss([])
    with pytest.raises(ValueError, match="repeated: sft"):
        CombinedLoss([term("sft"), term("sft", reduction="sum")])
