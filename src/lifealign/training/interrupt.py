"""Graceful stop on SIGINT / SIGTERM: the loop finishes the current step, commits a checkpoint, then stops.

The first signal sets a flag that ``train_task`` checks after every optimizer step; outside a training stage (or on
a second signal) the default behaviour applies — the process stops at once and resumes from the last commit.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_requested: list[int] = []


class RunInterrupted(Exception):
    """Raised after the checkpoint of the step that was running when a stop signal arrived."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 1)
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; a checkpoint was committed")


def _handler(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
    if _requested:
        raise KeyboardInterrupt  # a second signal: stop now
    _requested.append(signum)


def install_stop_handlers() -> dict[int, Any]:
    """Route SIGINT and SIGTERM to the graceful-stop flag (main thread only); returns the previous handlers."""
    _requested.clear()
    return {sig: signal.signal(sig, _handler) for sig in EXIT_CODES}


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _requested.clear()


def stop_requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _requested[0] if _requested else None
