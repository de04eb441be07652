"""Defaults that follow the data: model size, STFT settings and the training budget.

One set of rules for every dataset (no per-dataset tuning), measured on the development suite
(docs/accuracy.md). Every option these fill in can be given explicitly instead; an explicit
value always wins. Inputs are facts a data module knows after setup: training items, input
length in samples, sample rate (or None), and the number of classes.

For code that trains without train.py (a scikit-learn estimator, a notebook):

    datamodule = SignalDataModule(DataConfig(...)); datamodule.setup("fit")
    model, optimization = fill_data_defaults(ModelOptions(...), OptimizationOptions(), datamodule)
    module = SignalClassifierModule.from_options(model, optimization, datamodule)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from models.options import ModelOptions, OptimizationOptions

# The recurrence runs over at most this many steps: longer inputs get a patch stem that
# averages ceil(length / MAX_STEPS) samples per step. 512 steps keep a 2-layer scan cheap on
# a CPU and leave each step a few tens of milliseconds of a 100 Hz signal.
MAX_STEPS = 512
MIN_N_FFT, MAX_N_FFT = 8, 256
# Large sets (from this many training items) get a wider, deeper time branch and a fourth
# CNN stage; below it the small model generalises better from a few dozen series.
LARGE_DATA_ITEMS = 2000
MIN_TRAIN_STEPS, MAX_TRAIN_STEPS, BUDGET_EPOCHS = 1000, 10000, 20
# Below this many training items a run is an ensemble of ENSEMBLE_SIZE models: one model's
# test accuracy on a few dozen series swings by several points with its seed, the mean of a
# few models' probabilities much less, and each costs only a minute or two there.
ENSEMBLE_BELOW_ITEMS, ENSEMBLE_SIZE = 1000, 3
# Member k of an ensemble trains with seed + MEMBER_SEED_STEP * k (one split for all): 1000
# apart, ensembles of neighbouring seeds share no member
MEMBER_SEED_STEP = 1000


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


def auto_ensemble(train_items: int) -> int:
    """Models in a run: ENSEMBLE_SIZE below ENSEMBLE_BELOW_ITEMS training items, else 1."""
    return ENSEMBLE_SIZE if train_items < ENSEMBLE_BELOW_ITEMS else 1


def data_facts(datamodule: Any) -> DataFacts:
    """The facts of a set-up `SignalDataModule` (after setup())."""
    return DataFacts(len(datamodule.train_dataset), datamodule.signal_length,
                     datamodule.sample_rate, datamodule.num_classes)


MODEL_SIZE_FIELDS = ("hidden_size", "num_layers", "patch_size", "cnn_channels", "spectrogram",
                     "n_fft", "hop_length", "n_mels")


def fill_model_defaults(model: ModelOptions, facts: DataFacts) -> ModelOptions:
    """A copy of `model` with every automatic (None) size filled from the data; explicit values
    win. An explicit n_fft moves the hop that follows it (n_fft / 4)."""
    auto = auto_model(facts)
    if model.n_fft is not None:
        auto["hop_length"] = max(1, model.n_fft // 4)
    filled = {key: auto[key] for key in MODEL_SIZE_FIELDS if getattr(model, key) is None}
    return dataclasses.replace(model, **filled)


def fill_budget_defaults(optimization: OptimizationOptions, train_items: int,
                         batch_size: int) -> OptimizationOptions:
    """A copy of `optimization` with the step budget filled (`auto_train_steps`) when neither
    epochs nor max_steps is given."""
    if optimization.epochs is not None or optimization.max_steps is not None:
        return optimization
    return dataclasses.replace(optimization,
                               max_steps=auto_train_steps(train_items, batch_size))


def fill_data_defaults(model: ModelOptions, optimization: OptimizationOptions,
                       datamodule: Any) -> tuple[ModelOptions, OptimizationOptions]:
    """Copies of the model and optimization options with everything automatic (None) filled
    from a set-up `SignalDataModule`: model sizes, STFT settings and the step budget (at the
    data module's batch size). Explicit values win."""
    facts = data_facts(datamodule)
    return (fill_model_defaults(model, facts),
            fill_budget_defaults(optimization, facts.train_items, datamodule.batch_size))


def model_settings(model: ModelOptions, facts: DataFacts) -> dict[str, Any]:
    """The `DualBranchConfig` fields (a plain dict, as `SignalClassifierModule(model=...)`
    takes them) that filled options describe (`fill_model_defaults` first); the SpecAugment
    mask sizes follow the data and the spectrogram's height."""
    if any(getattr(model, key) is None for key in MODEL_SIZE_FIELDS):
        raise ValueError("model_settings needs filled options; call fill_model_defaults first")
    auto = auto_model(facts)
    n_bins = model.n_fft // 2 + 1
    n_freq = model.n_mels if model.spectrogram == "mel" else n_bins
    freq_mask = min(auto["freq_mask_param"], n_bins // 4, max(0, n_freq - 1))
    masks = ({"freq_mask_param": freq_mask, "time_mask_param": auto["time_mask_param"]}
             if model.spec_augment else {"freq_mask_param": 0, "time_mask_param": 0})
    return {
        "branches": model.branches,
        "fusion": model.fusion,
        "dropout": model.dropout,
        "branch_loss": model.branch_loss,
        "instance_norm": model.instance_norm,
        "keep_amplitude": model.keep_amplitude and model.instance_norm,
        "time": {
            "hidden_size": model.hidden_size, "num_layers": model.num_layers,
            "patch_size": model.patch_size, "stem": model.stem,
            "stem_depth": model.stem_depth, "pooling": model.pooling,
            "bidirectional": model.bidirectional, "dropout": model.rwkv_dropout,
            "gradient_checkpointing": model.gradient_checkpointing,
            "compile_blocks": model.compile, "compile_mode": model.compile_mode,
            "wkv_backend": model.wkv_backend,
        },
        "freq": {
            "spectrogram": model.spectrogram, "sample_rate": round(facts.sample_rate or 16000),
            "n_fft": model.n_fft, "hop_length": model.hop_length,
            "n_mels": min(model.n_mels, n_bins), "channels": list(model.cnn_channels),
            **masks,
        },
    }


__all__ = ["MEMBER_SEED_STEP", "DataFacts", "auto_ensemble", "auto_model", "auto_train_steps",
           "data_facts", "fill_budget_defaults", "fill_data_defaults", "fill_model_defaults",
           "model_settings", "stft_size"]
