"""NumPy readers: .npz archives and memory-mapped .npy arrays with a sidecar labels CSV."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.formats.core import (
    DataError,
    SignalDataset,
    _check_rate,
    _merge_rate,
    _require_nonempty,
    build_dataset,
    check_label_mode,
)
from data.formats.text import _read_table


def _numeric(array: np.ndarray, path, field: str) -> np.ndarray:
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise DataError(path, field, f"has dtype {array.dtype}; expected real numbers")
    return array


def _as_rows(X: np.ndarray, path, field: str) -> np.ndarray:
    """(N, T), or (N, 1, T) / (N, T, 1) with the channel axis dropped (a view, memmaps too)."""
    if X.ndim == 3 and 1 in X.shape[1:]:
        X = X.reshape(X.shape[0], -1)
    if X.ndim != 2:
        raise DataError(path, field, f"has shape {X.shape}; expected (N, T) or (N, 1, T), one "
                                     "1-channel signal per row")
    return X


_MAGIC = {"npz": b"PK\x03\x04", "npy": b"\x93NUMPY"}  # zip archive / NumPy array header
_EMPTY_ZIP = b"PK\x05\x06"  # np.savez() with no arrays


def _check_magic(path: Path, expected: str) -> None:
    """Refuse a file that is not what the reader reads, saying what it looks like: without
    this, np.load calls any file that is neither zip nor .npy 'pickled data'."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise DataError(path, "file", f"cannot be read ({e.strerror}); expected a readable "
                                      f".{expected} file") from e
    if head.startswith(_MAGIC[expected]) or (expected == "npz" and head.startswith(_EMPTY_ZIP)):
        return
    other = {"npz": "npy", "npy": "npz"}[expected]
    if head.startswith(_MAGIC[other]):
        looks = f"a NumPy .{other} file"
        fix = f"--format {other} (format='{other}' in a config)"
    else:
        try:
            head.decode("utf-8")
            text = True
        except UnicodeDecodeError as e:  # a character cut at the end of the 512 bytes is text
            text = e.start >= len(head) - 3
        looks = "text" if text else "neither a zip archive nor a NumPy array"
        fix = ("the reader for its format (--format csv, tsv or ts)" if text
               else f"a file written by {'np.savez' if expected == 'npz' else 'np.save'}")
    writer = "np.savez" if expected == "npz" else "np.save"
    raise DataError(path, "file", f"is not an .{expected} file ({writer} output): it is {looks}; "
                                  f"expected {fix}")


# ----------------------------------------------------------------------------------------------
# NumPy


def read_npz(path: str | Path, *, signals_key: str = "X", labels_key: str = "y",
             labels: str = "required", nan_policy: str = "raise",
             sample_rate: float | None = None,
             class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read an .npz archive: X (N, T) [or 1-D concatenation + lengths (N,)], y (N,), optional
    groups (N,), fs (scalar Hz), class_names (names for integer y) and ids or record_names
    (N,) (the signals' names, reported by prediction).

    Without y (labels='optional'), or with labels='none', every signal is UNLABELLED.
    """
    path = Path(path)
    check_label_mode(labels, path)
    _require_nonempty(path)
    _check_magic(path, "npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(path, "file", f"cannot be read ({e}); expected an archive written by "
                                      "np.savez with numeric arrays") from e
    for key in (signals_key, labels_key) if labels == "required" else (signals_key,):
        if key not in arrays:
            raise DataError(path, key, f"is missing (keys: {sorted(arrays)}); expected arrays "
                                       f"{signals_key!r} and {labels_key!r}")
    X = _numeric(arrays[signals_key], path, signals_key)
    if "lengths" in arrays:
        lengths = np.asarray(arrays["lengths"]).astype(np.int64).ravel()
        if X.ndim != 1 or (lengths < 0).any() or lengths.sum() != len(X):
            raise DataError(path, "lengths", f"sum to {lengths.sum()} for X of shape {X.shape}; "
                                             "expected a 1-D X of exactly sum(lengths) samples")
        signals = np.split(X.astype(np.float32), np.cumsum(lengths)[:-1])
    else:
        signals = _as_rows(X, path, signals_key).astype(np.float32)
    raw = None
    if labels != "none" and labels_key in arrays:
        raw = np.asarray(arrays[labels_key])
        raw = raw.reshape(-1) if raw.ndim == 2 and 1 in raw.shape else raw
        if raw.ndim != 1:
            raise DataError(path, labels_key, f"has shape {raw.shape}; expected (N,)")
        if "class_names" in arrays:
            raw = _index_names(raw, [str(c) for c in arrays["class_names"]], path, labels_key)
    rate = _merge_rate(_check_rate(arrays.get("fs"), path, "fs"), sample_rate, path)
    names_key = next((key for key in ("ids", "record_names") if key in arrays), None)
    return build_dataset(path, signals, raw, groups=arrays.get("groups"), sample_rate=rate,
                         nan_policy=nan_policy, class_names=class_names,
                         signals_field=signals_key, labels_field=labels_key,
                         names=None if names_key is None else arrays[names_key],
                         names_field=names_key or "ids")


def _index_names(y: np.ndarray, names: list[str], path, field: str) -> np.ndarray:
    """Integer labels -> their names from the file's class_names."""
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0
                                                             or y.max() >= len(names))):
        raise DataError(path, field, f"holds values {np.unique(y)[:10]} with {len(names)} "
                                     "class_names; expected integers in [0, len(class_names))")
    return np.asarray(names, dtype=object)[y]


def read_npy(path: str | Path, *, labels_path: str | Path | None = None,
             labels: str = "required", nan_policy: str = "raise",
             sample_rate: float | None = None,
             class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read X (N, T) from an .npy file as a read-only memmap, labels from a sidecar CSV.

    The sidecar is NAME.labels.csv next to NAME.npy (or labels_path): a header row with a
    `label` column and optionally `group` and `id` (the signal's name) columns, then one row
    per signal of X, in order.
    With labels='optional' the sidecar, or its `label` column, may be missing (UNLABELLED);
    labels='none' ignores the `label` column (a `group` column is still read).
    """
    path = Path(path)
    check_label_mode(labels, path)
    _require_nonempty(path)
    _check_magic(path, "npy")
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(path, "file", f"cannot be read ({e}); expected an array written by "
                                      "np.save") from e
    X = _as_rows(_numeric(X, path, "X"), path, "X")
    sidecar = Path(labels_path) if labels_path is not None else path.with_suffix(".labels.csv")
    if not sidecar.exists():
        if labels == "required" or labels_path is not None:
            raise DataError(path, "labels", f"no labels file {sidecar.name}; expected a sidecar "
                                            "CSV with a 'label' column (and optional 'group')")
        return build_dataset(path, X, None, sample_rate=sample_rate, nan_policy=nan_policy,
                             class_names=class_names, signals_field="X", labels_field="label")
    header, rows, _ = _read_table(sidecar, ",")
    columns = [c.strip().casefold() for c in header]
    if "label" not in columns and labels == "required":
        raise DataError(sidecar, "label", f"no 'label' column in header {header}; expected a "
                                          "header row naming 'label' (and optional 'group')")
    raw = groups = ids = None
    if "label" in columns and labels != "none":
        label_at = columns.index("label")
        raw = [row[label_at] if label_at < len(row) else "" for _, row in rows]
    if "group" in columns:
        group_at = columns.index("group")
        groups = np.array([row[group_at] if group_at < len(row) else "" for _, row in rows])
    if "id" in columns:
        id_at = columns.index("id")
        ids = [row[id_at].strip() if id_at < len(row) else "" for _, row in rows]
    return build_dataset(sidecar if len(rows) != len(X) else path, X, raw, groups=groups,
                         sample_rate=sample_rate, nan_policy=nan_policy,
                         class_names=class_names, signals_field="X", labels_field="label",
                         names=ids, names_field="id")
