"""Continual methods as plugins on the one loop: a stable lowercase name -> a ``Plugin`` class.

Named compositions are plain config: LifeAlign = ``loss: fpo`` + ``plugins: [replay, slmc]``; SeqFT = no plugin;
ER = ``plugins: [replay]``; MTL and STL are runners (``method.runner``), not plugins.
"""

from lifealign.continual.cppo import CPPOPlugin
from lifealign.continual.ewc import EWCPlugin
from lifealign.continual.gem import AGEMPlugin, GEMPlugin
from lifealign.continual.l2p import L2PPlugin
from lifealign.continual.olora import OLoRAPlugin
from lifealign.continual.replay import ReplayPlugin
from lifealign.continual.slmc import SLMCPlugin
from lifealign.training.plugin import Plugin

METHODS: dict[str, type[Plugin]] = {
    "replay": ReplayPlugin,
    "slmc": SLMCPlugin,
    "ewc": EWCPlugin,
    "gem": GEMPlugin,
    "agem": AGEMPlugin,
    "olora": OLoRAPlugin,
    "l2p": L2PPlugin,
    "cppo": CPPOPlugin,
}

__all__ = ["METHODS"]
