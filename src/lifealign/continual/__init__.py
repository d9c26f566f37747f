"""Continual methods as plugins on the one loop: a stable lowercase name -> a ``Plugin`` class.

Named compositions are plain config: LifeAlign = ``loss: fpo`` + ``plugins: [replay, slmc]``; SeqFT = no plugin;
ER = ``plugins: [replay]``; MTL and STL are runners (``method.runner``), not plugins.
"""

from lifealign.continual.replay import ReplayPlugin
from lifealign.continual.slmc import SLMCPlugin
from lifealign.training.plugin import Plugin

METHODS: dict[str, type[Plugin]] = {
    "replay": ReplayPlugin,
    "slmc": SLMCPlugin,
}

__all__ = ["METHODS"]
