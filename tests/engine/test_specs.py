"""Binding at load time: every loss, plugin, objective, baseline and scorer of a config is checked before a model
loads, with the full dotted path of each problem; every shipped config binds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from lifealign.config import ConfigError, config_from_dict
from lifealign.engine.specs import bind_config, bind_method, load_run_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [
    p
    for p in sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "src/lifealign/configs").rglob("*.yaml"))
    if "accelerate" not in p.parts
]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_binds(path):
    cfg = load_run_config(path)
    specs = bind_config(cfg)
    assert [s.name for s in specs] == [m.name for m in cfg.all_methods()]
    for spec in specs:
        assert [p.name for p in spec.build_plugins()] == [p.name for p in spec.section.plugins]


def _comparison(tmp_path: Path, second_plugin: dict) -> Path:
    data = {
        "model": {"name_or_path": "tiny"},
        "tasks": [{"name": "a", "train": "synthetic:arithmetic", "max_train": 4}],
        "methods": [
            {"name": "seqft", "loss": {"name": "dpo"}},
            {"name": "lifealign", "loss": {"name": "fpo"}, "plugins": [second_plugin]},
        ],
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_typo_in_the_second_methods_plugin_fails_before_any_model_loads(tmp_path, monkeypatch):
    import lifealign.models.load as load

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(load, "load_model_and_tokenizer", no_model)
    path = _comparison(tmp_path, {"name": "slmc", "thetaa": 0.9})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"methods\.1\.plugins\.0\.thetaa: not a parameter of plugin 'slmc'"):
        load_run_config(path)
    assert time.monotonic() - started < 10


def test_the_cli_reports_the_dotted_path_and_exits_2(tmp_path, capsys):
    from lifealign.cli.main import main

    path = _comparison(tmp_path, {"name": "replay", "fraction": 1.5})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "methods.1.plugins.0.fraction: must be in (0, 1], got 1.5" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_every_problem_of_a_config_is_reported_at_once():
    cfg = config_from_dict(
        {
            "methods": [
                {"name": "a", "loss": [{"name": "dpo", "betta": 0.1}]},
                {"name": "b", "plugins": [{"name": "ewc", "lam": "1e-3"}, {"name": "nope"}]},
            ],
            "unlearn": {"objective": "npo", "loss_args": {"gamma": 1}},
            "eval": {"scorers": ["pref_acc", "bleu"]},
        }
    )
    with pytest.raises(ConfigError) as err:
        bind_config(cfg)
    message = str(err.value)
    for fragment in (
        "methods.0.loss.0.betta: not a parameter of loss 'dpo'",
        "methods.1.plugins.1.name: unknown plugin 'nope'",
        "unlearn.loss_args.gamma",
        "eval.scorers.1: unknown scorer 'bleu'",
    ):
        assert fragment in message
    assert "methods.1.plugins.0" not in message  # lam: "1e-3" (a YAML string) is a valid float, as for losses


def test_plugin_kwargs_are_coerced_like_loss_kwargs():
    """``1e-3`` arrives from YAML as a string: both a loss's beta and a plugin's lam accept it as the float 0.001;
    a boolean is not a number and a float is not an integer."""
    method = config_from_dict(
        {"method": {"loss": {"name": "dpo", "beta": "1e-3"}, "plugins": [{"name": "ewc", "lam": "1e-3"}]}}
    ).method
    spec = bind_method(method)
    assert spec.loss.terms[0].kwargs == {"beta": 0.001}
    assert spec.plugins[0].kwargs == {"lam": 0.001} and spec.build_plugins()[0].lam == 0.001
    bad = config_from_dict({"method": {"plugins": [{"name": "ewc", "lam": True, "n_samples": 2.5}]}}).method
    with pytest.raises(ValueError) as err:
        bind_method(bad)
    assert "method.plugins.0.lam: must be a finite number, got True" in str(err.value)
    assert "method.plugins.0.n_samples: must be an integer, got 2.5" in str(err.value)


def test_two_methods_with_one_name_are_refused():
    cfg = config_from_dict({"methods": [{"name": "x"}, {"name": "x"}]})
    with pytest.raises(ConfigError, match="names must be distinct"):
        bind_config(cfg)


def test_the_config_names_the_conventions_the_registries_implement():
    """config/ may not import evaluation/, so the names are repeated there as Literals; they must stay equal."""
    import typing

    from lifealign.config.schema import ConventionsSection
    from lifealign.evaluation import matrix, scorers

    fields = ConventionsSection.model_fields
    registry = {**matrix.CONVENTIONS, **scorers.CONVENTIONS}
    assert set(fields) == set(registry)
    for name, field in fields.items():
        assert typing.get_args(field.annotation) == tuple(registry[name]), name
        assert field.default == registry[name][0], name
