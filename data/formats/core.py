"""The common result of every reader and the one place it is assembled and checked.

`SignalDataset` (what every reader returns), `DataError` (what every reader raises),
`encode_labels` (raw labels -> class indices), `build_dataset` (checks and assembly) and the
small helpers the readers share. See data/formats/__init__.py for the formats and label modes.
"""

from __future__ import annotations

import decimal
import logging
import math
import re
from collections.abc import Sequence
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
    names:       (N,) str name of each signal as the file gives it, or None where the file
                 names none: an .npz's `ids` or `record_names`, the `id` column of a CSV/TSV
                 or of an .npy's labels sidecar, a WFDB/EDF window's record name and start
                 ('100@20s'). Prediction reports these instead of the index.
    """

    signals: list[np.ndarray] | np.ndarray
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray | None = None
    sample_rate: float | None = None
    source: str = ""
    names: np.ndarray | None = None

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
        names = None if self.names is None else self.names[indices]
        return SignalDataset(signals, self.labels[indices], list(self.class_names), groups,
                             self.sample_rate, self.source, names)


# ----------------------------------------------------------------------------------------------
# Labels: strings from files -> class indices, refusing unknown or inconsistent spellings.


# A number as files write one: ASCII digits, optional sign, point and exponent. float() also
# takes '1_000', 'infinity' and non-ASCII digits, which are text in a label column.
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_LEADING_ZERO = re.compile(r"[+-]?0[0-9]")  # '007', '-01': codes, not numbers
_NON_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


def _label_key(label: object) -> str:
    """Identity of a label: whole numbers by exact value ('1', '1.0', '1e0' and 1 are one
    label, shown as '1'; 10**17 and 10**17 + 1 stay two), anything else as text, exactly,
    after stripping whitespace. Leading zeros mark an identifier: '007' and '7' are two."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return str(int(label))
    text = str(label).strip()
    if not _NUMBER.fullmatch(text) or _LEADING_ZERO.match(text):
        return text
    # Decimal, not float: a float has 53 bits, so float keys merge integers above 2**53
    value = decimal.Decimal(text)
    # adjusted(): the decimal exponent; '1e999999999' would otherwise build a huge int
    if value.adjusted() < 64 and value == value.to_integral_value():
        return str(int(value))
    return text


def _is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text.strip()) or _NON_FINITE.fullmatch(text.strip()))


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
                                     "labels can be read with labels='none' to predict on "
                                     "(train.py predict --reader-option labels=none)")
    if class_names is None:
        numeric = all(_is_number(k) for k in distinct)
        class_names = sorted(distinct, key=int) if numeric else distinct
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


def _handle_nonfinite(signals, labels, groups, names, policy: str, path, field: str):
    """Refuse, drop or repair signals holding NaN/Inf, logging what was done."""
    if policy not in NAN_POLICIES:
        raise DataError(path, "nan_policy", f"is {policy!r}; expected one of {NAN_POLICIES}")
    ok = _finite_rows(signals)
    if ok.all():
        return signals, labels, groups, names
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
    return (signals, labels[keep], None if groups is None else groups[keep],
            None if names is None else names[keep])


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
                  labels_field: str = "labels", names=None,
                  names_field: str = "names") -> SignalDataset:
    """Check and assemble a dataset; every reader ends here.

    raw_labels: one label per signal, None in it for a signal without a label, or None for a
    file without labels (all UNLABELLED; class_names, if given, are kept).
    names: one name per signal (kept as str; `names_field` is the file's field for errors),
    or None.
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
    if names is not None:
        names = np.asarray(names).ravel().astype(str)
        if len(names) != n:
            raise DataError(path, names_field, f"has {len(names)} names for {n} signals; "
                                               "expected one per signal")
    known = np.array([r is not None for r in raw_labels], dtype=bool)
    labels = np.full(n, UNLABELLED, dtype=np.int64)
    class_list = list(class_names) if class_names is not None else []
    if known.any():
        labels[known], class_list = encode_labels(raw_labels[known], path, labels_field,
                                                  class_names)
    signals, labels, groups, names = _handle_nonfinite(signals, labels, groups, names,
                                                       nan_policy, path, signals_field)
    present = np.unique(labels)
    if class_names is None and known.all() and len(present) < 2:
        raise DataError(path, labels_field, f"holds a single class {class_list[present[0]]!r}; "
                                            "expected at least two classes to classify")
    return SignalDataset(signals, labels, class_list, groups, _check_rate(sample_rate, path),
                         str(path), names)


def _require_nonempty(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file", "does not exist; expected a readable file")
    if not (path.is_file() or path.is_dir()):  # reading a FIFO waits for a writer forever
        raise DataError(path, "file", "is not a regular file (a pipe, device or socket); "
                                      "expected a file of signals")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, "file", "is empty; expected signals")
