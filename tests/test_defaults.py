"""models/defaults.py: the rules that size the model and the run from the data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from models.defaults import (
    DataFacts,
    auto_ensemble,
    auto_model,
    auto_train_steps,
    fill_data_defaults,
    fill_model_defaults,
    model_settings,
    stft_size,
)
from models.dual_branch import DualBranchConfig
from models.frequency import FrequencyConfig
from models.options import ModelOptions, OptimizationOptions


@pytest.mark.parametrize("length,n_fft", [(1, 8), (24, 8), (100, 16), (150, 32), (275, 64),
                                          (3750, 256), (10**6, 256)])
def test_stft_size_follows_the_length(length, n_fft):
    assert stft_size(length) == n_fft


@pytest.mark.parametrize("items,length,rate", [(36, 251, None), (67, 24, None),
                                               (1400, 3750, 125.0), (50_000, 16384, 25600.0)])
def test_auto_model_builds_a_valid_frequency_branch(items, length, rate):
    auto = auto_model(DataFacts(items, length, rate, 3))
    assert auto["patch_size"] == -(-length // 512)  # at most 512 recurrent steps
    assert auto["spectrogram"] == ("mel" if rate is not None and auto["n_fft"] >= 128
                                   else "linear")  # no mel filters without a rate
    n_mels = min(auto["n_mels"], auto["n_fft"] // 2 + 1)
    FrequencyConfig(spectrogram=auto["spectrogram"], n_fft=auto["n_fft"],
                    hop_length=auto["hop_length"], n_mels=n_mels,
                    freq_mask_param=auto["freq_mask_param"],
                    time_mask_param=auto["time_mask_param"])  # raises if inconsistent
    large = items >= 2000
    assert (auto["hidden_size"], auto["num_layers"]) == ((128, 4) if large else (64, 2))


def test_budget_and_ensemble_follow_the_training_size():
    assert auto_train_steps(36, 9) == 1000  # 4 steps an epoch: the floor
    assert auto_train_steps(8000, 32) == 5000  # 20 epochs
    assert auto_train_steps(10**6, 32) == 10000  # the ceiling
    assert auto_ensemble(36) == 3 and auto_ensemble(999) == 3 and auto_ensemble(1000) == 1


def test_fill_model_defaults_keeps_explicit_values_and_fills_the_rest() -> None:
    facts = DataFacts(train_items=100, length=3750, sample_rate=125.0, num_classes=7)
    auto = auto_model(facts)
    filled = fill_model_defaults(ModelOptions(hidden_size=8, n_fft=64), facts)
    assert (filled.hidden_size, filled.n_fft) == (8, 64)  # explicit wins
    assert filled.hop_length == 16  # follows the explicit n_fft, not the automatic one
    assert filled.num_layers == auto["num_layers"] and filled.patch_size == auto["patch_size"]
    settings = model_settings(filled, facts)
    DualBranchConfig.from_dict({**settings, "num_classes": 7})  # a valid model
    assert settings["branch_loss"] == 0.0
    blended = model_settings(fill_model_defaults(ModelOptions(branch_loss=0.3), facts), facts)
    assert DualBranchConfig.from_dict({**blended, "num_classes": 7}).branch_loss == 0.3
    assert settings["time"]["hidden_size"] == 8 and settings["freq"]["n_fft"] == 64
    assert settings["freq"]["n_mels"] == 33  # capped at n_fft / 2 + 1
    assert settings["freq"]["freq_mask_param"] == min(auto["freq_mask_param"], 33 // 4)
    with pytest.raises(ValueError, match="fill_model_defaults first"):
        model_settings(ModelOptions(), facts)


def test_fill_data_defaults_sets_the_budget_only_without_epochs() -> None:
    datamodule = SimpleNamespace(train_dataset=range(640), signal_length=512, sample_rate=None,
                                 num_classes=3, batch_size=32)
    model, optimization = fill_data_defaults(ModelOptions(), OptimizationOptions(), datamodule)
    assert optimization.max_steps == auto_train_steps(640, 32) and model.spectrogram == "linear"
    _, explicit = fill_data_defaults(ModelOptions(), OptimizationOptions(epochs=3), datamodule)
    assert explicit.max_steps is None and explicit.epochs == 3
