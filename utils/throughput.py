"""Keeping the GPU busy during training, and measuring how busy it is: two Lightning callbacks.

`GraphCapture`: on one GPU, the whole train step (forward, loss, backward, clipping, AdamW)
    recorded once as a CUDA graph and replayed (`models.train_step.CapturedTrainStep`); with
    --capture and several processes, the whole classifier under
    torch.compile(mode="reduce-overhead") instead. Where neither can work it leaves the step
    eager and logs one line saying why (not on a GPU, gradient accumulation, a GradScaler,
    batch shapes that keep changing). Captured or compiled, the classifier's per-forward
    NaN/Inf check of its input (a host sync) is not made: the readers refuse or repair
    non-finite samples (data/formats/core.py) and NonFiniteGuard checks the loss.
`ThroughputMonitor`: the one throughput callback. Every `every_n_steps` training steps it logs
    to the trainer's logger (TensorBoard) samples/s (all ranks), wall ms per step, the fraction
    of the step the loader made the loop wait, and, from a short torch.profiler window, GPU busy
    time per step, the busy fraction (busy / wall) and host launch calls per step: one device
    synchronisation per window, none per step. Per epoch it logs train/val/test samples/s
    through the LightningModule (summed over ranks; validation inside a training epoch does
    not count as training time).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

from utils.benchmarking import busy_and_launches

log = logging.getLogger(__name__)
# torch.compile modes that record CUDA graphs themselves
GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _batch_shape(batch: Any) -> tuple[int, ...] | None:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def capture_blocker(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why the whole model cannot be compiled and captured on `device`, or None if it can."""
    if device.type != "cuda":
        return f"not on a GPU ({device.type})"
    from torch.utils._triton import has_triton

    if not has_triton():
        return "torch.compile needs Triton, which is not installed"
    return None


def _uncompile_blocks(model: torch.nn.Module) -> bool:
    """Undo `compile_blocks` (the whole model is compiled instead, or the blocks' compile
    mode records CUDA graphs of its own); True if there were any."""
    undone = False
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            undone = True
    return undone


def whole_step_blocker(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Why the whole train step (models/train_step.py) cannot be one CUDA graph in this
    fit, or None if it can."""
    if not hasattr(pl_module, "capture_train_step"):
        return f"{type(pl_module).__name__} has no captured train step"
    if trainer.world_size > 1:
        return f"{trainer.world_size} processes: DDP all-reduces the gradients outside a graph"
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return "16-mixed: the GradScaler reads its overflow checks on the host"
    return accumulation_blocker(trainer)


def accumulation_blocker(trainer: pl.Trainer) -> str | None:
    """Why no part of the train step can be replayed as CUDA graphs: gradients accumulated
    over several batches would live in one replay's memory and be overwritten by the next
    (torch.compile's reduce-overhead fails on them); None if they are not."""
    if trainer.accumulate_grad_batches > 1:
        return f"gradients accumulate over {trainer.accumulate_grad_batches} batches"
    return None


class GraphCapture(Callback):
    """On a GPU, the train step replayed as CUDA graphs; eager with a one-line logged reason
    where that cannot work. enabled: True (--capture), None (the default: the whole step
    only, nothing said on a CPU) or False (--no-capture).

    Where it can (one process, no gradient accumulation), the whole step (forward, loss,
    backward, clipping and the AdamW update) is recorded as one graph after a few eager steps
    and replayed for every batch of that shape and kind, zero-padded with lengths or whole
    (`models.train_step.CapturedTrainStep`); other batches take the eager step, and a model
    that cannot be recorded trains eagerly from then on (logged). Where the model asks for
    compiled blocks (`compile`), the whole classifier is compiled instead, in the default
    mode (Triton kernels, no CUDA graphs of its own), so the recorded step holds its fused
    kernels rather than the eager code around the blocks; evaluation runs it eagerly, as
    below. Otherwise blocks compiled with a CUDA-graph mode (reduce-overhead, max-autotune)
    are made eager first: a graph cannot hold another's.

    Otherwise, torch.compile(mode=`mode`) of `pl_module.model` (in place: parameter names and
    checkpoints are unchanged) replays its forward and backward as graphs. After `max_shapes`
    different training-batch shapes it goes back to eager (each new shape would be compiled
    and recorded again). Validation, test and predict run eagerly: in eval mode, and for each
    of their batch shapes, the whole model would be compiled and recorded once more (over a
    minute each for configs/gpu.yaml's model on an H200) to save a few milliseconds per
    batch. The fit's teardown makes the model eager for good."""

    def __init__(self, enabled: bool | None = True, mode: str = "reduce-overhead",
                 max_shapes: int = 3) -> None:
        self.enabled = enabled  # None: the whole step where it can be, else eager
        self.mode = mode
        self.max_shapes = max_shapes
        self.active = False  # the whole model compiled
        self.whole_step = False  # the whole train step captured
        self._shapes: set[tuple[int, ...]] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.active or self.whole_step:
            return
        if self.enabled is False:
            log.debug("train step: eager, not captured as CUDA graphs (turned off)")
            return
        device = trainer.strategy.root_device
        if device.type != "cuda":  # said where capture was asked for; quiet by default
            log.log(logging.INFO if self.enabled else logging.DEBUG,
                    "train step: eager, not captured as CUDA graphs (%s)",
                    capture_blocker(pl_module.model, device))
            return
        whole = whole_step_blocker(trainer, pl_module)
        # the way round, when asked for: the whole model compiled (a compile takes a minute)
        fallback = None if whole is None else (
            "the whole model's compile only with --capture" if not self.enabled
            else capture_blocker(pl_module.model, device) or accumulation_blocker(trainer))
        if fallback is not None:
            log.info("train step: eager, not captured as CUDA graphs (%s)",
                     whole if fallback == whole else f"{whole}; {fallback}")
            return
        from models.wkv import prepare_backend

        prepare_backend(device)  # a trace or a graph can only use a loaded WKV kernel
        if whole is None:
            self.whole_step = True
            pl_module.capture_train_step = True  # before configure_optimizers
            time_config = getattr(getattr(pl_module.model, "config", None), "time", None)
            how = ""
            if getattr(time_config, "compile_blocks", False) and capture_blocker(
                    pl_module.model, device) is None:
                # compile asked for: the whole classifier, in the mode that records no graphs
                # of its own (Triton kernels), so the step's graph holds fused kernels
                _uncompile_blocks(pl_module.model)
                pl_module.model.compile()
                self.active = True
                how = " (the whole classifier compiled inside it, instead of each block)"
            elif (getattr(time_config, "compile_mode", None) in GRAPH_MODES
                  and _uncompile_blocks(pl_module.model)):
                how = " (the blocks' CUDA-graph compile made eager)"
            log.info("train step: forward, loss, backward, clipping and the AdamW update "
                     "recorded as one CUDA graph after a few eager steps, then replayed%s", how)
            return
        replaced = _uncompile_blocks(pl_module.model)
        pl_module.model.compile(mode=self.mode)
        self.active = True
        log.info("train step: the whole classifier under torch.compile(mode=%r): forward and "
                 "backward replayed as CUDA graphs%s; not the whole step as one graph (%s)",
                 self.mode, " (instead of the per-block compile)" if replaced else "", whole)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not self.active:
            return
        shape = _batch_shape(batch)
        if shape is not None and shape not in self._shapes:
            self._shapes.add(shape)
            if len(self._shapes) > self.max_shapes:
                self._uncompile(pl_module)
                log.info("train step: back to eager, not captured as CUDA graphs (batch shapes "
                         "vary: %d seen, e.g. %s; each would be compiled and recorded again)",
                         len(self._shapes), shape)
                return
        if not self.whole_step:
            # a new iteration: the previous step's graph outputs are dead and may be overwritten
            torch.compiler.cudagraph_mark_step_begin()

    def _eager(self) -> None:
        if self.active:
            torch.compiler.set_stance("force_eager")

    def _compiled(self) -> None:
        if self.active:
            torch.compiler.set_stance("default")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eager()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compiled()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eager()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compiled()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eager()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compiled()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._compiled()  # the stance is process-wide: do not leave it behind

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After the fit the model is eager again: whatever uses it next outside a trainer's
        stages (an export, the estimator's predictions, on the CPU where Lightning's teardown
        leaves it) would otherwise compile and record it anew for each batch shape."""
        if stage == "fit" and self.active:
            self._uncompile(pl_module)
            self._shapes.clear()
        if stage == "fit" and self.whole_step:
            self.whole_step = False
            pl_module.capture_train_step = False
            pl_module.train_step_graph = None  # its memory pool goes with it

    def _uncompile(self, pl_module: pl.LightningModule) -> None:
        self.active = False
        pl_module.model._compiled_call_impl = None  # what nn.Module.compile set


class _EpochClock:
    """Samples and seconds of one stage's epoch, the clock paused while another stage runs."""

    def __init__(self) -> None:
        self.samples, self.elapsed = 0, 0.0
        self._since: float | None = None

    def start(self, reset: bool = True) -> None:
        self._since = time.perf_counter()
        if reset:
            self.samples, self.elapsed = 0, 0.0

    def pause(self) -> None:
        if self._since is not None:
            self.elapsed += time.perf_counter() - self._since
            self._since = None

    @property
    def running(self) -> bool:
        return self._since is not None


class ThroughputMonitor(Callback):
    """Throughput of a run, logged two ways.

    Per window (rank 0 writes `throughput/*` to the trainer's logger every `every_n_steps`
    training steps): samples_per_s (summed over ranks), step_ms, data_wait_fraction and, on a
    GPU, gpu_busy_ms, gpu_busy_fraction, launches_per_step and kernels_per_step from a
    `profile_steps`-step profiler window started at step `profile_at` and again every
    `profile_every` steps. `record`: also append every logged row to this JSON-lines file.

    Per epoch (`epoch_rates`, through `pl_module.log`, so also in `trainer.callback_metrics`
    and the test results): `train/samples_per_s`, `val/samples_per_s` and
    `test/samples_per_s`, each rank's samples over its seconds in that stage, summed over
    ranks (they run in lock-step); validation inside a training epoch does not count as
    training time. A second monitor beside a trainer's own passes epoch_rates=False: two
    would add their epoch figures up.
    """

    def __init__(self, every_n_steps: int = 50, profile_at: int = 30, profile_every: int = 2000,
                 profile_steps: int = 5, record: str | Path | None = None,
                 epoch_rates: bool = True) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.profile_at, self.profile_every = profile_at, max(1, profile_every)
        self.profile_steps = max(1, profile_steps)
        self.record = Path(record) if record else None
        self.epoch_rates = epoch_rates
        self.history: list[dict[str, float]] = []
        self.epochs = {stage: _EpochClock() for stage in ("train", "val", "test")}
        self._train_paused = False
        self._window_start: float | None = None
        self._window_steps = self._window_samples = 0
        self._wait = 0.0
        self._last_end: float | None = None
        self._steps_seen = 0
        self._profiler = None
        self._profiled_steps = 0
        self._gpu: dict[str, float] = {}

    # ---------------------------------------------------------------- the host-clock window

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _reset(self) -> None:
        self._window_start = None
        self._window_steps = self._window_samples = 0
        self._wait = 0.0
        self._last_end = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._window_start is None:
            self._sync(pl_module)
            self._window_start = time.perf_counter()
        elif self._last_end is not None:
            self._wait += now - self._last_end  # the loop waited for this batch
        if self._profiler is None and self._due_for_profile() and pl_module.device.type == "cuda":
            self._start_profiler(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._steps_seen += 1
        shape = _batch_shape(batch)
        self.epochs["train"].samples += shape[0] if shape else 0
        if self._profiler is not None:
            self._profiled_steps += 1
            if self._profiled_steps >= self.profile_steps:
                self._stop_profiler(pl_module)
            return
        self._window_steps += 1
        self._window_samples += (shape[0] if shape else 0) * trainer.world_size
        if self._window_steps >= self.every_n_steps:
            self._sync(pl_module)
            elapsed = time.perf_counter() - self._window_start
            self._log(trainer, elapsed)
            self._reset()
            return
        self._last_end = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._profiler is not None:
            self._stop_profiler(pl_module)
        self._reset()  # validation time is not training time

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None  # the wait for an epoch's first batch includes worker start-up
        self.epochs["train"].start()

    def _log(self, trainer: pl.Trainer, elapsed: float) -> None:
        step_ms = elapsed * 1e3 / self._window_steps
        row = {"samples_per_s": self._window_samples / elapsed, "step_ms": step_ms,
               "data_wait_fraction": self._wait / elapsed}
        if self._gpu:
            row.update(self._gpu)
            row["gpu_busy_fraction"] = self._gpu["gpu_busy_ms"] / step_ms
            self._gpu = {}
        row = {f"throughput/{k}": float(v) for k, v in row.items()}
        row["step"] = float(trainer.global_step)
        self.history.append(row)
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics({k: v for k, v in row.items() if k != "step"},
                                           step=trainer.global_step)
            if self.record is not None:
                with self.record.open("a") as f:
                    f.write(json.dumps(row) + "\n")

    # ---------------------------------------------------------------- the epoch figures

    def _log_epoch(self, stage: str, pl_module: pl.LightningModule) -> None:
        clock = self.epochs[stage]
        clock.pause()
        if not self.epoch_rates:
            return
        rate = clock.samples / clock.elapsed if clock.elapsed > 0 else 0.0
        pl_module.log(f"{stage}/samples_per_s", torch.tensor(rate, device=pl_module.device),
                      on_step=False, on_epoch=True, sync_dist=True, reduce_fx="sum")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epoch("train", pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer,
                                  pl_module: pl.LightningModule) -> None:
        # a validation inside a training epoch: its time is not training time
        self._train_paused = trainer.state.fn == TrainerFn.FITTING and self.epochs["train"].running
        self.epochs["train"].pause()
        self.epochs["val"].start()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        shape = _batch_shape(batch)
        self.epochs["val"].samples += shape[0] if shape else 0

    def on_validation_epoch_end(self, trainer: pl.Trainer,
                                pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self.epochs["val"].pause()
        else:
            self._log_epoch("val", pl_module)
        if self._train_paused:
            self.epochs["train"].start(reset=False)  # the rest of the epoch trains again
            self._train_paused = False

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs["test"].start()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        shape = _batch_shape(batch)
        self.epochs["test"].samples += shape[0] if shape else 0

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epoch("test", pl_module)

    # ---------------------------------------------------------------- the profiler window

    def _due_for_profile(self) -> bool:
        step = self._steps_seen
        return step >= self.profile_at and (step - self.profile_at) % self.profile_every == 0

    def _start_profiler(self, pl_module: pl.LightningModule) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._sync(pl_module)
        self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._profiler.__enter__()
        self._profiled_steps = 0

    def _stop_profiler(self, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        steps = max(self._profiled_steps, 1)
        busy_us, launches, kernels = busy_and_launches(prof)
        self._gpu = {"gpu_busy_ms": busy_us / 1e3 / steps, "launches_per_step": launches / steps,
                     "kernels_per_step": kernels / steps}
        self._reset()  # the profiler's own host cost stays out of the wall-clock window


__all__ = ["GraphCapture", "ThroughputMonitor", "capture_blocker"]
