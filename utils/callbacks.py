"""Lightning callbacks for the cross-cutting work of a run: every rank's RNG states in the
checkpoints (exact resume), how often the resume checkpoint is written, a one-line epoch
summary, an exponential moving average of the weights over the end of training, and writing
predictions.

The memory monitor lives with the memory utilities (utils.memory.MemoryMonitorCallback), the
throughput monitor (per step and per epoch) with the CUDA-graph capture
(utils.throughput.ThroughputMonitor).
"""

from __future__ import annotations

import csv
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    BasePredictionWriter,
    Callback,
    ModelCheckpoint,
    TQDMProgressBar,
    WeightAveraging,
)
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from data.aggregate import aggregate_windows, prediction_table
from models.lightning_module import RNG_KEY, gather_rng_states, set_rng_states
from utils.checkpoint_io import atomic_open, write_failure


class RNGStateCheckpoint(Callback):
    """Saves every rank's RNG states (torch, CUDA, numpy, random) in each checkpoint under
    `rng_states`, and restores this rank's when a fit resumes from one. Lightning does not
    store them, and without them a resumed run draws other shuffles and dropout masks."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = gather_rng_states()  # a collective: every rank calls it

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RNG_KEY)
        if not states or not trainer.training:
            return  # loading weights to test or predict: leave the RNGs alone
        rank, world = trainer.global_rank, trainer.world_size
        if len(states) != world:
            warnings.warn(
                f"checkpoint holds RNG states of {len(states)} ranks, this run has {world}: "
                "rank 0's states are used everywhere, so the continuation is not bit-exact",
                stacklevel=2,
            )
            rank = 0
        set_rng_states(states[rank])


class BudgetEMA(WeightAveraging):
    """Lightning's weight averaging with an exponential moving average whose horizon is a
    fraction of the run's optimizer steps: decay = 1 - 1 / (fraction x steps), so one setting
    suits a 1,000-step and a 10,000-step budget. The averaged weights (and BatchNorm
    statistics) are the ones validated, checkpointed (the training weights ride along under
    `current_model_state`, for --resume) and tested."""

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"the averaging horizon is a fraction of the steps in (0, 1]; "
                             f"got {fraction}")
        super().__init__()
        self.fraction = fraction
        self.decay: float | None = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # only a fit that resumes takes the training weights back; testing or predicting a
        # checkpoint keeps its state_dict, the average (Lightning's callback loaded the
        # training weights into the model there too, so the best checkpoint was tested as
        # trained, not averaged)
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not in setup: the step count sets up the training data, which must come after
        # a resumed run's RNG states are restored (configure_optimizers asked it already)
        steps = max(1, int(trainer.estimated_stepping_batches))
        self.decay = 1.0 - 1.0 / max(1.0, self.fraction * steps)
        assert self._average_model is not None
        self._average_model.multi_avg_fn = get_ema_multi_avg_fn(self.decay)


class EpochSummary(Callback):
    """One line per epoch on rank 0 (loss, validation metrics, seconds): readable in batch-job
    logs, where a progress bar is not."""

    KEYS = ("train/loss_epoch", "val/loss", "val/acc", "val/balanced_acc", "val/macro_f1")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed from a mid-epoch checkpoint (--max-steps, kill -9) starts without
        # on_train_epoch_start for that epoch
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on every rank: reading callback_metrics computes the epoch's synced metrics, a
        # collective that a rank-0-only read leaves the other ranks out of (DDP then hangs)
        metrics = trainer.callback_metrics
        if not trainer.is_global_zero:
            return
        values = " ".join(f"{k.replace('_epoch', '')} {float(metrics[k]):.4g}"
                          for k in self.KEYS if k in metrics)
        total = "?" if trainer.max_epochs in (None, -1) else trainer.max_epochs
        line = (f"epoch {trainer.current_epoch + 1}/{total}: {values} "
                f"({time.perf_counter() - self._started:.1f} s)")
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)  # on a line of its own above the bar, not glued onto it
        else:
            print(line, flush=True)


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` at the end of a training epoch (where resume is exact, also with several
    validations an epoch), but at most once every `min_interval_s` seconds, and always at the
    end of the last epoch (the step or epoch budget reached, or a stop asked for by early
    stopping or another callback: Lightning runs checkpoint callbacks after the others). On
    the suite's small sets an epoch is a few steps, and a save after each one cost about 8% of
    a CPU run. A killed run loses at most `min_interval_s` of training, or one epoch where an
    epoch takes longer.
    """

    def __init__(self, dirpath: str | Path | None, min_interval_s: float = 60.0) -> None:
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1,
                         enable_version_counter=False, save_on_train_epoch_end=True)
        self.min_interval_s = min_interval_s
        self._saved_at: float | None = None
        self.saved_step: int | None = None  # the global step of the newest save, if any

    def _due(self, trainer: pl.Trainer) -> bool:
        now = time.monotonic()
        last_epoch = (trainer.max_epochs not in (None, -1)
                      and trainer.current_epoch + 1 >= trainer.max_epochs)
        budget_spent = (trainer.max_steps not in (None, -1)
                        and trainer.global_step >= trainer.max_steps)
        due = (trainer.should_stop or last_epoch or budget_spent or self._saved_at is None
               or now - self._saved_at >= self.min_interval_s)
        if due:
            self._saved_at, self.saved_step = now, trainer.global_step
        return due

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            super().on_train_epoch_end(trainer, pl_module)


class StepLossBar(TQDMProgressBar):
    """Lightning's progress bar, with the last step's training loss read only when the bar
    redraws (every `refresh_rate` steps). A `prog_bar=True` step metric is turned into a
    Python number after every step, a device sync that keeps a GPU waiting for the host."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "step_loss", None)
        if trainer.training and loss is not None:
            metrics["train/loss_step"] = float(loss)
        return metrics


class PredictionCSVWriter(BasePredictionWriter):
    """Writes the probabilities of a predict run as the prediction CSV, one row per record
    (`aggregate` 'mean' or 'vote') or per window ('none'), with the records' ids from the file
    and times in seconds where the rate is known (data.aggregate). The file is written whole
    or not at all (an older one stays until then). After the run, `rows` holds the
    `RecordPredictions` written and `probabilities` the (M, K) window probabilities.

    inputs: the `data.datamodule.PredictionInputs` the predict loader serves, in its order.
    """

    def __init__(self, output: str | Path, inputs: Any, class_names: Sequence[str],
                 aggregate: str = "mean") -> None:
        super().__init__(write_interval="epoch")
        self.output, self.inputs = Path(output), inputs
        self.class_names, self.aggregate = list(class_names), aggregate
        self.rows = self.probabilities = None

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        if predictions and isinstance(predictions[0], (list, tuple)):
            predictions = predictions[0]  # one list per dataloader
        probs = torch.cat([p.float().cpu() for p in predictions]).numpy()
        windows = self.inputs.windows
        self.probabilities = probs
        self.rows = aggregate_windows(windows[:, 0], windows[:, 1], self.inputs.ends, probs,
                                      self.aggregate)
        if not trainer.is_global_zero:
            return
        header, table = prediction_table(self.rows, self.inputs.dataset, self.class_names)
        try:
            with atomic_open(self.output, "w") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(table)
        except OSError as exc:
            raise write_failure(exc, self.output) from exc
