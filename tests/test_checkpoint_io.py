"""utils/checkpoint_io.py: checkpoints and result files are whole or absent, also when the disk
fills up mid-write (simulated: the write raises ENOSPC after part of the bytes)."""

from __future__ import annotations

import errno

import pytest
import torch

from utils import checkpoint_io
from utils.checkpoint_io import AtomicCheckpointIO, atomic_open
from utils.guards import TrainingFailed


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((256, 256), value)}, "epoch": 3}


def _fill_disk_after(nbytes: int):
    """A torch.save that writes `nbytes` bytes of the checkpoint, then fails as a full disk."""

    def save(obj, f) -> None:
        f.write(b"\x50\x4b\x03\x04" + b"\0" * (nbytes - 4))
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_checkpoint_is_written_whole(tmp_path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), path)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_a_full_disk_leaves_the_old_checkpoint_and_no_partial_file(tmp_path,
                                                                   monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    monkeypatch.setattr(checkpoint_io.torch, "save", _fill_disk_after(80_000))
    with pytest.raises(TrainingFailed) as failure:
        io.save_checkpoint(_checkpoint(2.0), path)
    message = str(failure.value)
    assert message.startswith(f"no space left in {tmp_path} to write last.ckpt (it needs "
                              "about 0.3 MiB, ")
    assert " free); free space there or pass --output-dir on a disk with room" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # nothing truncated left
    kept = torch.load(path, weights_only=True)  # the previous checkpoint, whole
    assert float(kept["state_dict"]["w"][0, 0]) == 1.0


def test_a_first_checkpoint_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint_io.torch, "save", _fill_disk_after(1000))
    with pytest.raises(TrainingFailed, match="no space left in"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), tmp_path / "best.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_name_the_file(tmp_path, monkeypatch) -> None:
    def refuse(obj, f) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint_io.torch, "save", refuse)
    with pytest.raises(TrainingFailed, match=r"cannot write .*best\.ckpt: Permission denied"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), tmp_path / "best.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_keeps_the_old_file_until_the_new_one_is_whole(tmp_path) -> None:
    path = tmp_path / "probs.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_open(path, "w") as f:
        f.write("new, part")
        raise RuntimeError("mid-write")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["probs.csv"]
    with atomic_open(path, "w") as f:
        f.write("new\n")
    assert path.read_text() == "new\n"
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # the umask's, not mkstemp's 0600
