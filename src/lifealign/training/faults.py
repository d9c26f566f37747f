"""Deterministic fault injection for the reliability tests (RELIABILITY.md §5).

``LIFEALIGN_FAULT`` holds one fault, ``<action>:<key>=<value>,...``; when a named point in the code is reached
with matching keys, the process kills itself with SIGKILL (no ``finally`` blocks run), e.g.::

    LIFEALIGN_FAULT=kill:point=step,task=1,stage=pref,step=3
    LIFEALIGN_FAULT=kill:point=step,seed=2,task=1,stage=pref,step=3   (only the run of train.seed 2)
    LIFEALIGN_FAULT=kill:point=save,after_file=adapter.safetensors
    LIFEALIGN_FAULT=term:point=step,task=0,stage=pref,step=2   (SIGTERM; ``int`` sends SIGINT)
    LIFEALIGN_FAULT=nan:point=loss,step=2        (returns True so the caller poisons the loss)
"""

from __future__ import annotations

import os
import signal

ENV = "LIFEALIGN_FAULT"
_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}


def _parse(spec: str) -> tuple[str, dict[str, str]]:
    action, _, rest = spec.partition(":")
    keys = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
    return action.strip(), keys


def fault_matches(point: str, **where: object) -> str | None:
    """The fault action configured for this point and context, or None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    action, keys = _parse(spec)
    if keys.get("point", point) != point:
        return None
    for key, value in keys.items():
        if key == "point":
            continue
        if key not in where or str(where[key]) != value:
            return None
    return action


def maybe_fault(point: str, **where: object) -> bool:
    """Kill the process at a matching ``kill`` fault; return True for a matching ``nan`` fault."""
    action = fault_matches(point, **where)
    if action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
    return action == "nan"
