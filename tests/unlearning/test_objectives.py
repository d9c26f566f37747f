"""The ``unlearn:`` section: defaults, validation with key paths, binding of the forget loss, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lifealign.config import ConfigError, RunConfig, config_from_dict
from lifealign.config.unlearn import UnlearnSection
from lifealign.engine.specs import bind_config, load_run_config
from lifealign.losses import unlearning_objectives
from lifealign.unlearning.baselines import baseline_names
from lifealign.unlearning.objectives import forget_loss, steps_per_solve, uses_retain

REPO = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_released_u2a_scripts():
    section = RunConfig().unlearn
    assert (section.dpo_beta, section.reg_weight, section.retain_weight, section.rounds) == (0.3, 0.1, 0.3, 3)
    assert section.weight_sign == "paper" and section.sparsity == 0.0 and section.hessian == "identity"
    assert (section.pa_ratio, section.negative_ratio, section.forget_ratio, section.split_seed) == (0.2, 0.65, 0.65, 42)


def test_unknown_and_invalid_keys_are_errors_naming_the_path():
    with pytest.raises(ValueError, match="unlearn.rounds"):
        config_from_dict({"unlearn": {"rounds": -1}})
    with pytest.raises(ValueError, match="unlearn.weights_lrr"):
        config_from_dict({"unlearn": {"weights_lrr": 1.0}})
    with pytest.raises(ValidationError, match="baselines"):
        UnlearnSection(baselines=["ga", "ga"])
    with pytest.raises(ConfigError, match=r"unlearn\.baselines\.1: unknown baseline 'sft'"):
        bind_config(config_from_dict({"unlearn": {"baselines": ["ga", "sft"]}}))
    with pytest.raises(ConfigError, match=r"unlearn\.objective: unknown unlearning objective 'dpo'"):
        bind_config(config_from_dict({"unlearn": {"objective": "dpo"}}))


def test_forget_loss_binds_the_objectives_loss_with_checked_args():
    assert [t.name for t in forget_loss(UnlearnSection(objective="grad_diff")).terms] == ["ga"]
    npo = forget_loss(UnlearnSection(objective="npo", loss_args={"beta": 0.2}))
    assert npo.terms[0].kwargs == {"beta": 0.2} and npo.needs_reference and npo.uses == ("rejected",)
    with pytest.raises(ValueError, match="unlearn.loss_args.gamma"):
        forget_loss(UnlearnSection(objective="npo", loss_args={"gamma": 1.0}))
    with pytest.raises(ValueError, match="unlearn.loss_args.beta must be > 0"):
        forget_loss(UnlearnSection(objective="npo", loss_args={"beta": 0}))
    # a baseline with another objective ignores the section's loss_args
    assert forget_loss(UnlearnSection(objective="npo", loss_args={"beta": 0.2}), "simnpo").terms[0].kwargs == {}


def test_steps_per_solve():
    train = RunConfig().train.model_copy(update={"batch_size": 4, "grad_accum": 2})
    assert steps_per_solve(UnlearnSection(inner_epochs=1.0), train, 20) == 3  # ceil(20 / 8)
    assert steps_per_solve(UnlearnSection(inner_max_steps=7), train, 20) == 7


def test_the_objectives_and_full_set_baselines_come_from_the_one_loss_registry():
    assert list(unlearning_objectives()) == ["ga", "grad_diff", "npo", "simnpo"]
    assert baseline_names() == ["ga", "grad_diff", "npo", "simnpo", "random", "topk", "dpo"]
    assert [name for name in unlearning_objectives() if uses_retain(name)] == ["grad_diff"]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "u2a").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_u2a_config_loads_and_binds(path):
    cfg = load_run_config(path)  # binds every loss, plugin, objective, baseline and scorer
    assert len(cfg.tasks) == 1
    assert all(b in baseline_names() for b in cfg.unlearn.baselines)
