"""Training that went wrong says so: `TrainingFailed` and the `NonFiniteGuard` callback.

`TrainingFailed` is a run that could not finish honestly (a non-finite loss or weights, no
training step at all, a full disk); train.main() prints it as one line and exits with status 1,
apart from the status 2 of a bad option or bad data.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class TrainingFailed(RuntimeError):
    """A run that cannot give a trustworthy result; the message says what to change."""


def first_nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN/Inf, or None when all are finite."""
    named = [(name, p) for name, p in module.named_parameters()]
    if not named:
        return None
    # one device sync for all parameters, not one per tensor
    finite = torch.stack([p.detach().isfinite().all() for _, p in named]).cpu()
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


class NonFiniteGuard(Callback):
    """Stops training with `TrainingFailed` when the loss or the weights stop being finite.

    The loss is checked every step without a device sync (a flag accumulated on the device,
    read every `sync_every` steps and before anything is evaluated or saved); the weights are
    checked before every validation and at every training epoch end, and the validation loss
    after every validation; Lightning runs these hooks before the checkpoint callbacks (it
    orders those last), so no checkpoint of NaN weights or outputs is written and none can
    become 'best'.
    """

    def __init__(self, sync_every: int = 50, hint: str = "") -> None:
        self.sync_every = sync_every
        self.hint = hint  # what to change, e.g. the learning rate in use
        self._bad_step: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):  # a captured step returns none: it has trained
            loss = getattr(pl_module, "step_loss", None)
        if not isinstance(loss, torch.Tensor):
            return
        # made on the device: torch.tensor(n, device=...) is a blocking copy, a sync a step
        step = torch.full((), trainer.global_step, dtype=torch.long, device=loss.device)
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        # remember the first step whose loss is not finite
        first = (self._bad_step < 0) & ~torch.isfinite(loss.detach()).all()
        self._bad_step = torch.where(first, step, self._bad_step)
        # a single CPU process reads the flag for free; elsewhere reading it is a device sync
        # (and, with several processes, a collective), so only every sync_every steps
        single_cpu = loss.device.type == "cpu" and trainer.world_size == 1
        if single_cpu or (batch_idx + 1) % self.sync_every == 0:
            self._check_loss(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, "before validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # finite but enormous weights can still give NaN outputs; the best checkpoint is
        # chosen right after this (checkpoint callbacks run last), so stop before it
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val") and key.endswith("loss") and not torch.isfinite(value):
                raise TrainingFailed(f"the validation loss ({key}) is {float(value)}: the model's "
                                     "outputs are not finite; the run was stopped before "
                                     f"keeping a checkpoint of it{self.hint}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, "at the epoch end")

    def _check_loss(self, trainer: pl.Trainer) -> None:
        step = -1 if self._bad_step is None else int(self._bad_step)
        # every process stops together: one stopping alone would leave the others waiting in
        # their next collective
        if trainer.strategy.reduce_boolean_decision(step >= 0, all=False):
            where = f"at step {step}" if step >= 0 else "in another process"
            raise TrainingFailed(f"the training loss became NaN/Inf {where}; the run was "
                                 f"stopped before writing another checkpoint{self.hint}")

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        self._check_loss(trainer)
        # the weights are the same in every process (DDP all-reduces the gradients)
        name = first_nonfinite_parameter(pl_module)
        if name is not None:
            raise TrainingFailed(f"the weights became NaN/Inf ({name}, {when}); the run was "
                                 f"stopped before writing a checkpoint of them{self.hint}")
