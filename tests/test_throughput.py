"""Tests for utils/throughput.py (GraphCapture, ThroughputMonitor: per window of steps and per
epoch) and the profiler arithmetic of utils/benchmarking.py they share."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.lightning_module import SignalClassifierModule
from utils.benchmarking import busy_and_launches
from utils.throughput import GraphCapture, ThroughputMonitor, capture_blocker

cuda = pytest.mark.cuda
TINY_MODEL = {
    "time": {"hidden_size": 16, "num_layers": 2, "patch_size": 8, "bidirectional": True},
    "freq": {"n_fft": 64, "hop_length": 32, "n_mels": 16, "channels": [4, 8],
             "sample_rate": 125, "time_mask_param": 2},
}


def _event(name, start, end, device, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=device, is_user_annotation=annotation)


def test_busy_time_counts_overlapping_kernels_once():
    gpu, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [_event("k1", 0, 10, gpu), _event("k2", 5, 12, gpu), _event("k3", 20, 25, gpu),
              _event("k4", 21, 22, gpu), _event("cudaLaunchKernel", 0, 1, cpu),
              _event("cudaGraphLaunch", 2, 3, cpu), _event("aten::mm", 0, 4, cpu)]
    busy, launches, kernels = busy_and_launches(SimpleNamespace(events=lambda: events))
    assert busy == 12 + 5
    assert (launches, kernels) == (2, 4)


def test_busy_time_leaves_out_annotations_on_the_gpu_timeline():
    """A record_function range shows on the GPU timeline from its first kernel to its last;
    counted as work it fills the gaps and the busy fraction exceeds 1."""
    gpu = torch.autograd.DeviceType.CUDA
    events = [_event("## Call CompiledFxGraph ##", 0, 100, gpu, annotation=True),
              _event("k1", 0, 10, gpu), _event("k2", 90, 100, gpu)]
    busy, _, kernels = busy_and_launches(SimpleNamespace(events=lambda: events))
    assert (busy, kernels) == (20, 2)


def _fit(callbacks, steps=12, accelerator="cpu"):
    torch.manual_seed(0)
    module = SignalClassifierModule(model=TINY_MODEL, num_classes=3)
    data = TensorDataset(torch.randn(64, 256), torch.randint(0, 3, (64,)))
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks,
                         precision="bf16-mixed" if accelerator == "gpu" else "32")
    trainer.fit(module, DataLoader(data, batch_size=8, drop_last=True))
    return module, trainer


def test_throughput_monitor_logs_samples_per_second_on_cpu(tmp_path, caplog):
    record = tmp_path / "throughput.jsonl"
    monitor = ThroughputMonitor(every_n_steps=4, record=record)
    with caplog.at_level(logging.INFO, logger="utils.throughput"):
        _fit([GraphCapture(), monitor])
    assert "train step: eager, not captured as CUDA graphs (not on a GPU (cpu))" in caplog.text
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 3 and rows == monitor.history
    for row in rows:
        assert row["throughput/samples_per_s"] > 0
        assert 0 <= row["throughput/data_wait_fraction"] < 1
        assert row["throughput/step_ms"] == pytest.approx(
            8e3 / row["throughput/samples_per_s"], rel=1e-6)
        assert "throughput/gpu_busy_fraction" not in row  # no GPU: no profiler window


class PausingModule(pl.LightningModule):
    """A one-weight model whose validation batches each take `pause` seconds."""

    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.pause = pause

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(self.pause)

    def test_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(callbacks, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


def test_epoch_rates_count_every_test_item():
    monitor = ThroughputMonitor()
    data = DataLoader(TensorDataset(torch.zeros(13, 4)), batch_size=5)
    logged = _trainer([monitor]).test(PausingModule(), dataloaders=data, verbose=False)[0]
    test = monitor.epochs["test"]
    assert test.samples == 13 and not test.running
    assert logged["test/samples_per_s"] == pytest.approx(13 / test.elapsed, rel=1e-4)


def test_epoch_rates_leave_validation_time_out_of_training():
    monitor = ThroughputMonitor(every_n_steps=2)
    second = ThroughputMonitor(every_n_steps=2, epoch_rates=False)  # beside it: not added up
    train = DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=5)
    val = DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=3)
    trainer = _trainer([monitor, second], max_epochs=1)
    trainer.fit(PausingModule(pause=0.25), train_dataloaders=train, val_dataloaders=val)
    train_clock, val_clock = monitor.epochs["train"], monitor.epochs["val"]
    assert (train_clock.samples, val_clock.samples) == (20, 6)
    assert val_clock.elapsed >= 0.5 > train_clock.elapsed  # two validation batches of 0.25 s
    metrics = trainer.callback_metrics
    assert float(metrics["train/samples_per_s"]) == pytest.approx(20 / train_clock.elapsed,
                                                                  rel=1e-4)
    assert float(metrics["val/samples_per_s"]) == pytest.approx(6 / val_clock.elapsed, rel=1e-4)
    # the per-window figures of both, two windows of two steps each
    assert len(monitor.history) == len(second.history) == 2


def test_capture_runs_validation_test_and_predict_eagerly():
    """Eval mode and every evaluation batch shape would compile the whole model again."""
    traced = []

    def counting_backend(graph, example_inputs):
        traced.append(graph)
        return graph.forward

    class Scale(nn.Module):  # dynamo leaves torch's own modules (nn.Linear) untraced
        def forward(self, x):
            return 2 * x

    model = Scale()
    model.compile(backend=counting_backend)
    capture = GraphCapture()
    capture.active = True  # as setup() leaves it on a GPU
    for start, end in ((capture.on_validation_start, capture.on_validation_end),
                       (capture.on_test_start, capture.on_test_end),
                       (capture.on_predict_start, capture.on_predict_end)):
        start(None, None)
        model(torch.randn(3, 4))
        assert traced == []
        end(None, None)
    model(torch.randn(3, 4))  # training steps: compiled again
    assert len(traced) == 1
    capture.on_validation_start(None, None)
    capture.on_exception(None, None, RuntimeError("stopped"))
    model(torch.randn(5, 4))  # not left eager after a failure
    assert len(traced) == 2


def test_capture_leaves_the_model_eager_after_the_fit():
    """What uses the model after a fit, outside a trainer's stages (an export, the
    estimator's predictions), must not compile it again for every batch shape."""
    traced = []

    def counting_backend(graph, example_inputs):
        traced.append(graph)
        return graph.forward

    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    module = SimpleNamespace(model=Scale())
    module.model.compile(backend=counting_backend)
    capture = GraphCapture()
    capture.active = True  # as setup() leaves it on a GPU
    capture.teardown(None, module, "validate")  # a validation run inside the fit: still on
    module.model(torch.randn(3, 4))
    assert len(traced) == 1 and capture.active
    capture.teardown(None, module, "fit")
    module.model(torch.randn(5, 4))
    module.model(torch.randn(7, 4))
    assert len(traced) == 1 and not capture.active


def test_automatic_capture_is_quiet_on_a_cpu(caplog):
    """The default (enabled=None) captures where it can; a CPU run is not told about it."""
    with caplog.at_level(logging.INFO, logger="utils.throughput"):
        _fit([GraphCapture(enabled=None)], steps=2)
    assert "train step" not in caplog.text


def test_capture_blocker_names_the_reason():
    model = torch.nn.Linear(2, 2)
    assert capture_blocker(model, torch.device("cpu")) == "not on a GPU (cpu)"


def _without_random_draws(**time) -> dict:
    """TINY_MODEL with no dropout and no SpecAugment (compiled code and graphs draw other
    random numbers than eager code), `time` options added."""
    return {**TINY_MODEL, "dropout": 0.0, "time": {**TINY_MODEL["time"], **time},
            "freq": {**TINY_MODEL["freq"], "time_mask_param": 0, "freq_mask_param": 0,
                     "dropout": 0.0}}


def _fit_on_gpu(model: dict, callbacks: list, **trainer_args) -> SignalClassifierModule:
    """12 bf16-mixed steps on one GPU, the same initial weights and data every call."""
    torch.manual_seed(0)
    module = SignalClassifierModule(model=model, num_classes=3, mixup=0.0)
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(64, 512), torch.randint(0, 3, (64,)))
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=12, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="bf16-mixed",
                         callbacks=callbacks, **trainer_args)
    trainer.fit(module, DataLoader(data, batch_size=8, drop_last=True))
    return module


def _weights(module: pl.LightningModule) -> dict:
    return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}


@cuda
@pytest.mark.parametrize(("checkpointing", "accumulate"), [(False, 1), (True, 1), (False, 2)])
def test_graph_capture_trains_like_eager_and_reports_gpu_busy(tmp_path, checkpointing,
                                                              accumulate):
    """The captured train step under Lightning (bf16-mixed) gives the eager run's weights after
    the same steps (with gradients accumulated over two batches it says why it stays eager);
    the monitor reports a busy fraction."""
    torch._dynamo.reset()
    model = _without_random_draws(gradient_checkpointing=checkpointing)
    results = []
    for capture in (False, True):
        monitor = ThroughputMonitor(every_n_steps=4, profile_at=2, profile_steps=2)
        module = _fit_on_gpu(model, [GraphCapture(enabled=capture), monitor],
                             accumulate_grad_batches=accumulate)
        results.append((_weights(module), monitor.history))
    (eager, _), (captured, history) = results
    for name, value in eager.items():
        # bf16 steps: Adam moves each weight by ~lr a step whatever the gradient size
        torch.testing.assert_close(captured[name], value, rtol=0, atol=3e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")
    busy = [row["throughput/gpu_busy_fraction"] for row in history
            if "throughput/gpu_busy_fraction" in row]
    assert busy and all(0 < b <= 1.05 for b in busy)


@cuda
def test_compiled_blocks_become_one_compiled_classifier_inside_the_captured_step(caplog):
    """compile_blocks with the whole step captured: the whole classifier is compiled (default
    mode, no graphs of its own) and recorded inside the step; the weights follow the eager
    run's, evaluation runs eagerly and the model is eager after the fit."""
    torch._dynamo.reset()
    model = _without_random_draws(compile_blocks=True)
    results = []
    for capture in (False, True):
        with caplog.at_level(logging.INFO, logger="utils.throughput"):
            module = _fit_on_gpu(model, [GraphCapture(enabled=None if capture else False)])
        if capture:
            assert "the whole classifier compiled inside it" in caplog.text
            assert module.model._compiled_call_impl is None  # eager after the fit
            assert all(b._compiled_call_impl is None for b in module.model.time_branch.blocks)
        results.append(_weights(module))
    eager, captured = results
    for name, value in eager.items():
        torch.testing.assert_close(captured[name], value, rtol=0, atol=3e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_whole_classifier_compiled_gives_eager_gradients():
    """What GraphCapture compiles: the whole classifier (conv stem with a partial last patch,
    bidirectional blocks, spectrogram CNN with odd sizes) gives eager's loss and gradients."""
    from models.dual_branch import DualBranchClassifier

    torch._dynamo.reset()
    config = {**TINY_MODEL, "num_classes": 3, "dropout": 0.0,
              "time": {**TINY_MODEL["time"], "stem": "conv", "patch_size": 6},
              "freq": {**TINY_MODEL["freq"], "time_mask_param": 0, "freq_mask_param": 0}}
    x, y = torch.randn(4, 500), torch.randint(0, 3, (4,))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = DualBranchClassifier.from_dict(config)
        if compiled:
            model.compile()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for name, grad in grads0.items():
        assert (grads1[name] - grad).norm() <= 1e-3 * grad.norm() + 1e-6, name
