"""utils/checks.py: what can be known before training is refused there, in one line that says
what to change: devices, lengths against the model and memory, batches per process, and data
that normalisation would turn into zeros."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from data.formats import DataError
from models.dual_branch import DualBranchClassifier
from utils import checks
from utils.cli import ConfigError

SMALL = {"branches": "both",
         "time": {"hidden_size": 8, "num_layers": 1, "patch_size": 8},
         "freq": {"n_fft": 256, "hop_length": 64, "n_mels": 16, "channels": [4, 8]}}


def test_devices_that_do_not_exist_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(checks, "cpu_cores", lambda: 2)
    checks.check_devices(2, on_gpu=False)
    checks.check_devices("auto", on_gpu=False)
    with pytest.raises(ConfigError, match="--devices 5: on the CPU every device is a training "
                                          "process and this machine has 2 CPU core"):
        checks.check_devices(5, on_gpu=False)
    with pytest.raises(ConfigError, match="GPU ids need a GPU"):
        checks.check_devices("0,1", on_gpu=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="--devices 0,2: there is no GPU 2; this host has 2"):
        checks.check_devices("0,2", on_gpu=True)
    with pytest.raises(ConfigError, match="this host has 2 GPU"):
        checks.check_devices(4, on_gpu=True)


def test_a_length_that_cannot_fit_is_refused_before_allocating() -> None:
    with pytest.raises(ConfigError, match=r"--length 100000000000: the built-in dataset \(2000 "
                                          "signals\\) of 100000000000 samples needs at least"):
        checks.check_memory_for_length(10**11, 32, synthetic_signals=2000)
    with pytest.raises(ConfigError, match="a batch of 32 inputs"):
        checks.check_memory_for_length(10**13, 32, synthetic_signals=None)
    checks.check_memory_for_length(3750, 32, synthetic_signals=2000)


def test_inputs_shorter_than_the_model_accepts_are_refused(monkeypatch) -> None:
    # the check asks the model (min_length), however its settings were chosen
    monkeypatch.setattr(DualBranchClassifier, "min_length",
                        property(lambda self: self.config.freq.n_fft
                                 if self.config.use_freq else 1))
    with pytest.raises(ConfigError) as refused:
        checks.check_model_for_data(SMALL, 2, 100, "--length 100", 8, False, "32-true")
    assert str(refused.value) == (
        "the model inputs are 100 samples (--length 100) but the model takes at least 256 "
        "(DualBranchClassifier.min_length); pass a --length of at least 256, or model "
        "options with a shorter window (--n-fft 64 or less), or --branches time")
    checks.check_model_for_data({**SMALL, "branches": "time"}, 2, 100, "--length 100", 8,
                                False, "32-true")


def test_a_step_that_cannot_fit_in_memory_is_refused(monkeypatch) -> None:
    small = checks.training_memory_bytes(checks._probe_model(SMALL, 2), 3000, 8)
    large = checks.training_memory_bytes(checks._probe_model(SMALL, 2), 300_000, 8)
    assert 60 * small < large < 140 * small  # activations grow linearly with the length
    monkeypatch.setattr(checks, "available_memory_bytes", lambda on_gpu: small * 10)
    checks.check_model_for_data(SMALL, 2, 3000, "--length 3000", 8, False, "32-true")
    with pytest.raises(ConfigError, match=r"a training step on inputs of 300000 samples \(the "
                                          "longest training record, --length-policy pad\\) "
                                          "with --batch-size 8 needs about .* in RAM, but .* is "
                                          "available; pass a smaller --length"):
        checks.check_model_for_data(SMALL, 2, 300_000, "the longest training record, "
                                    "--length-policy pad", 8, False, "32-true")


def test_the_probe_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    checks.check_model_for_data(SMALL, 2, 3000, "--length 3000", 8, False, "32-true")
    torch.testing.assert_close(torch.rand(3), expected)


def test_no_process_without_a_full_batch() -> None:
    checks.check_steps_per_process(100, 32, 1)
    checks.check_steps_per_process(20, 32, 4)  # one short batch each (drop_last is off)
    with pytest.raises(ConfigError, match="40 training items over 5 processes leave 8 per "
                                          "process, less than --batch-size 16"):
        checks.check_steps_per_process(40, 16, 5)


def test_data_normalised_into_zeros_is_refused(caplog) -> None:
    flat = np.ones((10, 50), dtype=np.float32) * np.arange(10)[:, None]  # levels, no shape
    records = np.arange(10)
    with pytest.raises(DataError) as refused:
        checks.check_informative_signals(flat, records, 50, "window", "flat.csv")
    assert str(refused.value) == (
        "flat.csv [signals]: all 10 training records are constant (std <= 1e-06), so "
        "--normalize window turns every input into zeros; expected signals that vary, or "
        "--normalize dataset or none to keep their levels")
    for keeps_levels in ("none", "dataset"):
        checks.check_informative_signals(flat, records, 50, keeps_levels, "flat.csv")
    with pytest.raises(DataError, match="model inputs of 1 sample are all zeros"):
        checks.check_informative_signals(np.random.randn(10, 1), records, 1, "window", "one")
    mixed = np.random.default_rng(0).standard_normal((10, 50))
    mixed[3] = 2.0
    with caplog.at_level(logging.WARNING):
        checks.check_informative_signals(mixed, records, 50, "record", "mixed.csv")
    assert "1 of 10 training records checked are constant" in caplog.text


def test_the_cpu_probe_of_a_gpu_run_does_not_name_a_wkv_backend(monkeypatch, caplog) -> None:
    """The memory probe runs on the CPU; for a GPU run its "WKV backend: cpu" would be wrong."""
    import models.wkv as wkv_module

    monkeypatch.setattr(wkv_module, "_logged_choice", set())
    monkeypatch.setattr(checks, "available_memory_bytes", lambda on_gpu: 1 << 50)
    with caplog.at_level(logging.INFO, logger="models.wkv"):
        checks.check_model_for_data(SMALL, 2, 3000, "--length 3000", 8, True, "bf16-mixed")
        assert not [m for m in caplog.messages if m.startswith("WKV backend")]
        checks.check_model_for_data(SMALL, 2, 3000, "--length 3000", 8, False, "32-true")
    assert [m for m in caplog.messages if m.startswith("WKV backend")]  # a CPU run says it
