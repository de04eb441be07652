"""`SignalDataModule`: files or the synthetic set -> train/val/test DataLoaders; and
`prediction_inputs`: a file -> model inputs prepared as the training data was.

Batches are (x, y, n): x (B, L) float32, y (B,) int64 and n (B,) int64, the real samples of
each input (the rest is zero padding, which the model leaves out), with L = `signal_length`.

setup() runs once: read (with the official test set when there is one), resample, filter,
split records (stratified, and grouped by record/subject when groups exist), then serve items
under the length policy (data/transforms.py), normalised (by default with the training set's
mean and std, which keeps the signals' relative amplitude: the model z-normalises each signal
itself and keeps its level and gain as features), augmented in training only. The official
test set is never used for validation or statistics. Training reads files with
labels='required'; prediction with labels='optional' (y = -1 where unknown).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from data.formats import NAN_POLICIES, DataError, SignalDataset, read_dataset, read_train_test
from data.synthetic import SyntheticConfig, make_synthetic
from data.transforms import (
    LENGTH_POLICIES,
    filter_dataset,
    fit_length,
    make_augmentation,
    plan_windows,
    prediction_windows,
    resample_dataset,
    znormalize,
)
from utils.metrics import to_plain
from utils.options import (
    Check,
    at_least,
    check_fields,
    in_range,
    option,
    positive_finite,
    seed_range,
)

log = logging.getLogger(__name__)

NORMALIZATIONS = ("dataset", "window", "record", "none")
# Below this many training records a validation split costs more (data the model never
# learns from) than it gives (a best-epoch choice from a handful of items): train on all of
# them for the step budget and keep the last weights.
MIN_RECORDS_FOR_VALIDATION = 1000
BALANCE_MODES = ("none", "loss", "sampler")


FORMATS = Literal["npz", "npy", "csv", "tsv", "ts", "wfdb", "edf"]


@dataclass
class DataConfig:
    """Everything the data side needs; the `data:` section of a YAML config and the data flags
    of train.py are derived from these fields (utils/cli.py)."""

    source: str = option("synthetic", "'synthetic' (the built-in dataset) or a file/folder "
                         "(.npz .npy .csv .tsv .ts, WFDB, EDF; see docs/data.md)",
                         flag="data", metavar="PATH")
    test_source: str | None = option(None, "official test file (UCR *_TRAIN/*_TEST pairs are "
                                     "found alone); default: hold out test_fraction",
                                     flag="test-data", metavar="PATH")
    format: FORMATS | None = option(None, "reader for the source (default: by extension)")
    reader_options: dict[str, Any] = option(
        help="reader options, e.g. {channel: MLII}; flag: --reader-option KEY=VALUE, "
             "repeatable", flag="reader-option", metavar="KEY=VALUE", default_factory=dict)
    synthetic_num_signals: int = option(2000, "signals in the built-in dataset", at_least(14),
                                        flag="synthetic-signals", metavar="N")
    synthetic_imbalance: float = option(1.0, "built-in dataset: largest / smallest class count",
                                        in_range(1.0, float("inf")), metavar="RATIO")
    sample_rate: float | None = option(None, "resample to this rate (default: keep the source "
                                       "rate; synthetic: 125)", positive_finite(), metavar="HZ")
    length: int | None = option(None, "model input length in samples after resampling "
                                "(default: the dataset's; synthetic: 3750)", at_least(1),
                                metavar="N")
    length_policy: Literal["pad", "crop", "window"] = option(
        "pad", "records vs length: pad/truncate, random crop, or cut into windows")
    window_stride: int | None = option(None, "stride of length_policy window (default: the "
                                       "length)", at_least(1), metavar="N")
    bandpass: tuple[float, float] | None = option(None, "band-pass filter [low, high] Hz; low 0 "
                                                  "= low-pass", metavar="[LOW,HIGH]")
    notch: float | None = option(None, "notch filter at this frequency, e.g. 50 or 60 Hz mains",
                                 positive_finite(), metavar="HZ")
    normalize: Literal["dataset", "window", "record", "none"] = option(
        "dataset", "scale by the training set's mean and std (keeps relative amplitude; the "
        "model z-normalises each signal itself), z-normalise per model input or per record, "
        "or not at all")
    nan_policy: Literal["raise", "drop", "interpolate"] = option(
        "raise", "NaN samples in a record: refuse the file, drop the record, or interpolate")
    val_fraction: float | None = option(
        None, "held out for validation (best checkpoint, early stopping); 0: none, keep the "
        "last weights (default: 0.1 from 1000 training records on, else 0)",
        in_range(0.0, 1.0), metavar="F")
    test_fraction: float = option(0.15, "held out when there is no official test set",
                                  in_range(0.0, 1.0), metavar="F")
    balance: Literal["none", "loss", "sampler"] = option(
        "none", "class imbalance: class-weighted loss, or a class-balanced sampler")
    augment: bool = option(True, "random noise (and gain, with --aug-scale) on training inputs")
    # no random gain by default: amplitude separates the classes of many recordings (measured
    # on the development suite, docs/accuracy.md "No random gain by default")
    aug_scale: tuple[float, float] | None = option(None, "random gain range of augmentation "
                                                   "(default: none)", metavar="[LOW,HIGH]")
    aug_noise: float = option(0.05, "augmentation noise std (relative to the signal's)",
                              in_range(0.0, float("inf")), metavar="STD")
    aug_shift: float = option(0.0, "random circular shift, fraction of the length; 0 keeps "
                              "event positions", in_range(0.0, 1.0, high_open=False),
                              metavar="F")
    aug_slice: float = option(0.0, "window slicing: a random stretch of 1 - F to all of each "
                              "training signal, resampled to its length (0: off)",
                              in_range(0.0, 1.0), metavar="F")
    batch_size: int | None = option(None, "per device; the effective batch is this x devices x "
                                    "nodes x accumulate (default: a quarter of the training "
                                    "items, 4 to 32)", at_least(1), metavar="N")
    num_workers: int | None = option(None, "DataLoader workers per process (default: 4 where "
                                     "CUDA is available, else 0)", at_least(0), metavar="N")
    pin_memory: bool | None = option(None, "pin loader memory (default: when CUDA is "
                                     "available)")
    persistent_workers: bool = option(True, "keep loader workers between epochs (with workers)")
    seed: int = option(0, "seeds the split (and, unless run.seed is given, init, shuffles and "
                       "augmentation)", seed_range(), metavar="N")
    cv_folds: int = option(0, "K-fold cross-validation of the source (no official test set): "
                           "stratified, grouped by record/subject when the data has groups; "
                           "per-fold and mean +- sd metrics (0: one test_fraction split)",
                           Check("0 (off) or at least 2 folds",
                                 lambda v: isinstance(v, int) and (v == 0 or v >= 2)),
                           flag="cv", metavar="K")
    cv_fold: int = option(0, "the fold that is the test part (a --cv run sets it per fold)",
                          at_least(0), metavar="K")

    def __post_init__(self) -> None:
        val = self.val_fraction or 0.0
        if not 0 <= val < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError(f"val_fraction and test_fraction must be in [0, 1); got "
                             f"{self.val_fraction}, {self.test_fraction}")
        if val + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave a training part")
        if self.length is not None and self.length < 1:
            raise ValueError(f"length must be positive; got {self.length}")
        if (self.batch_size is not None and self.batch_size < 1) or (self.num_workers or 0) < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        # a misspelt choice would otherwise fall through silently (normalize='Window': none)
        for name, choices in (("length_policy", LENGTH_POLICIES), ("normalize", NORMALIZATIONS),
                              ("nan_policy", NAN_POLICIES), ("balance", BALANCE_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}; got {getattr(self, name)!r}")
        if self.cv_folds == 1 or self.cv_folds < 0 or not 0 <= self.cv_fold < max(self.cv_folds, 1):
            raise ValueError(f"cv_folds must be 0 or >= 2 and 0 <= cv_fold < cv_folds; got "
                             f"{self.cv_folds}, {self.cv_fold}")
        if self.window_stride is not None and self.window_stride < 1:  # 0 would mean 'length'
            raise ValueError(f"window_stride must be positive or None; got {self.window_stride}")
        if self.sample_rate is not None and not self.sample_rate > 0:
            raise ValueError(f"sample_rate must be positive Hz or None; got {self.sample_rate}")
        if self.reader_options.get("labels", "required") != "required":
            raise ValueError(f"reader_options labels={self.reader_options['labels']!r}: "
                             "training needs labelled data (labels='required'); unlabelled "
                             "files are for prediction")
        check_fields(self)  # the ranges the fields declare (the same checks as the CLI's)

    @property
    def workers(self) -> int:
        """num_workers, or for None 4 where CUDA is available, else 0."""
        if self.num_workers is not None:
            return self.num_workers
        return 4 if torch.cuda.is_available() else 0


class SignalItems(Dataset):
    """Items (record, start) of a record collection -> (x (L,) float32, y () int64, n () int64):
    n real samples, then zero padding up to L; y is -1 for a record without a label.

    start -1: crop position chosen per load (random if random_crop, else centred). A memmap
    is pickled as its file description, so spawned workers re-open it instead of copying it.
    """

    def __init__(self, signals, record_labels: np.ndarray, items: np.ndarray, length: int,
                 normalize: str, record_stats: np.ndarray | None = None,
                 random_crop: bool = False, transform: torch.nn.Module | None = None,
                 dataset_stats: tuple[float, float] | None = None):
        self.signals, self.record_labels, self.items = signals, record_labels, items
        self.length, self.normalize, self.record_stats = length, normalize, record_stats
        self.random_crop, self.transform = random_crop, transform
        self.dataset_stats = dataset_stats

    @property
    def labels(self) -> np.ndarray:
        """(M,) int64 label of every item."""
        return self.record_labels[self.items[:, 0]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        record, start = (int(v) for v in self.items[index])
        signal = self.signals[record]
        extra = len(signal) - self.length
        if start < 0:
            start = 0 if extra <= 0 else (int(torch.randint(0, extra + 1, ()))
                                          if self.random_crop else extra // 2)
        # a copy: a memmap slice would be read-only and tied to the file
        x = np.array(signal[start:start + self.length], dtype=np.float32)
        if self.normalize == "window":
            x = znormalize(x)
        elif self.normalize == "record":
            mean, std = self.record_stats[record]
            x = (x - mean) / std
        elif self.normalize == "dataset":
            mean, std = self.dataset_stats
            x = (x - mean) / std
        real = min(len(x), self.length)
        x = torch.from_numpy(np.ascontiguousarray(fit_length(x, self.length)))
        if self.transform is not None:
            # the signal only: noise must not fill the padding the model leaves out, and a
            # shift or slice must not move padding into the signal
            x[:real] = self.transform(x[:real])
        return (x, torch.tensor(self.record_labels[record], dtype=torch.int64),
                torch.tensor(real, dtype=torch.int64))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        signals = self.signals
        # np.memmap pickles as an in-memory copy; keep larger-than-RAM data on disk instead.
        # Readers only hand over whole C-contiguous memmaps, whose offset/shape describe them.
        if isinstance(signals, np.memmap) and signals.filename and signals.flags.c_contiguous:
            state["signals"] = ("memmap", signals.filename, signals.dtype.str, signals.shape,
                                signals.offset)
        return state

    def __setstate__(self, state: dict) -> None:
        signals = state["signals"]
        if isinstance(signals, tuple) and signals[0] == "memmap":
            _, name, dtype, shape, offset = signals
            state["signals"] = np.memmap(name, dtype=dtype, mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)


def dataset_stats(signals, records: np.ndarray) -> tuple[float, float]:
    """Mean and std (at least 1e-12) of every sample of `records`, one record in RAM at a
    time (float64 sums: a long recording's float32 sum loses its tail)."""
    total = total_sq = count = 0.0
    for r in records:
        s = np.asarray(signals[r], dtype=np.float64)
        total, total_sq, count = total + s.sum(), total_sq + np.square(s).sum(), count + s.size
    if count == 0:
        return 0.0, 1.0
    mean = total / count
    return float(mean), float(max(np.sqrt(max(total_sq / count - mean * mean, 0.0)), 1e-12))


def record_stats(signals) -> np.ndarray:
    """(N, 2) float32 mean and std (at least 1e-6) of each record, one record in RAM at a time."""
    stats = np.empty((len(signals), 2), dtype=np.float32)
    for i, s in enumerate(signals):
        s = np.asarray(s, dtype=np.float64)
        stats[i] = s.mean(), max(s.std(), 1e-6)
    return stats


def split_indices(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int,
                  source: str = "dataset", option: str = "",
                  instead: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices; about `fraction` held out, stratified by label.

    With groups, no group is on both sides (StratifiedGroupKFold with round(1/fraction)
    folds: the first fold is held out, so the fraction is approximate). Too few groups is a
    DataError naming `option` (the flag that sets the share) and `instead` (what else to pass).
    """
    index = np.arange(len(labels))
    if fraction <= 0:
        return index, index[:0]
    if groups is None:
        try:
            kept, held = train_test_split(index, test_size=fraction, stratify=labels,
                                          random_state=seed)
        except ValueError:  # a class too small to appear on both sides
            log.warning("%s: too few items per class to stratify; splitting at random", source)
            kept, held = train_test_split(index, test_size=fraction, random_state=seed)
        return np.sort(kept), np.sort(held)
    codes = np.unique(groups, return_inverse=True)[1]
    folds = max(2, round(1 / fraction))
    if codes.max() + 1 < folds:
        by = f" ({option})" if option else ""
        raise DataError(source, "groups", f"has {codes.max() + 1} records/subjects, too few to "
                                          f"hold out {fraction:.0%}{by} by group (no record "
                                          f"is on both sides); expected at least {folds} of them"
                                          + (f", or {instead}" if instead else ""))
    with warnings.catch_warnings():  # 'least populated class' warnings are expected here
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        kept, held = next(splitter.split(index, labels, codes))
    return np.sort(kept), np.sort(held)


def cv_fold_indices(labels: np.ndarray, groups: np.ndarray | None, folds: int, fold: int,
                    seed: int, source: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) record indices of fold `fold` of `folds` stratified folds; with
    groups, no group is on both sides. The same seed gives the same folds for every fold
    number, so the K runs of a cross-validation cover every record exactly once."""
    index = np.arange(len(labels))
    if groups is None:
        counts = np.bincount(labels[labels >= 0])
        largest = int(counts.max()) if len(counts) else 0
        if largest < folds:  # sklearn's own message names neither the option nor the fix
            raise DataError(source, "cv_folds", f"has at most {largest} records per class, "
                                                f"too few for {folds} stratified folds; "
                                                f"expected --cv {largest} or fewer")
        smallest = int(counts[counts > 0].min()) if len(counts) else 0
        if smallest < folds:
            log.warning("%s: the smallest class has %d records, fewer than %d folds: some "
                        "folds miss it", source, smallest, folds)
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        codes = None
    else:
        codes = np.unique(groups, return_inverse=True)[1]
        n = codes.max() + 1
        if n < folds:
            raise DataError(source, "groups", f"has {n} records/subjects, too few for {folds} "
                                              "folds by group (no record is on both sides); "
                                              + (f"expected --cv {n} or fewer" if n >= 2 else
                                                 "expected at least 2 of them"))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # 'least populated class' warnings: reported above
        warnings.simplefilter("ignore", UserWarning)
        kept, held = list(splitter.split(index, labels, codes))[fold]
    return np.sort(kept), np.sort(held)


class SignalDataModule(pl.LightningDataModule):
    """Train/val/test loaders of (x (B, L) float32, y (B,) int64) from a `DataConfig`.

    After setup(): num_classes, class_names, signal_length (L), sample_rate (Hz or None),
    class_counts (training items per class), class_weights ((C,) tensor when balance='loss',
    else None) and has_official_test.

    `SignalDataModule.for_prediction(path, trained, class_names)` makes one whose
    predict_dataloader() serves a file prepared as a checkpoint's training data was; after
    setup("predict") it knows class_names, num_classes, signal_length, sample_rate and
    `prediction` (the `PredictionInputs`, in loader order).
    """

    def __init__(self, config: DataConfig | None = None):
        super().__init__()
        self.config = config or DataConfig()
        # plain lists, not tuples: hparams.yaml stays loadable with yaml.safe_load
        self.save_hyperparameters(to_plain(asdict(self.config)))
        self._ready = False
        self._predict_request: dict[str, Any] | None = None
        self.prediction: PredictionInputs | None = None

    @classmethod
    def for_prediction(cls, path: str | Path, trained: Mapping[str, Any],
                       class_names: Sequence[str], *, format: str | None = None,
                       reader_options: Mapping[str, Any] | None = None,
                       window_stride: int | None = None,
                       batch_size: int = 64) -> SignalDataModule:
        """A data module for `trainer.predict`: `path` read and cut into model inputs as
        `prediction_inputs` does, from `trained` (a checkpoint's data settings) and the
        checkpoint's class names; reader_options {'labels': 'required'} for labelled data."""
        known = {f.name for f in fields(DataConfig)}
        settings = {k: v for k, v in trained.items() if k in known and k != "reader_options"}
        for name in ("bandpass", "aug_scale"):
            if settings.get(name) is not None:
                settings[name] = tuple(settings[name])
        module = cls(DataConfig(**{**settings, "batch_size": batch_size}))
        module._predict_request = {"path": path, "trained": dict(trained),
                                   "class_names": list(class_names), "format": format,
                                   "reader_options": dict(reader_options or {}),
                                   "window_stride": window_stride}
        return module

    # -- reading and preprocessing --------------------------------------------------------

    def _load(self) -> tuple[SignalDataset, SignalDataset | None]:
        cfg = self.config
        if cfg.source == "synthetic":
            synthetic = SyntheticConfig(num_signals=cfg.synthetic_num_signals,
                                        length=cfg.length or SyntheticConfig.length,
                                        sample_rate=cfg.sample_rate or SyntheticConfig.sample_rate,
                                        imbalance=cfg.synthetic_imbalance, seed=cfg.seed)
            return make_synthetic(synthetic), None
        options = {"nan_policy": cfg.nan_policy, **cfg.reader_options}
        return read_train_test(cfg.source, cfg.test_source, cfg.format, **options)

    def _preprocess(self, dataset: SignalDataset) -> SignalDataset:
        cfg = self.config
        if cfg.sample_rate is not None:
            dataset = resample_dataset(dataset, cfg.sample_rate)
        return filter_dataset(dataset, cfg.bandpass, cfg.notch)

    def setup(self, stage: str | None = None) -> None:
        """Read, preprocess and split once; later calls (fit, then test) reuse the result.
        A data module made by `for_prediction` reads its file instead."""
        if self._ready:
            return
        if self._predict_request is not None:
            self._setup_prediction()
            return
        cfg = self.config
        full, official_test = self._load()
        full = self._preprocess(full)
        if official_test is not None:
            official_test = self._preprocess(official_test)
        self.val_fraction = self._val_fraction(len(full), official_test is not None)
        train_idx, val_idx, test_idx = self._split(full, official_test is not None)
        length, _ = plan_windows(full.lengths[train_idx], cfg.length_policy, cfg.length,
                                 cfg.window_stride, full.source)
        self.dataset_stats = (dataset_stats(full.signals, train_idx)
                              if cfg.normalize == "dataset" else None)
        stats = self._record_stats(full)
        self.train_dataset = self._items(full, stats, train_idx, length, train=True)
        self.val_dataset = self._items(full, stats, val_idx, length, train=False)
        if official_test is not None:
            test_idx = np.arange(len(official_test))
            self.test_dataset = self._items(official_test, self._record_stats(official_test),
                                            test_idx, length, train=False)
        else:
            self.test_dataset = self._items(full, stats, test_idx, length, train=False)

        self.class_names = list(full.class_names)
        self.num_classes = len(self.class_names)
        self.signal_length = length
        self.sample_rate = full.sample_rate
        self.has_official_test = official_test is not None
        self.class_counts = np.bincount(self.train_dataset.labels, minlength=self.num_classes)
        self.class_weights = self._class_weights() if cfg.balance == "loss" else None
        self.batch_size = cfg.batch_size or auto_batch_size(len(self.train_dataset))
        self._ready = True
        log.info("data: %s, %d classes, L=%d, rate=%s Hz, items train/val/test = %d/%d/%d%s%s",
                 full.source, self.num_classes, length, self.sample_rate,
                 len(self.train_dataset), len(self.val_dataset), len(self.test_dataset),
                 " (official test set)" if self.has_official_test else "",
                 "" if len(self.val_dataset) else
                 " (no validation split: the last weights are kept)")

    @property
    def has_validation(self) -> bool:
        """True when a validation split exists (after setup())."""
        return len(self.val_dataset) > 0

    def _val_fraction(self, records: int, has_test: bool) -> float:
        """DataConfig.val_fraction, or for None the automatic choice by training records."""
        cfg = self.config
        if cfg.val_fraction is not None:
            return cfg.val_fraction
        test_share = 1.0 / cfg.cv_folds if cfg.cv_folds else cfg.test_fraction
        train_records = records if has_test else records * (1 - test_share)
        return 0.1 if train_records >= MIN_RECORDS_FOR_VALIDATION else 0.0

    def trained_settings(self) -> dict[str, Any]:
        """What prediction needs to prepare new data as this data was (after setup()): the
        DataConfig fields plus signal_length (L) and trained_sample_rate (Hz after resampling,
        or None). train.py stores it in checkpoints; `prediction_inputs` reads it back."""
        return {**asdict(self.config), "signal_length": self.signal_length,
                "trained_sample_rate": self.sample_rate,
                "dataset_stats": None if self.dataset_stats is None else list(self.dataset_stats)}

    def _split(self, full: SignalDataset,
               has_test: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Record indices (train, val, test); test is None when an official test set exists."""
        cfg = self.config
        if has_test:  # validation comes from the training file only
            rest, test_idx, test_share = np.arange(len(full)), None, 0.0
        elif cfg.cv_folds:
            rest, test_idx = cv_fold_indices(full.labels, full.groups, cfg.cv_folds,
                                             cfg.cv_fold, cfg.seed, full.source)
            test_share = 1.0 / cfg.cv_folds
        else:
            rest, test_idx = split_indices(
                full.labels, full.groups, cfg.test_fraction, cfg.seed, full.source,
                f"--test-fraction {cfg.test_fraction:g}",
                "a test set of other records with --test-data")
            test_share = cfg.test_fraction
        groups = None if full.groups is None else full.groups[rest]
        train_pos, val_pos = split_indices(
            full.labels[rest], groups, self.val_fraction / (1 - test_share), cfg.seed,
            full.source, f"--val-fraction {self.val_fraction:g}",
            "--val-fraction 0 (no validation: the last weights are tested)")
        return rest[train_pos], rest[val_pos], test_idx

    def _record_stats(self, dataset: SignalDataset) -> np.ndarray | None:
        """Per-record (mean, std) when normalising per record, else None."""
        return record_stats(dataset.signals) if self.config.normalize == "record" else None

    def _items(self, dataset: SignalDataset, stats: np.ndarray | None, indices: np.ndarray,
               length: int, train: bool) -> SignalItems:
        """Items of the records `indices` (the records stay where they are, memmaps too)."""
        cfg = self.config
        items = np.zeros((0, 2), dtype=np.int64)
        if len(indices):
            _, items = plan_windows(dataset.lengths[indices], cfg.length_policy, length,
                                    cfg.window_stride, dataset.source)
            items[:, 0] = indices[items[:, 0]]
        augment = (make_augmentation(cfg.aug_scale, cfg.aug_noise, cfg.aug_shift, cfg.aug_slice)
                   if train and cfg.augment else None)
        return SignalItems(dataset.signals, dataset.labels, items, length, cfg.normalize,
                           stats, random_crop=train, transform=augment,
                           dataset_stats=self.dataset_stats)

    def _class_weights(self) -> torch.Tensor:
        """'balanced' weights N / (C * n_c) of the training items; 0 for an absent class."""
        counts = self.class_counts.astype(np.float64)
        if (counts == 0).any():
            missing = [n for n, c in zip(self.class_names, counts, strict=True) if c == 0]
            log.warning("classes %s have no training items; their loss weight is 0", missing)
        weights = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0)
        return torch.tensor(weights, dtype=torch.float32)

    # -- loaders --------------------------------------------------------------------------

    def _loader(self, dataset: SignalItems, shuffle: bool, sampler=None,
                drop_last: bool = False) -> DataLoader:
        cfg = self.config
        pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler,
                          drop_last=drop_last, num_workers=cfg.workers, pin_memory=pin,
                          persistent_workers=cfg.persistent_workers and cfg.workers > 0)

    def train_dataloader(self) -> DataLoader:
        cfg = self.config
        sampler = None
        if cfg.balance == "sampler":
            labels = self.train_dataset.labels
            weights = 1.0 / self.class_counts[labels]
            generator = torch.Generator().manual_seed(cfg.seed)
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.float64),
                                            len(labels), replacement=True, generator=generator)
        # drop_last: a last batch of one item breaks BatchNorm in training
        return self._loader(self.train_dataset, shuffle=sampler is None, sampler=sampler,
                            drop_last=len(self.train_dataset) > self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        # no validation split: an empty list, which Lightning reads as "skip validation"
        return self._loader(self.val_dataset, shuffle=False) if self.has_validation else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The inputs of the file given to `for_prediction`, in `prediction.windows` order."""
        if self.prediction is None:
            raise RuntimeError("predict_dataloader needs a data module from for_prediction, "
                               "set up with setup('predict')")
        return self._loader(self.prediction.items, shuffle=False)

    def _setup_prediction(self) -> None:
        request = self._predict_request
        trained = request["trained"]
        self.prediction = prediction_inputs(
            request["path"], trained, request["class_names"], format=request["format"],
            reader_options=request["reader_options"], window_stride=request["window_stride"])
        self.class_names = list(request["class_names"])
        self.num_classes = len(self.class_names)
        self.signal_length = self.prediction.length
        self.sample_rate = trained.get("trained_sample_rate")
        self.batch_size = self.config.batch_size or 64
        self._ready = True



class InMemoryDataModule(SignalDataModule):
    """A `SignalDataModule` over records already in memory (arrays handed to the
    scikit-learn estimator) instead of `config.source`: everything after reading
    (resampling, filters, splits, length policy, normalisation, loaders) is the same."""

    def __init__(self, records: SignalDataset, config: DataConfig | None = None):
        super().__init__(config)
        self.records = records

    def _load(self) -> tuple[SignalDataset, SignalDataset | None]:
        return self.records, None


def auto_batch_size(items: int) -> int:
    """A quarter of the training items, at least 4 and at most 32: several optimizer steps
    per epoch on a few dozen series, and the usual batch on large sets."""
    return max(4, min(32, items // 4))


# ----------------------------------------------------------------------------------------------
# Prediction


@dataclass
class PredictionInputs:
    """Model inputs of a file to predict on, prepared as the training data was.

    dataset: the file's records after resampling and filtering; labels are -1 (UNLABELLED)
             where the file has none, class_names are the checkpoint's.
    items:   a Dataset of (x (L,) float32, y () int64) per window, in `windows` order.
    """

    dataset: SignalDataset
    items: SignalItems

    @property
    def length(self) -> int:
        """L, the model input length in samples."""
        return self.items.length

    @property
    def windows(self) -> np.ndarray:
        """(M, 2) int64 record index and start sample of every input."""
        return self.items.items

    @property
    def ends(self) -> np.ndarray:
        """(M,) int64 end sample (exclusive) of every input; a record shorter than L ends
        before start + L (the rest of the input is zero padding)."""
        records, starts = self.windows[:, 0], self.windows[:, 1]
        return np.minimum(starts + self.length, self.dataset.lengths[records])


def prediction_inputs(path: str | Path, trained: Mapping[str, Any], class_names: Sequence[str],
                      *, format: str | None = None,
                      reader_options: Mapping[str, Any] | None = None,
                      window_stride: int | None = None) -> PredictionInputs:
    """Read `path` and cut it into model inputs exactly as training prepared its data.

    trained: the data settings a checkpoint stores (`SignalDataModule.trained_settings()`).
    The file is read with the training format and reader options unless `format` /
    `reader_options` override them, with labels='optional' (a file without labels is fine;
    labels it has must be among class_names), resampled to the training rate (when the file
    states its rate), band-pass/notch filtered as in training, cut by `prediction_windows`
    into inputs of the training length L, `window_stride` apart (default: the training
    stride, else L), and normalised as in training.
    """
    fmt = format or (trained.get("format") if trained.get("source") != "synthetic" else None)
    options = {key: value for key, value in (trained.get("reader_options") or {}).items()
               if key != "labels"}  # training always reads with labels='required'
    options = {"labels": "optional", **options, **(reader_options or {})}
    dataset = read_dataset(path, fmt, class_names=list(class_names), **options)
    return prepare_prediction_inputs(dataset, trained, window_stride)


def prepare_prediction_inputs(dataset: SignalDataset, trained: Mapping[str, Any],
                              window_stride: int | None = None) -> PredictionInputs:
    """Cut records already read (a file's, or arrays in memory) into model inputs exactly as
    training prepared its data: `prediction_inputs` without the reading."""
    rate = trained.get("trained_sample_rate")
    if rate and dataset.sample_rate and dataset.sample_rate != rate:
        dataset = resample_dataset(dataset, rate)
    dataset = filter_dataset(dataset, trained.get("bandpass"), trained.get("notch"))
    length = int(trained["signal_length"])
    stride = window_stride or trained.get("window_stride") or length
    windows = prediction_windows(dataset.lengths, length, stride)
    normalize = trained.get("normalize", "window")
    stats = record_stats(dataset.signals) if normalize == "record" else None
    pair = trained.get("dataset_stats")
    return PredictionInputs(dataset, SignalItems(dataset.signals, dataset.labels, windows,
                                                 length, normalize, stats,
                                                 dataset_stats=None if pair is None
                                                 else tuple(pair)))
