"""Annotated long recordings: WFDB records and EDF/EDF+ files, cut into labelled windows."""

from __future__ import annotations

import errno
import importlib
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data.formats.core import (
    DataError,
    SignalDataset,
    _require_nonempty,
    build_dataset,
    check_label_mode,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Annotated long recordings: WFDB and EDF


@contextmanager
def _ctrl_c_kept() -> Iterator[None]:
    """Raise KeyboardInterrupt on leaving if Ctrl-C was pressed inside, even where a library
    swallowed it: wfdb's rdann reads the header inside a bare `except:`, so a Ctrl-C that
    landed there vanished and the run went on. Only where Python's own handler is installed
    (the main thread of train.py or a script), so a program's own handler is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pressed = []

    def on_ctrl_c(signum, frame) -> None:
        pressed.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:  # reached only when the KeyboardInterrupt was swallowed on the way
        raise KeyboardInterrupt


def _optional_package(name: str, path):
    """Import wfdb or pyedflib, optional dependencies (requirements-formats.txt)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise DataError(path, "format", f"reading it needs the optional package {name}, which "
                                        "is not installed; expected `pip install -r "
                                        "requirements-formats.txt`") from e


def _compile_group_pattern(pattern: str | None, path) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise DataError(path, "group_pattern", f"{pattern!r} is not a regular expression ({e}); "
                                               r"expected one like r'SC4(\d\d)'") from e


def _check_seconds(value: float | None, path, field: str) -> None:
    """Refuse a window, stride or epoch length of inf or NaN seconds, which would fail inside
    round() (zero and negative lengths are refused as windows shorter than a sample)."""
    if value is not None and not math.isfinite(value):
        raise DataError(path, field, f"is {value!r}; expected a positive, finite number of "
                                     "seconds")


def _group_id(name: str, pattern: re.Pattern | None) -> str:
    """Record name -> group id; pattern's first capture group, e.g. r'SC4(\\d\\d)' = subject."""
    if pattern is None:
        return name
    match = pattern.search(name)
    return match.group(1) if match and match.groups() else name


def _labelled_windows(signal: np.ndarray, window: int, stride: int, spans=None, events=None,
                      label_map: Mapping[str, str | None] | None = None, path="",
                      field: str = "annotation", keep_unlabelled: bool = False):
    """Cut a record into windows; label each from spans (start, end, label) by coverage or
    from events (sample, label) by majority; with neither, no window has a label.

    Returns (windows (n, window) or None, labels: a name per window, None where it has none,
    starts (n,) samples). Windows without a label are dropped unless keep_unlabelled.
    """
    # Local import: transforms imports DataError from this package.
    from data.transforms import label_windows_by_events, label_windows_by_spans, window_starts

    if window < 1 or stride < 1:
        raise DataError(path, "window", f"window of {window} and stride of {stride} samples; "
                                        "expected at least one sample each (positive "
                                        "window_seconds, stride_seconds, epoch_seconds)")
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
    return windows, [names[i] if i >= 0 else None for i in index], starts


# MIT-BIH beat annotation codes (the others are rhythm, noise and comment markers).
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")


def _check_link(path: Path) -> None:
    """Refuse a symbolic link that loops or points nowhere: Path.exists() calls it missing,
    which would drop its record without a word."""
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as e:
            why = "loops" if e.errno == errno.ELOOP else "points to nothing"
            raise DataError(path, "file", f"is a symbolic link that {why} ({e.strerror}); "
                                          "expected a link to the record's file") from e


def _wfdb_records(path: Path, annotation: str, labels: str) -> list[Path]:
    """The records at path (a record or a folder); with labels='required' only, and all,
    with an annotation file. Records skipped for want of one are logged by name."""
    need = labels == "required"
    if path.is_dir():
        listing = path / "RECORDS"
        try:
            names = (listing.read_text(encoding="utf-8-sig").split() if listing.exists()
                     else sorted(p.stem for p in path.glob("*.hea")))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(listing, "file", f"cannot be read ({e}); expected record names, "
                                             "one per line") from e
        for name in names:
            for ext in ("hea", annotation):
                _check_link(path / f"{name}.{ext}")
        records = [path / n for n in names if not need or (path / f"{n}.{annotation}").exists()]
        skipped = [n for n in names if path / n not in records]
        if skipped:
            source = "RECORDS lists" if listing.exists() else "the folder holds"
            log.warning("%s: %s %d record(s) without a .%s annotation, skipped: %s%s", path,
                        source, len(skipped), annotation, " ".join(skipped[:10]),
                        " ..." if len(skipped) > 10 else "")
        if not records:
            raise DataError(path, annotation, f"no record with a .{annotation} annotation file; "
                                              "expected .hea/.dat records with annotations")
        return records
    if path.is_file() and path.suffix.lower() not in (".hea", ".dat", f".{annotation}"):
        raise DataError(path, "format", f"is a {path.suffix or 'plain'} file, not a WFDB record "
                                        "(NAME.hea with its signal files); expected the reader "
                                        "for its format")
    record = path.with_suffix("") if path.suffix.lower() in (".hea", ".dat", f".{annotation}") \
        else path
    for ext in ("hea", annotation) if need else ("hea",):
        _check_link(record.with_name(f"{record.name}.{ext}"))
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
    path = Path(path)
    check_label_mode(labels, path)
    if label_source not in ("rhythm", "beat"):
        raise DataError(path, "label_source", f"is {label_source!r}; expected 'rhythm'/'beat'")
    _check_seconds(window_seconds, path, "window_seconds")
    _check_seconds(stride_seconds, path, "stride_seconds")
    group_regex = _compile_group_pattern(group_pattern, path)
    windows, raw, groups, ids, rates = [], [], [], [], set()
    records = _wfdb_records(path, annotation, labels)  # file problems first, then the package
    wfdb = _optional_package("wfdb", path)
    for record in records:
        header = record.with_name(record.name + ".hea")
        ann_path = record.with_name(f"{record.name}.{annotation}")
        annotated = labels != "none" and ann_path.exists()
        try:
            with _ctrl_c_kept():
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
        w, names, starts = _labelled_windows(signal, window, stride, spans, events, label_map,
                                             ann_path if annotated else header,
                                             "aux_note" if label_source == "rhythm"
                                             else "symbol",
                                             keep_unlabelled=labels != "required")
        if w is not None:
            windows.append(w)
            raw += names
            groups += [_group_id(record.name, group_regex)] * len(names)
            ids += _window_names(record.name, starts, fs)
    return _annotated_dataset(path, windows, raw, groups, ids, rates, nan_policy, class_names)


def _window_names(record: str, starts: np.ndarray, fs: float) -> list[str]:
    """'100@20s': the record a window comes from and its start in seconds."""
    return [f"{record}@{start / fs:g}s" for start in starts]


def _annotated_dataset(path, windows, raw, groups, ids, rates, nan_policy, class_names):
    if len(rates) > 1:
        raise DataError(path, "sample_rate", f"records have different rates {sorted(rates)}; "
                                             "expected one rate (resample them first)")
    if not windows:  # only with labels='required': the other modes keep every window
        raise DataError(path, "labels", "no window got a label; expected annotations "
                                        "covering the recording")
    return build_dataset(path, np.concatenate(windows), raw, groups=np.array(groups),
                         sample_rate=rates.pop(), nan_policy=nan_policy,
                         class_names=class_names, signals_field="signal",
                         labels_field="annotation", names=ids)


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
    _check_link(path)
    _require_nonempty(path)
    pyedflib = _optional_package("pyedflib", path)
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
    _check_seconds(epoch_seconds, path, "epoch_seconds")
    label_map = SLEEP_STAGES if label_map is None else label_map
    group_regex = _compile_group_pattern(group_pattern, path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.edf") if "hypnogram" not in p.name.casefold())
        if not files:
            raise DataError(path, "file", "holds no .edf recordings; expected EDF files")
        pairs = [(f, None) for f in files]
    else:
        pairs = [(path, Path(hypnogram) if hypnogram is not None else None)]
    windows, raw, groups, ids, rates = [], [], [], [], set()
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
        w, names, starts = _labelled_windows(signal, epoch, epoch, spans, None, label_map,
                                             hyp or psg, "annotations",
                                             keep_unlabelled=labels != "required")
        rates.add(fs)
        if w is not None:
            windows.append(w)
            raw += names
            groups += [_group_id(psg.stem, group_regex)] * len(names)
            ids += _window_names(psg.stem, starts, fs)
    return _annotated_dataset(path, windows, raw, groups, ids, rates, nan_policy, class_names)


def _is_staged(texts, label_map: Mapping[str, str | None]) -> bool:
    """True if any text is a stage annotation (in label_map, or 'Sleep stage ...')."""
    return any(str(t) in label_map or str(t).startswith("Sleep stage") for t in texts)
