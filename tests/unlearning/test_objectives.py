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
from lifealign.unlearning.inner import inner_plugins
from lifealign.unlearning.objectives import forget_loss, inner_reg_weight, steps_per_solve, uses_retain
from lifealign.unlearning.plugins import AnchorPlugin, ForgetNLLGuard

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
    assert npo.terms[0].kwargs == {"reduction": "mean", "beta": 0.2}
    assert npo.needs_reference and npo.uses == ("rejected",)
    with pytest.raises(ValueError, match="unlearn.loss_args.gamma"):
        forget_loss(UnlearnSection(objective="npo", loss_args={"gamma": 1.0}))
    with pytest.raises(ValueError, match="unlearn.loss_args.beta must be > 0"):
        forget_loss(UnlearnSection(objective="npo", loss_args={"beta": 0}))
    # a baseline with another objective ignores the section's loss_args
    assert forget_loss(UnlearnSection(objective="npo", loss_args={"beta": 0.2}), "simnpo").terms[0].kwargs == {}


def test_npo_gets_u2a_codes_per_token_mean_unless_loss_args_say_otherwise():
    """``unlearn.objective: npo`` (and the ``npo`` baseline) binds ``reduction: mean`` (U2A's code); ``loss_args`` or
    ``forget_reduction: sum`` give the NPO paper's sum; losses without a ``reduction`` get nothing."""
    assert forget_loss(UnlearnSection(objective="npo")).terms[0].kwargs == {"reduction": "mean"}
    assert forget_loss(UnlearnSection(objective="ga"), "npo").terms[0].kwargs == {"reduction": "mean"}
    summed = UnlearnSection(objective="npo", loss_args={"reduction": "sum"})
    assert forget_loss(summed).terms[0].kwargs == {"reduction": "sum"}
    paper = UnlearnSection(objective="ga", forget_reduction="sum")
    assert forget_loss(paper, "npo").terms[0].kwargs == {"reduction": "sum"}
    assert forget_loss(paper).terms[0].kwargs == {} and forget_loss(paper, "simnpo").terms[0].kwargs == {}
    with pytest.raises(ValueError, match="unlearn.loss_args.reduction"):
        forget_loss(UnlearnSection(objective="npo", loss_args={"reduction": "max"}))
    with pytest.raises(ValueError, match="forget_reduction"):
        UnlearnSection(forget_reduction="max")


@pytest.mark.parametrize(
    ("reg_objectives", "expected"),
    [
        (None, {"ga": 0.1, "grad_diff": 0.0, "npo": 0.0, "simnpo": 0.0}),  # U2A's code: GA only
        (["ga", "grad_diff", "npo", "simnpo"], {"ga": 0.1, "grad_diff": 0.1, "npo": 0.1, "simnpo": 0.1}),
        ([], {"ga": 0.0, "grad_diff": 0.0, "npo": 0.0, "simnpo": 0.0}),
    ],
)
def test_the_regulariser_applies_to_the_listed_objectives(reg_objectives, expected):
    section = UnlearnSection() if reg_objectives is None else UnlearnSection(reg_objectives=reg_objectives)
    assert {name: inner_reg_weight(section, name) for name in expected} == expected
    common = dict(
        anchor={}, retain=[{"index": 0}], pad_id=0, batch_size=1, grad_accum=1, seed=0, reference_state=None, label=""
    )
    for objective, weight in expected.items():
        anchors = [p for p in inner_plugins(section, objective, **common) if isinstance(p, AnchorPlugin)]
        assert [p.weight for p in anchors] == ([weight] if weight else [])


def test_reg_objectives_are_checked_when_the_config_is_bound():
    with pytest.raises(ConfigError, match=r"unlearn\.reg_objectives: unknown unlearning objective\(s\) \['gaa'\]"):
        bind_config(config_from_dict({"unlearn": {"reg_objectives": ["gaa"]}}))
    with pytest.raises(ValidationError, match="reg_objectives"):
        UnlearnSection(reg_objectives=["ga", "ga"])


def test_the_stop_rule_carries_the_configured_scope():
    assert UnlearnSection().stop_scope == "epoch"  # U2A's code
    for scope in ("epoch", "solve", "run"):
        section = UnlearnSection(max_forget_nll=2.0, stop_scope=scope)
        common = dict(anchor={}, retain=[], pad_id=0, batch_size=1, grad_accum=1, seed=0, reference_state=None)
        (guard,) = [p for p in inner_plugins(section, "npo", **common, label="x") if isinstance(p, ForgetNLLGuard)]
        assert guard.scope == scope
    with pytest.raises(ValidationError, match="stop_scope"):
        UnlearnSection(stop_scope="round")


def test_steps_per_solve():
    train = RunConfig().train.model_copy(update={"batch_size": 4, "grad_accum": 2})
    assert steps_per_solve(UnlearnSection(inner_epochs=1.0), train, 20) == 3  # ceil(20 / 8)
    assert steps_per_solve(UnlearnSection(inner_max_steps=7), train, 20) == 7


def test_steps_per_solve_counts_the_global_batch_of_every_process():
    """20 examples, batch 4 x accumulation 2 on 2 processes: a global batch of 16, ceil(20 / 16) = 2 steps per
    epoch (3 on one process); 2.5 epochs: ceil(50 / 16) = 4. ``inner_max_steps`` is a step count, not scaled."""
    train = RunConfig().train.model_copy(update={"batch_size": 4, "grad_accum": 2})
    assert steps_per_solve(UnlearnSection(inner_epochs=1.0), train, 20, world=2) == 2
    assert steps_per_solve(UnlearnSection(inner_epochs=2.5), train, 20, world=2) == 4
    assert steps_per_solve(UnlearnSection(inner_max_steps=7), train, 20, world=2) == 7
    with pytest.raises(ValueError, match="world"):
        steps_per_solve(UnlearnSection(), train, 20, world=0)


def test_the_objectives_and_full_set_baselines_come_from_the_one_loss_registry():
    assert list(unlearning_objectives()) == ["ga", "grad_diff", "npo", "simnpo"]
    assert baseline_names() == ["ga", "grad_diff", "npo", "simnpo", "random", "topk", "dpo"]
    assert [name for name in unlearning_objectives() if uses_retain(name)] == ["grad_diff"]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "u2a").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_u2a_config_loads_and_binds(path):
    cfg = load_run_config(path)  # binds every loss, plugin, objective, baseline and scorer
    assert len(cfg.tasks) == 1
    assert all(b in baseline_names() for b in cfg.unlearn.baselines)


def test_every_option_docs_methods_names_exists():
    """docs/METHODS.md's option column stays true to the code: each ``unlearn.<key>`` is a field of the section, each
    ``{name: <plugin>, <key>: …}`` a constructor argument of that plugin, each ``loss: {name: <loss>, <key>: …}`` a
    keyword of that loss, each ``eval.conventions.<metric>: <name>`` an allowed convention."""
    import re

    from lifealign.config.schema import ConventionsSection
    from lifealign.continual import METHODS
    from lifealign.losses import LOSSES
    from lifealign.utils.kwargs import parameters

    text = (REPO / "docs" / "METHODS.md").read_text()
    unlearn = set(re.findall(r"`unlearn\.([a-z_]+)", text))
    assert {"forget_reduction", "reg_objectives", "stop_scope", "weight_sign"} <= unlearn
    assert unlearn <= set(UnlearnSection.model_fields)
    plugin_keys = re.findall(r"(?<!loss: )\{name: ([a-z_]+), ([a-z_]+):", text)
    assert ("slmc", "stages") in plugin_keys and ("ewc", "consolidate_sft") in plugin_keys
    for plugin, key in plugin_keys:
        assert key in parameters(METHODS[plugin]), (plugin, key)
    for loss, keys in re.findall(r"loss: \{name: ([a-z_]+), ([^}]*)\}", text):
        for key in re.findall(r"([a-z_]+):", keys):
            assert key in parameters(LOSSES[loss].fn, keyword_only=True), (loss, key)
    for metric, name in re.findall(r"`eval\.conventions\.([a-z0-9_]+): ([a-z_]+)`", text):
        ConventionsSection(**{metric: name})
