"""Continual methods as plugins on the one loop: a stable lowercase name -> a ``Plugin`` class.

Named compositions are plain config: LifeAlign = ``loss: fpo`` + ``plugins: [replay, slmc]``; SeqFT = no plugin;
ER = ``plugins: [replay]``; MTL and STL are runners (``method.runner``), not plugins. A new method is one file with
a ``Plugin`` subclass (keyword-only, typed constructor arguments = its YAML keys) and one line in ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lifealign.continual.cppo import CPPOPlugin
from lifealign.continual.ema import EMAPlugin
from lifealign.continual.ewc import EWCPlugin
from lifealign.continual.gem import AGEMPlugin, GEMPlugin
from lifealign.continual.l2p import L2PPlugin
from lifealign.continual.lwf import LwFPlugin
from lifealign.continual.merge import MergePlugin
from lifealign.continual.olora import OLoRAPlugin
from lifealign.continual.replay import ReplayPlugin
from lifealign.continual.slmc import SLMCPlugin
from lifealign.training.plugin import Plugin
from lifealign.utils.kwargs import KwargsError, bind_kwargs

METHODS: dict[str, type[Plugin]] = {
    "replay": ReplayPlugin,
    "slmc": SLMCPlugin,
    "ewc": EWCPlugin,
    "gem": GEMPlugin,
    "agem": AGEMPlugin,
    "olora": OLoRAPlugin,
    "l2p": L2PPlugin,
    "cppo": CPPOPlugin,
    "lwf": LwFPlugin,
    "ema": EMAPlugin,
    "merge": MergePlugin,
}

__all__ = ["METHODS", "PluginFactory", "bind_plugin"]


@dataclass(frozen=True)
class PluginFactory:
    """A registry plugin with checked constructor arguments; ``build()`` makes a fresh instance per run."""

    name: str
    cls: type[Plugin]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Plugin:
        return self.cls(**self.kwargs)


def bind_plugin(spec: Mapping[str, Any], path: str = "plugin") -> PluginFactory:
    """Check ``{name: ..., **kwargs}`` against ``METHODS`` and the plugin's constructor; ``KwargsError`` listing every
    problem as ``<path>.<key>: ...``.

    Types are checked and converted by signature binding (``lifealign.utils.kwargs``: numeric strings for floats,
    no booleans for numbers, ``Literal`` choices); the constructor's own range checks (``ValueError`` whose message
    starts with the argument's name) run once, here, so a bad value fails when the config is bound.
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in METHODS:
        raise KwargsError(f"{path}.name: unknown plugin {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    kwargs, problems = bind_kwargs(cls, spec, path, f"plugin {name!r}")
    if not problems:
        try:
            cls(**kwargs)
        except ValueError as err:
            problems.append(f"{path}.{err}")
    if problems:
        raise KwargsError("\n".join(problems))
    return PluginFactory(name, cls, kwargs)
