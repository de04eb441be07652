"""utils/guards.py: a non-finite loss, weights or validation loss stops training with
TrainingFailed before any checkpoint of it is written."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from utils.guards import NonFiniteGuard, TrainingFailed, first_nonfinite_parameter


class Regression(pl.LightningModule):
    """A linear model whose training loss is NaN from step `nan_from` on, or whose weights
    are set to Inf by the step `inf_weights_at` (the loss of that step still finite)."""

    def __init__(self, nan_from: int | None = None, inf_weights_at: int | None = None):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.nan_from, self.inf_weights_at = nan_from, inf_weights_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.nan_from is not None and self.global_step + 1 >= self.nan_from:
            loss = loss * float("nan")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.inf_weights_at is not None and self.global_step == self.inf_weights_at:
            with torch.no_grad():
                self.net.weight.fill_(float("inf"))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module: pl.LightningModule, tmp_path, epochs: int = 3) -> None:
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[NonFiniteGuard(hint="; lower --lr"),
                                    ModelCheckpoint(dirpath=tmp_path, monitor="val/loss"),
                                    ModelCheckpoint(dirpath=tmp_path, filename="last")])
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))


def test_a_nan_loss_stops_the_run_before_any_checkpoint(tmp_path) -> None:
    with pytest.raises(TrainingFailed, match="the training loss became NaN/Inf at step 3; the "
                                             "run was stopped before writing another "
                                             "checkpoint; lower --lr"):
        _fit(Regression(nan_from=3), tmp_path)
    assert list(tmp_path.iterdir()) == []  # 4 steps per epoch: no epoch ended


def test_nan_weights_are_never_saved_or_kept_as_best(tmp_path) -> None:
    with pytest.raises(TrainingFailed, match=r"the weights became NaN/Inf \(net.weight, "
                                             r"before validation\)"):
        _fit(Regression(inf_weights_at=8), tmp_path)  # the last step of epoch 2
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["epoch=0-step=4.ckpt", "last.ckpt"]  # epoch 1's, both finite
    for name in saved:
        state = torch.load(tmp_path / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


def test_first_nonfinite_parameter() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert first_nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    assert first_nonfinite_parameter(model) == "1.bias"
