"""Binding a config to the registries, at load time: every loss term, plugin, objective, baseline and scorer.

``load_config`` (``lifealign.config``) checks the schema only and imports nothing above ``config/``. The commands
load through :func:`load_run_config`, which also binds every method's loss terms and plugin specs and the unlearning
and evaluation names against their registries, reporting every problem at once with its full dotted path
(``methods.1.plugins.0.thetaa: not a parameter of plugin 'slmc'``) before a model is loaded. The runs bind again
from the same config (cheap), so a spec that passed here is the spec that trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lifealign.config.load import ConfigError, load_config
from lifealign.config.schema import LossTerm, MethodSection, RunConfig
from lifealign.continual import PluginFactory, bind_plugin
from lifealign.evaluation.scorers import SCORERS
from lifealign.losses import CombinedLoss, bind_losses
from lifealign.training.plugin import Plugin
from lifealign.unlearning.baselines import baseline_names
from lifealign.unlearning.objectives import forget_loss

__all__ = ["MethodSpec", "bind_config", "bind_method", "load_run_config", "method_path"]


@dataclass(frozen=True)
class MethodSpec:
    """A method bound to the registries: its section, its loss and the factories of its plugins."""

    section: MethodSection
    loss: CombinedLoss
    plugins: tuple[PluginFactory, ...]

    @property
    def name(self) -> str:
        return self.section.name

    def layout(self, requested: str) -> str:
        """The batch layout the method runs: ``requested`` (``train.pair_layout``) unless one of its plugins needs plain
        rows (``Plugin.plain_rows_only``), then ``concat``."""
        return "concat" if any(f.cls.plain_rows_only for f in self.plugins) else requested

    def build_plugins(self) -> list[Plugin]:
        """Fresh plugin instances, in config order (each run of the method gets its own)."""
        return [factory.build() for factory in self.plugins]


def method_path(cfg: RunConfig, index: int) -> str:
    """The dotted config path of ``cfg.all_methods()[index]``: ``methods.<i>`` or ``method``."""
    return f"methods.{index}" if cfg.methods else "method"


def bind_method(method: MethodSection, path: str = "method") -> MethodSpec:
    """Bind one method's loss terms and plugins; ``ValueError`` listing every problem under ``path``."""
    problems: list[str] = []
    loss = None
    try:
        loss = bind_losses(method.loss, f"{path}.loss")
    except ValueError as err:
        problems.append(str(err))
    factories: list[PluginFactory] = []
    for i, spec in enumerate(method.plugins):
        try:
            factories.append(bind_plugin({"name": spec.name, **spec.kwargs}, f"{path}.plugins.{i}"))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("\n".join(problems))
    assert loss is not None
    return MethodSpec(method, loss, tuple(factories))


def _unlearn_problems(cfg: RunConfig) -> list[str]:
    problems = []
    try:
        forget_loss(cfg.unlearn)
    except ValueError as err:
        problems.append(str(err))
    known = baseline_names()
    for i, name in enumerate(cfg.unlearn.baselines):
        if name not in known:
            problems.append(f"unlearn.baselines.{i}: unknown baseline {name!r}; available: {', '.join(known)}")
    return problems


def _eval_problems(cfg: RunConfig) -> list[str]:
    return [
        f"eval.scorers.{i}: unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}"
        for i, name in enumerate(cfg.eval.scorers)
        if name not in SCORERS
    ]


def bind_config(cfg: RunConfig, source: str = "<config>") -> list[MethodSpec]:
    """Every method of ``cfg`` bound (``MethodSpec`` per method, in order), after checking the unlearning and
    evaluation names; ``ConfigError`` listing every problem of the whole config."""
    problems: list[str] = []
    specs: list[MethodSpec] = []
    methods = cfg.all_methods()
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        problems.append(f"methods: names must be distinct, got {names}")
    for i, method in enumerate(methods):
        try:
            specs.append(bind_method(method, method_path(cfg, i)))
        except ValueError as err:
            problems.append(str(err))
    problems += _unlearn_problems(cfg) + _eval_problems(cfg)
    if problems:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(problems))
    return specs


def sft_loss() -> CombinedLoss:
    """The loss of the optional per-task SFT stage (token NLL on the chosen responses)."""
    return bind_losses([LossTerm(name="sft")], "sft")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """``load_config`` plus :func:`bind_config`: a config every command can run, or one ``ConfigError``."""
    cfg = load_config(path, overrides)
    bind_config(cfg, str(path))
    return cfg
