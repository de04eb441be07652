"""Readers in data/formats.py: each format written with its own library, read back, compared;
each kind of bad input gives a DataError naming the file and field."""

import csv
import logging
import warnings

import numpy as np
import pytest

from data.formats import (
    UNLABELLED,
    DataError,
    build_dataset,
    encode_labels,
    find_test_file,
    read_dataset,
    read_edf,
    read_npy,
    read_train_test,
    read_ts,
    read_wfdb,
)

# wfdb 4.3 calls pandas with a keyword pandas 3.1 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword")


def import_wfdb():
    """wfdb, or skip the calling test where it is not installed (an optional dependency:
    requirements-formats.txt), so this file collects everywhere."""
    with warnings.catch_warnings():  # wfdb 4.3 calls pandas 3.1 with a deprecated keyword
        warnings.filterwarnings("ignore", message="The inplace keyword")
        return pytest.importorskip("wfdb")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)


def write_ts(path, cases, labels=("1", "2"), equal=True, header_extra=""):
    lines = ["# toy problem", "@problemName Toy", "@timeStamps false", "@univariate true",
             f"@equalLength {'true' if equal else 'false'}",
             f"@classLabel true {' '.join(labels)}", header_extra, "@data"]
    for values, label in cases:
        lines.append(",".join("?" if np.isnan(v) else repr(float(v)) for v in values)
                     + f":{label}")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# NumPy


def test_npz_round_trip(tmp_path, rng):
    X = rng.standard_normal((6, 50)).astype(np.float32)
    y = np.array(["b", "a", "b", "a", "c", "c"])
    groups = np.array([1, 1, 2, 2, 3, 3])
    np.savez(tmp_path / "d.npz", X=X, y=y, groups=groups, fs=250.0)
    ds = read_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(ds.signals, X)
    assert ds.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(ds.labels, [1, 0, 1, 0, 2, 2])
    np.testing.assert_array_equal(ds.groups, groups)
    assert ds.sample_rate == 250.0 and ds.source.endswith("d.npz")


def test_npz_unequal_lengths_and_class_names(tmp_path, rng):
    parts = [rng.standard_normal(n).astype(np.float32) for n in (30, 45, 12)]
    np.savez(tmp_path / "u.npz", X=np.concatenate(parts), lengths=[30, 45, 12], y=[0, 1, 1],
             class_names=np.array(["normal", "afib"]))
    ds = read_dataset(tmp_path / "u.npz")
    assert [len(s) for s in ds.signals] == [30, 45, 12]
    for got, want in zip(ds.signals, parts, strict=True):
        np.testing.assert_array_equal(got, want)
    assert [ds.class_names[i] for i in ds.labels] == ["normal", "afib", "afib"]
    assert ds.sample_rate is None


def test_npy_is_memory_mapped_with_sidecar_labels(tmp_path, rng):
    X = rng.standard_normal((5, 40))
    np.save(tmp_path / "big.npy", X)
    write_csv(tmp_path / "big.labels.csv",
              [["label", "group"], ["x", "r1"], ["y", "r1"], ["x", "r2"], ["y", "r3"],
               ["x", "r3"]])
    ds = read_dataset(tmp_path / "big.npy", sample_rate=100)
    assert isinstance(ds.signals, np.memmap) and ds.signals.mode == "r"
    np.testing.assert_array_equal(np.asarray(ds.signals), X)
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(ds.groups, ["r1", "r1", "r2", "r3", "r3"])
    assert ds.sample_rate == 100.0


def test_npy_nan_drop_keeps_memmap_rows(tmp_path, rng, caplog):
    X = rng.standard_normal((4, 20))
    X[2, 5] = np.nan
    np.save(tmp_path / "n.npy", X)
    write_csv(tmp_path / "n.labels.csv", [["label"], ["a"], ["b"], ["a"], ["b"]])
    with caplog.at_level(logging.WARNING):
        ds = read_npy(tmp_path / "n.npy", nan_policy="drop")
    assert "dropped 1 of 4 signals" in caplog.text
    assert len(ds) == 3 and all(isinstance(s, np.memmap) for s in ds.signals)
    np.testing.assert_array_equal(np.stack(ds.signals), X[[0, 1, 3]])
    np.testing.assert_array_equal(ds.labels, [0, 1, 1])


# ----------------------------------------------------------------------------------------------
# Delimited text


def test_csv_label_column_by_name_and_groups(tmp_path, rng):
    X = np.round(rng.standard_normal((4, 8)), 4)
    rows = [["s0", "s1", "s2", "s3", "diagnosis", "s4", "s5", "s6", "s7", "group"]]
    for i, (x, label) in enumerate(zip(X, ["MI", "NORM", "MI", "NORM"], strict=True)):
        rows.append([*x[:4], label, *x[4:], f"p{i // 2}"])
    write_csv(tmp_path / "ecg.csv", rows)
    ds = read_dataset(tmp_path / "ecg.csv", label_column="diagnosis")
    np.testing.assert_allclose(ds.signals, X, rtol=1e-6)
    assert ds.class_names == ["MI", "NORM"]
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1])
    np.testing.assert_array_equal(ds.groups, ["p0", "p0", "p1", "p1"])


def test_csv_default_label_column_and_interpolate(tmp_path):
    write_csv(tmp_path / "d.csv", [["label", "a", "b", "c", "d"], ["1", 0, 1, "", 3],
                                   ["2", 5, 5, 5, 5]])
    ds = read_dataset(tmp_path / "d.csv", nan_policy="interpolate")
    np.testing.assert_allclose(ds.signals, [[0, 1, 2, 3], [5, 5, 5, 5]])
    assert ds.class_names == ["1", "2"]


def test_csv_negative_column_index_refused(tmp_path):
    write_csv(tmp_path / "n.csv", [[1, 2, 3], [2, 4, 5], [1, 3, 3]])
    with pytest.raises(DataError, match="expected a column index >= 0") as err:
        read_dataset(tmp_path / "n.csv", label_column=-1)
    assert err.value.field == "label_column"
    with pytest.raises(DataError, match="expected a column index >= 0") as err:
        read_dataset(tmp_path / "n.csv", group_column=-2)
    assert err.value.field == "group_column"


def test_ucr_tsv_label_first_unequal_lengths(tmp_path):
    write_csv(tmp_path / "Toy_TRAIN.tsv", [[2, 0.5, 1.5, 2.5], [1, 1.0, 2.0, "NaN"],
                                           [10, 3.0, "", ""]], delimiter="\t")
    ds = read_dataset(tmp_path / "Toy_TRAIN.tsv")
    assert [list(s) for s in ds.signals] == [[0.5, 1.5, 2.5], [1.0, 2.0], [3.0]]
    assert ds.class_names == ["1", "2", "10"]  # numeric labels sort as numbers
    np.testing.assert_array_equal(ds.labels, [1, 0, 2])


# ----------------------------------------------------------------------------------------------
# UCR/UEA .ts and fixed train/test splits


def test_ts_equal_and_unequal_length(tmp_path, rng):
    cases = [(rng.standard_normal(6), lab) for lab in ("b", "a", "b")]
    write_ts(tmp_path / "e.ts", cases, labels=("b", "a"), header_extra="@seriesLength 6")
    ds = read_dataset(tmp_path / "e.ts")
    np.testing.assert_allclose(ds.signals, [c[0] for c in cases], rtol=1e-6)
    assert ds.class_names == ["b", "a"]  # the header's declared order
    np.testing.assert_array_equal(ds.labels, [0, 1, 0])

    cases = [(rng.standard_normal(n), lab) for n, lab in ((5, "1"), (9, "2"))]
    write_ts(tmp_path / "u.ts", cases, equal=False)
    ds = read_dataset(tmp_path / "u.ts")
    assert [len(s) for s in ds.signals] == [5, 9]
    np.testing.assert_allclose(ds.signals[1], cases[1][0], rtol=1e-6)


def test_ts_bad_series_length_header(tmp_path):
    for stated in ("abc", ""):
        write_ts(tmp_path / "s.ts", [([1.0, 2.0], "1"), ([3.0, 4.0], "2")],
                 header_extra=f"@seriesLength {stated}")
        with pytest.raises(DataError, match="expected a whole number of samples") as err:
            read_dataset(tmp_path / "s.ts")
        assert err.value.field == "@seriesLength" and err.value.path.endswith("s.ts")


def test_ts_multivariate_needs_dimension(tmp_path):
    (tmp_path / "m.ts").write_text("@problemName M\n@univariate false\n@classLabel true x y\n"
                                   "@data\n1,2,3:4,5,6:x\n7,8,9:1,1,1:y\n")
    with pytest.raises(DataError, match="dimension"):
        read_dataset(tmp_path / "m.ts")
    ds = read_dataset(tmp_path / "m.ts", dimension=1)
    np.testing.assert_array_equal(ds.signals, [[4, 5, 6], [1, 1, 1]])


def test_ucr_pair_folder_gives_train_and_test(tmp_path, rng):
    write_ts(tmp_path / "Toy_TRAIN.ts", [(rng.standard_normal(4), lab) for lab in "1212"])
    write_ts(tmp_path / "Toy_TEST.ts", [(rng.standard_normal(4), lab) for lab in "22"])
    assert find_test_file(tmp_path) == (tmp_path / "Toy_TRAIN.ts", tmp_path / "Toy_TEST.ts")
    train, test = read_train_test(tmp_path)
    assert len(train) == 4 and len(test) == 2
    assert test.class_names == train.class_names == ["1", "2"]
    np.testing.assert_array_equal(test.labels, [1, 1])  # one class is fine in a test set
    train, test = read_train_test(tmp_path / "Toy_TRAIN.ts")
    assert len(test) == 2
    alone, none = read_train_test(tmp_path / "Toy_TEST.ts", class_names=["1", "2"])
    assert none is None and len(alone) == 2


def test_explicit_test_file_with_unknown_label(tmp_path):
    write_csv(tmp_path / "train.csv", [["label", "x"], ["a", 1], ["b", 2]])
    write_csv(tmp_path / "test.csv", [["label", "x"], ["a", 1], ["c", 2]])
    with pytest.raises(DataError) as err:
        read_train_test(tmp_path / "train.csv", tmp_path / "test.csv")
    assert err.value.path.endswith("test.csv") and "unknown labels ['c']" in str(err.value)


# ----------------------------------------------------------------------------------------------
# WFDB


def write_wfdb(directory, name, signal, fs, samples, symbols, notes, channels=("MLII", "V5")):
    wfdb = import_wfdb()
    p_signal = np.column_stack([signal] + [signal * 0.5] * (len(channels) - 1))
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(channels), sig_name=list(channels),
                p_signal=p_signal, fmt=["16"] * len(channels), write_dir=str(directory))
    wfdb.wrann(name, "atr", np.asarray(samples), symbol=symbols, aux_note=notes,
               write_dir=str(directory))


def test_wfdb_rhythm_windows(tmp_path, rng):
    signal = rng.standard_normal(6000)
    write_wfdb(tmp_path, "100", signal, 100, [0, 2400, 4000], ["+"] * 3,
               ["(N", "(AFIB", "(N"])
    ds = read_dataset(tmp_path / "100.hea", window_seconds=10, channel="V5")
    assert ds.sample_rate == 100.0 and ds.signals.shape == (6, 1000)
    assert [ds.class_names[i] for i in ds.labels] == ["N", "N", "AFIB", "AFIB", "N", "N"]
    np.testing.assert_allclose(ds.signals[2], 0.5 * signal[2000:3000], atol=1e-3)
    assert set(ds.groups) == {"100"}
    ds = read_wfdb(tmp_path / "100", window_seconds=10, stride_seconds=5)
    assert len(ds) == 11  # windows start every 5 s; the last full one at 50 s
    np.testing.assert_allclose(ds.signals[1], signal[500:1500], atol=1e-3)


def test_wfdb_beat_majority_and_folder_groups(tmp_path, rng):
    beats = np.arange(50, 4000, 100)
    symbols = ["V" if 1200 <= b < 2000 else "N" for b in beats]  # window 1: 8 V, 2 N
    for name in ("201", "202"):
        write_wfdb(tmp_path, name, rng.standard_normal(4000), 200, beats, symbols,
                   [""] * len(beats))
    ds = read_dataset(tmp_path, label_source="beat", window_seconds=5,
                      label_map={"N": "normal", "V": "ventricular"})
    assert [ds.class_names[i] for i in ds.labels[:4]] == ["normal", "ventricular", "normal",
                                                          "normal"]
    np.testing.assert_array_equal(ds.groups, ["201"] * 4 + ["202"] * 4)


def test_wfdb_errors(tmp_path, rng):
    write_wfdb(tmp_path, "300", rng.standard_normal(1000), 100, [0], ["+"], ["(N"])
    with pytest.raises(DataError, match="longer than the record") as err:
        read_wfdb(tmp_path / "300", window_seconds=20)
    assert err.value.field == "window" and "300.atr" in err.value.path
    with pytest.raises(DataError, match="not found") as err:
        read_wfdb(tmp_path / "300", window_seconds=5, channel="II")
    assert err.value.field == "channel"
    with pytest.raises(DataError, match="not in label_map"):
        read_wfdb(tmp_path / "300", window_seconds=5, label_map={"AFIB": "af"})
    with pytest.raises(DataError, match="no beat annotations"):
        read_wfdb(tmp_path / "300", window_seconds=5, label_source="beat")
    for seconds in ({"window_seconds": 0}, {"window_seconds": 5, "stride_seconds": 0.001}):
        with pytest.raises(DataError, match="expected at least one sample each") as err:
            read_wfdb(tmp_path / "300", **seconds)
        assert err.value.field == "window"
    with pytest.raises(DataError, match="not a regular expression") as err:
        read_wfdb(tmp_path / "300", window_seconds=5, group_pattern="(")
    assert err.value.field == "group_pattern"
    dat = tmp_path / "300.dat"
    dat.write_bytes(dat.read_bytes()[:100])  # truncated signal file
    with pytest.raises(DataError, match="cannot be read as a WFDB record") as err:
        read_wfdb(tmp_path / "300", window_seconds=5)
    assert err.value.path.endswith("300.hea")


# ----------------------------------------------------------------------------------------------
# EDF / EDF+


def write_edf(path, signals, fs, labels, annotations=()):
    pyedflib = pytest.importorskip("pyedflib")
    headers = pyedflib.highlevel.make_signal_headers(labels, sample_frequency=fs,
                                                     physical_min=-500, physical_max=500)
    writer = pyedflib.EdfWriter(str(path), len(labels), file_type=pyedflib.FILETYPE_EDFPLUS)
    if labels:
        writer.setSignalHeaders(headers)
        writer.writeSamples(list(signals))
    for onset, duration, text in annotations:
        writer.writeAnnotation(onset, duration, text)
    writer.close()


STAGES = [(0, 30, "Sleep stage W"), (30, 60, "Sleep stage 2"), (45, -1, "Lights off"),
          (90, 30, "Sleep stage R"), (120, 30, "Sleep stage ?")]


def test_edf_epochs_from_own_annotations(tmp_path, rng):
    eeg = 50 * rng.standard_normal(150 * 100)
    write_edf(tmp_path / "night.edf", [0.1 * eeg, eeg], 100, ["EOG", "EEG Fpz-Cz"], STAGES)
    ds = read_dataset(tmp_path / "night.edf", channel="EEG Fpz-Cz")
    assert ds.signals.shape == (4, 3000) and ds.sample_rate == 100.0
    assert [ds.class_names[i] for i in ds.labels] == ["W", "N2", "N2", "REM"]
    np.testing.assert_allclose(ds.signals[1], eeg[3000:6000], atol=0.02)
    assert set(ds.groups) == {"night"}


def test_edf_separate_hypnogram_and_folder(tmp_path, rng):
    for subject in ("SC4001", "SC4011"):
        write_edf(tmp_path / f"{subject}E0-PSG.edf", [rng.standard_normal(150 * 50)], 50,
                  ["EEG Fpz-Cz"])
        write_edf(tmp_path / f"{subject}EC-Hypnogram.edf", [], 50, [], STAGES)
    ds = read_edf(tmp_path / "SC4001E0-PSG.edf",
                  hypnogram=tmp_path / "SC4001EC-Hypnogram.edf")
    assert [ds.class_names[i] for i in ds.labels] == ["W", "N2", "N2", "REM"]
    ds = read_dataset(tmp_path, group_pattern=r"SC4(\d\d)")  # pairs found by name
    assert len(ds) == 8 and ds.signals.shape[1] == 1500
    np.testing.assert_array_equal(ds.groups, ["00"] * 4 + ["01"] * 4)


def test_edf_errors(tmp_path, rng):
    write_edf(tmp_path / "plain.edf", [rng.standard_normal(3000)], 100, ["EEG"])
    with pytest.raises(DataError, match="no sleep-stage annotations"):
        read_edf(tmp_path / "plain.edf")
    write_edf(tmp_path / "odd.edf", [rng.standard_normal(3000)], 100, ["EEG"],
              [(0, 30, "Sleep stage 5")])
    with pytest.raises(DataError, match="not in label_map"):
        read_edf(tmp_path / "odd.edf")
    with pytest.raises(DataError, match="expected one of \\['EEG'\\]"):
        read_edf(tmp_path / "odd.edf", channel="EOG")
    with pytest.raises(DataError, match="expected at least one sample each"):
        read_edf(tmp_path / "odd.edf", epoch_seconds=0, label_map={"Sleep stage 5": "N5"})
    (tmp_path / "junk.edf").write_bytes(b"0       not an edf header" * 4)
    with pytest.raises(DataError, match="cannot be read as EDF") as err:
        read_edf(tmp_path / "junk.edf")
    assert err.value.path.endswith("junk.edf") and err.value.field == "file"


# ----------------------------------------------------------------------------------------------
# Files without labels: labels='required' refuses them, 'optional' marks them UNLABELLED


def assert_unlabelled(ds, class_names=()):
    assert ds.labels.dtype == np.int64 and (ds.labels == UNLABELLED).all()
    assert ds.class_names == list(class_names) and not ds.has_labels
    assert ds.class_counts().tolist() == [0] * len(class_names)


def test_unlabelled_npz_and_npy(tmp_path, rng):
    X = rng.standard_normal((4, 30)).astype(np.float32)
    np.savez(tmp_path / "new.npz", X=X, fs=50.0)
    with pytest.raises(DataError, match="is missing") as err:
        read_dataset(tmp_path / "new.npz")  # training's default: labels are required
    assert err.value.field == "y" and err.value.path.endswith("new.npz")
    ds = read_dataset(tmp_path / "new.npz", labels="optional", class_names=["a", "b"])
    np.testing.assert_array_equal(ds.signals, X)
    assert_unlabelled(ds, ["a", "b"])
    assert ds.sample_rate == 50.0
    np.savez(tmp_path / "y.npz", X=X, y=["b", "a", "b", "a"])
    ds = read_dataset(tmp_path / "y.npz", labels="optional")  # labels it has are read
    assert ds.labels.tolist() == [1, 0, 1, 0] and ds.has_labels
    assert_unlabelled(read_dataset(tmp_path / "y.npz", labels="none"))

    np.save(tmp_path / "big.npy", X)
    with pytest.raises(DataError, match="no labels file big.labels.csv") as err:
        read_dataset(tmp_path / "big.npy")
    assert err.value.field == "labels"
    ds = read_dataset(tmp_path / "big.npy", labels="optional")
    assert isinstance(ds.signals, np.memmap)
    np.testing.assert_array_equal(np.asarray(ds.signals), X)
    assert_unlabelled(ds)
    write_csv(tmp_path / "big.labels.csv", [["group"], ["p1"], ["p1"], ["p2"], ["p2"]])
    with pytest.raises(DataError, match="no 'label' column") as err:
        read_dataset(tmp_path / "big.npy")
    ds = read_dataset(tmp_path / "big.npy", labels="optional")
    assert_unlabelled(ds)
    np.testing.assert_array_equal(ds.groups, ["p1", "p1", "p2", "p2"])


def test_unlabelled_csv(tmp_path, rng):
    X = np.round(rng.standard_normal((3, 6)), 4)
    write_csv(tmp_path / "h.csv", [[f"s{j}" for j in range(6)], *X.tolist()])
    ds = read_dataset(tmp_path / "h.csv", labels="optional", class_names=["x", "y"])
    np.testing.assert_allclose(ds.signals, X, rtol=1e-6)  # every column is a sample
    assert_unlabelled(ds, ["x", "y"])
    # required: the first column is the label (UCR rule), and sample values are no labels
    with pytest.raises(DataError, match="non-integer numbers like") as err:
        read_dataset(tmp_path / "h.csv")
    assert err.value.field == "label" and str(err.value).endswith(
        "a file without labels can be read with labels='none' to predict on (train.py predict "
        "--reader-option labels=none)")  # the reader's option and train.py's flag for it

    write_csv(tmp_path / "n.csv", X.tolist())  # no header: labels='optional' keeps UCR layout
    with pytest.raises(DataError, match="non-integer numbers"):
        read_dataset(tmp_path / "n.csv", labels="optional", class_names=["x", "y"])
    ds = read_dataset(tmp_path / "n.csv", labels="none")
    np.testing.assert_allclose(ds.signals, X, rtol=1e-6)
    assert_unlabelled(ds)
    with pytest.raises(DataError, match="labels='none'") as err:
        read_dataset(tmp_path / "n.csv", labels="none", label_column=0)
    assert err.value.field == "label_column"

    rows = [["group", "a", "b", "c"], ["p1", 1, 2, 3], ["p2", 4, 5, ""]]
    write_csv(tmp_path / "g.tsv", rows, delimiter="\t")
    ds = read_dataset(tmp_path / "g.tsv", labels="optional")
    assert [list(s) for s in ds.signals] == [[1, 2, 3], [4, 5]]
    np.testing.assert_array_equal(ds.groups, ["p1", "p2"])
    assert_unlabelled(ds)
    write_csv(tmp_path / "l.csv", [["label", "a", "b"], ["y", 1, 2], ["x", 3, 4]])
    ds = read_dataset(tmp_path / "l.csv", labels="optional", class_names=["x", "y"])
    assert ds.labels.tolist() == [1, 0]


def test_unlabelled_ts(tmp_path, rng):
    series = [rng.standard_normal(n) for n in (7, 5)]
    lines = ["@problemName New", "@univariate true", "@equalLength false", "@classLabel false",
             "@data", *(",".join(repr(float(v)) for v in s) for s in series)]
    (tmp_path / "new.ts").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="is missing or false") as err:
        read_dataset(tmp_path / "new.ts")
    assert err.value.field == "@classLabel" and err.value.path.endswith("new.ts")
    ds = read_ts(tmp_path / "new.ts", labels="optional", class_names=["1", "2"])
    for got, want in zip(ds.signals, series, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert_unlabelled(ds, ["1", "2"])
    write_ts(tmp_path / "l.ts", [(rng.standard_normal(4), lab) for lab in "21"])
    assert read_dataset(tmp_path / "l.ts", labels="optional").labels.tolist() == [1, 0]
    assert_unlabelled(read_dataset(tmp_path / "l.ts", labels="none"), ["1", "2"])


def test_unlabelled_wfdb(tmp_path, rng):
    signal = rng.standard_normal(6000)
    write_wfdb(tmp_path, "100", signal, 100, [0, 2400], ["+"] * 2, ["(N", "(AFIB"])
    (tmp_path / "100.atr").unlink()
    with pytest.raises(DataError, match="does not exist") as err:
        read_wfdb(tmp_path / "100", window_seconds=10)
    assert err.value.path.endswith("100.atr")
    ds = read_wfdb(tmp_path / "100", window_seconds=10, labels="optional")
    assert ds.signals.shape == (6, 1000) and ds.sample_rate == 100.0
    np.testing.assert_allclose(ds.signals[2], signal[2000:3000], atol=1e-3)
    assert_unlabelled(ds)
    # a folder: annotated records keep their labels, and with 'optional' no window is skipped
    write_wfdb(tmp_path, "101", signal[:4000], 100, [1500], ["+"], ["(AFIB"])
    ds = read_dataset(tmp_path, window_seconds=10, labels="optional", class_names=["AFIB", "N"])
    np.testing.assert_array_equal(ds.groups, ["100"] * 6 + ["101"] * 4)
    assert ds.labels.tolist() == [UNLABELLED] * 7 + [0, 0, 0]  # 101's first window: no rhythm
    with pytest.raises(DataError, match="single class 'AFIB'"):  # required: only 101 is read
        read_dataset(tmp_path, window_seconds=10)


def test_unlabelled_edf(tmp_path, rng):
    eeg = 50 * rng.standard_normal(95 * 100)
    write_edf(tmp_path / "plain.edf", [eeg], 100, ["EEG"])
    ds = read_edf(tmp_path / "plain.edf", labels="optional", class_names=["W", "N2"])
    assert ds.signals.shape == (3, 3000)  # fixed 30 s epochs, the last 5 s left over
    np.testing.assert_allclose(ds.signals[2], eeg[6000:9000], atol=0.02)
    assert_unlabelled(ds, ["W", "N2"])
    eeg = 50 * rng.standard_normal(150 * 100)
    write_edf(tmp_path / "night.edf", [eeg], 100, ["EEG"], STAGES)
    ds = read_edf(tmp_path / "night.edf", labels="optional", class_names=["N2", "REM", "W"])
    assert ds.labels.tolist() == [2, 0, 0, 1, UNLABELLED]  # 'Sleep stage ?' is kept unlabelled
    assert_unlabelled(read_edf(tmp_path / "night.edf", labels="none"))


def test_label_mode_and_partial_labels(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((2, 3)), y=[0, 1])
    with pytest.raises(DataError, match="expected one of \\('required', 'optional', 'none'\\)"):
        read_dataset(tmp_path / "d.npz", labels="maybe")
    ds = build_dataset("f.csv", np.zeros((3, 4)), ["b", None, "a"], class_names=["a", "b"])
    assert ds.labels.tolist() == [1, UNLABELLED, 0] and not ds.has_labels
    assert ds.class_counts().tolist() == [1, 1]
    assert ds.subset(np.array([1])).labels.tolist() == [UNLABELLED]


# ----------------------------------------------------------------------------------------------
# Bad input, format by format: a DataError naming file and field, never a library traceback


def test_empty_files(tmp_path):
    for name in ("e.csv", "e.npz", "e.npy", "e.ts", "e.edf", "e.tsv"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match="is empty") as err:
            read_dataset(tmp_path / name)
        assert err.value.path.endswith(name) and err.value.field == "file"


def test_wrong_shapes(tmp_path):
    np.savez(tmp_path / "flat.npz", X=np.zeros(10), y=np.zeros(10))
    with pytest.raises(DataError, match=r"shape \(10,\); expected \(N, T\)") as err:
        read_dataset(tmp_path / "flat.npz")
    assert err.value.field == "X"
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match="expected \\(N, T\\)"):
        read_dataset(tmp_path / "cube.npy")
    np.savez(tmp_path / "none.npz", X=np.zeros((0, 5)), y=np.zeros(0, dtype=np.int64),
             class_names=["a", "b"])
    with pytest.raises(DataError, match="holds no signals") as err:
        read_dataset(tmp_path / "none.npz")
    assert err.value.field == "X"
    np.savez(tmp_path / "lens.npz", X=np.zeros(10), lengths=[4, 4], y=["a", "b"])
    with pytest.raises(DataError, match="sum to 8") as err:
        read_dataset(tmp_path / "lens.npz")
    assert err.value.field == "lengths"


def test_nan_refused_dropped_or_interpolated(tmp_path, caplog):
    X = np.arange(12, dtype=np.float64).reshape(3, 4)
    X[1, 2], X[2, :] = np.inf, np.nan
    np.savez(tmp_path / "n.npz", X=X, y=["a", "b", "a"])
    with pytest.raises(DataError, match="2 of 3 signals contain NaN/Inf") as err:
        read_dataset(tmp_path / "n.npz")
    assert err.value.field == "X"
    with caplog.at_level(logging.WARNING):
        ds = read_dataset(tmp_path / "n.npz", nan_policy="interpolate")
    assert "interpolated NaN/Inf samples in 1 of 3 signals, dropped 1" in caplog.text
    np.testing.assert_array_equal(ds.signals, [[0, 1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(DataError, match="nan_policy"):
        read_dataset(tmp_path / "n.npz", nan_policy="zero")


def test_label_count_mismatch(tmp_path):
    np.savez(tmp_path / "c.npz", X=np.zeros((4, 5)), y=["a", "b", "a"])
    with pytest.raises(DataError, match="3 labels for 4 signals") as err:
        read_dataset(tmp_path / "c.npz")
    assert err.value.field == "y"
    np.save(tmp_path / "c.npy", np.zeros((4, 5)))
    write_csv(tmp_path / "c.labels.csv", [["label"], ["a"], ["b"]])
    with pytest.raises(DataError, match="2 labels for 4 signals") as err:
        read_dataset(tmp_path / "c.npy")
    assert err.value.path.endswith("c.labels.csv")


def test_single_class(tmp_path):
    write_csv(tmp_path / "one.csv", [["label", "x", "y"], ["a", 1, 2], ["a", 3, 4]])
    with pytest.raises(DataError, match="single class 'a'") as err:
        read_dataset(tmp_path / "one.csv")
    assert err.value.field == "label"


def test_unknown_and_inconsistent_labels(tmp_path):
    write_ts(tmp_path / "u.ts", [([1.0, 2.0], "1"), ([3.0, 4.0], "3")])
    with pytest.raises(DataError, match=r"unknown labels \['3'\]"):
        read_dataset(tmp_path / "u.ts")
    write_csv(tmp_path / "i.csv", [["label", "x"], ["AFIB", 1], ["afib", 2], ["N", 3]])
    with pytest.raises(DataError, match="inconsistent label spellings"):
        read_dataset(tmp_path / "i.csv")
    with pytest.raises(DataError, match=r"inconsistent label spellings \[\['N', 'n'\]\]"):
        encode_labels(["N", "V"], "test.csv", "label", class_names=["V", "n"])
    labels, names = encode_labels(["1", "1.0", " 2"], "f.csv", "label")  # numbers by value
    assert names == ["1", "2"] and labels.tolist() == [0, 0, 1]
    with pytest.raises(DataError, match="label 1 is empty"):
        encode_labels(["a", " ", "b"], "f.csv", "label")
    labels, names = encode_labels([2.0, 1.0, 2.0], "f.npz", "y")
    assert names == ["1", "2"] and labels.tolist() == [1, 0, 1]
    with pytest.raises(DataError, match="non-integer numbers like -3e-05") as err:
        encode_labels(["1", "0.25", "-3e-05"], "f.csv", "label")  # samples, not classes
    assert err.value.field == "label"


def test_unreadable_and_truncated_files(tmp_path):
    np.savez(tmp_path / "t.npz", X=np.zeros((3, 4)), y=[0, 1, 0])
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot be read") as err:
        read_dataset(tmp_path / "t.npz")
    assert err.value.path.endswith("t.npz") and err.value.field == "file"
    np.save(tmp_path / "t.npy", np.zeros((10, 50)))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:300])
    with pytest.raises(DataError, match="cannot be read"):
        read_dataset(tmp_path / "t.npy")
    (tmp_path / "t.ts").write_text("@problemName T\n@classLabel true 1 2\n")
    with pytest.raises(DataError, match="@data") as err:
        read_dataset(tmp_path / "t.ts")
    (tmp_path / "b.csv").write_bytes(b"label,x\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="UTF-8"):
        read_dataset(tmp_path / "b.csv")
    write_csv(tmp_path / "s.csv", [["label", "x", "y"], ["a", 1, "oops"], ["b", 2, 3]])
    with pytest.raises(DataError, match="sample 1 is 'oops'") as err:
        read_dataset(tmp_path / "s.csv")
    assert err.value.field == "line 2"


def test_dispatch_errors(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"data")
    with pytest.raises(DataError, match="unknown file type '.parquet'"):
        read_dataset(tmp_path / "x.parquet")
    write_csv(tmp_path / "ok.csv", [["label", "x"], ["a", 1], ["b", 2]])
    with pytest.raises(DataError, match="not options of the csv reader") as err:
        read_dataset(tmp_path / "ok.csv", lable_column="label")
    assert err.value.field == "options"
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "missing.npz")
    for missing in ("missing", "missing_dir/"):  # no extension to pick a reader by
        with pytest.raises(DataError, match="does not exist") as err:
            read_dataset(tmp_path / missing)
        assert err.value.field == "file"
    np.savez(tmp_path / "r.npz", X=np.zeros((2, 3)), y=[0, 1], fs=-5)
    with pytest.raises(DataError, match="positive number of Hz") as err:
        read_dataset(tmp_path / "r.npz")
    assert err.value.field == "fs"


def test_data_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(DataError("a.csv", "label", "is bad")))
    assert (err.path, err.field, str(err)) == ("a.csv", "label", "a.csv [label]: is bad")


# ----------------------------------------------------------------------------------------------
# Inputs read as they are meant: BOMs, delimiters, exact labels, the reader that was asked for


def test_large_integer_labels_stay_apart(tmp_path):
    X = np.arange(24, dtype=np.float32).reshape(6, 4)
    y = np.array([5, 10**17, 10**17 + 1, 5, 10**17, 10**17 + 1], dtype=np.int64)
    np.savez(tmp_path / "big.npz", X=X, y=y)
    ds = read_dataset(tmp_path / "big.npz")  # float() keys would merge the last two
    assert ds.class_names == ["5", "100000000000000000", "100000000000000001"]
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    write_csv(tmp_path / "big.csv", [[label, *row] for label, row in zip(y, X, strict=True)])
    assert read_dataset(tmp_path / "big.csv").labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_text_labels_stay_text(tmp_path):
    # float() reads these as numbers; in a label column they are names
    labels, names = encode_labels(["1_000", "10", "1_000", "\u0661"], "f.csv", "label")
    assert names == ["10", "1_000", "\u0661"] and labels.tolist() == [1, 0, 1, 2]
    labels, names = encode_labels(["AFIB", "N", "N"], "f.npz", "y")
    assert names == ["AFIB", "N"] and labels.tolist() == [0, 1, 1]
    np.savez(tmp_path / "codes.npz", X=np.zeros((4, 3)), y=np.array(["007", "7", "N", "7.0"]))
    ds = read_dataset(tmp_path / "codes.npz")  # leading zeros: an identifier, not 7
    assert ds.class_names == ["007", "7", "N"] and ds.labels.tolist() == [0, 1, 2, 1]


def test_utf8_bom_is_not_part_of_the_first_cell(tmp_path):
    rows = "1,0.5,0.25,0.75\n2,1.5,1.0,0.5\n1,0.1,0.2,0.3\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    ds = read_dataset(tmp_path / "bom.csv")
    assert ds.class_names == ["1", "2"] and ds.labels.tolist() == [0, 1, 0]  # no '\ufeff1'
    (tmp_path / "head.csv").write_bytes(b"\xef\xbb\xbflabel,a,b\nx,1,2\ny,3,4\n")
    assert read_dataset(tmp_path / "head.csv").class_names == ["x", "y"]  # 'label' found
    write_ts(tmp_path / "bom.ts", [([1.0, 2.0], "1"), ([3.0, 4.0], "2")])
    (tmp_path / "bom.ts").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "bom.ts").read_bytes())
    assert read_dataset(tmp_path / "bom.ts").labels.tolist() == [0, 1]


def test_semicolon_delimiter_is_found_or_named(tmp_path, caplog):
    write_csv(tmp_path / "semi.csv", [["1", 0.5, 1.5], ["2", 2.5, 3.5]], delimiter=";")
    with caplog.at_level(logging.INFO):
        ds = read_dataset(tmp_path / "semi.csv")
    assert "read with delimiter ';'" in caplog.text
    np.testing.assert_array_equal(ds.signals, [[0.5, 1.5], [2.5, 3.5]])
    # told to split at ',': the message names the delimiter the file uses
    with pytest.raises(DataError, match="pass delimiter=';'") as err:
        read_dataset(tmp_path / "semi.csv", delimiter=",")
    assert err.value.field == "delimiter"
    # decimal commas: ',' is in line 1, so it is kept, and the bad cell says ';' is around
    (tmp_path / "comma.csv").write_text("1;0,5;1,5\n2;2,5;3,5\n")
    with pytest.raises(DataError, match="cells seem separated by ';'"):
        read_dataset(tmp_path / "comma.csv")


def test_a_format_that_does_not_fit_the_file_says_what_it_is(tmp_path):
    write_csv(tmp_path / "d.csv", [["1", 0.5, 1.5], ["2", 2.5, 3.5]])
    with pytest.raises(DataError, match=r"is not an \.npz file \(np\.savez output\): it is "
                                        r"text; expected the reader for its format "
                                        r"\(--format csv") as err:
        read_dataset(tmp_path / "d.csv", format="npz")  # np.load: 'contains pickled data'
    assert err.value.field == "file"
    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    with pytest.raises(DataError, match="it is a NumPy .npy file; expected --format npy "):
        read_dataset(tmp_path / "a.npy", format="npz")
    np.savez(tmp_path / "z.npz", X=np.zeros((2, 3)), y=[0, 1])
    with pytest.raises(DataError, match="it is a NumPy .npz file; expected --format npz "):
        read_dataset(tmp_path / "z.npz", format="npy")
    with pytest.raises(DataError, match=r"is a \.csv file, not a WFDB record") as err:
        read_dataset(tmp_path / "d.csv", format="wfdb")
    assert err.value.field == "format"


def test_ctrl_c_inside_wfdb_is_not_swallowed(tmp_path, rng, monkeypatch):
    # wfdb's rdann reads the header inside a bare `except:`: a Ctrl-C that landed there
    # vanished, and train.py read on and trained with exit 0
    import signal
    import traceback

    annotation = import_wfdb().io.annotation
    for name in ("100", "101"):
        write_wfdb(tmp_path, name, rng.standard_normal(3000), 100, [0, 2000], ["+"] * 2,
                   ["(N", "(AFIB"])
    real = annotation.record.rdheader

    def rdheader(*args, **kwargs):
        if traceback.extract_stack()[-2].name == "rdann":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, inside rdann's header read
        return real(*args, **kwargs)

    monkeypatch.setattr(annotation.record, "rdheader", rdheader)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        read_dataset(tmp_path, window_seconds=10)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    monkeypatch.undo()
    assert len(read_dataset(tmp_path, window_seconds=10)) == 6  # and without a Ctrl-C, read


def test_wfdb_record_name_form_and_skipped_records(tmp_path, rng, caplog):
    from data.formats import source_exists

    signal = rng.standard_normal(3000)
    for name in ("100", "101"):
        write_wfdb(tmp_path, name, signal, 100, [0, 2000], ["+"] * 2, ["(N", "(AFIB"])
    assert source_exists(tmp_path / "100") and not source_exists(tmp_path / "999")
    assert len(read_dataset(tmp_path / "100", window_seconds=10)) == 3  # records/100
    write_wfdb(tmp_path, "102", signal, 100, [0], ["+"], ["(N"])
    (tmp_path / "102.atr").unlink()
    (tmp_path / "RECORDS").write_text("100\n101\n102\n")
    with caplog.at_level(logging.WARNING):
        ds = read_dataset(tmp_path, window_seconds=10)
    assert set(ds.groups) == {"100", "101"}
    assert "RECORDS lists 1 record(s) without a .atr annotation, skipped: 102" in caplog.text


def test_links_that_loop_are_refused_by_name(tmp_path, rng):
    write_wfdb(tmp_path, "100", rng.standard_normal(3000), 100, [0], ["+"], ["(N"])
    write_wfdb(tmp_path, "101", rng.standard_normal(3000), 100, [0], ["+"], ["(AFIB"])
    (tmp_path / "101.atr").unlink()
    (tmp_path / "101.atr").symlink_to(tmp_path / "101.atr")  # a link to itself
    with pytest.raises(DataError, match="is a symbolic link that loops") as err:
        read_dataset(tmp_path, window_seconds=10)  # not a silent drop of record 101
    assert err.value.path.endswith("101.atr")
    (tmp_path / "gone.edf").symlink_to(tmp_path / "nowhere.edf")
    with pytest.raises(DataError, match="is a symbolic link that points to nothing"):
        read_edf(tmp_path / "gone.edf")


# Signal names: what prediction reports instead of the index


def test_names_from_npz_npy_and_csv(tmp_path, rng):
    X = rng.standard_normal((3, 20)).astype(np.float32)
    np.savez(tmp_path / "ids.npz", X=X, y=[0, 1, 0], ids=np.array(["p7", "p8", "p9"]))
    assert read_dataset(tmp_path / "ids.npz").names.tolist() == ["p7", "p8", "p9"]
    np.savez(tmp_path / "rn.npz", X=X, record_names=np.array([101, 102, 103]))
    ds = read_dataset(tmp_path / "rn.npz", labels="optional")
    assert ds.names.tolist() == ["101", "102", "103"]
    np.savez(tmp_path / "plain.npz", X=X, y=[0, 1, 0])
    assert read_dataset(tmp_path / "plain.npz").names is None  # the index is the id then
    np.savez(tmp_path / "bad.npz", X=X, y=[0, 1, 0], ids=np.array(["a", "b"]))
    with pytest.raises(DataError, match="has 2 names for 3 signals") as err:
        read_dataset(tmp_path / "bad.npz")
    assert err.value.field == "ids"

    np.save(tmp_path / "big.npy", X)
    write_csv(tmp_path / "big.labels.csv", [["id", "label"], ["r1", "a"], ["r2", "b"],
                                            ["r3", "a"]])
    assert read_dataset(tmp_path / "big.npy").names.tolist() == ["r1", "r2", "r3"]

    rows = [["id", "label", "s0", "s1", "s2"], ["rec-a", "x", 1, 2, 3], ["rec-b", "y", 4, 5, 6]]
    write_csv(tmp_path / "d.csv", rows)
    ds = read_dataset(tmp_path / "d.csv")
    assert ds.names.tolist() == ["rec-a", "rec-b"]  # and the id is no sample
    np.testing.assert_array_equal(ds.signals, [[1, 2, 3], [4, 5, 6]])
    write_csv(tmp_path / "o.csv", [["label", "code", "s0", "s1"], ["x", "k1", 1, 2],
                                   ["y", "k2", 3, 4]])
    assert read_dataset(tmp_path / "o.csv", id_column="code").names.tolist() == ["k1", "k2"]
    assert read_dataset(tmp_path / "o.csv", id_column=1).signals.tolist() == [[1, 2], [3, 4]]


def test_names_follow_dropped_signals_subsets_and_resampling(tmp_path, rng):
    from data.transforms import filter_dataset, resample_dataset

    X = rng.standard_normal((4, 200))
    X[1, 3] = np.nan
    np.savez(tmp_path / "n.npz", X=X, y=[0, 1, 0, 1], ids=np.array(["a", "b", "c", "d"]),
             fs=100.0)
    ds = read_dataset(tmp_path / "n.npz", nan_policy="drop")
    assert ds.names.tolist() == ["a", "c", "d"]
    assert ds.subset(np.array([2, 0])).names.tolist() == ["d", "a"]
    assert resample_dataset(ds, 50.0).names.tolist() == ["a", "c", "d"]
    assert filter_dataset(ds, (1.0, 20.0)).names.tolist() == ["a", "c", "d"]


def test_names_of_wfdb_and_edf_windows(tmp_path, rng):
    write_wfdb(tmp_path, "100", rng.standard_normal(3000), 100, [0, 1000], ["+"] * 2,
               ["(N", "(AFIB"])
    ds = read_wfdb(tmp_path / "100", window_seconds=10)
    assert ds.names.tolist() == ["100@0s", "100@10s", "100@20s"]
    ds = read_wfdb(tmp_path / "100", window_seconds=10, stride_seconds=7.5)
    assert ds.names.tolist() == ["100@0s", "100@7.5s", "100@15s"]
    eeg = 50 * rng.standard_normal(150 * 100)
    write_edf(tmp_path / "night.edf", [eeg], 100, ["EEG"], STAGES)
    ds = read_edf(tmp_path / "night.edf")  # epoch 4 ('Sleep stage ?') is skipped
    assert ds.names.tolist() == ["night@0s", "night@30s", "night@60s", "night@90s"]


def test_links_that_loop_or_point_nowhere_are_named_as_such(tmp_path):
    from data.formats import source_exists, why_missing

    loop, dangling = tmp_path / "loop.csv", tmp_path / "dangling.csv"
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / "nowhere.csv")
    assert not source_exists(loop) and not source_exists(dangling)
    assert why_missing(loop) == "is a symbolic link that loops; expected a link to the file"
    assert why_missing(dangling) == (f"is a symbolic link to {tmp_path / 'nowhere.csv'}, "
                                     "which does not exist")
    assert why_missing(tmp_path / "absent.csv") == "does not exist"
