"""Atomic checkpoints: verification, corruption fallback, rotation, non-finite refusal (RELIABILITY R1, R2, F5, F20)."""

import json
import pickle

import pytest
import torch

from lifealign.training.checkpoint import Checkpointer, CheckpointError


def save_one(ck: Checkpointer, value: float, step: int):
    return ck.save(
        {"step": step},
        {"adapter": {"w": torch.full((4, 4), value)}},
        optimizer_state={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    )


def test_save_then_latest_round_trip(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=3)
    save_one(ck, 1.0, 1)
    path = save_one(ck, 2.0, 2)
    latest = ck.latest()
    assert latest.path == path and latest.state["step"] == 2
    assert torch.equal(latest.tensors("adapter")["w"], torch.full((4, 4), 2.0))
    assert latest.optimizer_state()["param_groups"][0]["lr"] == 0.1
    assert (tmp_path / "ck" / "LATEST").read_text() == path.name
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".tmp-")]


def test_rotation_keeps_newest(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep=2)
    for i in range(4):
        save_one(ck, float(i), i)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-000002", "ckpt-000003"]


@pytest.mark.parametrize("corruption", ["truncate", "flip_byte", "delete_state", "garbage_manifest"])
def test_corrupted_newest_falls_back_to_previous(tmp_path, corruption, caplog):
    ck = Checkpointer(tmp_path / "ck", keep=3)
    good = save_one(ck, 1.0, 1)
    bad = save_one(ck, 2.0, 2)
    adapter = bad / "adapter.safetensors"
    if corruption == "truncate":
        adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    elif corruption == "flip_byte":
        data = bytearray(adapter.read_bytes())
        data[-3] ^= 0xFF  # inside the tensor data: the safetensors header still parses
        adapter.write_bytes(bytes(data))
    elif corruption == "delete_state":
        (bad / "state.json").unlink()
    else:
        (bad / "manifest.json").write_text("{not json")
    latest = ck.latest()
    assert latest.path == good
    assert any(str(bad) in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match=str(bad.name)):
        ck.latest(strict=True)


def test_pickle_payload_in_optimizer_is_rejected(tmp_path):
    """A replaced optimizer file fails the sha256 check; and weights_only=True refuses it independently."""
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    ck = Checkpointer(tmp_path / "ck", keep=3)
    path = save_one(ck, 1.0, 1)
    (path / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
    assert "sha256" in Checkpointer.verify(path) or "size" in Checkpointer.verify(path)
    assert ck.latest() is None
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path / "optimizer.pt", weights_only=True)
    assert not sentinel.exists()


def test_non_finite_tensors_are_never_committed(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    save_one(ck, 1.0, 1)
    with pytest.raises(CheckpointError, match="non-finite"):
        ck.save({"step": 2}, {"adapter": {"w": torch.tensor([1.0, float("nan")])}})
    assert ck.latest().state["step"] == 1


def test_disk_error_keeps_previous_and_cleans_tmp(tmp_path, monkeypatch):
    import errno

    import lifealign.training.checkpoint as mod

    ck = Checkpointer(tmp_path / "ck")
    save_one(ck, 1.0, 1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "adapter.safetensors")

    monkeypatch.setattr(mod, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_one(ck, 2.0, 2)
    assert ck.latest().state["step"] == 1
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".tmp-")]


def test_stale_tmp_folders_are_removed(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    save_one(ck, 1.0, 1)
    stale = tmp_path / "ck" / ".tmp-ckpt-000001-999"
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"partial")
    assert ck.clean_stale_tmp() == 1
    assert not stale.exists()
    assert json.loads((ck.latest().path / "state.json").read_text())["step"] == 1
