"""data/aggregate.py: window predictions -> one row per record, record ids, the CSV table."""

import csv

import numpy as np
import pytest

from data.aggregate import (
    aggregate_windows,
    new_coverage,
    prediction_table,
    record_ids,
    write_prediction_csv,
)
from data.formats import UNLABELLED, SignalDataset
from data.transforms import prediction_windows


def windows_of(lengths, window, stride):
    """(records, starts, ends) exactly as prediction cuts records of `lengths`."""
    items = prediction_windows(np.asarray(lengths), window, stride)
    records, starts = items[:, 0], items[:, 1]
    return records, starts, np.minimum(starts + window, np.asarray(lengths)[records])


def test_new_coverage_counts_the_overlapping_tail_once():
    # record 0: 10 samples, windows of 4 -> [0, 4), [4, 8) and the tail [6, 10)
    # record 1: 3 samples, shorter than one window -> [0, 3)
    # record 2: stride 2 < window: every window after the first adds 2 samples
    records, starts, ends = windows_of([10, 3], 4, 4)
    np.testing.assert_array_equal(starts, [0, 4, 6, 0])
    np.testing.assert_array_equal(ends, [4, 8, 10, 3])
    np.testing.assert_array_equal(new_coverage(records, starts, ends), [4, 4, 2, 3])
    r, s, e = windows_of([8], 4, 2)
    np.testing.assert_array_equal(new_coverage(r, s, e), [4, 2, 2])
    # any order, records interleaved, a window inside covered samples: the same counts
    order = np.array([3, 2, 0, 1])
    np.testing.assert_array_equal(new_coverage(records[order], starts[order], ends[order]),
                                  [3, 2, 4, 4])
    np.testing.assert_array_equal(new_coverage([0, 0], [0, 1], [5, 3]), [5, 0])


def test_mean_weights_windows_by_new_samples():
    records, starts, ends = windows_of([10, 3], 4, 4)
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.3, 0.7]])
    out = aggregate_windows(records, starts, ends, probs, "mean")
    assert len(out) == 2
    np.testing.assert_array_equal(out.records, [0, 1])
    np.testing.assert_array_equal(out.starts, [0, 0])
    np.testing.assert_array_equal(out.ends, [10, 3])
    np.testing.assert_array_equal(out.windows, [3, 1])
    # (4 [1, 0] + 4 [0, 1] + 2 [0, 1]) / 10; the tail's 2 overlapping samples not again
    np.testing.assert_allclose(out.probabilities, [[0.4, 0.6], [0.3, 0.7]])
    np.testing.assert_array_equal(out.predicted, [1, 1])
    np.testing.assert_allclose(out.probabilities.sum(1), 1.0)


def test_vote_is_the_class_of_most_samples_and_ties_go_by_mean():
    # three equal windows: two narrowly for class 0, one sure of class 1
    records, starts, ends = np.zeros(3, int), np.array([0, 4, 8]), np.array([4, 8, 12])
    probs = np.array([[0.51, 0.49], [0.51, 0.49], [0.0, 1.0]])
    assert aggregate_windows(records, starts, ends, probs, "vote").predicted.tolist() == [0]
    assert aggregate_windows(records, starts, ends, probs, "mean").predicted.tolist() == [1]
    # the tail window's vote weighs only its new samples: 4 + 2 for class 1 beat 4
    r, s, e = windows_of([10], 4, 4)
    out = aggregate_windows(r, s, e, np.array([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8]]), "vote")
    assert out.predicted.tolist() == [1]
    # 4 samples each way: the tie goes to the higher mean probability
    r, s, e = np.zeros(2, int), np.array([0, 4]), np.array([4, 8])
    tie_for_1 = aggregate_windows(r, s, e, np.array([[0.6, 0.4], [0.3, 0.7]]), "vote")
    np.testing.assert_allclose(tie_for_1.probabilities, [[0.45, 0.55]])
    assert tie_for_1.predicted.tolist() == [1]
    tie_for_0 = aggregate_windows(r, s, e, np.array([[0.9, 0.1], [0.4, 0.6]]), "vote")
    assert tie_for_0.predicted.tolist() == [0]


def test_none_keeps_every_window_and_rows_come_in_record_order():
    records, starts, ends = windows_of([10, 3], 4, 4)
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=4)
    order = np.array([3, 1, 0, 2])
    out = aggregate_windows(records[order], starts[order], ends[order], probs[order], "none")
    np.testing.assert_array_equal(out.records, [0, 0, 0, 1])
    np.testing.assert_array_equal(out.windows, [1, 1, 1, 1])
    np.testing.assert_array_equal(out.predicted, probs[order][[1, 2, 3, 0]].argmax(1))
    np.testing.assert_array_equal(out.starts, [4, 0, 6, 0])  # stable within a record
    shuffled = aggregate_windows(records[order], starts[order], ends[order], probs[order])
    np.testing.assert_allclose(shuffled.probabilities,
                               aggregate_windows(records, starts, ends, probs).probabilities)


def test_aggregate_refuses_bad_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        aggregate_windows([0], [0], [4], [[1.0, 0.0]], "max")
    with pytest.raises(ValueError, match="same M"):
        aggregate_windows([0, 0], [0, 4], [4, 8], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="window 1 covers \\[4, 4\\)"):
        aggregate_windows([0, 0], [0, 4], [4, 4], [[1.0, 0.0], [0.0, 1.0]])
    empty = aggregate_windows([], [], [], np.zeros((0, 2)))
    assert len(empty) == 0 and empty.probabilities.shape == (0, 2)


def dataset(names=None, rate=None):
    signals = [np.zeros(10, np.float32), np.zeros(3, np.float32)]
    return SignalDataset(signals, np.array([1, UNLABELLED]), ["a", "b"], np.array(["g0", "g1"]),
                         rate, "test", names)


def test_record_ids_from_the_file_else_the_index():
    assert record_ids(dataset()).tolist() == ["0", "1"]
    assert record_ids(dataset(np.array(["rec-7", "rec-9"]))).tolist() == ["rec-7", "rec-9"]


def test_prediction_table_in_seconds_when_the_rate_is_known(tmp_path):
    records, starts, ends = windows_of([10, 3], 4, 4)
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.3, 0.7]])
    rows = aggregate_windows(records, starts, ends, probs, "mean")
    header, table = prediction_table(rows, dataset(np.array(["x1", "x2"]), rate=4.0), ["a", "b"])
    assert header == ["record", "index", "group", "start_s", "end_s", "windows", "label",
                      "predicted", "p_a", "p_b"]
    assert table[0] == ["x1", 0, "g0", "0", "2.5", 3, "b", "b", "0.400000", "0.600000"]
    assert table[1][:8] == ["x2", 1, "g1", "0", "0.75", 1, "", "b"]  # no label: empty
    header, table = prediction_table(rows, dataset(), ["a", "b"])
    assert header[3:5] == ["start", "end"] and table[0][3:5] == [0, 10]
    path = write_prediction_csv(tmp_path / "out" / "p.csv", rows, dataset(rate=4.0), ["a", "b"])
    with open(path, newline="") as f:
        read = list(csv.reader(f))
    assert read[0][:2] == ["record", "index"] and read[2][:5] == ["1", "1", "g1", "0", "0.75"]
