"""The checkpoint parts of a run that wrap live objects: the model's LoRA adapter and a method's plugins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lifealign.models.lora import load_lora_state, lora_state
from lifealign.training.plugin import Plugin

__all__ = ["AdapterPart", "PluginStates"]


class AdapterPart:
    """The trainable LoRA tensors of ``model`` (unwrapped; gathered by ``lora_state`` under sharded training)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": lora_state(self.model), "meta": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_lora_state(self.model, state["tensors"])


class PluginStates:
    """Every plugin's ``state_dict``, in config order: tensors prefixed ``<position>.``, metas as a list."""

    def __init__(self, plugins: Sequence[Plugin]):
        self.plugins = list(plugins)

    def state_dict(self) -> dict[str, Any]:
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for i, plugin in enumerate(self.plugins):
            state = plugin.state_dict()
            tensors.update({f"{i}.{k}": v for k, v in state.get("tensors", {}).items()})
            metas.append(state.get("meta", {}))
        return {"tensors": tensors, "meta": metas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, metas = state.get("tensors", {}), state.get("meta") or []
        for i, plugin in enumerate(self.plugins):
            prefix = f"{i}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            plugin.load_state_dict({"tensors": own, "meta": metas[i] if i < len(metas) else {}})
