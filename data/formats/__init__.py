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

Modules: core (SignalDataset, DataError, labels, build_dataset), arrays (.npz, .npy),
text (.csv/.tsv, .ts), physio (WFDB, EDF/EDF+); this file picks the reader.
"""

from __future__ import annotations

import errno
import inspect
import numbers
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from data.formats.arrays import read_npy, read_npz
from data.formats.core import (
    LABEL_MODES,
    NAN_POLICIES,
    UNLABELLED,
    DataError,
    SignalDataset,
    build_dataset,
    check_label_mode,
    encode_labels,
)
from data.formats.physio import BEAT_SYMBOLS, SLEEP_STAGES, read_edf, read_wfdb
from data.formats.text import read_csv, read_ts

__all__ = [
    "BEAT_SYMBOLS", "LABEL_MODES", "NAN_POLICIES", "READERS", "SLEEP_STAGES", "UNLABELLED",
    "DataError", "SignalDataset", "build_dataset", "check_label_mode", "detect_format",
    "encode_labels", "find_test_file", "read_csv", "read_dataset", "read_edf", "read_npy",
    "read_npz", "read_train_test", "read_ts", "read_wfdb", "source_exists", "why_missing",
]

# ----------------------------------------------------------------------------------------------
# Dispatch and fixed train/test splits


READERS = {"npz": read_npz, "npy": read_npy, "csv": read_csv, "tsv": read_csv, "ts": read_ts,
           "wfdb": read_wfdb, "edf": read_edf}
_EXTENSIONS = {".npz": "npz", ".npy": "npy", ".csv": "csv", ".tsv": "tsv", ".ts": "ts",
               ".hea": "wfdb", ".dat": "wfdb", ".edf": "edf", ".bdf": "edf"}


def source_exists(path: str | Path) -> bool:
    """True for an existing file or folder, or a WFDB record named without its extension
    (`records/100` for records/100.hea)."""
    path = Path(path)
    return path.exists() or path.with_name(path.name + ".hea").exists()


def why_missing(path: str | Path) -> str:
    """What to say of a source that `source_exists` refused: a link that loops or points
    nowhere is named as one, not taken for a missing file."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 raises this for a loop
            return "is a symbolic link that loops; expected a link to the file"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "is a symbolic link that loops; expected a link to the file"
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    return "does not exist"


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
    if not path.exists():
        raise DataError(path, "file", "does not exist; expected a file, a folder or a WFDB "
                                      "record name")
    raise DataError(path, "format", f"unknown file type {path.suffix!r}; expected one of "
                                    f"{sorted(_EXTENSIONS)} or format= one of {sorted(READERS)}")


def _fits(value: object, hint: object) -> bool:
    """True when an option value has the type a reader's annotation names (the few kinds
    the readers use: str, int, float, bool, paths, Sequence[str], Mapping, unions of them)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # True is an int to Python, not a column index or a dimension
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, os.PathLike)
    origin = typing.get_origin(hint)
    if origin is Sequence:  # a str is a sequence of str, but not a list of class names
        return (isinstance(value, Sequence) and not isinstance(value, (str, bytes))
                and all(isinstance(v, str) for v in value))
    if origin is Mapping:
        key, item = typing.get_args(hint) or (object, object)
        return isinstance(value, Mapping) and all(_fits(k, key) and _fits(v, item)
                                                  for k, v in value.items())
    return True  # an annotation this check does not know: the reader checks it


def _type_name(hint: object) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
             Path: "a path"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # None: the default
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is Sequence:
        return "a list of names"
    if typing.get_origin(hint) is Mapping:
        return "a mapping of names to names"
    return names.get(hint, str(hint))


def _check_option_types(path: str | Path, fmt: str, reader, options: dict) -> None:
    """Refuse a reader option of the wrong type (e.g. `--reader-option label_column=1.5`) in
    one line, before the reader fails on it with a TypeError or silently misreads it."""
    hints = typing.get_type_hints(reader)
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            raise DataError(path, key, f"is {value!r} ({type(value).__name__}); expected "
                                       f"{_type_name(hints[key])} for the {fmt} reader's "
                                       f"{key} option")


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
    _check_option_types(path, fmt, reader, options)
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


def _resolved_source(path: Path) -> Path | None:
    """The file or folder a source is, resolved (a WFDB record by its .hea), or None where
    there is none (the reader then says so)."""
    if path.suffix.lower() == ".dat":
        path = path.with_suffix(".hea")
    elif not path.exists() and path.with_name(path.name + ".hea").exists():
        path = path.with_name(path.name + ".hea")  # records/100
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a link that loops
        return None


def _check_test_is_apart(train_path: Path, test_path: Path) -> None:
    """Refuse a test source that is the training source itself (the same file, record or
    folder, under any name): its scores would be on records the model trained on."""
    train, test = _resolved_source(train_path), _resolved_source(test_path)
    if train is not None and train == test:
        raise DataError(test_path, "file", f"is the training data ({train_path}), so the test "
                                           "would score records the model trained on; "
                                           "expected a test set of other records (or none: a "
                                           "share of the training data is then held out)")


def read_train_test(path: str | Path, test_path: str | Path | None = None,
                    format: str | None = None,
                    **options) -> tuple[SignalDataset, SignalDataset | None]:
    """(train, test) for datasets that come with their own test set, else (dataset, None).

    The test set is given by `test_path` or found by `find_test_file`; its labels are mapped
    onto the training classes (a label the training set lacks is an error).
    """
    train_path, found = find_test_file(path)
    if test_path is not None:
        _check_test_is_apart(train_path, Path(test_path))
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
