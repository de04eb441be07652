"""Tests for utils/callbacks.py: RNG states in checkpoints and the prediction CSV
writer (aggregation, record ids, seconds)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from data.datamodule import PredictionInputs, SignalItems
from data.formats import UNLABELLED, SignalDataset
from models.lightning_module import gather_rng_states
from utils.callbacks import BudgetEMA, LastCheckpoint, PredictionCSVWriter, RNGStateCheckpoint


@pytest.mark.parametrize("training", [True, False])
def test_rng_states_are_restored_only_when_training_resumes(training: bool) -> None:
    torch.manual_seed(1)
    checkpoint = {"rng_states": gather_rng_states()}
    from_checkpoint = torch.rand(1)
    torch.manual_seed(2)
    untouched = torch.rand(1)
    torch.manual_seed(2)
    trainer = SimpleNamespace(training=training, global_rank=0, world_size=1)
    RNGStateCheckpoint().on_load_checkpoint(trainer, None, checkpoint)
    # resuming a fit continues the saved streams; loading weights to test or predict does not
    assert torch.equal(torch.rand(1), from_checkpoint if training else untouched)


def test_rng_states_are_saved_for_every_rank() -> None:
    checkpoint: dict = {}
    RNGStateCheckpoint().on_save_checkpoint(None, None, checkpoint)
    assert len(checkpoint["rng_states"]) == 1
    assert set(checkpoint["rng_states"][0]) >= {"torch", "numpy", "python"}


class Identity(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def predict_step(self, batch, batch_idx):
        return batch[0]  # the "probabilities" are the inputs themselves


def test_prediction_writer_aggregates_records(tmp_path) -> None:
    # record 0: 10 samples, windows [0, 4), [4, 8), [6, 10); record 1: 3 samples, one window
    signals = [np.zeros(10, np.float32), np.zeros(3, np.float32)]
    dataset = SignalDataset(signals=signals, labels=np.array([1, UNLABELLED]),
                            class_names=["a", "b"], sample_rate=2.0, source="x.npz",
                            names=np.array(["r0", "r1"]))
    windows = np.array([[0, 0], [0, 4], [0, 6], [1, 0]])
    inputs = PredictionInputs(dataset, SignalItems(signals, dataset.labels, windows, 4, "none"))
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    for mode in ("mean", "none"):
        output = tmp_path / f"{mode}.csv"
        writer = PredictionCSVWriter(output, inputs, ["a", "b"], aggregate=mode)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[writer])
        trainer.predict(Identity(), dataloaders=DataLoader(TensorDataset(probs), batch_size=3),
                        return_predictions=False)
        with open(output) as f:
            rows = list(csv.DictReader(f))
        if mode == "none":
            assert [(r["record"], r["start_s"], r["end_s"]) for r in rows] == [
                ("r0", "0", "2"), ("r0", "2", "4"), ("r0", "3", "5"), ("r1", "0", "1.5")]
            continue
        assert [(r["record"], r["label"], r["windows"]) for r in rows] == [("r0", "b", "3"),
                                                                           ("r1", "", "1")]
        # weights 4, 4 and 2 samples newly covered: the overlap counts once
        expected = (4 * probs[0] + 4 * probs[1] + 2 * probs[2]) / 10
        assert float(rows[0]["p_a"]) == pytest.approx(float(expected[0]), abs=1e-6)
        assert rows[0]["predicted"] == "b" and rows[1]["predicted"] == "a"
        np.testing.assert_allclose(writer.probabilities, probs.numpy())


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _RecordWeights(pl.Callback):
    """The training weights after every optimizer step (runs before BudgetEMA's update)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.layer.weight.detach().clone())


def test_budget_ema_averages_over_a_fraction_of_the_steps(tmp_path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    record, ema = _RecordWeights(), BudgetEMA(0.25)
    module = _Linear()
    trainer = pl.Trainer(max_steps=20, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[record, ema])
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert ema.decay == pytest.approx(1 - 1 / (0.25 * 20))  # a horizon of 5 of the 20 steps
    expected = record.weights[0]
    for w in record.weights[1:]:
        expected = ema.decay * expected + (1 - ema.decay) * w
    # after fit the module holds the average, not the last training weights
    torch.testing.assert_close(module.layer.weight, expected)
    assert not torch.allclose(module.layer.weight, record.weights[-1])
    with pytest.raises(ValueError, match="fraction of the steps"):
        BudgetEMA(0.0)


class _RecordSaves(pl.Callback):
    """The global step of every checkpoint written, and a stop asked for after `stop_epoch`."""

    def __init__(self, stop_epoch: int | None = None) -> None:
        self.steps: list[int] = []
        self.stop_epoch = stop_epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.steps.append(checkpoint["global_step"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.stop_epoch:
            trainer.should_stop = True


class _Validated(_Linear):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


@pytest.mark.parametrize("validation", [False, True])
@pytest.mark.parametrize(("interval", "budget", "stop_epoch", "saved"), [
    (0.0, {"max_epochs": 5}, None, [4, 8, 12, 16, 20]),  # every epoch's end
    (1e9, {"max_epochs": 5}, None, [4, 20]),  # the first and the last epoch's
    (1e9, {"max_steps": 10}, None, [4, 10]),  # the step budget ends mid-epoch
    (1e9, {"max_epochs": 5}, 2, [4, 12]),  # another callback stops the run after epoch 3
])
def test_last_checkpoint_is_written_at_most_once_an_interval_and_at_the_end(
        tmp_path, interval, budget, stop_epoch, saved, validation) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,))),
                      batch_size=4)
    record, last = _RecordSaves(stop_epoch), LastCheckpoint(tmp_path, min_interval_s=interval)
    trainer = pl.Trainer(**budget, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0, callbacks=[last, record])
    module = _Validated() if validation else _Linear()
    trainer.fit(module, data, val_dataloaders=data if validation else None)
    assert record.steps == saved and last.saved_step == saved[-1]
    # the file holds the end of training
    final = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert final["global_step"] == saved[-1]
    torch.testing.assert_close(final["state_dict"]["layer.weight"], module.layer.weight)
