"""Tests for models/lightning_module.py: schedule, loss, metrics against sklearn, optimizer
groups, RNG state capture, DDP padding mask and weights_only checkpoints."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
)
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from models.lightning_module import (
    SignalClassifierModule,
    SignalEnsemble,
    WarmupCosine,
    gather_rng_states,
    rng_states,
    set_rng_states,
)
from utils.callbacks import RNGStateCheckpoint
from utils.throughput import ThroughputMonitor

TINY_MODEL = {
    "time": {"hidden_size": 16, "num_layers": 1, "patch_size": 8},
    "freq": {"n_fft": 64, "hop_length": 32, "n_mels": 16, "channels": [4, 8],
             "sample_rate": 125, "time_mask_param": 2},
}


def tiny_module(num_classes: int = 3, **kwargs) -> SignalClassifierModule:
    return SignalClassifierModule(model=TINY_MODEL, num_classes=num_classes, **kwargs)


def loader(n: int, num_classes: int, length: int = 128, seed: int = 0, batch: int = 8,
           shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    # a class-dependent tone, so a few steps learn something
    t = torch.arange(length) / 125.0
    x = torch.sin(2 * math.pi * (5 + 10 * y[:, None]) * t) + 0.3 * torch.randn(n, length,
                                                                               generator=g)
    return DataLoader(TensorDataset(x.float(), y), batch_size=batch, shuffle=shuffle)


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


def test_warmup_cosine_shape() -> None:
    f = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # clamped after the end
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert WarmupCosine(5, 0)(0) == pytest.approx(1.0)


def test_loss_is_weighted_and_smoothed_cross_entropy() -> None:
    weights = [1.0, 2.0, 0.5]
    module = tiny_module(class_weights=weights, label_smoothing=0.1)
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor(weights),
                                                 label_smoothing=0.1)
    assert module.loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    # and without options it is the plain mean cross-entropy
    plain = tiny_module()
    assert plain.loss(logits, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_bad_settings_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="class names"):
        tiny_module(class_names=["a", "b"])
    with pytest.raises(ValueError, match="class weights"):
        tiny_module(class_weights=[1.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny_module(label_smoothing=1.0)
    with pytest.raises(ValueError, match="unknown"):
        SignalClassifierModule(model={"hiden_size": 3}, num_classes=3)


def test_optimizer_groups_and_step_schedule() -> None:
    module = tiny_module(lr=1e-2, weight_decay=0.1, warmup=2, min_lr_ratio=0.05)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader(32, 3))  # 4 steps per epoch
    optimizer = trainer.optimizers[0]
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in module.parameters()}
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.1, 0.0}
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and all(p.dim() >= 2 for p in decayed)  # never norms, biases, decay, first
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    # 8 steps: the schedule ran to its end, lr = lr * min_lr_ratio
    assert trainer.global_step == 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.05, rel=1e-6)
    assert not optimizer.defaults.get("fused")  # fused kernels only on a GPU


def test_lengths_that_pad_nothing_are_dropped_before_the_transfer() -> None:
    module = tiny_module()
    x, y = torch.randn(3, 128), torch.tensor([0, 1, 2])
    whole = module.on_before_batch_transfer((x, y, torch.full((3,), 128)), 0)
    assert len(whole) == 2 and whole[0] is x and whole[1] is y
    padded = (x, y, torch.tensor([128, 100, 128]))
    assert module.on_before_batch_transfer(padded, 0) is padded
    assert module.on_before_batch_transfer((x, y), 0) == (x, y)
    # checked here, on the host: a captured step does not read them on the device
    for bad in ([128, 129, 100], [128, 0, 100]):
        with pytest.raises(ValueError, match="batch lengths must lie in"):
            module.on_before_batch_transfer((x, y, torch.tensor(bad)), 0)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_the_fused_optimizer_is_clipped_as_lightning_would(algorithm: str) -> None:
    """Lightning refuses to clip for a fused optimizer; the module clips it itself, the same
    way torch.nn.utils does for the foreach one."""
    torch.manual_seed(0)
    module = tiny_module()
    x, y = torch.randn(4, 128), torch.tensor([0, 1, 2, 0])
    module.loss(module(x), y).backward()
    params = [p for p in module.parameters() if p.grad is not None]
    clip = 1e-3 if algorithm == "norm" else 1e-4
    if algorithm == "norm":
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        assert norm > 10 * clip  # so clipping has something to do
        scale = clip / (norm + 1e-6)
        expected = [p.grad * scale for p in params]
    else:
        expected = [p.grad.clamp(-clip, clip) for p in params]
    fused = torch.optim.AdamW(module.model.optimizer_groups(0.0), lr=1e-3, fused=True)
    module.configure_gradient_clipping(fused, clip, algorithm)
    for param, want in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, want)


@pytest.mark.cuda
def test_bf16_training_on_a_gpu_uses_the_fused_optimizer_and_clips() -> None:
    module = tiny_module()
    trainer = quiet_trainer(accelerator="gpu", precision="bf16-mixed", max_steps=4,
                            limit_val_batches=0, gradient_clip_val=0.01)
    trainer.fit(module, train_dataloaders=loader(32, 3))
    assert trainer.optimizers[0].defaults["fused"] is True
    # the last step's gradients, as clipped before its update (the next step zeroes them)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and 0 < float(torch.nn.utils.get_total_norm(grads)) <= 0.01 * 1.001


def test_test_metrics_match_sklearn() -> None:
    torch.manual_seed(0)
    module = tiny_module(num_classes=4, class_names=["a", "b", "c", "d"])
    data = loader(45, 4, batch=8)  # last batch is partial
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[ThroughputMonitor()])
    trainer.fit(module, train_dataloaders=loader(64, 4, seed=1, shuffle=True))
    logged = trainer.test(module, dataloaders=data, verbose=False)[0]

    module.eval()
    with torch.no_grad():
        x, y = data.dataset.tensors
        pred = module(x).argmax(-1).numpy()
    y = y.numpy()
    assert logged["test/acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert logged["test/balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred),
                                                        abs=1e-6)
    assert logged["test/macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=range(4), zero_division=0), abs=1e-6)
    assert logged["test/kappa"] == pytest.approx(cohen_kappa_score(y, pred), abs=1e-5)
    assert logged["test/samples_per_s"] > 0
    results = module.test_results
    np.testing.assert_array_equal(results["confusion_matrix"].numpy(),
                                  confusion_matrix(y, pred, labels=range(4)))
    assert results["report"]["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert "macro avg" in results["report_text"]


def test_rng_states_round_trip() -> None:
    saved = rng_states()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2]
    assert len(gather_rng_states()) == 1  # one process: its own states


def test_checkpoint_loads_weights_only_and_carries_rng(tmp_path) -> None:
    module = tiny_module(class_weights=[1.0, 1.0, 2.0], data={"signal_length": 128})
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[RNGStateCheckpoint()])
    trainer.fit(module, train_dataloaders=loader(16, 3))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["class_weights"] == [1.0, 1.0, 2.0]
    assert hp["data"] == {"signal_length": 128}
    assert set(ckpt["rng_states"][0]) >= {"torch", "numpy", "python"}
    rebuilt = SignalClassifierModule(**hp)
    rebuilt.load_state_dict(ckpt["state_dict"])
    x = torch.randn(2, 128)
    module.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), module(x))


@pytest.mark.parametrize(("size", "rank", "expected"), [
    (5, 0, [True, True, True]),  # items 0, 2, 4
    (5, 1, [True, True, False]),  # items 1, 3, then a repeat of item 0
    (6, 1, None),  # divides evenly: no padding, no mask
])
def test_padding_mask_of_distributed_evaluation(size: int, rank: int, expected) -> None:
    module = tiny_module()
    dataset = TensorDataset(torch.zeros(size, 4), torch.zeros(size, dtype=torch.long))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
    data = DataLoader(dataset, batch_size=2, sampler=sampler)
    module._trainer = SimpleNamespace(test_dataloaders=data, val_dataloaders=data)
    masks = [module._real_items("test", i, len(b[1])) for i, b in enumerate(data)]
    if expected is None:
        assert masks == [None, None]
    else:
        assert torch.cat(masks).tolist() == expected


def test_ensemble_predicts_the_mean_of_its_members_probabilities() -> None:
    torch.manual_seed(0)
    members = [tiny_module().eval(), tiny_module().eval()]
    ensemble = SignalEnsemble(members).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = (torch.softmax(members[0](x), -1) + torch.softmax(members[1](x), -1)) / 2
        got = ensemble.predict_step((x, torch.zeros(3, dtype=torch.long)), 0)
    torch.testing.assert_close(got, expected)
    assert got.sum(-1).allclose(torch.ones(3)) and ensemble.class_names == ["0", "1", "2"]


@pytest.mark.parametrize("lam", [0.1, 0.9])
def test_mixup_training_metrics_score_the_larger_part(monkeypatch, lam) -> None:
    # a model that names the label of each blend's larger part scores 1.0, whichever part it is
    module = tiny_module(num_classes=3, mixup=0.2)
    module.log = module.log_dict = lambda *args, **kwargs: None  # outside a Trainer
    y = torch.tensor([0, 1, 2, 0])
    perm = torch.tensor([1, 2, 0, 3])
    monkeypatch.setattr(np.random, "beta", lambda a, b: lam)
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: perm)
    larger = y if lam >= 0.5 else y[perm]
    monkeypatch.setattr(module, "forward", lambda x, lengths=None:
                        10.0 * torch.nn.functional.one_hot(larger, 3).float())
    module.training_step((torch.randn(4, 128), y), 0)
    assert float(module.train_metrics["acc"].compute()) == 1.0


def test_step_loss_reaches_the_bar_without_a_per_step_metric() -> None:
    """The training loss is no prog_bar step metric (Lightning turns those into numbers after
    every step: a device sync); the bar reads the module's step loss when it redraws."""
    from utils.callbacks import StepLossBar

    seen: list[dict] = []

    class Bar(StepLossBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            seen.append({"bar": self.get_metrics(trainer, pl_module),
                         "pbar": dict(trainer.progress_bar_metrics),
                         "loss": float(pl_module.step_loss)})

    torch.manual_seed(0)
    module = tiny_module()
    trainer = quiet_trainer(max_steps=3, enable_progress_bar=True, callbacks=[Bar()])
    trainer.fit(module, loader(16, 3))
    assert len(seen) == 3
    for step in seen:
        assert not any(key.startswith("train/loss") for key in step["pbar"])
        assert step["bar"]["train/loss_step"] == step["loss"]


def test_branch_heads_add_their_weighted_loss_and_train() -> None:
    module = SignalClassifierModule(model={**TINY_MODEL, "branch_loss": 0.5}, num_classes=3,
                                    label_smoothing=0.1)
    logits = torch.randn(6, 3, 3)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = sum(w * torch.nn.functional.cross_entropy(logits[:, j], y, label_smoothing=0.1)
                   for j, w in enumerate((1.0, 0.5, 0.5)))
    assert module.loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    # a fit trains the branch heads and scores the fused head
    torch.manual_seed(0)
    module = SignalClassifierModule(model={**TINY_MODEL, "branch_loss": 0.5}, num_classes=3,
                                    mixup=0.2)
    before = [p.detach().clone() for p in module.model.branch_heads.parameters()]
    quiet_trainer(max_steps=3).fit(module, loader(16, 3))
    after = list(module.model.branch_heads.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.isfinite(module.step_loss)
