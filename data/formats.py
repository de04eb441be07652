"""Readers for 1-channel signal files, labelled or not, all returning one `SignalDataset`.

Formats (see docs/data.md for the exact conventions; [...] is what an unlabelled file lacks):
  .npz        keys X (N, T) and [y (N,)]; optional groups (N,), fs (scalar), class_names,
              lengths (N,) when X is the 1-D concatenation of unequal-length signals
  .npy        X (N, T), memory-mapped (mmap_mode='r') so it may be larger than RAM, with [a
              sidecar NAME.labels.csv holding a `label` column] (and optionally `group`)
  .csv/.tsv   one signal per row plus [a label column] (UCR .tsv: label in the first column)
  .ts         UCR/UEA sktime text format, univariate (or one dimension picked), any lengths
              [@classLabel true and a label after the values]
  WFDB        record (.hea/.dat) + [annotation file], cut into windows labelled from rhythm
              annotations ('(N', '(AFIB') or by the majority beat symbol
  EDF/EDF+    one channel cut into 30 s epochs labelled from [sleep-stage annotations] in the
              file itself or in a separate hypnogram EDF+

Labels: every reader takes `labels=` (LABEL_MODES). 'required' (the default, and what training
uses) refuses a file without labels; 'optional' reads the labels a file has and marks the rest
UNLABELLED (-1), e.g. new recordings to predict on; 'none' ignores any labels in the file.

Every reader checks its input once, here, and raises `DataError` naming the file, the field and
what was expected, so nothing downstream sees NaN, a label count that does not match, or a
traceback from inside numpy/wfdb/pyedflib.
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NAN_POLICIES = ("raise", "drop", "interpolate")
LABEL_MODES = ("required", "optional", "none")
UNLABELLED = -1  # the label index of a signal whose class is not known
# Blocks of about this many samples when scanning a memory-mapped array, so RAM stays bounded.
_BLOCK_SAMPLES = 1 << 24


class DataError(ValueError):
    """Bad input data. The message reads `<file> [<field>]: <what is wrong>; expected <what>`."""

    def __init__(self, path: str | Path, field: str, message: str):
        self.path, self.field, self.message = str(path), field, message
        super().__init__(f"{path} [{field}]: {message}")

    def __reduce__(self):  # DataLoader workers pickle exceptions back to the main process
        return (DataError, (self.path, self.field, self.message))


@dataclass
class SignalDataset:
    """1-channel signals and their labels, the common result of every reader.

    signals:     N 1-D arrays (any lengths) or a 2-D (N, T) array, possibly a read-only memmap
                 in the file's own real dtype; consumers cast windows to float32.
    labels:      (N,) int64 class indices into class_names; UNLABELLED (-1) where the class is
                 not known (only when read with labels='optional' or 'none').
    class_names: the class list; index i is the name of class i (for a file read without
                 labels: the given class_names, else the classes a .ts header declares, else
                 empty).
    groups:      (N,) record/subject ids or None; items of one group must share a split.
    sample_rate: Hz, or None when the file does not say.
    source:      where the data came from (a path, or 'synthetic(...)').
    """

    signals: list[np.ndarray] | np.ndarray
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray | None = None
    sample_rate: float | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 number of samples of each signal."""
        if isinstance(self.signals, np.ndarray):
            return np.full(len(self), self.signals.shape[1], dtype=np.int64)
        return np.array([len(s) for s in self.signals], dtype=np.int64)

    @property
    def has_labels(self) -> bool:
        """True when every signal has a class (none is UNLABELLED)."""
        return bool((self.labels != UNLABELLED).all())

    def class_counts(self) -> np.ndarray:
        """(num_classes,) int64 number of labelled signals per class."""
        return np.bincount(self.labels[self.labels != UNLABELLED], minlength=self.num_classes)

    def subset(self, indices: np.ndarray) -> SignalDataset:
        """The signals at `indices`; a memmap stays on disk (a list of row views)."""
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(self.signals, np.memmap) or not isinstance(self.signals, np.ndarray):
            signals = [self.signals[i] for i in indices]
        else:
            signals = self.signals[indices]
        groups = None if self.groups is None else self.groups[indices]
        return SignalDataset(signals, self.labels[indices], list(self.class_names), groups,
                             self.sample_rate, self.source)


# ----------------------------------------------------------------------------------------------
# Labels: strings from files -> class indices, refusing unknown or inconsistent spellings.


def _label_key(label: object) -> str:
    """Identity of a label: numbers by value ('1', '1.0' and 1 are one label, shown as '1'),
    text exactly after stripping whitespace."""
    text = str(label).strip()
    try:
        value = float(text)
    except ValueError:
        return text
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value) if math.isfinite(value) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def encode_labels(raw: Sequence[object] | np.ndarray, path: str | Path, field: str,
                  class_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to class indices.

    Numbers match by value; text matches exactly, and two spellings that differ only in case
    ('AFIB', 'afib') are refused as inconsistent. With class_names (e.g. those of the training
    file) every label must be one of them; otherwise the classes are the distinct labels,
    sorted numerically when all are numbers. Returns (labels (N,) int64, class_names).
    """
    keys = [_label_key(r) for r in np.asarray(raw, dtype=object).ravel()]
    if "" in keys:
        raise DataError(path, field, f"label {keys.index('')} is empty; expected a class label "
                                     "for every signal")
    distinct = sorted(set(keys))
    fractional = [k for k in distinct if _is_number(k) and not re.fullmatch(r"-?\d+", k)]
    if fractional:  # what a sample column read as labels looks like
        raise DataError(path, field, f"holds non-integer numbers like {fractional[0]}; expected "
                                     "class labels (names or whole numbers); a file without "
                                     "labels can be read with labels='none' to predict on")
    if class_names is None:
        numeric = all(_is_number(k) for k in distinct)
        class_names = sorted(distinct, key=float) if numeric else distinct
    known = {_label_key(name): i for i, name in enumerate(class_names)}
    by_case: dict[str, set[str]] = {}
    for key in [*distinct, *known]:
        by_case.setdefault(key.casefold(), set()).add(key)
    clashes = sorted(sorted(s) for s in by_case.values() if len(s) > 1)
    if clashes:
        raise DataError(path, field, f"inconsistent label spellings {clashes}; expected one "
                                     "spelling per class")
    unknown = [k for k in distinct if k not in known]
    if unknown:
        raise DataError(path, field, f"unknown labels {unknown[:10]}; expected one of "
                                     f"{list(class_names)}")
    return np.array([known[k] for k in keys], dtype=np.int64), list(class_names)


# ----------------------------------------------------------------------------------------------
# The one place a dataset is assembled and checked.


def _finite_rows(signals: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N,) bool, True where a signal has only finite samples (memmaps scanned in blocks)."""
    if isinstance(signals, np.ndarray):
        rows = max(1, _BLOCK_SAMPLES // max(1, signals.shape[1]))
        ok = np.empty(len(signals), dtype=bool)
        for i in range(0, len(signals), rows):
            ok[i:i + rows] = np.isfinite(signals[i:i + rows]).all(axis=1)
        return ok
    return np.array([bool(np.isfinite(s).all()) for s in signals], dtype=bool)


def _interpolate(signal: np.ndarray) -> np.ndarray | None:
    """Linear interpolation over non-finite samples; edges take the nearest finite value."""
    good = np.isfinite(signal)
    if not good.any():
        return None
    out = np.array(signal, dtype=np.float32)
    positions = np.arange(len(out))
    out[~good] = np.interp(positions[~good], positions[good], out[good])
    return out


def _handle_nonfinite(signals, labels, groups, policy: str, path, field: str):
    """Refuse, drop or repair signals holding NaN/Inf, logging what was done."""
    if policy not in NAN_POLICIES:
        raise DataError(path, "nan_policy", f"is {policy!r}; expected one of {NAN_POLICIES}")
    ok = _finite_rows(signals)
    if ok.all():
        return signals, labels, groups
    bad = np.flatnonzero(~ok)
    if policy == "raise":
        raise DataError(path, field, f"{len(bad)} of {len(ok)} signals contain NaN/Inf samples "
                                     f"(first: signal {bad[0]}); expected finite values, or "
                                     "nan_policy='drop' or 'interpolate'")
    rows = list(signals)  # row views: a memmap stays on disk
    if policy == "interpolate":
        for i in bad:
            fixed = _interpolate(np.asarray(rows[i]))
            if fixed is not None:
                rows[i], ok[i] = fixed, True
        log.warning("%s: interpolated NaN/Inf samples in %d of %d signals, dropped %d with no "
                    "finite sample", path, int(ok[bad].sum()), len(ok), int((~ok).sum()))
    else:
        log.warning("%s: dropped %d of %d signals with NaN/Inf samples", path, len(bad), len(ok))
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        raise DataError(path, field, "every signal contains NaN/Inf samples; expected at least "
                                     "one finite signal")
    on_disk = isinstance(signals, np.memmap)
    signals = [rows[i] for i in keep]
    if len({len(s) for s in signals}) == 1 and not on_disk:
        signals = np.stack(signals)
    return signals, labels[keep], None if groups is None else groups[keep]


def _check_rate(rate: object, path, field: str = "sample_rate") -> float | None:
    if rate is None:
        return None
    try:
        value = float(np.asarray(rate).item())
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise DataError(path, field, f"is {rate!r}; expected a positive number of Hz")
    return value


def _merge_rate(file_rate: float | None, option_rate: float | None, path) -> float | None:
    if file_rate is not None and option_rate is not None and file_rate != option_rate:
        raise DataError(path, "sample_rate", f"the file says {file_rate} Hz but sample_rate="
                                             f"{option_rate} was given; expected them to agree")
    return file_rate if file_rate is not None else option_rate


def check_label_mode(labels: str, path: str | Path) -> None:
    """Refuse a `labels=` value that is not one of LABEL_MODES."""
    if labels not in LABEL_MODES:
        raise DataError(path, "labels", f"is {labels!r}; expected one of {LABEL_MODES}")


def build_dataset(path: str | Path, signals: list[np.ndarray] | np.ndarray,
                  raw_labels: Sequence[object] | np.ndarray | None, *, groups=None,
                  sample_rate: float | None = None, nan_policy: str = "raise",
                  class_names: Sequence[str] | None = None, signals_field: str = "signals",
                  labels_field: str = "labels") -> SignalDataset:
    """Check and assemble a dataset; every reader ends here.

    raw_labels: one label per signal, None in it for a signal without a label, or None for a
    file without labels (all UNLABELLED; class_names, if given, are kept).
    Refuses: no signals, empty or non-1-D signals, a label count that differs from the signal
    count, bad labels (see `encode_labels`), NaN/Inf (per nan_policy), and a single class when
    class_names is not given (a test file mapped onto training classes may hold one class).
    """
    n = len(signals)
    if n == 0:
        raise DataError(path, signals_field, "holds no signals; expected at least one")
    if isinstance(signals, np.ndarray):
        if signals.ndim != 2 or signals.shape[1] == 0:
            raise DataError(path, signals_field, f"has shape {signals.shape}; expected (N, T) "
                                                 "with T > 0")
    else:
        for i, s in enumerate(signals):
            if s.ndim != 1 or len(s) == 0:
                raise DataError(path, signals_field, f"signal {i} has shape {s.shape}; expected "
                                                     "a non-empty 1-D signal")
    raw_labels = np.full(n, None, dtype=object) if raw_labels is None \
        else np.asarray(raw_labels, dtype=object).ravel()
    if len(raw_labels) != n:
        raise DataError(path, labels_field, f"has {len(raw_labels)} labels for {n} signals; "
                                            "expected one label per signal")
    if groups is not None:
        groups = np.asarray(groups).ravel()
        if len(groups) != n:
            raise DataError(path, "groups", f"has {len(groups)} ids for {n} signals; expected "
                                            "one per signal")
    known = np.array([r is not None for r in raw_labels], dtype=bool)
    labels = np.full(n, UNLABELLED, dtype=np.int64)
    names = list(class_names) if class_names is not None else []
    if known.any():
        labels[known], names = encode_labels(raw_labels[known], path, labels_field, class_names)
    signals, labels, groups = _handle_nonfinite(signals, labels, groups, nan_policy, path,
                                                signals_field)
    present = np.unique(labels)
    if class_names is None and known.all() and len(present) < 2:
        raise DataError(path, labels_field, f"holds a single class {names[present[0]]!r}; "
                                            "expected at least two classes to classify")
    return SignalDataset(signals, labels, names, groups, _check_rate(sample_rate, path),
                         str(path))


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


# ----------------------------------------------------------------------------------------------
# NumPy


def read_npz(path: str | Path, *, signals_key: str = "X", labels_key: str = "y",
             labels: str = "required", nan_policy: str = "raise",
             sample_rate: float | None = None,
             class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read an .npz archive: X (N, T) [or 1-D concatenation + lengths (N,)], y (N,), optional
    groups (N,), fs (scalar Hz) and class_names (names for integer y).

    Without y (labels='optional'), or with labels='none', every signal is UNLABELLED.
    """
    path = Path(path)
    check_label_mode(labels, path)
    _require_nonempty(path)
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
    return build_dataset(path, signals, raw, groups=arrays.get("groups"), sample_rate=rate,
                         nan_policy=nan_policy, class_names=class_names,
                         signals_field=signals_key, labels_field=labels_key)


def _index_names(y: np.ndarray, names: list[str], path, field: str) -> np.ndarray:
    """Integer labels -> their names from the file's class_names."""
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(names):
        raise DataError(path, field, f"holds values {np.unique(y)[:10]} with {len(names)} "
                                     "class_names; expected integers in [0, len(class_names))")
    return np.asarray(names, dtype=object)[y]


def read_npy(path: str | Path, *, labels_path: str | Path | None = None,
             labels: str = "required", nan_policy: str = "raise",
             sample_rate: float | None = None,
             class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read X (N, T) from an .npy file as a read-only memmap, labels from a sidecar CSV.

    The sidecar is NAME.labels.csv next to NAME.npy (or labels_path): a header row with a
    `label` column and optionally a `group` column, then one row per signal of X, in order.
    With labels='optional' the sidecar, or its `label` column, may be missing (UNLABELLED);
    labels='none' ignores the `label` column (a `group` column is still read).
    """
    path = Path(path)
    check_label_mode(labels, path)
    _require_nonempty(path)
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
    header, rows = _read_table(sidecar, ",")
    columns = [c.strip().casefold() for c in header]
    if "label" not in columns and labels == "required":
        raise DataError(sidecar, "label", f"no 'label' column in header {header}; expected a "
                                          "header row naming 'label' (and optional 'group')")
    raw = groups = None
    if "label" in columns and labels != "none":
        label_at = columns.index("label")
        raw = [row[label_at] if label_at < len(row) else "" for _, row in rows]
    if "group" in columns:
        group_at = columns.index("group")
        groups = np.array([row[group_at] if group_at < len(row) else "" for _, row in rows])
    return build_dataset(sidecar if len(rows) != len(X) else path, X, raw, groups=groups,
                         sample_rate=sample_rate, nan_policy=nan_policy,
                         class_names=class_names, signals_field="X", labels_field="label")


def _require_nonempty(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file", "does not exist; expected a readable file")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, "file", "is empty; expected signals")


# ----------------------------------------------------------------------------------------------
# Delimited text: CSV, TSV, UCR .tsv


def _read_table(path: Path, delimiter: str, header: bool | None = True, label_hint: str = ""):
    """(header cells or None, [(line number, cells)]) with blank lines skipped."""
    _require_nonempty(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(i + 1, row) for i, row in enumerate(csv.reader(f, delimiter=delimiter))
                    if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, "file", f"cannot be read as delimited text ({e}); expected UTF-8 "
                                      "text, one signal per row") from e
    if not rows:
        raise DataError(path, "file", "has no rows; expected one signal per row")
    if header is None:  # a header has several non-numeric cells, or names the label column
        first = [c.strip() for c in rows[0][1]]
        words = [c for c in first if c and not _is_number(c)]
        header = len(words) > 1 or any(c.casefold() in ("label", label_hint) for c in words)
    if not header:
        return None, rows
    if len(rows) == 1:
        raise DataError(path, "file", "has a header but no data rows; expected one signal per "
                                      "row")
    return rows[0][1], rows[1:]


def _parse_samples(cells: list[str], path, line: int) -> np.ndarray:
    """Sample cells -> float32; trailing empty/NaN cells are padding (unequal lengths)."""
    end = len(cells)
    while end and cells[end - 1].strip().casefold() in ("", "nan"):
        end -= 1
    cells = [c.strip() for c in cells[:end]]
    if not cells:
        raise DataError(path, f"line {line}", "has no samples; expected a label and samples")
    try:
        return np.array(cells, dtype=np.float32)
    except ValueError:
        pass
    values = np.empty(len(cells), dtype=np.float32)
    for j, cell in enumerate(cells):  # empty inner cells are missing samples (nan_policy)
        if cell == "":
            values[j] = np.nan
        elif _is_number(cell):
            values[j] = float(cell)
        else:
            raise DataError(path, f"line {line}", f"sample {j} is {cell!r}; expected a number")
    return values


def _column(spec: str | int | None, names: list[str] | None, default: str | None, path,
            field: str) -> int | None:
    """Index of a column given by name (needs a header) or position."""
    if isinstance(spec, int):
        return spec
    if names is None:
        if spec is not None:
            raise DataError(path, field, f"column {spec!r} requested but the file has no header "
                                         "row; expected a column index")
        return 0 if default == "label" else None
    folded = [n.strip().casefold() for n in names]
    if spec is None:
        if default in folded:
            return folded.index(default)
        return 0 if default == "label" else None
    if spec.casefold() not in folded:
        raise DataError(path, field, f"column {spec!r} not in header {names}; expected one of "
                                     "those names")
    return folded.index(spec.casefold())


def _label_column(spec: str | int | None, names: list[str] | None, labels: str,
                  path) -> int | None:
    """Index of the label column, or None when the file is read without labels: always for
    labels='none'; for 'optional', a header row that names no label column (a header says
    what its columns are; a file without one keeps the UCR rule, label first)."""
    if labels == "none":
        if spec is not None:
            raise DataError(path, "label_column", f"is {spec!r} but labels='none'; expected "
                                                  "one or the other")
        return None
    folded = [n.strip().casefold() for n in names or []]
    if labels == "optional" and names is not None and spec is None and "label" not in folded:
        return None
    return _column(spec, names, "label", path, "label_column")


def read_csv(path: str | Path, *, label_column: str | int | None = None,
             group_column: str | int | None = None, delimiter: str | None = None,
             header: bool | None = None, labels: str = "required", nan_policy: str = "raise",
             sample_rate: float | None = None,
             class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read one signal per row with a label column (UCR .tsv is this with the label first).

    delimiter: default tab for .tsv, comma otherwise. header: None detects a header row.
    label_column: name or index; default a column named 'label', else the first column.
    group_column: name or index; default a column named 'group' when there is one.
    labels='optional': a header row without a 'label' column (and no label_column) means no
    labels; labels='none': no label column, every cell but the group is a sample.
    Rows may differ in length: trailing empty or NaN cells are padding; an empty cell inside
    a row is a missing sample (see nan_policy).
    """
    path = Path(path)
    check_label_mode(labels, path)
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    hint = label_column.casefold() if isinstance(label_column, str) else ""
    names, rows = _read_table(path, delimiter, header, hint)
    label_at = _label_column(label_column, names, labels, path)
    group_at = _column(group_column, names, "group", path, "group_column")
    raw, groups, signals = [], [], []
    for line, row in rows:
        if label_at is not None and label_at >= len(row):
            raise DataError(path, f"line {line}", f"has {len(row)} cells; expected a label in "
                                                  f"column {label_at}")
        if group_at is not None and group_at >= len(row):
            raise DataError(path, f"line {line}", f"has {len(row)} cells; expected a group in "
                                                  f"column {group_at}")
        if label_at is not None:
            raw.append(row[label_at])
        if group_at is not None:
            groups.append(row[group_at].strip())
        samples = [c for j, c in enumerate(row) if j != label_at and j != group_at]
        signals.append(_parse_samples(samples, path, line))
    if len({len(s) for s in signals}) == 1:
        signals = np.stack(signals)
    return build_dataset(path, signals, raw if label_at is not None else None,
                         groups=np.array(groups) if groups else None, sample_rate=sample_rate,
                         nan_policy=nan_policy, class_names=class_names,
                         signals_field="samples", labels_field="label")


# ----------------------------------------------------------------------------------------------
# UCR/UEA .ts


def read_ts(path: str | Path, *, dimension: int | None = None, labels: str = "required",
            nan_policy: str = "raise", sample_rate: float | None = None,
            class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read a UCR/UEA .ts file: '@' header lines, then '@data' and one case per line,
    `v1,v2,...:label` ('?' = missing). Multivariate files need `dimension` (0-based).

    A file with `@classLabel false` (or none) has lines without a label, `v1,v2,...`: it is
    read with labels='optional' or 'none' (UNLABELLED); 'none' also ignores declared labels.
    """
    path = Path(path)
    check_label_mode(labels, path)
    _require_nonempty(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, "file", f"cannot be read ({e}); expected UTF-8 text") from e
    meta: dict[str, list[str]] = {}
    start = None
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not text.startswith("@"):
            raise DataError(path, f"line {i + 1}", f"{text[:40]!r} before @data; expected "
                                                   "@-header lines first")
        key, *values = text.split()
        if key.casefold() == "@data":
            start = i + 1
            break
        meta[key[1:].casefold()] = values
    if start is None:
        raise DataError(path, "@data", "is missing (truncated file?); expected a header ending "
                                       "in @data")

    def flag(key: str) -> bool:
        return (meta.get(key) or ["false"])[0].casefold() == "true"

    if flag("timestamps"):
        raise DataError(path, "@timeStamps", "is true; expected false (timestamped series are "
                                             "not supported)")
    labelled = flag("classlabel")
    if not labelled and labels == "required":
        raise DataError(path, "@classLabel", "is missing or false; expected class labels")
    declared = meta["classlabel"][1:] if labelled else []
    raw, signals = [], []
    for i in range(start, len(lines)):
        text = lines[i].strip()
        if not text or text.startswith("#"):
            continue
        dims = text.split(":")
        if labelled:
            *dims, label = dims
            raw.append(label)
        if not dims:
            raise DataError(path, f"line {i + 1}", "has no ':'; expected values:label")
        if dimension is None and len(dims) > 1:
            raise DataError(path, f"line {i + 1}", f"has {len(dims)} dimensions; expected a "
                                                   "univariate series, or pass dimension=")
        d = dimension or 0
        if d >= len(dims):
            raise DataError(path, f"line {i + 1}", f"has {len(dims)} dimensions; expected more "
                                                   f"than dimension={d}")
        cells = dims[d].replace("?", "nan").split(",")
        signals.append(_parse_samples(cells, path, i + 1))
    if not signals:
        raise DataError(path, "@data", "has no cases; expected one series per line")
    if labelled and labels != "none":
        encode_labels(raw, path, "class label", declared)  # every label must be declared
    lengths = {len(s) for s in signals}
    if flag("equallength") and len(lengths) > 1:
        raise DataError(path, "@equalLength", f"is true but lengths range {min(lengths)}.."
                                              f"{max(lengths)}; expected equal lengths")
    if "serieslength" in meta and len(lengths) == 1 and lengths != {int(meta["serieslength"][0])}:
        raise DataError(path, "@seriesLength", f"is {meta['serieslength'][0]} but the series "
                                               f"have {lengths.pop()} samples; expected equal")
    if len(lengths) == 1:
        signals = np.stack(signals)
    # Class order: as declared in the header, unless mapped onto another file's classes.
    names = class_names if class_names is not None else [_label_key(d) for d in declared]
    raw = raw if labelled and labels != "none" else None
    dataset = build_dataset(path, signals, raw, sample_rate=sample_rate, nan_policy=nan_policy,
                            class_names=names, signals_field="series",
                            labels_field="class label")
    if class_names is None and raw is not None and len(np.unique(dataset.labels)) < 2:
        raise DataError(path, "class label", "holds a single class; expected at least two")
    return dataset


# ----------------------------------------------------------------------------------------------
# Annotated long recordings: WFDB and EDF


def _group_id(name: str, pattern: str | None) -> str:
    """Record name -> group id; pattern's first capture group, e.g. r'SC4(\\d\\d)' = subject."""
    if pattern is None:
        return name
    match = re.search(pattern, name)
    return match.group(1) if match and match.groups() else name


def _labelled_windows(signal: np.ndarray, window: int, stride: int, spans=None, events=None,
                      label_map: Mapping[str, str | None] | None = None, path="",
                      field: str = "annotation", keep_unlabelled: bool = False):
    """Cut a record into windows; label each from spans (start, end, label) by coverage or
    from events (sample, label) by majority; with neither, no window has a label.

    Returns (windows (n, window) or None, labels: a name per window, None where it has none).
    Windows without a label are dropped unless keep_unlabelled.
    """
    # Local import: transforms imports DataError from this module.
    from data.transforms import label_windows_by_events, label_windows_by_spans, window_starts

    if window > len(signal):
        raise DataError(path, "window", f"window of {window} samples is longer than the record "
                                        f"({len(signal)} samples); expected a shorter window")
    starts = window_starts(len(signal), window, stride)
    names: list[str] = []
    index = np.full(len(starts), -1, dtype=np.int64)
    if spans is not None or events is not None:
        source = spans if spans is not None else events
        raw = [str(x) for x in source[-1]]
        if label_map is not None:
            unknown = sorted(set(raw) - set(label_map))
            if unknown:
                raise DataError(path, field, f"labels {unknown[:10]} are not in label_map; "
                                             f"expected one of {sorted(label_map)}")
            raw = [label_map[r] or "" for r in raw]  # None in the map: ignore that label
        names = sorted({r for r in raw if r})
        codes = np.array([names.index(r) if r else -1 for r in raw], dtype=np.int64)
        if spans is not None:
            index = label_windows_by_spans(starts, window, spans[0], spans[1], codes)
        else:
            index = label_windows_by_events(starts, window, events[0], codes)
        unlabelled = int((index < 0).sum())
        if unlabelled:
            log.info("%s: %d of %d windows have no label%s", path, unlabelled, len(index),
                     "" if keep_unlabelled else " and were skipped")
    if not keep_unlabelled:
        starts, index = starts[index >= 0], index[index >= 0]
    windows = np.stack([signal[s:s + window] for s in starts]) if len(starts) else None
    return windows, [names[i] if i >= 0 else None for i in index]


# MIT-BIH beat annotation codes (the others are rhythm, noise and comment markers).
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")


def _wfdb_records(path: Path, annotation: str, labels: str) -> list[Path]:
    """The records at path (a record or a folder); with labels='required' only, and all,
    with an annotation file."""
    need = labels == "required"
    if path.is_dir():
        listing = path / "RECORDS"
        names = (listing.read_text().split() if listing.exists()
                 else sorted(p.stem for p in path.glob("*.hea")))
        records = [path / n for n in names if not need or (path / f"{n}.{annotation}").exists()]
        if not records:
            raise DataError(path, annotation, f"no record with a .{annotation} annotation file; "
                                              "expected .hea/.dat records with annotations")
        return records
    record = path.with_suffix("") if path.suffix.lower() in (".hea", ".dat", f".{annotation}") \
        else path
    for ext in ("hea", annotation) if need else ("hea",):
        if not record.with_name(f"{record.name}.{ext}").exists():
            raise DataError(record.with_name(f"{record.name}.{ext}"), "file",
                            "does not exist; expected a WFDB record with its annotation file")
    return [record]


def _resolve_channel(names: list[str], channel: str | int | None, path) -> int:
    if channel is None:
        return 0
    if isinstance(channel, int):
        if not 0 <= channel < len(names):
            raise DataError(path, "channel", f"index {channel} out of range for channels "
                                             f"{names}; expected 0..{len(names) - 1}")
        return channel
    if channel not in names:
        raise DataError(path, "channel", f"{channel!r} not found; expected one of {names}")
    return names.index(channel)


def _wfdb_labels(ann, label_source: str, length: int, ann_path: Path, required: bool):
    """(spans, events) for `_labelled_windows` from a WFDB annotation; (None, None) when it
    holds none of label_source's kind and labels are not required."""
    samples = np.asarray(ann.sample, dtype=np.int64)
    if label_source == "rhythm":
        notes = [str(a or "").strip("\x00 ") for a in (ann.aux_note or [])]
        at = [i for i, a in enumerate(notes) if a.startswith("(")]
        if not at and required:
            raise DataError(ann_path, "aux_note", "has no rhythm annotations like '(N'; "
                                                  "expected some, or label_source='beat'")
        starts = samples[at]
        ends = np.append(starts[1:], length)
        return ((starts, ends, [notes[i][1:] for i in at]), None) if at else (None, None)
    at = [i for i, s in enumerate(ann.symbol) if s in BEAT_SYMBOLS]
    if not at and required:
        raise DataError(ann_path, "symbol", "has no beat annotations; expected beat symbols "
                                            "like N, V, A")
    return (None, (samples[at], [ann.symbol[i] for i in at])) if at else (None, None)


def read_wfdb(path: str | Path, *, window_seconds: float = 10.0,
              stride_seconds: float | None = None, annotation: str = "atr",
              label_source: str = "rhythm", channel: str | int | None = None,
              label_map: Mapping[str, str | None] | None = None,
              group_pattern: str | None = None, labels: str = "required",
              nan_policy: str = "raise",
              class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read a WFDB record (or a folder of records) as labelled windows; groups = record.

    label_source 'rhythm': a window takes the rhythm (aux_note '(N', '(AFIB', ... -> 'N',
    'AFIB') covering most of it, and is skipped if none covers half. 'beat': the most frequent
    beat symbol in the window (ties: first in sorted order); windows without beats are skipped.
    label_map renames raw labels (None drops them); a raw label missing from it is an error.
    labels='optional': records without an annotation file are read too, and no window is
    skipped: those without a label are UNLABELLED. labels='none': no annotation is read.
    """
    import wfdb

    path = Path(path)
    check_label_mode(labels, path)
    if label_source not in ("rhythm", "beat"):
        raise DataError(path, "label_source", f"is {label_source!r}; expected 'rhythm'/'beat'")
    windows, raw, groups, rates = [], [], [], set()
    for record in _wfdb_records(path, annotation, labels):
        header = record.with_name(record.name + ".hea")
        ann_path = record.with_name(f"{record.name}.{annotation}")
        annotated = labels != "none" and ann_path.exists()
        try:
            meta = wfdb.rdheader(str(record))
            index = _resolve_channel(list(meta.sig_name or []), channel, header)
            rec = wfdb.rdrecord(str(record), channels=[index])
            ann = wfdb.rdann(str(record), annotation) if annotated else None
        except DataError:
            raise
        except Exception as e:  # wfdb raises bare ValueError/OSError/IndexError on bad files
            raise DataError(header, "file", f"cannot be read as a WFDB record ({e}); expected "
                                            f"a valid .hea/.dat and .{annotation} file") from e
        fs = float(rec.fs)
        rates.add(fs)
        signal = rec.p_signal[:, 0].astype(np.float32)
        spans = events = None
        if ann is not None:
            spans, events = _wfdb_labels(ann, label_source, len(signal), ann_path,
                                         labels == "required")
        window = round(window_seconds * fs)
        stride = round((stride_seconds or window_seconds) * fs)
        w, names = _labelled_windows(signal, window, stride, spans, events, label_map,
                                     ann_path if annotated else header,
                                     "aux_note" if label_source == "rhythm" else "symbol",
                                     keep_unlabelled=labels != "required")
        if w is not None:
            windows.append(w)
            raw += names
            groups += [_group_id(record.name, group_pattern)] * len(names)
    return _annotated_dataset(path, windows, raw, groups, rates, nan_policy, class_names)


def _annotated_dataset(path, windows, raw, groups, rates, nan_policy, class_names):
    if len(rates) > 1:
        raise DataError(path, "sample_rate", f"records have different rates {sorted(rates)}; "
                                             "expected one rate (resample them first)")
    if not windows:  # only with labels='required': the other modes keep every window
        raise DataError(path, "labels", "no window got a label; expected annotations "
                                        "covering the recording")
    return build_dataset(path, np.concatenate(windows), raw, groups=np.array(groups),
                         sample_rate=rates.pop(), nan_policy=nan_policy,
                         class_names=class_names, signals_field="signal",
                         labels_field="annotation")


# Sleep-EDF / AASM stage annotations -> classes (R&K stages 3 and 4 merge into N3).
SLEEP_STAGES: dict[str, str | None] = {
    "Sleep stage W": "W", "Sleep stage 1": "N1", "Sleep stage 2": "N2", "Sleep stage 3": "N3",
    "Sleep stage 4": "N3", "Sleep stage R": "REM", "Sleep stage N1": "N1",
    "Sleep stage N2": "N2", "Sleep stage N3": "N3", "Sleep stage ?": None, "Movement time": None,
}


def _find_hypnogram(psg: Path) -> Path | None:
    """Sleep-EDF pairing: SC4001E0-PSG.edf <-> SC4001EC-Hypnogram.edf (same stem but the last
    character before '-')."""
    stem = psg.stem.split("-")[0]
    found = [p for p in psg.parent.glob("*.edf") if "hypnogram" in p.name.casefold()
             and p.stem.split("-")[0][:-1] == stem[:-1]]
    return found[0] if len(found) == 1 else None


def _edf_open(path: Path):
    import pyedflib

    _require_nonempty(path)
    try:
        return pyedflib.EdfReader(str(path))
    except Exception as e:  # pyedflib raises a bare OSError for any header problem
        raise DataError(path, "file", f"cannot be read as EDF/EDF+ ({e}); expected a valid "
                                      "EDF file") from e


def _stage_spans(notes, label_map: Mapping[str, str | None], fs: float, length: int,
                 source: Path, required: bool):
    """(starts, ends, texts) in samples of the stage annotations (onsets, durations, texts);
    None when there are none and labels are not required."""
    onsets, durations, texts = (np.asarray(a) for a in notes)
    staged = [i for i, t in enumerate(texts) if _is_staged([t], label_map)]
    if not staged:
        if required:
            raise DataError(source, "annotations", "hold no sleep-stage annotations; expected "
                                                   "texts like 'Sleep stage W' or a hypnogram")
        return None
    starts = np.round(onsets[staged] * fs).astype(np.int64)
    # EDF+ duration -1 / 0 means 'unknown': the stage lasts until the next one.
    ends = np.append(starts[1:], length)
    given = durations[staged] > 0
    ends[given] = starts[given] + np.round(durations[staged][given] * fs).astype(np.int64)
    return starts, np.minimum(ends, length), [str(texts[i]) for i in staged]


def read_edf(path: str | Path, *, channel: str | int | None = None,
             epoch_seconds: float = 30.0, hypnogram: str | Path | None = None,
             label_map: Mapping[str, str | None] | None = None,
             group_pattern: str | None = None, labels: str = "required",
             nan_policy: str = "raise",
             class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read an EDF/EDF+ recording (or a folder of them) as labelled epochs; groups = record.

    Stage annotations (onset, duration, text) come from the file, from `hypnogram`, or from a
    Sleep-EDF style sibling '*Hypnogram.edf'. Each epoch takes the stage covering most of it
    (at least half). label_map defaults to SLEEP_STAGES; any 'Sleep stage ...' text missing
    from it is an error, other annotations (e.g. 'Lights off') are ignored.
    labels='optional': a recording without stage annotations is cut into fixed epochs, and no
    epoch is skipped: those without a stage are UNLABELLED. labels='none': no annotation is read.
    """
    path = Path(path)
    check_label_mode(labels, path)
    label_map = SLEEP_STAGES if label_map is None else label_map
    if path.is_dir():
        files = sorted(p for p in path.glob("*.edf") if "hypnogram" not in p.name.casefold())
        if not files:
            raise DataError(path, "file", "holds no .edf recordings; expected EDF files")
        pairs = [(f, None) for f in files]
    else:
        pairs = [(path, Path(hypnogram) if hypnogram is not None else None)]
    windows, raw, groups, rates = [], [], [], set()
    for psg, hyp in pairs:
        f = _edf_open(psg)
        try:
            index = _resolve_channel(list(f.getSignalLabels()), channel, psg)
            fs = float(f.getSampleFrequency(index))
            signal = f.readSignal(index).astype(np.float32)
            notes = f.readAnnotations()
        except DataError:
            raise
        except Exception as e:
            raise DataError(psg, "file", f"cannot be read ({e}); expected a valid EDF") from e
        finally:
            f.close()
        spans = None
        if labels != "none":
            hyp = hyp or (None if _is_staged(notes[2], label_map) else _find_hypnogram(psg))
            if hyp is not None:
                h = _edf_open(hyp)
                try:
                    notes = h.readAnnotations()
                finally:
                    h.close()
            spans = _stage_spans(notes, label_map, fs, len(signal), hyp or psg,
                                 required=labels == "required")
        epoch = round(epoch_seconds * fs)
        w, names = _labelled_windows(signal, epoch, epoch, spans, None, label_map, hyp or psg,
                                     "annotations", keep_unlabelled=labels != "required")
        rates.add(fs)
        if w is not None:
            windows.append(w)
            raw += names
            groups += [_group_id(psg.stem, group_pattern)] * len(names)
    return _annotated_dataset(path, windows, raw, groups, rates, nan_policy, class_names)


def _is_staged(texts, label_map: Mapping[str, str | None]) -> bool:
    """True if any text is a stage annotation (in label_map, or 'Sleep stage ...')."""
    return any(str(t) in label_map or str(t).startswith("Sleep stage") for t in texts)


# ----------------------------------------------------------------------------------------------
# Dispatch and fixed train/test splits


READERS = {"npz": read_npz, "npy": read_npy, "csv": read_csv, "tsv": read_csv, "ts": read_ts,
           "wfdb": read_wfdb, "edf": read_edf}
_EXTENSIONS = {".npz": "npz", ".npy": "npy", ".csv": "csv", ".tsv": "tsv", ".ts": "ts",
               ".hea": "wfdb", ".dat": "wfdb", ".edf": "edf", ".bdf": "edf"}


def detect_format(path: str | Path) -> str:
    """The reader name for a path: by extension; a folder of .hea -> wfdb, of .edf -> edf."""
    path = Path(path)
    if path.is_dir():
        for pattern, name in (("*.hea", "wfdb"), ("*.edf", "edf")):
            if any(path.glob(pattern)):
                return name
        raise DataError(path, "format", "folder holds no .hea or .edf files; expected a WFDB or "
                                        "EDF folder, a file, or a UCR/UEA folder of "
                                        "NAME_TRAIN/NAME_TEST files (read_train_test)")
    if path.suffix.lower() in _EXTENSIONS:
        return _EXTENSIONS[path.suffix.lower()]
    if path.with_name(path.name + ".hea").exists():  # WFDB record named without extension
        return "wfdb"
    raise DataError(path, "format", f"unknown file type {path.suffix!r}; expected one of "
                                    f"{sorted(_EXTENSIONS)} or format= one of {sorted(READERS)}")


def read_dataset(path: str | Path, format: str | None = None, **options) -> SignalDataset:
    """Read any supported file or folder; the reader is picked by extension or `format`.

    options go to the reader (e.g. labels=, label_column=, channel=, nan_policy=,
    sample_rate=); every reader takes labels= (LABEL_MODES, default 'required').
    """
    fmt = format or detect_format(path)
    if fmt not in READERS:
        raise DataError(path, "format", f"is {fmt!r}; expected one of {sorted(READERS)}")
    reader = READERS[fmt]
    accepted = set(inspect.signature(reader).parameters) - {"path"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(path, "options", f"{unknown} are not options of the {fmt} reader; "
                                         f"expected some of {sorted(accepted)}")
    if fmt == "tsv":
        options.setdefault("delimiter", "\t")
    return reader(path, **options)


def find_test_file(path: str | Path) -> tuple[Path, Path | None]:
    """(train, test) paths of a UCR/UEA pair: NAME_TRAIN.ext beside NAME_TEST.ext, or a folder
    holding both (.ts preferred over .tsv). Anything else: (path, None)."""
    path = Path(path)
    if path.is_dir():
        for ext in (".ts", ".tsv"):
            train = sorted(path.glob(f"*_TRAIN{ext}"))
            if len(train) == 1:
                test = train[0].with_name(train[0].name.replace("_TRAIN", "_TEST"))
                if test.exists():
                    return train[0], test
        return path, None
    if "_TRAIN" in path.stem:
        test = path.with_name(path.name.replace("_TRAIN", "_TEST"))
        if test.exists():
            return path, test
    return path, None


def read_train_test(path: str | Path, test_path: str | Path | None = None,
                    format: str | None = None,
                    **options) -> tuple[SignalDataset, SignalDataset | None]:
    """(train, test) for datasets that come with their own test set, else (dataset, None).

    The test set is given by `test_path` or found by `find_test_file`; its labels are mapped
    onto the training classes (a label the training set lacks is an error).
    """
    train_path, found = find_test_file(path)
    test_path = test_path if test_path is not None else found
    train = read_dataset(train_path, format, **options)
    if test_path is None:
        return train, None
    test = read_dataset(test_path, format, **{**options, "class_names": train.class_names})
    if None not in (train.sample_rate, test.sample_rate) and train.sample_rate != test.sample_rate:
        raise DataError(test_path, "sample_rate", f"is {test.sample_rate} Hz but the training "
                                                  f"set has {train.sample_rate} Hz; expected "
                                                  "the same rate")
    return train, test
