"""Regression tests for the bad inputs a fault sweep of train.py found handled badly (issue 18)
and that the other test files do not cover: each makes its bad file or option, asserts the
exact one-line message, and leaves nothing behind (tmp_path only)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from data.datamodule import cv_fold_indices
from data.formats import DataError, read_dataset, read_train_test
from utils import checks


@pytest.fixture
def small_csv(tmp_path):
    """A labelled CSV of 6 signals, 8 samples each, with a header row."""
    rng = np.random.default_rng(0)
    path = tmp_path / "small.csv"
    rows = ["label," + ",".join(f"s{i}" for i in range(8))]
    rows += [f"{'AB'[i % 2]}," + ",".join(f"{v:.3f}" for v in rng.standard_normal(8))
             for i in range(6)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("option, value, expected", [
    # a float column index used to fail with AttributeError inside the reader
    ("label_column", 1.5, "is 1.5 (float); expected text or a whole number for the csv "
                          "reader's label_column option"),
    # True is an int to Python: it was read as column 1, a sample column
    ("label_column", True, "is True (bool); expected text or a whole number for the csv "
                           "reader's label_column option"),
    ("group_column", 2.5, "is 2.5 (float); expected text or a whole number for the csv "
                          "reader's group_column option"),
    # any non-empty text used to count as header=True
    ("header", "maybe", "is 'maybe' (str); expected true or false for the csv reader's header "
                        "option"),
    ("delimiter", 5, "is 5 (int); expected text for the csv reader's delimiter option"),
    # a TypeError from inside the reader before
    ("class_names", 5, "is 5 (int); expected a list of names for the csv reader's class_names "
                       "option"),
    # a str is a sequence of one-letter class names
    ("class_names", "AB", "is 'AB' (str); expected a list of names for the csv reader's "
                          "class_names option"),
    ("sample_rate", [1, 2], "is [1, 2] (list); expected a number for the csv reader's "
                            "sample_rate option"),
])
def test_reader_options_of_the_wrong_type_are_refused(small_csv, option, value,
                                                      expected) -> None:
    with pytest.raises(DataError) as refused:
        read_dataset(small_csv, **{option: value})
    assert str(refused.value) == f"{small_csv} [{option}]: {expected}"


def test_reader_options_of_the_right_type_still_read(small_csv) -> None:
    for options in ({"label_column": "label"}, {"label_column": 0}, {"sample_rate": 250},
                    {"sample_rate": 250.0}, {"header": True}, {"delimiter": ","},
                    {"class_names": ["A", "B"]}, {"class_names": ("A", "B")}):
        assert read_dataset(small_csv, **options).class_names == ["A", "B"]


@pytest.mark.parametrize("delimiter", [";;", ""])
def test_a_delimiter_of_more_or_less_than_one_character_is_refused(small_csv,
                                                                   delimiter) -> None:
    # csv.reader's TypeError ('"delimiter" must be a 1-character string') was a traceback
    with pytest.raises(DataError) as refused:
        read_dataset(small_csv, delimiter=delimiter)
    assert str(refused.value) == (f"{small_csv} [delimiter]: is {delimiter!r}; expected one "
                                  "character such as ',', ';', '\\t' or '|'")


@pytest.mark.parametrize("fmt, option", [("wfdb", "window_seconds"), ("wfdb", "stride_seconds"),
                                         ("edf", "epoch_seconds")])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_window_and_epoch_lengths_must_be_finite_and_positive(tmp_path, fmt, option,
                                                              value) -> None:
    # inf failed inside round() with OverflowError, NaN with "cannot convert float NaN"; the
    # check comes before the record is opened, so no record is needed
    path = tmp_path / ("100.hea" if fmt == "wfdb" else "night.edf")
    with pytest.raises(DataError) as refused:
        read_dataset(path, fmt, **{option: value})
    assert str(refused.value) == (f"{path} [{option}]: is {value!r}; expected a positive, "
                                  "finite number of seconds")


@pytest.mark.parametrize("normalize", ["dataset", "none"])
def test_training_records_that_all_hold_one_value_are_refused(normalize) -> None:
    # --normalize dataset turned them into zeros and trained on them with exit 0
    flat = np.full((6, 40), 3.0, dtype=np.float32)
    with pytest.raises(DataError) as refused:
        checks.check_informative_signals(flat, np.arange(6), 40, normalize, "flat.csv")
    assert str(refused.value) == (
        "flat.csv [signals]: all 6 training records hold the one value 3, so every input is "
        f"the same under --normalize {normalize}; expected signals that vary")
    levels = flat * np.arange(1, 7)[:, None]  # constant, but the levels tell records apart
    checks.check_informative_signals(levels, np.arange(6), 40, normalize, "levels.csv")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
@pytest.mark.parametrize("name", ["signals.csv", "signals.npz", "signals.ts"])
def test_a_named_pipe_is_refused_instead_of_waited_on(tmp_path, name) -> None:
    # open() on a FIFO blocks until a writer comes: train.py hung without a word. The read
    # runs in a thread, so that a reader that waits fails the test instead of hanging it
    fifo = tmp_path / name
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_dataset(fifo)
        except BaseException as exc:  # handed to the test below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)  # the refusal is a stat: milliseconds, even on a loaded machine
    if reader.is_alive():  # waiting on the pipe: a writer that closes at once lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=60)
        pytest.fail(f"read_dataset({fifo}) waited for a writer instead of refusing the pipe")
    assert outcome and isinstance(outcome[0], DataError), outcome
    assert str(outcome[0]) == (f"{fifo} [file]: is not a regular file (a pipe, device or "
                               "socket); expected a file of signals")


def test_decimal_commas_in_a_semicolon_file_are_named(tmp_path) -> None:
    # the delimiter ';' is found from the header; the message advised delimiter=',' before,
    # which splits every number in two
    path = tmp_path / "export.csv"
    path.write_text("label;s0;s1\nA;0,5;1,5\nB;2,5;3,5\n")
    with pytest.raises(DataError) as refused:
        read_dataset(path)
    assert str(refused.value) == (f"{path} [line 2]: sample 0 is '0,5', a number with a "
                                  "decimal comma; expected a decimal point (export the file "
                                  "with '.' as the decimal separator)")


@pytest.mark.parametrize("option", ["label_column", "group_column", "id_column"])
def test_a_column_index_beyond_every_row_names_the_option(small_csv, option) -> None:
    # it was "[line 2]: has 9 cells; expected a label in column 99", about the row
    with pytest.raises(DataError) as refused:
        read_dataset(small_csv, **{option: 99})
    assert str(refused.value) == (f"{small_csv} [{option}]: is 99 but the rows have at most 9 "
                                  "cells; expected a column index below 9")


def test_more_folds_than_records_names_the_option() -> None:
    # sklearn's "Cannot have number of splits n_splits=100 greater than the number of
    # samples" named neither --cv nor the data
    labels = np.arange(28) % 2
    with pytest.raises(DataError) as refused:
        cv_fold_indices(labels, None, 100, 0, seed=0, source="small.csv")
    assert str(refused.value) == ("small.csv [cv_folds]: has at most 14 records per class, "
                                  "too few for 100 stratified folds; expected --cv 14 or "
                                  "fewer")
    kept, held = cv_fold_indices(labels, None, 14, 0, seed=0, source="small.csv")
    assert len(held) == 2 and len(kept) == 26


def _two_record_npz(path) -> None:
    """20 windows of 2 records (groups), 2 classes within each record."""
    rng = np.random.default_rng(1)
    np.savez(path, X=rng.standard_normal((20, 32)).astype(np.float32), y=np.arange(20) % 2,
             groups=np.repeat(["100", "101"], 10))


@pytest.mark.parametrize("fractions, expected", [
    ({}, "too few to hold out 15% (--test-fraction 0.15) by group (no record is on both "
         "sides); expected at least 7 of them, or a test set of other records with --test-data"),
    ({"test_fraction": 0.5, "val_fraction": 0.2},
     "too few to hold out 40% (--val-fraction 0.2) by group (no record is on both sides); "
     "expected at least 2 of them, or --val-fraction 0 (no validation: the last weights are "
     "tested)"),
])
def test_too_few_records_for_a_grouped_split_name_the_option(tmp_path, fractions,
                                                            expected) -> None:
    # it said "has 2 records/subjects, too few to hold out 15% by group; expected at least
    # 7": neither which share (test or validation) nor what else to pass
    from data.datamodule import DataConfig, SignalDataModule

    path = tmp_path / "two.npz"
    _two_record_npz(path)
    with pytest.raises(DataError) as refused:
        SignalDataModule(DataConfig(source=str(path), **fractions)).setup("fit")
    held = "1 records/subjects" if "val" in expected else "2 records/subjects"
    assert str(refused.value) == f"{path} [groups]: has {held}, {expected}"


def test_more_folds_than_records_by_group_names_the_option() -> None:
    labels, groups = np.arange(20) % 2, np.repeat(["a", "b", "c"], [7, 7, 6])
    with pytest.raises(DataError) as refused:
        cv_fold_indices(labels, groups, 5, 0, seed=0, source="g.npz")
    assert str(refused.value) == ("g.npz [groups]: has 3 records/subjects, too few for 5 folds "
                                  "by group (no record is on both sides); expected --cv 3 or "
                                  "fewer")
    with pytest.raises(DataError) as refused:
        cv_fold_indices(labels, np.zeros(20), 2, 0, seed=0, source="g.npz")
    assert str(refused.value).endswith("too few for 2 folds by group (no record is on both "
                                       "sides); expected at least 2 of them")


def test_a_test_set_that_is_the_training_data_is_refused(small_csv, tmp_path) -> None:
    # --test-data naming the --data file trained and tested on the same records, exit 0
    link = tmp_path / "also_small.csv"
    link.symlink_to(small_csv)
    for test in (small_csv, tmp_path / "." / small_csv.name, link):
        with pytest.raises(DataError) as refused:
            read_train_test(small_csv, test)
        assert str(refused.value) == (
            f"{test} [file]: is the training data ({small_csv}), so the test would score "
            "records the model trained on; expected a test set of other records (or none: a "
            "share of the training data is then held out)")
    # a WFDB record by its name, its .hea or its .dat is one record (refused before reading)
    (tmp_path / "100.hea").write_text("100 1 360 3600\n")
    for test in ("100.hea", "100.dat"):
        with pytest.raises(DataError, match=r"is the training data \(.*100\)"):
            read_train_test(tmp_path / "100", tmp_path / test)
    other = tmp_path / "other.csv"
    other.write_bytes(small_csv.read_bytes())  # the same contents in another file: a test set
    train, test = read_train_test(small_csv, other)
    assert len(train) == len(test) == 6
