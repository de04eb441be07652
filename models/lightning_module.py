"""LightningModule for the dual-branch signal classifier: loss, metrics, optimizer, schedule.

Holds the model (`DualBranchClassifier`), a class-weighted, optionally label-smoothed
cross-entropy, AdamW over the model's RWKV-style parameter groups with a per-step warmup +
cosine schedule, and torchmetrics for accuracy, balanced accuracy, macro-F1 and Cohen's kappa
(torchmetrics sync their state across DDP ranks before computing). At validation and test end it
logs the confusion matrix as a figure and sklearn's per-class report as text to TensorBoard.

Hyperparameters are plain dicts/lists/numbers so checkpoints load with `weights_only=True`
(and hparams.yaml with `yaml.safe_load`). Every rank's RNG states go into checkpoints through
the `utils.callbacks.RNGStateCheckpoint` callback (the helpers `rng_states` / `set_rng_states`
/ `gather_rng_states` are here), throughput through `utils.throughput.ThroughputMonitor`.
`SignalClassifierModule.from_options` builds the module from the option dataclasses and a
set-up data module; `SignalEnsemble` averages the probabilities of several for prediction.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

from models.dual_branch import DualBranchClassifier, DualBranchConfig, check_length_range
from models.train_step import CapturedTrainStep, GraphAdamW
from utils.metrics import classification_report_from_confusion, plot_confusion_matrix, to_plain

RNG_KEY = "rng_states"
log = logging.getLogger(__name__)


class WarmupCosine:
    """Learning-rate factor for LambdaLR: linear warmup to 1, then cosine decay to `min_ratio`.

    A callable object with only plain attributes, so LambdaLR's state_dict (which stores
    `__dict__` of non-function lambdas) stays loadable with `weights_only=True`.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> None:
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = min(max(int(warmup_steps), 0), self.total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _stage_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_acc": MulticlassRecall(num_classes, average="macro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "kappa": MulticlassCohenKappa(num_classes),
        },
        prefix=prefix,
    )


class SignalClassifierModule(pl.LightningModule):
    """Trains and evaluates a `DualBranchClassifier` on batches (x: (B, T) float, y: (B,) int64).

    model: keyword arguments of `DualBranchConfig` (num_classes is filled in from `num_classes`).
    class_names: K names for reports; default "0".."K-1".
    class_weights: K loss weights (e.g. inverse class frequency), or None for unweighted.
    lr, weight_decay, betas: AdamW; weight decay applies to the groups the model marks for it.
    warmup: warmup length, as a fraction of all optimizer steps if < 1, else a step count.
    min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio.
    label_smoothing: cross-entropy label smoothing in [0, 1).
    mixup: Beta(alpha, alpha) of mixup in training (each batch blended with a shuffled copy of
        itself, the loss likewise), 0 for off. On a few dozen series it is the regulariser that
        keeps the model from memorising them.
    data: the data settings the model was trained with (length, sample rate, format ...),
        kept in the checkpoint so prediction prepares new signals the same way.
    """

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        class_names: Sequence[str] | None = None,
        class_weights: Sequence[float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: Sequence[float] = (0.9, 0.99),
        warmup: float = 0.05,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        class_names = [str(c) for c in class_names] if class_names else None
        class_names = class_names or [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != num_classes:
                raise ValueError(
                    f"got {len(class_weights)} class weights for {num_classes} classes"
                )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        if not (mixup >= 0 and math.isfinite(mixup)):
            raise ValueError(f"mixup must be a finite alpha >= 0 (0: off); got {mixup}")
        # Plain containers only: the checkpoint must load with weights_only=True.
        self.save_hyperparameters(
            {
                "model": dict(model),
                "num_classes": int(num_classes),
                "class_names": class_names,
                "class_weights": class_weights,
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "betas": [float(b) for b in betas],
                "warmup": float(warmup),
                "min_lr_ratio": float(min_lr_ratio),
                "label_smoothing": float(label_smoothing),
                "mixup": float(mixup),
                "data": dict(data or {}),
            }
        )
        self.class_names = class_names
        self.model = DualBranchClassifier(
            DualBranchConfig.from_dict({**model, "num_classes": int(num_classes)})
        )
        weight = torch.tensor(class_weights) if class_weights is not None else None
        self.register_buffer("class_weight", weight, persistent=False)
        # validate_args=False, nan_strategy="disable": their checks read values back to the
        # host, a device sync every training step (the loss is checked by NonFiniteGuard)
        self.train_metrics = MetricCollection(
            {"acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False)},
            prefix="train/",
        )
        self.val_metrics = _stage_metrics(num_classes, "val/")
        self.test_metrics = _stage_metrics(num_classes, "test/")
        # sample-weighted mean losses: a plain mean of per-rank means is off when ranks hold
        # different numbers of evaluation items
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # Filled at test end (all ranks) for train.py to write out.
        self.test_results: dict[str, Any] = {}
        self.samples_trained = 0  # by this process, since it started
        # the whole train step as a CUDA graph (utils.throughput.GraphCapture asks for it
        # before the optimizer is made; models/train_step.py)
        self.capture_train_step = False
        self.train_step_graph: CapturedTrainStep | None = None
        self.step_loss: Tensor | None = None  # the last training step's loss, for the guards

    @classmethod
    def from_options(cls, model: Any, optimization: Any, datamodule: Any,
                     lr: float | None = None) -> SignalClassifierModule:
        """The module that `models.options.ModelOptions` (filled: see
        `models.defaults.fill_model_defaults`) and `OptimizationOptions` describe for a set-up
        `SignalDataModule` (classes, class weights, sample rate and the data settings that
        prediction needs come from it). lr: the learning rate to use (e.g. scaled for several
        devices), default optimization.lr."""
        from models.defaults import data_facts, model_settings

        weights = datamodule.class_weights
        return cls(
            model=model_settings(model, data_facts(datamodule)),
            num_classes=datamodule.num_classes,
            class_names=datamodule.class_names,
            class_weights=None if weights is None else weights.tolist(),
            lr=optimization.lr if lr is None else lr, weight_decay=optimization.weight_decay,
            warmup=optimization.warmup, min_lr_ratio=optimization.min_lr_ratio,
            label_smoothing=optimization.label_smoothing, mixup=optimization.mixup,
            data=to_plain(datamodule.trained_settings()),
        )

    # ------------------------------------------------------------------ forward and steps

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x: (B, T) float signal, lengths (B,) real samples or None -> (B, num_classes)."""
        return self.model(x, lengths)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Class-weighted, label-smoothed cross-entropy (mean over the batch). logits (B, K),
        or what training scores with branch heads, (B, 1 + H, K) (`_scored`): the fused
        head's loss plus branch_loss times each branch head's."""
        if logits.dim() == 3:
            weight = self.model.config.branch_loss
            return self.loss(logits[:, 0], y) + sum(
                weight * self.loss(logits[:, j], y) for j in range(1, logits.shape[1]))
        return nn.functional.cross_entropy(
            logits.float(),
            y,
            weight=self.class_weight,
            label_smoothing=self.hparams.label_smoothing,
        )

    def _scored(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The logits training scores: (B, K), or (B, 1 + H, K) with the model's H branch
        heads (the fused head's first)."""
        if len(self.model.branch_heads) == 0:
            return self(x, lengths)
        return self.model(x, lengths, branch_heads=True)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """An (x, y, lengths) batch's lengths checked on the host, where it costs no device
        sync (a captured step does not read them on the device); (x, y) where its signals are
        all whole: what the model does with such lengths (nothing), so the step takes the
        unmasked path."""
        if (isinstance(batch, (tuple, list)) and len(batch) == 3
                and isinstance(batch[0], Tensor) and batch[0].dim() >= 2
                and isinstance(batch[2], Tensor) and batch[2].device.type == "cpu"
                and batch[2].shape == batch[0].shape[:1] and batch[2].numel() > 0):
            steps = batch[0].shape[1]
            low, high = (int(v) for v in torch.aminmax(batch[2]))
            check_length_range(low, high, getattr(self.model, "min_length", 1), steps,
                               "batch lengths")
            if low == steps:
                return batch[0], batch[1]
        return batch

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor | None:
        x, y, lengths = _unpack(batch)
        alpha = self.hparams.mixup
        mixing = alpha > 0 and len(y) > 1
        lam = float(np.random.beta(alpha, alpha)) if mixing else 1.0
        other = torch.randperm(len(y), device=y.device) if mixing else None
        captured = self._captured_step(x, y, lengths, lam, other)
        if captured is not None:
            loss, logits = captured
        elif mixing:
            x = lam * x + (1 - lam) * x[other]
            if lengths is not None:
                lengths = torch.maximum(lengths, lengths[other])
            logits = self._scored(x, lengths)
            loss = lam * self.loss(logits, y) + (1 - lam) * self.loss(logits, y[other])
        else:
            logits = self._scored(x, lengths)
            loss = self.loss(logits, y)
        if logits.dim() == 3:  # the metrics score the fused head
            logits = logits[:, 0]
        # the training metrics score a blend against its larger part's label (against y
        # alone, a model that fits every blend scored about 0.6 on ten classes)
        if mixing and lam < 0.5:
            y = y[other]
        self.step_loss = loss.detach()
        self.train_metrics.update(logits.detach(), y)
        self.samples_trained += x.shape[0]
        # the weight as a device tensor: a Python number becomes one through a blocking copy,
        # a device sync every step (it held a captured step's host back by ~3 ms on an H200)
        self.train_loss(loss.detach(), _count(loss, len(y)))
        # not prog_bar: that turns the loss into a number after every step, a device sync;
        # the progress bar (utils.callbacks.StepLossBar) reads step_loss when it redraws
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(y))
        # a captured step has trained already: nothing for Lightning to back-propagate
        return None if captured is not None else loss

    def _captured_step(self, x: Tensor, y: Tensor, lengths: Tensor | None, lam: float,
                       other: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """(loss, logits) of this batch's step as a CUDA graph (models/train_step.py), which
        updates the weights itself; None where the step runs eagerly (capture not asked for,
        a batch of another shape or kind than the recorded one, or a model that could not be
        captured)."""
        optimizer = self.trainer.optimizers[0] if self.capture_train_step else None
        if not isinstance(optimizer, GraphAdamW):
            return None
        if self.train_step_graph is None:
            trainer = self.trainer
            clip = trainer.gradient_clip_val or 0.0
            by_value = str(trainer.gradient_clip_algorithm) == "value"
            self.train_step_graph = CapturedTrainStep(
                self._scored, self.loss, optimizer, clip_norm=0.0 if by_value else clip,
                clip_value=clip if by_value else 0.0)
        step = self.train_step_graph
        if not step.accepts(x, lengths):
            return None
        if other is None:
            other = torch.arange(len(y), device=y.device)
        try:
            outputs = step(x, y, lam, other, lengths)
        except RuntimeError as exc:
            self.capture_train_step = False
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.info("train step: eager from here on, not captured as a CUDA graph (%s)", reason)
            return None
        optimizer.updated_in_step = True
        return outputs

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val", self.val_metrics, self.val_confusion,
                       self.val_loss)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test", self.test_metrics, self.test_confusion,
                       self.test_loss)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities (B, num_classes) for a batch x, (x, y) or (x, y, lengths)."""
        if isinstance(batch, (tuple, list)):
            x, _, lengths = _unpack(batch)
        else:
            x, lengths = batch, None
        return torch.softmax(self(x, lengths).float(), dim=-1)

    def _evaluate(
        self,
        batch: tuple[Tensor, Tensor],
        batch_idx: int,
        stage: str,
        metrics: MetricCollection,
        confusion: MulticlassConfusionMatrix,
        mean_loss: MeanMetric,
    ) -> None:
        x, y, lengths = _unpack(batch)
        logits = self(x, lengths)
        keep = self._real_items(stage, batch_idx, len(y))
        if keep is not None:  # drop the repeats DistributedSampler pads the last batches with
            logits, y = logits[keep], y[keep]
            if len(y) == 0:
                return
        if stage == "test":
            self._test_probs.append(torch.softmax(logits.float(), -1).detach().cpu())
            self._test_labels.append(y.detach().cpu())
        loss = self.loss(logits, y)
        mean_loss.update(loss, _count(loss, len(y)))
        metrics.update(logits, y)
        confusion.update(logits, y)
        self.log(f"{stage}/loss", mean_loss, prog_bar=stage == "val")
        self.log_dict(metrics)

    def _real_items(self, stage: str, batch_idx: int, n: int) -> Tensor | None:
        """Mask of the batch items that are not DistributedSampler padding, or None.

        An unshuffled DistributedSampler pads the dataset to a multiple of the world size by
        repeating its first items; rank r reads positions r, r + W, r + 2W ..., so position i
        of this rank is item i * W + r and is padding if that is past the dataset's end.
        Counting those repeats would bias every metric of a multi-process evaluation.
        """
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        if (not isinstance(sampler, DistributedSampler) or sampler.shuffle or sampler.drop_last
                or loader.batch_size is None):
            return None
        size = len(sampler.dataset)
        if sampler.total_size == size:
            return None
        position = batch_idx * loader.batch_size + torch.arange(n, device=self.device)
        return position * sampler.num_replicas + sampler.rank < size

    # ------------------------------------------------------------------ epoch ends

    def on_validation_epoch_end(self) -> None:
        cm = self.val_confusion.compute()  # collective: every rank computes
        self.val_confusion.reset()
        if self.trainer.sanity_checking:
            return
        self._log_report("val", cm)

    def on_test_epoch_start(self) -> None:
        self._test_probs: list[Tensor] = []
        self._test_labels: list[Tensor] = []

    def on_test_epoch_end(self) -> None:
        cm = self.test_confusion.compute()
        self.test_confusion.reset()
        text, report = self._log_report("test", cm)
        self.test_results = {
            "confusion_matrix": cm.cpu(),
            "class_names": list(self.class_names),
            "report_text": text,
            "report": report,
            # this rank's items in loader order (all of them in a single-process run): what
            # an ensemble averages and the bootstrap resamples
            "probabilities": torch.cat(self._test_probs) if self._test_probs else None,
            "labels": torch.cat(self._test_labels) if self._test_labels else None,
        }

    def _log_report(self, stage: str, cm: Tensor) -> tuple[str, dict[str, Any]]:
        text, report = classification_report_from_confusion(cm, self.class_names)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_figure"):
            step = self.global_step
            fig = plot_confusion_matrix(cm, self.class_names, title=f"{stage} confusion matrix")
            experiment.add_figure(f"{stage}/confusion_matrix", fig, step, close=True)
            # indented = preformatted in TensorBoard's markdown text plugin
            experiment.add_text(f"{stage}/classification_report", _indent(text), step)
        return text, report

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self.model.optimizer_groups(hp.weight_decay)
        # on a GPU without a GradScaler (bf16-mixed, 32): the fused kernels, one launch per
        # parameter group instead of a dozen foreach ones (configure_gradient_clipping clips
        # for it); with a GradScaler (16-mixed) the foreach kernels, which Lightning unscales
        if self.capture_train_step:
            optimizer = GraphAdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas),
                                          fused=self._fused_optimizer() or None)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = hp.warmup * total if hp.warmup < 1 else hp.warmup
        schedule = WarmupCosine(total, round(warmup), hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }

    def _fused_optimizer(self) -> bool:
        """Fused AdamW: on a GPU, unless a GradScaler unscales the gradients (16-mixed)."""
        trainer = self._trainer
        if trainer is None or self.device.type != "cuda":
            return False
        return getattr(trainer.precision_plugin, "scaler", None) is None

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except for the fused optimizer (no GradScaler, so nothing to
        unscale), which Lightning's mixed-precision plugin refuses: clipped here the same way."""
        if getattr(optimizer, "updated_in_step", False):
            return  # clipped inside the captured step, before its update
        if not gradient_clip_val or not optimizer.defaults.get("fused"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if gradient_clip_algorithm == "value":
            nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        else:
            nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)


class SignalEnsemble(pl.LightningModule):
    """Prediction with several trained `SignalClassifierModule`s (an ensemble's members, or
    one): `predict_step` gives the mean of their class probabilities (B, num_classes)."""

    def __init__(self, members: Sequence[SignalClassifierModule]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.class_names = list(members[0].class_names)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x: (B, T) float signal -> (B, num_classes) mean class probabilities."""
        return torch.stack([torch.softmax(m(x, lengths).float(), -1)
                            for m in self.members]).mean(0)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, (tuple, list)):
            x, _, lengths = _unpack(batch)
        else:
            x, lengths = batch, None
        return self(x, lengths)


def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x, y) or (x, y, lengths) -> (x, y, lengths or None)."""
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    return batch[0], batch[1], None


def _count(like: Tensor, n: int) -> Tensor:
    """n as a float32 scalar on like's device, made there (no host-to-device copy)."""
    return torch.full((), float(n), dtype=torch.float32, device=like.device)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# ---------------------------------------------------------------------- RNG state helpers


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_states() -> dict[str, Any]:
    """This process's RNG states as plain values and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"].cpu())
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in states["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective call under torch.distributed)."""
    local = rng_states()
    rank, world = _rank_and_world()
    if world == 1:
        return [local]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    return gathered
