"""Defaults that follow the data: model size, STFT settings and the training budget.

One set of rules for every dataset (no per-dataset tuning), measured on the development suite
(docs/accuracy.md). Every option these fill in can be given explicitly instead; an explicit
value always wins. Inputs are facts a data module knows after setup: training items, input
length in samples, sample rate (or None), and the number of classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The recurrence runs over at most this many steps: longer inputs get a patch stem that
# averages ceil(length / MAX_STEPS) samples per step. 512 steps keep a 2-layer scan cheap on
# a CPU and leave each step a few tens of milliseconds of a 100 Hz signal.
MAX_STEPS = 512
MIN_N_FFT, MAX_N_FFT = 8, 256
# Large sets (from this many training items) get a wider, deeper time branch and a fourth
# CNN stage; below it the small model generalises better from a few dozen series.
LARGE_DATA_ITEMS = 2000
MIN_TRAIN_STEPS, MAX_TRAIN_STEPS, BUDGET_EPOCHS = 1000, 10000, 20


@dataclass(frozen=True)
class DataFacts:
    """What the defaults depend on (a data module knows all of it after setup)."""

    train_items: int  # model inputs (records or windows) in the training split
    length: int  # L, samples per model input
    sample_rate: float | None  # Hz, None when the file does not say
    num_classes: int


def stft_size(length: int) -> int:
    """n_fft for inputs of `length` samples: the power of two nearest below length / 4,
    within [8, 256], so a short series still gives several frames."""
    target = max(MIN_N_FFT, length // 4)
    return int(min(MAX_N_FFT, 2 ** int(math.floor(math.log2(target)))))


def auto_model(facts: DataFacts) -> dict[str, Any]:
    """Model settings for these data, as the flat option names train.py uses:
    hidden_size, num_layers, patch_size, cnn_channels, spectrogram, n_fft, hop_length, n_mels,
    freq_mask_param, time_mask_param."""
    large = facts.train_items >= LARGE_DATA_ITEMS
    n_fft = stft_size(facts.length)
    # a mel axis needs a rate to place its filters and enough bins to fill them; without
    # either, a linear axis (no empty filters, no assumed 16 kHz)
    mel = facts.sample_rate is not None and n_fft >= 128
    n_freq = n_fft // 2 + 1
    hop = max(1, n_fft // 4)
    frames = 1 + facts.length // hop
    return {
        "hidden_size": 128 if large else 64,
        "num_layers": 4 if large else 2,
        "patch_size": max(1, math.ceil(facts.length / MAX_STEPS)),
        "cnn_channels": [16, 32, 64, 128] if large else [16, 32, 64],
        "spectrogram": "mel" if mel else "linear",
        "n_fft": n_fft,
        "hop_length": hop,
        "n_mels": min(64, n_freq) if mel else 64,
        "freq_mask_param": max(0, min(8, (min(64, n_freq) if mel else n_freq) // 4)),
        "time_mask_param": max(0, min(16, frames // 8)),
    }


def auto_train_steps(train_items: int, batch_size: int) -> int:
    """Optimizer steps for a run: BUDGET_EPOCHS epochs, at least 1000 (a few dozen series
    need hundreds of epochs) and at most 10,000."""
    per_epoch = max(1, train_items // batch_size)
    return int(min(MAX_TRAIN_STEPS, max(MIN_TRAIN_STEPS, BUDGET_EPOCHS * per_epoch)))


__all__ = ["DataFacts", "auto_model", "auto_train_steps", "stft_size"]
