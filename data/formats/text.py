"""Text readers: delimited one-signal-per-row files (CSV, TSV, UCR .tsv) and UCR/UEA .ts."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.formats.core import (
    DataError,
    SignalDataset,
    _is_number,
    _label_key,
    _require_nonempty,
    build_dataset,
    check_label_mode,
    encode_labels,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Delimited text: CSV, TSV, UCR .tsv


DELIMITERS = (",", ";", "\t", "|")  # what spreadsheets and exports write between cells


def _sniff_delimiter(path: Path, text: str, default: str) -> str:
    """`default`, unless the first non-blank line holds none of it and exactly one other
    common delimiter (a semicolon CSV from a spreadsheet in a decimal-comma locale)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    others = [d for d in DELIMITERS if d != default and d in first]
    if default in first or len(others) != 1:
        return default
    log.info("%s: read with delimiter %r (line 1 holds no %r)", path, others[0], default)
    return others[0]


def _read_table(path: Path, delimiter: str | None, header: bool | None = True,
                label_hint: str = "", default_delimiter: str = ","):
    """(header cells or None, [(line number, cells)], delimiter used) with blank lines skipped.

    delimiter None: `default_delimiter`, or the one `_sniff_delimiter` finds. A UTF-8 byte
    order mark (spreadsheet exports start with one) is not part of the first cell.
    """
    _require_nonempty(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        if delimiter is None:
            delimiter = _sniff_delimiter(path, text, default_delimiter)
        rows = [(i + 1, row) for i, row in
                enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
                if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, "file", f"cannot be read as delimited text ({e}); expected UTF-8 "
                                      "text, one signal per row") from e
    if not rows:
        raise DataError(path, "file", "has no rows; expected one signal per row")
    if all(len(row) == 1 for _, row in rows[:100]):
        inside = [d for d in DELIMITERS if d != delimiter and d in rows[0][1][0]]
        if inside:
            raise DataError(path, "delimiter", f"line {rows[0][0]} is one cell when split at "
                                               f"{delimiter!r} but holds {inside[0]!r}; expected "
                                               f"cells separated by {delimiter!r}, or pass "
                                               f"delimiter={inside[0]!r}")
    if header is None:  # a header has several non-numeric cells, or names the label column
        first = [c.strip() for c in rows[0][1]]
        words = [c for c in first if c and not _is_number(c)]
        header = len(words) > 1 or any(c.casefold() in ("label", label_hint) for c in words)
    if not header:
        return None, rows, delimiter
    if len(rows) == 1:
        raise DataError(path, "file", "has a header but no data rows; expected one signal per "
                                      "row")
    return rows[0][1], rows[1:], delimiter


def _parse_samples(cells: list[str], path, line: int, delimiter: str = ",") -> np.ndarray:
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
        elif delimiter != "," and _is_number(cell.replace(",", ".", 1)):
            # a spreadsheet export in a decimal-comma locale: ',' is not a cell separator here
            raise DataError(path, f"line {line}", f"sample {j} is {cell!r}, a number with a "
                                                  "decimal comma; expected a decimal point "
                                                  "(export the file with '.' as the decimal "
                                                  "separator)")
        else:
            inside = [d for d in DELIMITERS if d != delimiter and d in cell]
            hint = (f" (cells seem separated by {inside[0]!r}, not {delimiter!r}: pass "
                    f"delimiter={inside[0]!r})" if inside else "")
            raise DataError(path, f"line {line}", f"sample {j} is {cell!r}; expected a "
                                                  f"number{hint}")
    return values


def _column(spec: str | int | None, names: list[str] | None, default: str | None, path,
            field: str) -> int | None:
    """Index of a column given by name (needs a header) or position."""
    if isinstance(spec, int):
        if spec < 0:  # a negative index would also leave the column among the samples
            raise DataError(path, field, f"is {spec}; expected a column index >= 0 or a name")
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
             group_column: str | int | None = None, id_column: str | int | None = None,
             delimiter: str | None = None,
             header: bool | None = None, labels: str = "required", nan_policy: str = "raise",
             sample_rate: float | None = None,
             class_names: Sequence[str] | None = None) -> SignalDataset:
    """Read one signal per row with a label column (UCR .tsv is this with the label first).

    delimiter: default tab for .tsv, comma otherwise. header: None detects a header row.
    label_column: name or index; default a column named 'label', else the first column.
    group_column: name or index; default a column named 'group' when there is one.
    id_column: name or index of the signals' names; default a column named 'id' when there
    is one.
    labels='optional': a header row without a 'label' column (and no label_column) means no
    labels; labels='none': no label column, every cell but the group and id is a sample.
    Rows may differ in length: trailing empty or NaN cells are padding; an empty cell inside
    a row is a missing sample (see nan_policy).
    """
    path = Path(path)
    check_label_mode(labels, path)
    if delimiter is not None and len(delimiter) != 1:
        raise DataError(path, "delimiter", f"is {delimiter!r}; expected one character such as "
                                           "',', ';', '\\t' or '|'")
    default = "\t" if path.suffix.lower() == ".tsv" else ","
    hint = label_column.casefold() if isinstance(label_column, str) else ""
    names, rows, delimiter = _read_table(path, delimiter, header, hint, default)
    label_at = _label_column(label_column, names, labels, path)
    group_at = _column(group_column, names, "group", path, "group_column")
    id_at = _column(id_column, names, "id", path, "id_column")
    widest = max(len(row) for _, row in rows)
    for option, spec in (("label_column", label_column), ("group_column", group_column),
                         ("id_column", id_column)):
        if isinstance(spec, int) and spec >= widest:  # the option is wrong, not one row
            raise DataError(path, option, f"is {spec} but the rows have at most {widest} "
                                          f"cells; expected a column index below {widest}")
    raw, groups, ids, signals = [], [], [], []
    for line, row in rows:
        if label_at is not None and label_at >= len(row):
            raise DataError(path, f"line {line}", f"has {len(row)} cells; expected a label in "
                                                  f"column {label_at}")
        if group_at is not None and group_at >= len(row):
            raise DataError(path, f"line {line}", f"has {len(row)} cells; expected a group in "
                                                  f"column {group_at}")
        if id_at is not None and id_at >= len(row):
            raise DataError(path, f"line {line}", f"has {len(row)} cells; expected an id in "
                                                  f"column {id_at}")
        if label_at is not None:
            raw.append(row[label_at])
        if group_at is not None:
            groups.append(row[group_at].strip())
        if id_at is not None:
            ids.append(row[id_at].strip())
        samples = [c for j, c in enumerate(row) if j not in (label_at, group_at, id_at)]
        signals.append(_parse_samples(samples, path, line, delimiter))
    if len({len(s) for s in signals}) == 1:
        signals = np.stack(signals)
    return build_dataset(path, signals, raw if label_at is not None else None,
                         groups=np.array(groups) if groups else None, sample_rate=sample_rate,
                         nan_policy=nan_policy, class_names=class_names,
                         signals_field="samples", labels_field="label",
                         names=ids if id_at is not None else None, names_field="id")


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
        lines = path.read_text(encoding="utf-8-sig").splitlines()
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
    if "serieslength" in meta and len(lengths) == 1:
        stated = " ".join(meta["serieslength"])
        if not stated.isdigit():
            raise DataError(path, "@seriesLength", f"is {stated!r}; expected a whole number of "
                                                   "samples")
        if lengths != {int(stated)}:
            raise DataError(path, "@seriesLength", f"is {stated} but the series have "
                                                   f"{lengths.pop()} samples; expected equal")
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
