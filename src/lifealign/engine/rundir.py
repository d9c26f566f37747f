"""A run folder is never overwritten silently and never shared by two runs.

``claim_run_dir(run_dir, resume=..., overwrite=...)`` is held for the whole run:

- a folder that already holds a run (its ``config.yaml``) is refused unless the run resumes it (``--resume``;
  ``resume="auto"`` resumes a run if there is one and starts one otherwise) or
  replaces it (``--overwrite``, which deletes the old run's files first); a non-empty folder that is not a run
  folder is refused either way (nothing of the user's is deleted); ``--resume`` on a folder with no run is refused
  before anything is written;
- a lock file (``.lifealign.lock``: pid, host, start time) keeps a second run out while the first runs; it is
  removed when the run ends, however it ends, and a lock left by a process that no longer exists on this host (a
  SIGKILL) is detected as stale and taken over with a warning. Only the main process (``RANK`` 0) locks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "RunDirError", "claim_run_dir", "is_run_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lifealign.lock"
RUN_MARKER = "config.yaml"


class RunDirError(RuntimeError):
    """The output folder holds another run, is in use, or cannot be written; raised before anything is written."""


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a lifealign run (its resolved ``config.yaml``)."""
    return (path / RUN_MARKER).is_file()


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_writable(run_dir: Path) -> None:
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"output directory {run_dir} is not writable: {parent} is a file")
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"output directory {run_dir} is not writable: {exc.strerror or exc}") from None


def _check_previous(run_dir: Path, resume: bool | str, overwrite: bool) -> None:
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []
    if resume == "auto":  # continue the run if there is one, else start one
        resume = is_run_dir(run_dir)
    if resume:
        if not is_run_dir(run_dir):
            raise RunDirError(f"--resume: {run_dir} holds no run to resume (no {RUN_MARKER}); run without --resume")
        return
    if not entries:
        return
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir} is not empty and holds no lifealign run: choose another output folder")
    if not overwrite:
        raise RunDirError(f"{run_dir} already holds a run: pass --resume to continue it or --overwrite to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(lock: Path) -> None:
    """Create the lock file exclusively; take over a stale one (its process is gone from this host)."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                logger.warning("%s: taking over a stale lock of process %s (no longer running)", lock, holder["pid"])
                lock.unlink(missing_ok=True)
                continue
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise RunDirError(
                f"{lock.parent} is in use by another run ({who}); wait for it or choose another folder"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return
    raise RunDirError(f"{lock}: could not take the lock")


def _clear(run_dir: Path) -> None:
    for entry in run_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, *, resume: bool | str, overwrite: bool = False) -> Iterator[None]:
    """Hold ``run_dir`` for one run (see the module docstring); the checks run before anything is written."""
    run_dir = Path(run_dir)
    if not _is_main():
        yield
        return
    _check_previous(run_dir, resume, overwrite)
    _check_writable(run_dir)
    lock = run_dir / LOCK_FILE
    _acquire(lock)
    try:
        if overwrite and not resume and is_run_dir(run_dir):
            logger.warning("--overwrite: deleting the previous run in %s", run_dir)
            _clear(run_dir)
        yield
    finally:
        lock.unlink(missing_ok=True)
