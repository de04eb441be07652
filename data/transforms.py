"""Signal transforms: resampling, filtering, normalisation, windowing, augmentations.

Array functions take x: (T,) or (N, T) and work along the last axis. Dataset functions take a
`SignalDataset` and raise `DataError` naming its source. Augmentations are small nn.Modules on
float tensors x: (T,) or (B, T); they draw from torch's global RNG, which DataLoader seeds per
worker, and are applied to training items only.

Unequal lengths -> fixed model input of L samples (`plan_windows`, LENGTH_POLICIES):
  'pad'     L = `length` or the longest record; shorter records are zero-padded at the end
            (after normalisation, so zero is the mean), longer ones truncated at the end.
  'crop'    L = `length` or the shortest record; one crop of L per record, at a random position
            in training and centred otherwise. A record shorter than L is an error.
  'window'  L = `length` or the shortest record; every record is cut into windows of L with
            `stride` (default L), each inheriting the record's label; windows of one record
            share its group. A record shorter than L is an error.
Prediction covers whole records whatever the policy (`prediction_windows`): a record of at most
L samples is one zero-padded input, a longer one windows of L plus one ending at its last sample.
"""

from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np
import scipy.signal
import torch
import torchaudio.functional
from torch import Tensor, nn

from data.formats import DataError, SignalDataset

log = logging.getLogger(__name__)

LENGTH_POLICIES = ("pad", "crop", "window")
_MAX_RATE_TERM = 10_000  # resampling filters grow with the reduced rate ratio's terms


# ----------------------------------------------------------------------------------------------
# Resampling


def _rate_ratio(orig_rate: float, new_rate: float) -> tuple[int, int]:
    """new/orig as a reduced fraction (up, down), e.g. 360 -> 125 Hz gives (25, 72)."""
    if not (orig_rate > 0 and new_rate > 0):
        raise ValueError(f"sample rates must be positive; got {orig_rate} -> {new_rate}")
    ratio = Fraction(new_rate).limit_denominator(1000) / Fraction(orig_rate).limit_denominator(1000)
    if max(ratio.numerator, ratio.denominator) > _MAX_RATE_TERM:
        approx = ratio.limit_denominator(1000)
        log.warning("resampling %s -> %s Hz approximated as ratio %s", orig_rate, new_rate, approx)
        ratio = approx
    return ratio.numerator, ratio.denominator


def resample(x: np.ndarray | Tensor, orig_rate: float, new_rate: float) -> np.ndarray | Tensor:
    """Band-limited resampling (torchaudio's windowed sinc) along the last axis.

    x: (..., T) numpy array or tensor -> (..., ceil(T * new_rate / orig_rate)), same kind;
    a numpy result is float32.
    """
    up, down = _rate_ratio(orig_rate, new_rate)
    if up == down:
        return x
    if isinstance(x, Tensor):
        return torchaudio.functional.resample(x.float(), down, up)
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torchaudio.functional.resample(tensor, down, up).numpy()


def resample_dataset(dataset: SignalDataset, new_rate: float) -> SignalDataset:
    """All signals at `new_rate` Hz (in memory). Needs the dataset's own rate."""
    if dataset.sample_rate is None:
        raise DataError(dataset.source, "sample_rate", f"is unknown, so resampling to {new_rate} "
                                                       "Hz is impossible; expected the file's "
                                                       "rate (pass sample_rate= to the reader)")
    if dataset.sample_rate == new_rate:
        return dataset
    rate = dataset.sample_rate
    if isinstance(dataset.signals, np.ndarray):
        rows = max(1, (1 << 22) // dataset.signals.shape[1])  # bounded memory for memmaps
        signals = np.concatenate([resample(dataset.signals[i:i + rows], rate, new_rate)
                                  for i in range(0, len(dataset), rows)])
    else:
        signals = [resample(s, rate, new_rate) for s in dataset.signals]
    return SignalDataset(signals, dataset.labels, dataset.class_names, dataset.groups,
                         float(new_rate), dataset.source, dataset.names)


# ----------------------------------------------------------------------------------------------
# Zero-phase filters and normalisation


def bandpass(x: np.ndarray, sample_rate: float, low: float, high: float,
             order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth band-pass (low-pass when low == 0) along the last axis.

    x: (..., T) -> (..., T) float32. Needs 0 <= low < high < sample_rate / 2.
    """
    if not 0 <= low < high < sample_rate / 2:
        raise ValueError(f"band ({low}, {high}) Hz must satisfy 0 <= low < high < Nyquist "
                         f"({sample_rate / 2} Hz)")
    band, kind = ([low, high], "bandpass") if low > 0 else (high, "lowpass")
    sos = scipy.signal.butter(order, band, btype=kind, fs=sample_rate, output="sos")
    # sosfiltfilt: forward + backward pass, so events keep their timing (no phase lag)
    return scipy.signal.sosfiltfilt(sos, x, axis=-1).astype(np.float32)


def notch(x: np.ndarray, sample_rate: float, freq: float, quality: float = 30.0) -> np.ndarray:
    """Zero-phase notch at `freq` Hz (e.g. 50/60 Hz mains) along the last axis; float32."""
    if not 0 < freq < sample_rate / 2:
        raise ValueError(f"notch {freq} Hz must lie in (0, Nyquist = {sample_rate / 2} Hz)")
    b, a = scipy.signal.iirnotch(freq, quality, fs=sample_rate)
    return scipy.signal.filtfilt(b, a, x, axis=-1).astype(np.float32)


def filter_dataset(dataset: SignalDataset, band: tuple[float, float] | None = None,
                   notch_freq: float | None = None) -> SignalDataset:
    """Apply `bandpass` and/or `notch` to every signal (in memory); needs the sample rate."""
    if band is None and notch_freq is None:
        return dataset
    field = "bandpass" if band is not None else "notch"
    rate = dataset.sample_rate
    if rate is None:
        raise DataError(dataset.source, "sample_rate", f"is unknown, so {field} filtering is "
                                                       "impossible; expected a known rate")

    def apply(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if band is not None:
            x = bandpass(x, rate, *band)
        return x if notch_freq is None else notch(x, rate, notch_freq)

    try:
        if isinstance(dataset.signals, np.ndarray):
            signals = apply(dataset.signals)
        else:
            signals = [apply(s) for s in dataset.signals]
    except ValueError as e:  # bad band for this rate, or a signal too short for the filter
        raise DataError(dataset.source, field, f"cannot be applied ({e}); expected frequencies "
                                               "below Nyquist and signals longer than the "
                                               "filter's padding") from e
    return SignalDataset(signals, dataset.labels, dataset.class_names, dataset.groups, rate,
                         dataset.source, dataset.names)


def znormalize(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(x - mean) / std along the last axis; a flat signal becomes zeros. Float32."""
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return (x - mean) / np.maximum(std, eps)


# ----------------------------------------------------------------------------------------------
# Windows and their labels


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Start samples of the full windows of `window` samples, `stride` apart, in `length`."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if window > length:
        raise ValueError(f"window of {window} samples is longer than the signal ({length})")
    return np.arange(0, length - window + 1, stride, dtype=np.int64)


def sliding_windows(x: np.ndarray, window: int, stride: int) -> np.ndarray:
    """x: (T,) -> (n, window) read-only view of the full windows, `stride` apart."""
    starts = window_starts(len(x), window, stride)
    return np.lib.stride_tricks.sliding_window_view(x, window)[::stride][:len(starts)]


def _merged(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of intervals [start, end) as sorted, disjoint intervals."""
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    first = np.flatnonzero(np.r_[True, starts[1:] > reach[:-1]])
    last = np.r_[first[1:] - 1, len(starts) - 1]
    return starts[first], reach[last]


def label_windows_by_spans(starts: np.ndarray, window: int, span_starts: np.ndarray,
                           span_ends: np.ndarray, span_labels: np.ndarray,
                           min_coverage: float = 0.5) -> np.ndarray:
    """Label each window [s, s + window) with the span label covering most of it.

    Spans are [start, end) in samples with label codes >= 0 (-1: ignore the span). Returns
    (n,) int64; -1 where no label covers at least min_coverage of the window.
    """
    starts = np.asarray(starts, dtype=np.float64)
    span_starts = np.asarray(span_starts, dtype=np.float64)
    span_ends = np.asarray(span_ends, dtype=np.float64)
    span_labels = np.asarray(span_labels, dtype=np.int64)
    num_labels = int(span_labels.max()) + 1 if len(span_labels) else 0
    coverage = np.zeros((len(starts), max(num_labels, 1)))
    for label in range(num_labels):
        keep = (span_labels == label) & (span_ends > span_starts)
        if not keep.any():
            continue
        s, e = _merged(span_starts[keep], span_ends[keep])
        # Covered length up to time t is piecewise linear in t with knots at the interval
        # ends, so np.interp gives it exactly; overlap = covered(end) - covered(start).
        knots = np.column_stack([s, e]).ravel()
        covered = np.column_stack([np.r_[0, np.cumsum(e - s)[:-1]], np.cumsum(e - s)]).ravel()
        coverage[:, label] = (np.interp(starts + window, knots, covered)
                              - np.interp(starts, knots, covered))
    best = coverage.argmax(axis=1)
    best[coverage.max(axis=1) < min_coverage * window] = -1
    return best


def label_windows_by_events(starts: np.ndarray, window: int, event_samples: np.ndarray,
                            event_labels: np.ndarray) -> np.ndarray:
    """Label each window with its most frequent event label (ties: the lowest code).

    Events are (sample, label code >= 0; -1 ignored). Returns (n,) int64, -1 with no event.
    """
    starts = np.asarray(starts, dtype=np.int64)
    event_samples = np.asarray(event_samples, dtype=np.int64)
    event_labels = np.asarray(event_labels, dtype=np.int64)
    num_labels = int(event_labels.max()) + 1 if len(event_labels) else 0
    counts = np.zeros((len(starts), max(num_labels, 1)), dtype=np.int64)
    for label in range(num_labels):
        samples = np.sort(event_samples[event_labels == label])
        counts[:, label] = (np.searchsorted(samples, starts + window)
                            - np.searchsorted(samples, starts))
    best = counts.argmax(axis=1)
    best[counts.max(axis=1) == 0] = -1
    return best


def plan_windows(lengths: np.ndarray, policy: str, length: int | None = None,
                 stride: int | None = None, source: str = "signals") -> tuple[int, np.ndarray]:
    """The model input length L and the items to load under a LENGTH_POLICIES policy.

    lengths: (N,) record lengths. Returns (L, items (M, 2) int64 of (record, start)); start -1
    means the crop position is chosen when the item is loaded (random or centred).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"length policy {policy!r}: expected one of {LENGTH_POLICIES}")
    records = np.arange(len(lengths))
    if policy == "pad":
        target = int(length or lengths.max())
        if (lengths > target).any():
            log.info("%s: %d records longer than %d samples are truncated", source,
                     int((lengths > target).sum()), target)
        return target, np.column_stack([records, np.zeros_like(records)])
    target = int(length or lengths.min())
    short = np.flatnonzero(lengths < target)
    if len(short):
        raise DataError(source, "length", f"{len(short)} records are shorter than the {policy} "
                                          f"length {target} (first: record {short[0]}, "
                                          f"{lengths[short[0]]} samples); expected records of "
                                          "at least that length, or length_policy='pad'")
    if policy == "crop":
        return target, np.column_stack([records, np.full_like(records, -1)])
    stride = int(stride or target)
    counts = (lengths - target) // stride + 1
    starts = np.concatenate([np.arange(c) * stride for c in counts])
    return target, np.column_stack([np.repeat(records, counts), starts]).astype(np.int64)


def prediction_windows(lengths: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Items (M, 2) int64 of (record, start) that cover every sample of every record.

    A record no longer than `window` is one item at 0 (zero-padded when loaded); a longer one
    gives every full window `stride` apart plus one ending at its last sample.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    items = []
    for record, n in enumerate(np.asarray(lengths, dtype=np.int64)):
        starts = [0] if n <= window else list(range(0, n - window + 1, stride))
        if n > window and starts[-1] != n - window:
            starts.append(n - window)  # cover the tail too
        items += [(record, s) for s in starts]
    return np.asarray(items, dtype=np.int64).reshape(-1, 2)


def fit_length(x: np.ndarray, length: int) -> np.ndarray:
    """x: (T,) -> (length,): zero-padded at the end, or truncated at the end."""
    if len(x) >= length:
        return x[:length]
    return np.concatenate([x, np.zeros(length - len(x), dtype=x.dtype)])


def window_dataset(dataset: SignalDataset, window: int,
                   stride: int | None = None) -> SignalDataset:
    """Cut every record into windows (label rule: a window inherits its record's label).

    Groups: the record's own group if it has one, else the record index, so a grouped split
    never puts windows of one record in two splits.
    """
    _, items = plan_windows(dataset.lengths, "window", window, stride, dataset.source)
    signals = np.stack([np.asarray(dataset.signals[r][s:s + window], dtype=np.float32)
                        for r, s in items])
    records = items[:, 0]
    groups = records if dataset.groups is None else dataset.groups[records]
    names = None if dataset.names is None else dataset.names[records]
    return SignalDataset(signals, dataset.labels[records], dataset.class_names, groups,
                         dataset.sample_rate, dataset.source, names)


# ----------------------------------------------------------------------------------------------
# Training augmentations: x (T,) or (B, T) float tensor -> same shape (RandomCrop: length)


def _per_row(x: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], 1)


class RandomCrop(nn.Module):
    """A random window of `length` samples (one offset for the whole tensor); shorter input
    is zero-padded at the end."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def forward(self, x: Tensor) -> Tensor:
        extra = x.shape[-1] - self.length
        if extra < 0:
            return nn.functional.pad(x, (0, -extra))
        start = int(torch.randint(0, extra + 1, ()))
        return x[..., start:start + self.length]


class RandomScale(nn.Module):
    """Multiply each signal by a log-uniform factor in [low, high] (gain variation)."""

    def __init__(self, low: float = 0.8, high: float = 1.25):
        super().__init__()
        if not 0 < low <= high:
            raise ValueError(f"scale range must satisfy 0 < low <= high; got ({low}, {high})")
        self.low, self.high = low, high

    def forward(self, x: Tensor) -> Tensor:
        log_low, log_high = np.log(self.low), np.log(self.high)
        u = torch.rand(_per_row(x), device=x.device)
        return x * torch.exp(log_low + (log_high - log_low) * u).to(x.dtype)


class GaussianNoise(nn.Module):
    """Add white Gaussian noise of standard deviation `std` (signals are z-normalised)."""

    def __init__(self, std: float = 0.05):
        super().__init__()
        self.std = std

    def forward(self, x: Tensor) -> Tensor:
        return x + self.std * torch.randn_like(x)


class RandomShift(nn.Module):
    """Shift each signal by up to max_fraction of its length: circularly (roll) or with zeros.

    Off by default in the data module: it moves events, so it would corrupt classes that are
    defined by where an event happens (e.g. the synthetic early/late transients).
    """

    def __init__(self, max_fraction: float = 0.1, circular: bool = True):
        super().__init__()
        self.max_fraction, self.circular = max_fraction, circular

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-1]
        limit = int(self.max_fraction * length)
        shift = torch.randint(-limit, limit + 1, _per_row(x), device=x.device)
        index = torch.arange(length, device=x.device) - shift  # out[t] = x[t - shift]
        out = x.gather(-1, index % length)
        if not self.circular:
            out = out.masked_fill((index < 0) | (index >= length), 0.0)
        return out


class RandomSlice(nn.Module):
    """Window slicing (Le Guennec, Malinowski and Tavenard, 2016): each signal replaced by a
    random stretch of it, between (1 - max_fraction) of its length and all of it, resampled
    back to its length by linear interpolation: a small random crop and time stretch."""

    def __init__(self, max_fraction: float = 0.1):
        super().__init__()
        if not 0 <= max_fraction < 1:
            raise ValueError(f"slice fraction must be in [0, 1); got {max_fraction}")
        self.max_fraction = max_fraction

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-1]
        if length < 2 or self.max_fraction == 0:
            return x
        rows = _per_row(x)
        span = (1 - self.max_fraction * torch.rand(rows, device=x.device)) * (length - 1)
        start = torch.rand(rows, device=x.device) * (length - 1 - span)
        pos = start + span * torch.linspace(0, 1, length, device=x.device)
        low = pos.floor().long().clamp(0, length - 2)
        frac = (pos - low).clamp(0, 1).to(x.dtype)
        left = x.gather(-1, low)
        return left + frac * (x.gather(-1, low + 1) - left)


def make_augmentation(scale: tuple[float, float] | None = None, noise: float = 0.05,
                      shift: float = 0.0, slice_fraction: float = 0.0) -> nn.Module | None:
    """The training augmentation chain (slice -> scale -> shift -> noise), or None if all are
    off."""
    steps: list[nn.Module] = []
    if slice_fraction > 0:
        steps.append(RandomSlice(slice_fraction))
    if scale is not None and tuple(scale) != (1.0, 1.0):
        steps.append(RandomScale(*scale))
    if shift > 0:
        steps.append(RandomShift(shift))
    if noise > 0:
        steps.append(GaussianNoise(noise))
    return nn.Sequential(*steps) if steps else None
