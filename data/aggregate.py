"""Record-level predictions from window predictions, and the table prediction writes.

Prediction cuts a record longer than the model input into windows
(`data.transforms.prediction_windows`: full windows `stride` apart plus one ending at the last
sample), so a long record gets several probability rows and its tail window overlaps the one
before it. `aggregate_windows` turns them into one row per record:

  "none": every window as it is (one row per window);
  "mean": the window probabilities averaged, each window weighted by the samples it newly
          covers (samples no earlier-starting window of the record covers), so the overlap of
          the tail window counts once;
  "vote": the class predicted for most of the record's samples (each window votes with the
          samples it newly covers); a tie goes to the tied class of highest mean probability.

`record_ids` names the records as the file does (SignalDataset.names), else by index, and
`prediction_table` lays the rows out for a CSV, with times in seconds where the rate is known.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.formats import UNLABELLED, SignalDataset

AGGREGATIONS = ("none", "mean", "vote")


@dataclass
class RecordPredictions:
    """One row per record (or per window with mode "none"), ordered by record index.

    records:       (R,) int64 record index into the dataset the windows were cut from.
    starts, ends:  (R,) int64 first sample and end sample (exclusive) the row covers.
    probabilities: (R, K) float64 class probabilities (mean over the record's windows).
    predicted:     (R,) int64 predicted class (the vote's winner with mode "vote").
    windows:       (R,) int64 number of windows combined into the row.
    """

    records: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    probabilities: np.ndarray
    predicted: np.ndarray
    windows: np.ndarray

    def __len__(self) -> int:
        return len(self.records)


def new_coverage(records: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(M,) int64 samples each window covers that no window of its record covers before it.

    Windows are taken in order of start (then end) within each record, so of two windows
    sharing samples the earlier one keeps them: windows [0, 4), [4, 8), [6, 10) of a 10-sample
    record newly cover 4, 4 and 2 samples. A window inside already covered samples gets 0.
    """
    records, starts, ends = (np.asarray(a, dtype=np.int64) for a in (records, starts, ends))
    if len(records) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((ends, starts, records))
    r, s, e = records[order], starts[order], ends[order]
    # a running maximum of ends that restarts at each record: offset every record above all
    # earlier ones, so one cumulative maximum over the sorted rows stays within records
    rank = np.concatenate(([0], np.cumsum(r[1:] != r[:-1])))
    offset = rank * (int(e.max()) - int(min(s.min(), 0)) + 1)
    s_off, e_off = s + offset, e + offset
    covered = np.maximum.accumulate(e_off)
    before = np.concatenate(([s_off[0]], covered[:-1]))
    first = np.concatenate(([True], r[1:] != r[:-1]))
    before[first] = s_off[first]
    fresh = np.maximum(e_off - np.maximum(s_off, before), 0)
    out = np.empty_like(fresh)
    out[order] = fresh
    return out


def aggregate_windows(records: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                      probabilities: np.ndarray, mode: str = "mean") -> RecordPredictions:
    """Window predictions -> one row per record (see the module docstring for the modes).

    records: (M,) record index of each window; starts, ends: (M,) its first and end sample
    (exclusive; a record shorter than the window ends at its own length, as
    `PredictionInputs.ends` gives); probabilities: (M, K) its class probabilities. Windows may
    come in any order. Returns a `RecordPredictions` ordered by record index.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {AGGREGATIONS}; got {mode!r}")
    records, starts, ends = (np.asarray(a, dtype=np.int64).ravel()
                             for a in (records, starts, ends))
    probabilities = np.asarray(probabilities, dtype=np.float64)
    m = len(records)
    if probabilities.ndim != 2 or len(starts) != m or len(ends) != m or len(probabilities) != m:
        raise ValueError(f"records, starts, ends must be (M,) and probabilities (M, K) for the "
                         f"same M; got {len(records)}, {len(starts)}, {len(ends)} and "
                         f"{probabilities.shape}")
    if m and (ends <= starts).any():
        bad = int(np.flatnonzero(ends <= starts)[0])
        raise ValueError(f"every window must end after it starts; window {bad} covers "
                         f"[{starts[bad]}, {ends[bad]})")
    if mode == "none":
        order = np.argsort(records, kind="stable")
        return RecordPredictions(records[order], starts[order], ends[order],
                                 probabilities[order], probabilities[order].argmax(-1),
                                 np.ones(m, dtype=np.int64))
    unique, row = np.unique(records, return_inverse=True)
    k = probabilities.shape[1]
    weight = new_coverage(records, starts, ends).astype(np.float64)
    covered = np.bincount(row, weights=weight, minlength=len(unique))
    mean = np.zeros((len(unique), k))
    np.add.at(mean, row, probabilities * weight[:, None])
    mean /= covered[:, None]
    if mode == "mean":
        predicted = mean.argmax(-1)
    else:
        votes = np.zeros((len(unique), k))
        np.add.at(votes, (row, probabilities.argmax(-1)), weight)
        tied = votes == votes.max(-1, keepdims=True)
        predicted = np.where(tied, mean, -np.inf).argmax(-1)
    first, last = np.full(len(unique), np.iinfo(np.int64).max), np.zeros(len(unique), np.int64)
    np.minimum.at(first, row, starts)
    np.maximum.at(last, row, ends)
    return RecordPredictions(unique, first, last, mean, predicted.astype(np.int64),
                             np.bincount(row, minlength=len(unique)).astype(np.int64))


def record_ids(dataset: SignalDataset) -> np.ndarray:
    """(N,) str name of every record: the file's own names (`SignalDataset.names`: .npz
    `ids`/`record_names`, an `id` column, WFDB/EDF record and window start) where the reader
    found them, else the record's index ('0', '1', ...)."""
    if dataset.names is not None:
        return np.asarray(dataset.names).astype(str)
    return np.arange(len(dataset)).astype(str)


def prediction_table(rows: RecordPredictions, dataset: SignalDataset,
                     class_names: Sequence[str]) -> tuple[list[str], list[list]]:
    """(header, rows) of the prediction CSV: record (its id), index, group, start and end
    (`start_s`/`end_s` in seconds when the dataset's rate is known, else `start`/`end` in
    samples), windows, label (empty for a record without one), predicted, p_<class>."""
    ids = record_ids(dataset)
    rate = dataset.sample_rate
    times = ["start_s", "end_s"] if rate else ["start", "end"]
    header = ["record", "index", "group", *times, "windows", "label", "predicted",
              *[f"p_{name}" for name in class_names]]
    table = []
    for i in range(len(rows)):
        record = int(rows.records[i])
        start, end = int(rows.starts[i]), int(rows.ends[i])
        label = int(dataset.labels[record])
        table.append([
            ids[record], record, "" if dataset.groups is None else dataset.groups[record],
            *((f"{start / rate:.6g}", f"{end / rate:.6g}") if rate else (start, end)),
            int(rows.windows[i]), "" if label == UNLABELLED else class_names[label],
            class_names[int(rows.predicted[i])], *[f"{p:.6f}" for p in rows.probabilities[i]],
        ])
    return header, table


def write_prediction_csv(path: str | Path, rows: RecordPredictions, dataset: SignalDataset,
                         class_names: Sequence[str]) -> Path:
    """Write `prediction_table` to `path` (parent folders made) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, table = prediction_table(rows, dataset, class_names)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    return path
