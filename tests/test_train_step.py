"""models/train_step.py: GraphAdamW (CPU and GPU) and the whole train step as one CUDA graph
under Lightning (GPU): the same weights as the eager step, the schedule followed, and eager
steps where a batch or a model cannot be captured."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.dual_branch import DualBranchClassifier
from models.lightning_module import SignalClassifierModule
from models.train_step import GraphAdamW
from utils.throughput import GraphCapture, whole_step_blocker

cuda = pytest.mark.cuda
# no dropout, no SpecAugment: the graph and the eager step draw other random numbers
TINY_MODEL = {
    "dropout": 0.0,
    "time": {"hidden_size": 16, "num_layers": 2, "patch_size": 8, "bidirectional": True},
    "freq": {"n_fft": 64, "hop_length": 32, "n_mels": 16, "channels": [4, 8],
             "sample_rate": 125, "time_mask_param": 0, "freq_mask_param": 0},
}


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3, generator=g)), nn.Parameter(torch.randn(3, generator=g))]


def test_graph_adamw_updates_like_adamw_and_skips_an_update_done_in_the_step() -> None:
    ours, theirs = _params(), _params()
    graph_adamw = GraphAdamW([{"params": ours, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99))
    adamw = torch.optim.AdamW([{"params": theirs, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99))
    for step in range(3):
        for params in (ours, theirs):
            for p in params:
                p.grad = torch.full_like(p, step + 1.0)
        closure_ran: list[int] = []
        graph_adamw.step(lambda ran=closure_ran: ran.append(1))
        adamw.step()
        assert closure_ran == [1]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    before = [p.detach().clone() for p in ours]
    graph_adamw.updated_in_step = True  # as a captured step leaves it
    assert graph_adamw.step(lambda: "loss") == "loss"
    assert all(torch.equal(p, b) for p, b in zip(ours, before, strict=True))
    assert graph_adamw.updated_in_step is False  # the next step updates again


def test_graph_adamw_without_parameters_says_so() -> None:
    with pytest.raises(ValueError, match="at least one parameter"):
        GraphAdamW([], lr=1e-3)


def test_graph_adamw_follows_lambdalr_in_place_and_checkpoints_plain_numbers() -> None:
    params = _params()
    optimizer = GraphAdamW([{"params": params}], lr=1e-2)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 ** k)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr  # filled in place: a graph reads it there
    assert float(lr) == pytest.approx(5e-3)
    state = optimizer.state_dict()
    assert type(state["param_groups"][0]["lr"]) is float
    plain = torch.optim.AdamW(_params(), lr=1.0)
    plain.load_state_dict(state)  # a captured run's checkpoint resumes anywhere
    assert plain.param_groups[0]["lr"] == pytest.approx(5e-3)
    again = GraphAdamW([{"params": _params()}], lr=1.0)
    again.load_state_dict(plain.state_dict())
    assert isinstance(again.param_groups[0]["lr"], torch.Tensor)
    assert float(again.param_groups[0]["lr"]) == pytest.approx(5e-3)


def test_whole_step_blocker_names_the_reason() -> None:
    module = SignalClassifierModule(model=TINY_MODEL, num_classes=3)

    class Trainer:
        world_size, accumulate_grad_batches = 1, 1
        precision_plugin = SimpleNamespace(scaler=None)

    trainer = Trainer()
    assert whole_step_blocker(trainer, module) is None
    trainer.precision_plugin = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    assert whole_step_blocker(trainer, module).startswith("16-mixed")
    trainer.precision_plugin = SimpleNamespace(scaler=None)
    trainer.accumulate_grad_batches = 4
    assert whole_step_blocker(trainer, module) == "gradients accumulate over 4 batches"
    trainer.world_size = 2
    assert whole_step_blocker(trainer, module).startswith("2 processes")
    assert whole_step_blocker(Trainer(), pl.LightningModule()).endswith("no captured train step")


class KeepStep(pl.Callback):
    """The captured step as the fit leaves it (GraphCapture drops it at teardown)."""

    step = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = pl_module.train_step_graph


def _fit(capture: bool, steps: int = 12, mixup: float = 0.0, model: dict | None = None,
         lengths: str | None = None, precision: str = "32-true", **trainer_args):
    torch.manual_seed(0)
    module = SignalClassifierModule(model=model or TINY_MODEL, num_classes=3, mixup=mixup,
                                    lr=3e-3, warmup=3)
    torch.manual_seed(1)
    tensors = [torch.randn(64, 512), torch.randint(0, 3, (64,))]
    if lengths is not None:
        tensors.append(torch.full((64,), 512) if lengths == "whole"
                       else torch.randint(400, 513, (64,)))
    keep = KeepStep()
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision=precision,
                         gradient_clip_val=0.5, callbacks=[GraphCapture(enabled=capture), keep],
                         **trainer_args)
    torch.manual_seed(2)  # the same mixup draws in both runs
    np.random.seed(2)
    trainer.fit(module, DataLoader(TensorDataset(*tensors), batch_size=8, drop_last=True))
    weights = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
    return module, trainer, weights, keep.step


@cuda
@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_the_captured_step_trains_like_the_eager_step(mixup: float) -> None:
    """fp32, clipping on, a warmup schedule: 3 eager steps, 1 recorded, 8 replayed give the
    eager run's weights, so the replays follow the schedule and the mixup draws."""
    _, _, eager, _ = _fit(capture=False, mixup=mixup)
    module, trainer, captured, step = _fit(capture=True, mixup=mixup)
    assert isinstance(trainer.optimizers[0], GraphAdamW)
    assert step is not None and step.graph is not None and step.steps == 12
    assert trainer.global_step == 12
    for name, value in eager.items():
        torch.testing.assert_close(captured[name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    last = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    assert float(lr) == pytest.approx(float(last)) and float(lr) < 3e-3


@cuda
@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_padded_batches_are_captured_with_their_lengths(mixup: float) -> None:
    """Zero-padded batches: the graph takes the lengths as an input, so its masks follow
    every batch's lengths, and the weights are the eager run's."""
    _, _, eager, _ = _fit(capture=False, mixup=mixup, lengths="padded")
    _, trainer, captured, step = _fit(capture=True, mixup=mixup, lengths="padded")
    assert trainer.global_step == 12
    assert step is not None and step.graph is not None and step.with_lengths
    assert step.steps == 12  # every batch captured
    for name, value in eager.items():
        torch.testing.assert_close(captured[name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # lengths that pad nothing are dropped on the host (no device sync): the unmasked graph
    _, trainer, _, step = _fit(capture=True, steps=6, lengths="whole")
    assert trainer.global_step == 6 and step is not None and step.graph is not None
    assert not step.with_lengths


@cuda
def test_a_model_that_cannot_be_recorded_trains_eagerly_and_says_why(caplog) -> None:
    """A host sync inside the forward (here .item()) cannot be recorded: the step that tried
    trains eagerly, and so does every later one."""
    original = DualBranchClassifier.forward

    def syncing_forward(self, x, lengths=None):
        if float(x.abs().sum().item()) < 0:  # never true, but a host sync
            raise AssertionError
        return original(self, x, lengths)

    DualBranchClassifier.forward = syncing_forward
    try:
        with caplog.at_level(logging.INFO, logger="models.lightning_module"):
            module, trainer, weights, _ = _fit(capture=True, steps=8)
    finally:
        DualBranchClassifier.forward = original
    assert trainer.global_step == 8
    assert "train step: eager from here on, not captured as a CUDA graph" in caplog.text
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert module.capture_train_step is False


@cuda
def test_bf16_with_gradient_checkpointing_is_captured() -> None:
    model = {**TINY_MODEL, "time": {**TINY_MODEL["time"], "gradient_checkpointing": True}}
    _, _, eager, _ = _fit(capture=False, model=model, precision="bf16-mixed")
    _, trainer, captured, step = _fit(capture=True, model=model, precision="bf16-mixed")
    assert step is not None and step.graph is not None
    for name, value in eager.items():
        # bf16 steps: Adam moves each weight by ~lr a step whatever the gradient size
        torch.testing.assert_close(captured[name], value, rtol=0, atol=3e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")
