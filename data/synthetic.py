"""The built-in dataset: synthetic 1-channel signals whose classes need both branches.

Each signal (default 3750 samples = 30 s at 125 Hz) is

    amplitude * (background oscillation + train of short events [+ one transient])
        + baseline drift + white noise

with amplitude log-uniform in [0.5, 2], events Gaussian pulses (sigma 20 ms) at a mean
interval drawn per signal in [0.7, 1.1] s, a drift of 0.05-0.3 Hz plus a linear trend, and
white noise. Classes differ either in spectrum or only in temporal structure:

  normal            background 8-12 Hz, regular events (3 % interval jitter)
  slow_wave         SPECTRAL: background 2-4 Hz instead, events as normal
  fast_wave         SPECTRAL: background 20-30 Hz instead, events as normal
  irregular_rhythm  TEMPORAL: as normal, but intervals uniform in [0.4, 1.6] x the mean
                    (same mean rate, no rhythm; like atrial fibrillation)
  paired_beats      TEMPORAL: as normal, but intervals alternate 0.5 / 1.5 x the mean
                    (events in couplets, same mean rate; like bigeminy)
  early_transient   TEMPORAL: as normal plus one 5 Hz burst (sigma 0.25 s) centred in the
                    first 10-30 % of the signal
  late_transient    TEMPORAL: the same burst centred in the last 10-30 % (only *where* the
                    burst happens separates it from early_transient)

Everything is drawn from one numpy Generator seeded by `SyntheticConfig.seed`, vectorised over
all signals, so the dataset is identical for a seed and ~2000 signals take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from data.formats import SignalDataset

SYNTHETIC_CLASSES = ("normal", "slow_wave", "fast_wave", "irregular_rhythm", "paired_beats",
                     "early_transient", "late_transient")
# Background band in Hz per class; classes not listed use the neutral 8-12 Hz band.
_BACKGROUND_BANDS = {"slow_wave": (2.0, 4.0), "fast_wave": (20.0, 30.0)}
_NEUTRAL_BAND = (8.0, 12.0)


@dataclass
class SyntheticConfig:
    """What to generate.

    imbalance: count ratio of the first to the last class in `classes` (1 = balanced);
    counts fall geometrically in between, so the first class is the majority.
    """

    num_signals: int = 2000
    length: int = 3750  # samples per signal
    sample_rate: float = 125.0  # Hz
    classes: tuple[str, ...] = SYNTHETIC_CLASSES
    imbalance: float = 1.0
    noise_std: float = 0.3
    drift: float = 0.5  # baseline wander amplitude
    seed: int = 0


def class_counts(num_signals: int, num_classes: int, imbalance: float = 1.0) -> np.ndarray:
    """(num_classes,) int64 signals per class, summing to num_signals, each at least one."""
    if imbalance < 1:
        raise ValueError(f"imbalance is a ratio of the largest to the smallest class, >= 1; got "
                         f"{imbalance}")
    weights = imbalance ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    exact = num_signals * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = num_signals - counts.sum()
    counts[np.argsort(counts - exact, kind="stable")[:remainder]] += 1  # largest remainders
    if counts.min() < 1:
        raise ValueError(f"{num_signals} signals are too few for {num_classes} classes at "
                         f"imbalance {imbalance}: some class would be empty")
    return counts


def _check(config: SyntheticConfig) -> None:
    unknown = set(config.classes) - set(SYNTHETIC_CLASSES)
    if unknown or len(set(config.classes)) != len(config.classes) or len(config.classes) < 2:
        raise ValueError(f"classes must be at least two distinct names of {SYNTHETIC_CLASSES}; "
                         f"got {config.classes}")
    if config.length < 1 or config.sample_rate <= 0:
        raise ValueError(f"length and sample_rate must be positive; got {config.length}, "
                         f"{config.sample_rate}")
    top = max(_BACKGROUND_BANDS.get(c, _NEUTRAL_BAND)[1] for c in config.classes)
    if top >= 0.45 * config.sample_rate:  # keep the bands clear of Nyquist
        raise ValueError(f"sample_rate {config.sample_rate} Hz is too low for a {top} Hz band; "
                         f"expected more than {top / 0.45:.0f} Hz")


def make_synthetic(config: SyntheticConfig | None = None) -> SignalDataset:
    """Generate the dataset: signals (N, T) float32, labels index `config.classes`."""
    config = config or SyntheticConfig()
    _check(config)
    rng = np.random.default_rng(config.seed)
    n, fs = config.num_signals, config.sample_rate
    counts = class_counts(n, len(config.classes), config.imbalance)
    labels = rng.permutation(np.repeat(np.arange(len(config.classes)), counts))
    kinds = np.array(config.classes)[labels]
    # float32 throughout: np.sin is ~10x faster, and the phase error stays far below the noise
    t = (np.arange(config.length) / fs).astype(np.float32)
    duration = config.length / fs

    amplitude = np.exp(_uniform(rng, np.log(0.5), np.log(2.0), (n, 1)))
    signal = _background(rng, kinds, t) + _events(rng, kinds, t, fs)
    signal += _transients(rng, kinds, t, duration)
    signal *= amplitude
    signal += _drift(rng, n, t, duration, config.drift)
    signal += config.noise_std * rng.standard_normal(signal.shape, dtype=np.float32)
    return SignalDataset(signal, labels.astype(np.int64),
                         list(config.classes), None, float(fs),
                         f"synthetic(seed={config.seed}, n={n})")


def _uniform(rng: np.random.Generator, low, high, size) -> np.ndarray:
    return rng.uniform(low, high, size).astype(np.float32)


def _background(rng: np.random.Generator, kinds: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N, T) an oscillation in the class's band, slowly wobbling in frequency and amplitude."""
    n = len(kinds)
    bands = np.array([_BACKGROUND_BANDS.get(k, _NEUTRAL_BAND) for k in kinds])
    freq = _uniform(rng, bands[:, 0], bands[:, 1], n)[:, None]
    wobble = _uniform(rng, 0.05, 0.2, (n, 1))
    tau = np.float32(2 * np.pi)
    phase = (tau * freq * t
             + (0.05 * freq / wobble) * np.sin(tau * wobble * t + _uniform(rng, 0, 7, (n, 1)))
             + _uniform(rng, 0, tau, (n, 1)))
    envelope = 1 + 0.3 * np.sin(tau * _uniform(rng, 0.05, 0.2, (n, 1)) * t
                                + _uniform(rng, 0, tau, (n, 1)))
    return 0.5 * envelope * np.sin(phase)


def _events(rng: np.random.Generator, kinds: np.ndarray, t: np.ndarray,
            fs: float) -> np.ndarray:
    """(N, T) Gaussian pulses whose intervals follow the class's rhythm."""
    n, length = len(kinds), len(t)
    mean = rng.uniform(0.7, 1.1, (n, 1))
    slots = int(length / fs / (0.4 * 0.7)) + 2  # enough for the shortest possible intervals
    factor = 1 + 0.03 * rng.standard_normal((n, slots))
    irregular = rng.uniform(0.4, 1.6, (n, slots))
    factor = np.where((kinds == "irregular_rhythm")[:, None], irregular, factor)
    couplets = np.where(np.arange(slots) % 2 == 0, 0.5, 1.5)
    factor = np.where((kinds == "paired_beats")[:, None], factor * couplets, factor)
    first = rng.uniform(0, 1, (n, 1)) * mean
    times = first + np.cumsum(mean * factor, axis=1) - mean * factor[:, :1]
    sample = np.round(times * fs).astype(np.int64)
    row, slot = np.nonzero(sample < length)
    train = np.zeros((n, length), dtype=np.float32)
    train[row, sample[row, slot]] = 1.5 * (1 + 0.1 * rng.standard_normal(len(row)))
    sigma = 0.02 * fs
    offsets = np.arange(-int(5 * sigma) - 1, int(5 * sigma) + 2)
    pulse = np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)
    return scipy.ndimage.convolve1d(train, pulse, axis=1, mode="constant")


def _transients(rng: np.random.Generator, kinds: np.ndarray, t: np.ndarray,
                duration: float) -> np.ndarray:
    """(N, T) one 5 Hz burst early or late in the transient classes, zeros elsewhere."""
    out = np.zeros((len(kinds), len(t)), dtype=np.float32)
    rows = np.flatnonzero(np.isin(kinds, ("early_transient", "late_transient")))
    if len(rows) == 0:
        return out
    position = rng.uniform(0.1, 0.3, len(rows))
    position = np.where(kinds[rows] == "late_transient", 1 - position, position)
    centre = (position * duration).astype(np.float32)[:, None]
    envelope = np.exp(-0.5 * ((t - centre) / np.float32(0.25)) ** 2)
    out[rows] = 1.2 * envelope * np.sin(np.float32(2 * np.pi * 5.0) * t
                                        + _uniform(rng, 0, 2 * np.pi, (len(rows), 1)))
    return out


def _drift(rng: np.random.Generator, n: int, t: np.ndarray, duration: float,
           amplitude: float) -> np.ndarray:
    """(N, T) baseline wander: a slow sine plus a linear trend (like breathing, electrodes)."""
    tau = np.float32(2 * np.pi)
    wander = _uniform(rng, 0.5, 1.0, (n, 1)) * np.sin(tau * _uniform(rng, 0.05, 0.3, (n, 1)) * t
                                                      + _uniform(rng, 0, tau, (n, 1)))
    trend = _uniform(rng, -0.5, 0.5, (n, 1)) * (t / np.float32(duration) - np.float32(0.5))
    return np.float32(amplitude) * (wander + trend)
