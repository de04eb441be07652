"""Files that are whole or absent: checkpoints and predictions are written to a temporary file
beside their target, fsynced, and renamed over it.

Lightning's TorchCheckpointIO writes through fsspec, which stages the file in /tmp and moves
it into place: across filesystems that move is a copy, and a full disk left a truncated
checkpoint under its final, valid-looking name. A temporary file in the destination folder
makes the final step a rename within one filesystem, which is atomic: a reader sees the old
file or the new one, never part of one. A failed write removes its temporary file and raises
`TrainingFailed` with one line naming the folder (and, for a full disk, the space needed).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from utils.guards import TrainingFailed

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform lets a folder be opened)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; on a clean exit it is flushed,
    fsynced and renamed to `path`; on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # O_EXCL: never write into another process's temporary file; 0o666 minus the umask,
    # the permissions a plain open() would give
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(path.parent)


def checkpoint_bytes(value: Any) -> int:
    """About how many bytes `torch.save(value)` writes: the tensors' storage, plus a little."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(checkpoint_bytes(v) for v in value.values()) + 64 * len(value)
    if isinstance(value, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in value) + 16 * len(value)
    return 64


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def write_failure(exc: BaseException, path: Path, needed: int | None = None,
                  atomic: bool = True) -> TrainingFailed:
    """One-line TrainingFailed for a failed write of `path`: for a full disk (ENOSPC, or a
    write error with less free space than the file needs), the folder, the space needed and
    the space free. atomic: the write went through `atomic_open`, so nothing partial is left
    (said in the message)."""
    left = " (nothing partial was left behind)" if atomic else ""
    folder = path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    full = getattr(exc, "errno", None) in _DISK_FULL or (
        needed is not None and free is not None and free < needed)
    if full:
        sizes = (f"it needs about {_mib(needed)}" if needed is not None else "")
        sizes += (f"{', ' if sizes else ''}{_mib(free)} free" if free is not None else "")
        sizes = f" ({sizes})" if sizes else ""
        return TrainingFailed(f"no space left in {folder} to write {path.name}{sizes}; free "
                              f"space there or pass --output-dir on a disk with room{left}")
    reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
    return TrainingFailed(f"cannot write {path}: {reason}{left}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are whole or absent (see the module docstring); remote
    (URL) paths keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_open(path, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as exc:  # torch reports some write errors as RuntimeError
            raise write_failure(exc, path, checkpoint_bytes(checkpoint)) from exc
        return None
