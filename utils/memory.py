"""Memory: global speed/memory settings, a memory-efficient model set-up, and a memory monitor.

`optimize_memory_usage()` applies process-wide settings and says what it set;
`create_memory_efficient_model()` turns on gradient checkpointing and picks the AMP dtype;
`MemoryMonitor` samples CUDA and host memory; `MemoryMonitorCallback` logs it from Lightning.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

MiB = 2**20
_ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch reads either


def optimize_memory_usage() -> dict[str, Any]:
    """Apply process-wide settings that save memory or time, and return what was set.

    - float32 matmuls may use TF32 (`torch.set_float32_matmul_precision("high")`).
    - cudnn.benchmark: picks the fastest conv algorithm per input shape (the frequency CNN);
      it costs a search per new shape, so keep signal lengths fixed within a run.
    - expandable_segments for the CUDA caching allocator (less fragmentation with varying
      batch shapes), only where it can still take effect: before CUDA is initialised, and not
      over a setting the user made in the environment.
    """
    applied: dict[str, Any] = {}
    torch.set_float32_matmul_precision("high")
    applied["float32_matmul_precision"] = "high"
    torch.backends.cudnn.benchmark = True
    applied["cudnn.benchmark"] = True
    user_setting = next((f"{k}={os.environ[k]}" for k in _ALLOC_ENV if os.environ.get(k)), None)
    if user_setting is not None:
        applied["allocator"] = f"kept the user's {user_setting}"
    elif torch.cuda.is_initialized():
        applied["allocator"] = "unchanged: CUDA already initialised, the allocator has its config"
    else:
        # read by the caching allocator when CUDA first initialises in this process
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        applied["allocator"] = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    return applied


@dataclass
class MemoryEfficientSetup:
    """What `create_memory_efficient_model` did: the model (changed in place), the autocast dtype
    to train with (None: full fp32), the matching Lightning `precision` string, and how many
    modules now checkpoint their blocks."""

    model: nn.Module
    amp_dtype: torch.dtype | None
    precision: str
    checkpointed_modules: int
    notes: list[str]


def _amp_dtype(use_amp: bool, precision: Any, cuda: bool) -> tuple[torch.dtype | None, str, str]:
    """Map a training config's precision to (autocast dtype, Lightning precision, note)."""
    precision = str(precision).lower()
    if not use_amp or precision in ("32", "32-true", "64", "64-true"):
        return None, "32-true", ""
    if precision in ("bf16", "bf16-mixed"):
        return torch.bfloat16, "bf16-mixed", ""
    if precision in ("16", "16-mixed", "fp16"):
        if not cuda:
            return None, "32-true", "fp16 autocast needs CUDA; training in fp32"
        return torch.float16, "16-mixed", ""
    if precision == "auto":
        if cuda and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16-mixed", ""
        if cuda:
            return torch.float16, "16-mixed", "no bf16 on this GPU: fp16 with loss scaling"
        return None, "32-true", "no CUDA: training in fp32"
    raise ValueError(f"precision must be one of 32, 16, 'bf16', 'auto' (or Lightning's "
                     f"'16-mixed', 'bf16-mixed', '32-true'); got {precision!r}")


def create_memory_efficient_model(base_model: nn.Module,
                                  training_config: dict[str, Any] | None = None
                                  ) -> MemoryEfficientSetup:
    """Set a model up to train in less memory; returns a `MemoryEfficientSetup`.

    training_config keys: "gradient_checkpointing" (default True) calls
    `set_gradient_checkpointing(True)` on every submodule that has it (the RWKV encoders);
    "use_amp" (default True) and "precision" (16, "bf16", "auto", 32 or Lightning strings;
    default 16) choose the autocast dtype. fp16 falls back to fp32 without CUDA.
    """
    cfg = {"gradient_checkpointing": True, "use_amp": True, "precision": 16}
    cfg.update(training_config or {})
    notes = []
    enabled = bool(cfg["gradient_checkpointing"])
    for module in base_model.modules():
        if hasattr(module, "set_gradient_checkpointing"):
            module.set_gradient_checkpointing(enabled)
    # containers (the classifier) delegate; count the modules that hold the flag
    checkpointed = sum(getattr(m, "gradient_checkpointing", False) is True
                       for m in base_model.modules())
    if enabled and checkpointed == 0:
        notes.append("no module supports gradient checkpointing")
    amp_dtype, precision, note = _amp_dtype(bool(cfg["use_amp"]), cfg["precision"],
                                            torch.cuda.is_available())
    if note:
        notes.append(note)
    return MemoryEfficientSetup(base_model, amp_dtype, precision, checkpointed, notes)


def host_memory_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc where there is one."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak_kib / 1024 if sys.platform != "darwin" else peak_kib / MiB  # macOS: bytes
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        current = pages * os.sysconf("SC_PAGE_SIZE") / MiB
    except (OSError, ValueError, IndexError):
        current = peak  # no /proc: the peak is the best bound we have
    return current, max(peak, current)


class MemoryMonitor:
    """Samples memory on `update()`, keeps the peaks, and summarises them in `report()`.

    CUDA numbers (allocated, reserved, peak allocated, in MiB) are read only once CUDA is
    initialised: querying earlier would create a CUDA context just to measure it. Host RSS is
    read from /proc (or getrusage's peak). Works on CPU-only machines.
    """

    def __init__(self, device: torch.device | str | int | None = None):
        self.device = torch.device(device) if isinstance(device, str) else device
        self.samples = 0
        self.last: dict[str, float] = {}
        self.peaks: dict[str, float] = {}

    def _cuda_device(self) -> torch.device | int | None:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        if isinstance(self.device, torch.device):
            return self.device if self.device.type == "cuda" else None
        return torch.cuda.current_device() if self.device is None else self.device

    def update(self) -> dict[str, float]:
        """Take a sample; returns {name: MiB} (host_rss, host_peak_rss, and cuda_* on GPU)."""
        rss, peak_rss = host_memory_mib()
        stats = {"host_rss_mib": rss, "host_peak_rss_mib": peak_rss}
        device = self._cuda_device()
        if device is not None:
            stats["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / MiB
            stats["cuda_reserved_mib"] = torch.cuda.memory_reserved(device) / MiB
            stats["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MiB
        for name, value in stats.items():
            self.peaks[name] = max(self.peaks.get(name, value), value)
        self.last = stats
        self.samples += 1
        return stats

    def reset_peaks(self) -> None:
        """Forget the peaks so far (and CUDA's own peak counter)."""
        self.peaks.clear()
        device = self._cuda_device()
        if device is not None:
            torch.cuda.reset_peak_memory_stats(device)

    def report(self) -> str:
        """A few lines: the last sample and the peak of each number over all samples."""
        if not self.samples:
            self.update()
        lines = [f"Memory over {self.samples} sample(s) (MiB):"]
        for name, value in self.last.items():
            lines.append(f"  {name:<26} last {value:10.1f}   peak {self.peaks[name]:10.1f}")
        return "\n".join(lines)


class MemoryMonitorCallback(pl.Callback):
    """Logs `MemoryMonitor` samples as memory/<name> every `every_n_steps` optimizer steps to
    all of the trainer's loggers, and prints the report when training ends."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.monitor = MemoryMonitor()
        self._last_logged_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor = MemoryMonitor(pl_module.device)
        self.monitor.reset_peaks()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches share a step: log it once
        if step % self.every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        stats = self.monitor.update()
        metrics = {f"memory/{name}": value for name, value in stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.update()
        rank_zero_info(self.monitor.report())


__all__ = [
    "MemoryEfficientSetup",
    "MemoryMonitor",
    "MemoryMonitorCallback",
    "create_memory_efficient_model",
    "host_memory_mib",
    "optimize_memory_usage",
]
