"""LOSSES registry and bind_loss: declared needs match what each loss reads; config errors name their keys."""

from pathlib import Path

import pytest
import torch

from lifealign.config.schema import LossTerm
from lifealign.losses import LOSSES, BoundLoss, bind_loss, bind_losses
from lifealign.losses.spec import LossInputs

EXPECTED = {"dpo", "ipo", "hinge", "fpo", "sft", "ga", "grad_diff", "npo", "simnpo"}


def declared_inputs(name: str, batch_size: int = 3) -> LossInputs:
    """Only the fields the registry entry declares (its sides, and their references if it needs them)."""
    spec = LOSSES[name]
    torch.manual_seed(0)
    fields = {}
    for side in spec.uses:
        fields[f"{side}_logps"] = -10 * torch.rand(batch_size)
        fields[f"{side}_tokens"] = torch.randint(1, 6, (batch_size,))
        if spec.needs_reference:
            fields[f"ref_{side}_logps"] = -10 * torch.rand(batch_size)
    return LossInputs(**fields)


def test_registry_has_exactly_the_expected_losses():
    assert set(LOSSES) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_loss_runs_on_exactly_its_declared_inputs(name):
    """Reading an undeclared side or reference would raise: the declaration is what the loop relies on."""
    bound = bind_loss(LossTerm(name=name))
    out = bound(declared_inputs(name))
    assert out.losses.shape == (3,) and torch.isfinite(out.losses).all()


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if LOSSES[n].needs_reference))
def test_losses_needing_a_reference_fail_without_it(name):
    inputs = declared_inputs(name)
    inputs.ref_chosen_logps = inputs.ref_rejected_logps = None
    with pytest.raises(ValueError, match="ref_"):
        LOSSES[name].fn(inputs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_loss_module_has_a_test_module(name):
    module = LOSSES[name].fn.__module__.rsplit(".", 1)[-1]
    assert (Path(__file__).parent / f"test_{module}.py").is_file()


def test_bound_loss_passes_its_kwargs():
    bound = bind_loss(LossTerm(name="fpo", weight=0.5, beta=0.2, gamma=0.0))
    assert isinstance(bound, BoundLoss) and bound.weight == 0.5 and bound.kwargs == {"beta": 0.2, "gamma": 0.0}
    inputs = declared_inputs("fpo")
    torch.testing.assert_close(bound(inputs).losses, LOSSES["dpo"].fn(inputs, beta=0.2).losses)


def test_numeric_strings_become_floats():
    assert bind_loss(LossTerm(name="npo", beta="1e-1")).kwargs == {"beta": 0.1}


def test_unknown_name_lists_the_available_losses():
    with pytest.raises(ValueError, match="unknown loss 'dop'") as err:
        bind_loss(LossTerm(name="dop"))
    assert all(name in str(err.value) for name in EXPECTED)


def test_all_bad_keys_are_reported_together():
    with pytest.raises(ValueError) as err:
        bind_loss(LossTerm(name="fpo", bta=0.1, gama=2, detach_weight="yes"))
    message = str(err.value)
    assert "loss.bta: not a parameter of loss 'fpo' (accepted: beta, gamma, detach_weight)" in message
    assert "loss.gama:" in message and "loss.detach_weight: must be true or false" in message


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        (LossTerm(name="dpo", beta=0), "loss.beta must be > 0"),
        (LossTerm(name="dpo", label_smoothing=0.7), "loss.label_smoothing must be in [0, 0.5)"),
        (LossTerm(name="sft", reduction="avg"), "loss.reduction: must be one of ['mean', 'sum']"),
        (LossTerm(name="ipo", beta="abc"), "loss.beta: must be a number"),
        (LossTerm(name="ga", beta=0.1), "loss.beta: not a parameter of loss 'ga' (accepted: none)"),
        (LossTerm(name="sft", weight=-1.0), "loss.weight: must be a finite number >= 0"),
    ],
)
def test_bad_values_are_named_by_key(term, expected):
    with pytest.raises(ValueError) as err:
        bind_loss(term)
    assert expected in str(err.value)


def test_bind_losses_reports_every_term_by_index():
    with pytest.raises(ValueError) as err:
        bind_losses([LossTerm(name="dpo", beta=0), LossTerm(name="sft"), LossTerm(name="ga", x=1)])
    message = str(err.value)
    assert "method.loss.0.beta must be > 0" in message and "method.loss.2.x: not a parameter" in message


def test_bind_losses_builds_the_combined_objective():
    combined = bind_losses([LossTerm(name="fpo"), LossTerm(name="sft", weight=0.1)])
    assert [t.name for t in combined.terms] == ["fpo", "sft"] and combined.needs_reference
