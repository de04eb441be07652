"""Run folders that cannot collide, and output paths checked before any work is done.

A run's folder DIR/NAME/version_N is claimed with an exclusive mkdir (`claim_run_folder`: the
first N no other process has created), so two runs started at the same moment get two
folders; the TensorBoard logger is then handed that version instead of picking one itself.
While a run lives it holds an advisory lock (flock) on its folder, also when it was resumed
(`lock_run_folder`), so a second process resuming the same run is refused instead of writing
into it too. The lock goes with the process (also on kill -9), and nothing is left on disk.
"""

from __future__ import annotations

import os
import re
from contextlib import suppress
from pathlib import Path

from utils.options import ConfigError

try:  # POSIX; elsewhere runs are not locked (claiming a folder still cannot collide)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_VERSION = re.compile(r"version_(\d+)")
_held: dict[Path, int] = {}  # locked run folder -> its open descriptor, for the process's life


def check_run_name(name: str) -> str:
    """The --name value if it names one folder inside --output-dir, else ValueError."""
    separators = {"/", os.sep, os.altsep or "/"}
    if (not name or name in (".", "..") or any(s in name for s in separators) or "\0" in name
            or Path(name).is_absolute() or Path(name).drive):
        raise ValueError(f"expected a plain folder name inside --output-dir (no '/', '..' or "
                         f"absolute path); got {name!r}")
    return name


def _check_folder_path(path: Path, option: str) -> None:
    """Refuse a folder path that crosses a file or whose nearest existing folder is not
    writable: the run would otherwise fail at its first write, after the work."""
    for candidate in (path, *path.parents):
        if not candidate.exists():
            continue
        if not candidate.is_dir():
            raise ConfigError(f"{option}: {candidate} is a file, not a folder; pass a folder")
        if not os.access(candidate, os.W_OK | os.X_OK):
            raise ConfigError(f"{option}: {candidate} is not writable; pass a folder you can "
                              "write to")
        return


def check_output_dir(output_dir: str | Path, name: str) -> None:
    """Refuse an --output-dir (or its NAME folder) that is a file or not writable."""
    _check_folder_path(Path(output_dir, name), "--output-dir")


def is_launching_process() -> bool:
    """True in the process that owns the run folder: global rank 0 (DDP processes that
    Lightning, torchrun or SLURM start carry their rank in the environment)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(key, "0") not in ("", "0"):
            return False
    return True


def lock_run_folder(folder: Path) -> None:
    """Hold an exclusive lock on `folder` for the life of this process; ConfigError when
    another process holds it (a run in progress there)."""
    folder = folder.resolve()
    if fcntl is None or folder in _held:
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"{folder} is in use by another train.py process that is still "
                          "running; wait for it to end, or start a new run") from None
    _held[folder] = fd


def release_run_folder(folder: Path, remove_if_empty: bool = False) -> None:
    """Drop this process's lock on `folder`; with remove_if_empty, also remove the folder if
    nothing was written into it (a run that failed its set-up leaves no trace)."""
    folder = folder.resolve()
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)
    if remove_if_empty:
        with suppress(OSError):
            folder.rmdir()  # only succeeds on an empty folder


def claim_run_folder(output_dir: str | Path, name: str) -> Path:
    """Create and lock the next free DIR/NAME/version_N; the exclusive mkdir is the claim, so
    concurrent runs never share a folder. Returns the folder."""
    root = Path(output_dir, name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name))]
    except OSError as exc:
        raise ConfigError(f"--output-dir: cannot create {root}: {exc.strerror}") from exc
    number = max(taken, default=-1) + 1
    while True:
        folder = root / f"version_{number}"
        try:
            folder.mkdir()
        except FileExistsError:  # another run took it between the listing and now
            number += 1
            continue
        except OSError as exc:
            raise ConfigError(f"--output-dir: cannot create {folder}: {exc.strerror}") from exc
        lock_run_folder(folder)
        return folder


def find_last_checkpoint(output_dir: str | Path, name: str) -> Path:
    """The newest DIR/NAME/version_*/checkpoints/last*.ckpt (by modification time, the
    higher version on a tie): what `--resume last` continues."""
    def key(path: Path) -> tuple[float, int]:
        match = _VERSION.fullmatch(path.parent.parent.name)
        return path.stat().st_mtime, int(match.group(1)) if match else -1

    found = sorted(Path(output_dir, name).glob("version_*/checkpoints/last*.ckpt"), key=key)
    if not found:
        raise ConfigError(f"--resume last: no last.ckpt under {Path(output_dir, name)}")
    return found[-1]


def version_of_checkpoint(checkpoint: str | Path, output_dir: str | Path,
                          name: str) -> str | None:
    """The run folder's version ('version_N') if `checkpoint` lies in
    DIR/NAME/version_N/checkpoints/, else None: a resumed run logs on into its own folder."""
    checkpoint = Path(checkpoint)
    run = checkpoint.resolve().parent.parent
    if checkpoint.parent.name == "checkpoints" and run.parent == Path(output_dir, name).resolve():
        return run.name
    return None


def check_prediction_output(output: str | Path, inputs: list[Path]) -> None:
    """Refuse an --output that is a folder, lies in no writable folder, or would overwrite a
    file that prediction reads (its --data file, a file of its --data folder or record, the
    .npy labels sidecar, the checkpoint): checked before any prediction is computed."""
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; pass a file name such as "
                          f"{output / 'predictions.csv'}")
    _check_folder_path(output.parent, f"--output {output}")
    if output.exists() and not os.access(output, os.W_OK):
        raise ConfigError(f"--output {output} exists and is not writable; pass another file")
    if not output.exists():
        return
    for source in inputs:
        read = [source]
        if source.suffix.lower() == ".npy":
            read.append(source.with_suffix(".labels.csv"))
        if source.is_dir():
            read += [p for p in source.iterdir() if p.is_file()]
        elif source.suffix.lower() in ("", ".hea", ".dat") or source.with_name(
                source.name + ".hea").exists():
            record = source.with_suffix("") if source.suffix.lower() in (".hea", ".dat") \
                else source
            read += list(record.parent.glob(f"{record.name}.*"))
        for path in read:
            if path.exists() and os.path.samefile(path, output):
                raise ConfigError(f"--output {output} is {path}, which prediction reads; pass "
                                  "another file name (the input is left as it is)")
