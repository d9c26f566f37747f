"""Atomic, verifiable checkpoints (RELIABILITY.md R1, R2, R7).

A checkpoint is a folder ``checkpoints/ckpt-<seq:06d>/`` holding safetensors (tensors), ``optimizer.pt`` (loaded
only with ``weights_only=True``) and ``state.json``, plus ``manifest.json`` written last with the sha256 and size
of every file. It is written into ``checkpoints/.tmp-ckpt-<seq>-<pid>/``, every file fsynced, then renamed into
place (same filesystem), and ``LATEST`` is replaced atomically. Rotation runs after the commit and never deletes
the newest valid checkpoint. On load, a checkpoint whose manifest does not verify is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lifealign.training.faults import maybe_fault

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message names the path and the reason."""


@dataclass
class Checkpoint:
    """A verified checkpoint on disk."""

    path: Path
    seq: int
    state: dict[str, Any]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        file = self.path / f"{name}.safetensors"
        return load_file(str(file)) if file.exists() else {}

    def optimizer_state(self) -> dict[str, Any] | None:
        file = self.path / "optimizer.pt"
        if not file.exists():
            return None
        return torch.load(file, map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temp file and ``os.replace`` (strict: NaN is an error)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and finds checkpoints under ``root`` (only the main process should call ``save``)."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def clean_stale_tmp(self) -> int:
        """Remove ``.tmp-*`` leftovers of interrupted saves; returns how many were removed (logged)."""
        if not self.root.exists():
            return 0
        stale = [p for p in self.root.iterdir() if p.name.startswith(".tmp-")]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            logger.warning("removed %d incomplete checkpoint folder(s) left by an interrupted save", len(stale))
        return len(stale)

    def _dirs(self) -> list[tuple[int, Path]]:
        if not self.root.exists():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("ckpt-") and p.name[5:].isdigit():
                out.append((int(p.name[5:]), p))
        return sorted(out)

    def save(
        self,
        state: dict[str, Any],
        tensors: dict[str, dict[str, torch.Tensor]],
        optimizer_state: dict[str, Any] | None = None,
    ) -> Path:
        """Commit one checkpoint atomically; ``tensors`` maps a file stem to its tensors (e.g. ``adapter``).

        Refuses to commit non-finite floating-point tensors (R5). On an OSError (disk full, unwritable) the temp
        folder is removed, the previous checkpoints stay intact and ``CheckpointError`` names the path and errno.
        """
        for stem, group in tensors.items():
            bad = _all_finite(group)
            if bad:
                raise CheckpointError(f"refusing to save non-finite tensors in {stem}: {bad[:5]}")
        self.root.mkdir(parents=True, exist_ok=True)
        seq = (self._dirs()[-1][0] + 1) if self._dirs() else 0
        final = self.root / f"ckpt-{seq:06d}"
        tmp = self.root / f".tmp-ckpt-{seq:06d}-{os.getpid()}"
        try:
            tmp.mkdir()
            files: list[Path] = []
            for stem, group in tensors.items():
                path = tmp / f"{stem}.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(path))
                files.append(path)
                maybe_fault("save", after_file=path.name)
            if optimizer_state is not None:
                path = tmp / "optimizer.pt"
                torch.save(optimizer_state, path)
                files.append(path)
                maybe_fault("save", after_file=path.name)
            state_path = tmp / "state.json"
            state_path.write_text(json.dumps({"schema": SCHEMA_VERSION, **state}, indent=2, allow_nan=False))
            files.append(state_path)
            maybe_fault("save", after_file=state_path.name)
            for path in files:
                _fsync_file(path)
            manifest = {
                "schema": SCHEMA_VERSION,
                "files": {p.name: {"sha256": _sha256(p), "size": p.stat().st_size} for p in files},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_file(tmp / MANIFEST)
            _fsync_dir(tmp)
            maybe_fault("save", after_file=MANIFEST)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            maybe_fault("save", after_file="rename")
            (self.root / ".LATEST.tmp").write_text(final.name)
            os.replace(self.root / ".LATEST.tmp", self.root / "LATEST")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint save failed: {exc.filename or tmp}: {exc.strerror or exc}") from exc
        self._rotate()
        return final

    def _rotate(self) -> None:
        dirs = self._dirs()
        for _, path in dirs[: max(0, len(dirs) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def verify(path: Path) -> str | None:
        """Return None when ``path`` is a complete, untampered checkpoint, else the reason it is not."""
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            return f"{manifest_path}: missing"
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as exc:
            return f"{manifest_path}: unreadable manifest ({exc})"
        if manifest.get("schema") != SCHEMA_VERSION:
            return f"{manifest_path}: unsupported schema {manifest.get('schema')!r}"
        if "state.json" not in files:
            return f"{path / 'state.json'}: not listed in the manifest"
        for name, meta in files.items():
            file = path / name
            if not file.exists():
                return f"{file}: missing"
            if file.stat().st_size != meta["size"]:
                return f"{file}: size {file.stat().st_size} != {meta['size']}"
            if _sha256(file) != meta["sha256"]:
                return f"{file}: sha256 mismatch"
        return None

    def latest(self, strict: bool = False) -> Checkpoint | None:
        """The newest checkpoint that verifies; invalid newer ones are reported (or an error when ``strict``)."""
        for seq, path in reversed(self._dirs()):
            reason = self.verify(path)
            if reason is None:
                state = json.loads((path / "state.json").read_text())
                return Checkpoint(path=path, seq=seq, state=state)
            if strict:
                raise CheckpointError(f"invalid checkpoint {path}: {reason}")
            logger.warning("skipping invalid checkpoint %s: %s", path, reason)
        return None
