"""Tests for utils/memory.py: global settings, memory-efficient set-up, monitor, callback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn

from models.dual_branch import DualBranchClassifier
from utils.memory import (
    MemoryMonitor,
    MemoryMonitorCallback,
    create_memory_efficient_model,
    host_memory_mib,
    optimize_memory_usage,
)

cuda = pytest.mark.cuda
ROOT = Path(__file__).resolve().parent.parent


def small_classifier() -> DualBranchClassifier:
    return DualBranchClassifier(2, time=dict(hidden_size=8, num_layers=2, ffn_mult=1),
                                freq=dict(n_fft=64, hop_length=16, n_mels=8, channels=[4],
                                          freq_mask_param=2))


def run_python(code: str, **env: str) -> str:
    """Run code in a fresh interpreter (CUDA and the allocator not yet initialised)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env},
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip()


# ------------------------------------------------------------------- optimize_memory_usage


@pytest.fixture
def restore_globals(monkeypatch):
    precision = torch.get_float32_matmul_precision()
    benchmark = torch.backends.cudnn.benchmark
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.benchmark = benchmark


def test_optimize_memory_usage_applies_and_reports(restore_globals):
    applied = optimize_memory_usage()
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.benchmark is True
    assert applied["float32_matmul_precision"] == "high" and applied["cudnn.benchmark"] is True
    if torch.cuda.is_initialized():
        assert applied["allocator"].startswith("unchanged")
    else:
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_optimize_memory_usage_keeps_user_allocator_setting(restore_globals, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    applied = optimize_memory_usage()
    assert applied["allocator"] == "kept the user's PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_optimize_memory_usage_in_a_fresh_process():
    out = run_python("import os; from utils.memory import optimize_memory_usage as o; "
                     "print(o()['allocator']); print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])")
    assert out.splitlines() == ["PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
                                "expandable_segments:True"]


# ----------------------------------------------------------- create_memory_efficient_model


def test_memory_efficient_model_turns_on_checkpointing_and_picks_dtype():
    model = small_classifier()
    setup = create_memory_efficient_model(model, {"gradient_checkpointing": True,
                                                  "use_amp": True, "precision": "bf16"})
    assert setup.model is model
    assert model.time_branch.gradient_checkpointing is True
    assert setup.checkpointed_modules == 1
    assert setup.amp_dtype == torch.bfloat16 and setup.precision == "bf16-mixed"
    off = create_memory_efficient_model(model, {"gradient_checkpointing": False,
                                                "use_amp": False})
    assert model.time_branch.gradient_checkpointing is False
    assert off.amp_dtype is None and off.precision == "32-true"


def test_memory_efficient_model_default_config():
    setup = create_memory_efficient_model(small_classifier())
    assert setup.checkpointed_modules == 1
    if torch.cuda.is_available():
        assert setup.amp_dtype == torch.float16 and setup.precision == "16-mixed"
    else:  # fp16 autocast needs CUDA: it falls back and says so
        assert setup.amp_dtype is None and setup.precision == "32-true"
        assert any("fp16" in note for note in setup.notes)


def test_memory_efficient_model_without_checkpointing_support():
    setup = create_memory_efficient_model(nn.Linear(3, 3), {"precision": 32})
    assert setup.checkpointed_modules == 0 and setup.amp_dtype is None
    assert setup.notes == ["no module supports gradient checkpointing"]
    with pytest.raises(ValueError, match="precision"):
        create_memory_efficient_model(nn.Linear(3, 3), {"precision": "fp8"})


# ------------------------------------------------------------------------- MemoryMonitor


def test_host_memory_tracks_an_allocation():
    before, _ = host_memory_mib()
    block = torch.ones(64 * 2**20)  # 256 MiB, written so the pages are resident
    after, peak = host_memory_mib()
    assert after - before > 200 and peak >= after
    del block


def test_monitor_update_and_report():
    monitor = MemoryMonitor()
    first = monitor.update()
    block = torch.ones(32 * 2**20)  # 128 MiB
    second = monitor.update()
    del block
    assert second["host_rss_mib"] - first["host_rss_mib"] > 100
    assert monitor.samples == 2
    assert monitor.peaks["host_rss_mib"] == max(first["host_rss_mib"], second["host_rss_mib"])
    report = monitor.report()
    assert report.startswith("Memory over 2 sample(s) (MiB):")
    assert "host_rss_mib" in report and "host_peak_rss_mib" in report
    if not torch.cuda.is_initialized():
        assert "cuda_allocated_mib" not in second


# ----------------------------------------------------------------- MemoryMonitorCallback


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(32, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)


def test_callback_logs_every_n_steps_and_reports(caplog):
    logger = RecordingLogger()
    callback = MemoryMonitorCallback(every_n_steps=2)
    trainer = pl.Trainer(max_steps=6, logger=logger, callbacks=[callback], accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyModule())
    memory = [(step, m) for step, m in logger.records if "memory/host_rss_mib" in m]
    assert [step for step, _ in memory] == [2, 4, 6]
    assert all(m["memory/host_rss_mib"] > 0 for _, m in memory)
    assert "Memory over" in caplog.text and "host_peak_rss_mib" in caplog.text
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryMonitorCallback(every_n_steps=0)


# ------------------------------------------------------------------------------- GPU


@cuda
def test_monitor_reads_cuda_memory():
    block = torch.ones(16 * 2**20, device="cuda")  # 64 MiB
    stats = MemoryMonitor("cuda").update()
    assert stats["cuda_allocated_mib"] >= 64
    assert stats["cuda_reserved_mib"] >= stats["cuda_allocated_mib"]
    assert stats["cuda_peak_allocated_mib"] >= stats["cuda_allocated_mib"]
    del block


@cuda
def test_expandable_segments_take_effect_in_a_fresh_process():
    out = run_python(
        "import torch; from utils.memory import optimize_memory_usage as o; o(); "
        "x = torch.ones(2**20, device='cuda'); "
        "print(all(s.get('is_expandable', False) for s in torch.cuda.memory_snapshot()))")
    assert out == "True"
