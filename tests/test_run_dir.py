"""utils/run_dir.py: run folders claimed without collisions, locked while in use, the run
`--resume last` continues, --name and --output-dir checks, and prediction outputs that never
replace an input, and the version folder a resumed checkpoint belongs to."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
from pathlib import Path

import pytest

from utils.cli import ConfigError
from utils.run_dir import (
    check_output_dir,
    check_prediction_output,
    check_run_name,
    claim_run_folder,
    find_last_checkpoint,
    lock_run_folder,
    release_run_folder,
    version_of_checkpoint,
)


def _claim_and_report(output_dir: str, start, queue) -> None:
    start.wait()  # every process claims at the same moment
    queue.put(claim_run_folder(output_dir, "exp").name)


def test_concurrent_claims_get_their_own_folders(tmp_path) -> None:
    # fork: the children need nothing re-imported (spawn would import torch four times)
    context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    start, queue = context.Event(), context.Queue()
    processes = [context.Process(target=_claim_and_report, args=(str(tmp_path), start, queue))
                 for _ in range(4)]
    for process in processes:
        process.start()
    start.set()
    names = sorted(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert names == ["version_0", "version_1", "version_2", "version_3"]


def test_a_claim_skips_taken_versions_and_locks_its_folder(tmp_path) -> None:
    (tmp_path / "exp" / "version_0").mkdir(parents=True)
    (tmp_path / "exp" / "version_7").mkdir()
    folder = claim_run_folder(tmp_path, "exp")
    assert folder.name == "version_8"
    # another process (here: another open file description) cannot take its lock
    fd = os.open(folder, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        release_run_folder(folder)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once released
    finally:
        os.close(fd)


def test_a_folder_in_use_is_refused(tmp_path) -> None:
    folder = tmp_path / "exp" / "version_0"
    folder.mkdir(parents=True)
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live run holds it
    try:
        with pytest.raises(ConfigError, match="is in use by another train.py process"):
            lock_run_folder(folder)
    finally:
        os.close(fd)
    lock_run_folder(folder)  # the other run ended
    release_run_folder(folder, remove_if_empty=True)
    assert not folder.exists()  # nothing written: nothing left


def _checkpoint(root: Path, version: int, mtime: float) -> Path:
    path = root / "exp" / f"version_{version}" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_a_checkpoint_in_a_version_folder_of_the_name_gives_its_version(tmp_path) -> None:
    inside = _checkpoint(tmp_path, 4, 1_000_000)  # tmp/exp/version_4/checkpoints/last.ckpt
    assert version_of_checkpoint(inside, tmp_path, "exp") == "version_4"
    assert version_of_checkpoint(str(inside), str(tmp_path), "exp") == "version_4"
    assert version_of_checkpoint(inside, tmp_path, "other") is None  # another --name
    loose = tmp_path / "exp" / "version_4" / "last.ckpt"  # not in checkpoints/
    assert version_of_checkpoint(loose, tmp_path, "exp") is None


def test_resume_last_finds_the_newest_run(tmp_path) -> None:
    _checkpoint(tmp_path, 0, 2_000_000)
    older = _checkpoint(tmp_path, 1, 1_000_000)
    assert find_last_checkpoint(tmp_path, "exp").parent.parent.name == "version_0"
    os.utime(older, (3_000_000, 3_000_000))
    assert find_last_checkpoint(tmp_path, "exp") == older
    _checkpoint(tmp_path, 2, 3_000_000)  # a tie: the later version
    assert find_last_checkpoint(tmp_path, "exp").parent.parent.name == "version_2"
    with pytest.raises(ConfigError, match="--resume last: no last.ckpt under"):
        find_last_checkpoint(tmp_path, "other")


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/b", "/abs", "x\0y"])
def test_names_that_leave_the_output_dir_are_refused(name) -> None:
    with pytest.raises(ValueError, match="expected a plain folder name inside --output-dir"):
        check_run_name(name)


def test_output_dir_that_is_a_file_is_refused(tmp_path) -> None:
    (tmp_path / "file").write_text("keep me")
    for output_dir, name in ((tmp_path / "file", "exp"), (tmp_path / "file" / "sub", "exp"),
                             (tmp_path, "file")):
        with pytest.raises(ConfigError, match="is a file, not a folder"):
            check_output_dir(output_dir, name)
    assert (tmp_path / "file").read_text() == "keep me"
    check_output_dir(tmp_path / "new" / "deeper", "exp")  # to be created: fine


def test_prediction_output_never_replaces_an_input(tmp_path) -> None:
    data = tmp_path / "in.csv"
    data.write_text("1,2,3\n")
    checkpoint = tmp_path / "m.ckpt"
    checkpoint.write_bytes(b"ckpt")
    for output in (data, checkpoint, tmp_path / "." / "in.csv"):
        with pytest.raises(ConfigError, match="which prediction reads"):
            check_prediction_output(output, [data, checkpoint])
    npy, sidecar = tmp_path / "x.npy", tmp_path / "x.labels.csv"
    npy.write_bytes(b"")
    sidecar.write_text("label\n")
    with pytest.raises(ConfigError, match="which prediction reads"):
        check_prediction_output(sidecar, [npy])
    records = tmp_path / "records"
    records.mkdir()
    (records / "100.hea").write_text("100 1 360 10\n")
    (records / "100.atr").write_bytes(b"")
    for source in (records, records / "100"):
        with pytest.raises(ConfigError, match="which prediction reads"):
            check_prediction_output(records / "100.atr", [source])
    check_prediction_output(records / "probs.csv", [records])  # a new file beside: fine
    with pytest.raises(ConfigError, match="is a folder; pass a file name"):
        check_prediction_output(records, [data])
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_prediction_output(data / "probs.csv", [checkpoint])
    assert data.read_text() == "1,2,3\n" and checkpoint.read_bytes() == b"ckpt"
