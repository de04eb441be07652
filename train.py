"""Train, evaluate and predict with the dual-branch (spectrogram CNN + RWKV) signal classifier.

Usage: `python train.py --help` (examples included) and `python train.py predict --help`.

Glue only: the data side is data.datamodule.SignalDataModule, the model and its loss/metrics/
optimizer models.lightning_module.SignalClassifierModule, the loop Lightning's Trainer, the
command line (options, checks, --config YAML) utils.cli.
"""

from __future__ import annotations

import argparse
import csv
import logging
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from data.datamodule import DataConfig, SignalDataModule, prediction_inputs
from data.formats import UNLABELLED, DataError, source_exists
from models.defaults import DataFacts, auto_ensemble, auto_model, auto_train_steps
from models.lightning_module import SignalClassifierModule
from utils.checkpoint_io import AtomicCheckpointIO, atomic_open, write_failure
from utils.checks import check_before_training, check_options, check_steps_per_process
from utils.cli import (
    CPU_DEFAULTS,
    GPU_DEFAULTS,
    PRECISIONS,
    ConfigError,
    build_parser,
    build_predict_parser,
    parse_args,
)
from utils.guards import NonFiniteGuard, TrainingFailed
from utils.memory import MemoryMonitorCallback, optimize_memory_usage
from utils.metrics import (
    bootstrap_intervals,
    classification_report_from_confusion,
    confusion_from_predictions,
    metrics_from_predictions,
    save_confusion_matrix_png,
    to_plain,
    write_json,
)
from utils.run_dir import (
    check_prediction_output,
    claim_run_folder,
    find_last_checkpoint,
    is_launching_process,
    lock_run_folder,
    release_run_folder,
)
from utils.throughput import GraphCapture, ThroughputMonitor

log = logging.getLogger("train")
MEMBER_SEED_STEP = 1000


# ---------------------------------------------------------------------------------- set-up


def resolve_device(accelerator: str, precision: str) -> tuple[bool, str]:
    """(on_gpu, Lightning precision) for --accelerator and --precision, training and predicting
    alike. A pair that cannot run raises ConfigError (Lightning would swap fp16 for bf16 on CPU)."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--accelerator gpu: no CUDA GPU is visible")
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    precision = PRECISIONS[precision]
    if precision == "auto":
        if not on_gpu:
            precision = "32-true"
        else:
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    elif precision == "16-mixed" and not on_gpu:
        raise ConfigError("--precision 16-mixed needs a GPU; use bf16-mixed or 32-true on CPU")
    return on_gpu, precision


def resolve_hardware(args: argparse.Namespace) -> tuple[bool, str]:
    """(on_gpu, Lightning precision) for the options; fills CPU/GPU size defaults into args."""
    on_gpu, precision = resolve_device(args.accelerator, args.precision)
    for key, value in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sync_batchnorm and not on_gpu:
        raise ConfigError("--sync-batchnorm needs GPUs (PyTorch's SyncBatchNorm is CUDA-only)")
    if args.sync_batchnorm is None:
        args.sync_batchnorm = on_gpu  # a no-op for a single process
    return on_gpu, precision


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        source=args.data, test_source=args.test_data, format=args.format,
        reader_options=dict(args.reader_option or []), synthetic_num_signals=args.synthetic_signals,
        synthetic_imbalance=args.synthetic_imbalance, sample_rate=args.sample_rate,
        length=args.length, length_policy=args.length_policy, window_stride=args.window_stride,
        normalize=args.normalize, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, balance=args.balance, augment=args.augment,
        batch_size=args.batch_size, num_workers=args.num_workers,
        # an ensemble's members differ in their training seed only: one split for all
        seed=getattr(args, "split_seed", args.seed),
        cv_folds=args.cv, cv_fold=getattr(args, "cv_fold", 0),
    )


def fill_data_defaults(args: argparse.Namespace, datamodule: SignalDataModule) -> dict:
    """Fill the options left unset (None) from the data (models/defaults.py); returns the
    automatic settings, explicit options already winning over them."""
    facts = DataFacts(len(datamodule.train_dataset), datamodule.signal_length,
                      datamodule.sample_rate, datamodule.num_classes)
    auto = auto_model(facts)
    if args.n_fft is not None:  # an explicit STFT size moves the settings that follow it
        n_freq = args.n_fft // 2 + 1
        auto.update(hop_length=max(1, args.n_fft // 4),
                    freq_mask_param=min(auto["freq_mask_param"], n_freq // 4))
    for key in ("hidden_size", "num_layers", "patch_size", "cnn_channels", "spectrogram",
                "n_fft", "hop_length", "n_mels"):
        if getattr(args, key) is None:
            setattr(args, key, auto[key])
    if args.epochs is None and args.max_steps is None:
        args.max_steps = auto_train_steps(facts.train_items, datamodule.batch_size)
    return auto


def model_settings(args: argparse.Namespace, sample_rate: float | None,
                   auto: dict[str, Any]) -> dict[str, Any]:
    """The `DualBranchConfig` fields (as a plain dict) the options describe."""
    n_freq = args.n_mels if args.spectrogram == "mel" else args.n_fft // 2 + 1
    masks = ({"freq_mask_param": min(auto["freq_mask_param"], max(0, n_freq - 1)),
              "time_mask_param": auto["time_mask_param"]} if args.spec_augment
             else {"freq_mask_param": 0, "time_mask_param": 0})
    return {
        "branches": args.branches,
        "fusion": args.fusion,
        "dropout": args.dropout,
        "instance_norm": args.instance_norm,
        "keep_amplitude": args.keep_amplitude and args.instance_norm,
        "time": {
            "hidden_size": args.hidden_size, "num_layers": args.num_layers,
            "patch_size": args.patch_size, "stem": args.stem, "pooling": args.pooling,
            "bidirectional": args.bidirectional,
            "dropout": args.rwkv_dropout, "gradient_checkpointing": args.gradient_checkpointing,
            "compile_blocks": args.compile, "compile_mode": args.compile_mode,
            "wkv_backend": args.wkv_backend,
        },
        "freq": {
            "spectrogram": args.spectrogram, "sample_rate": round(sample_rate or 16000),
            "n_fft": args.n_fft, "hop_length": args.hop_length,
            "n_mels": min(args.n_mels, args.n_fft // 2 + 1), "channels": list(args.cnn_channels),
            **masks,
        },
    }


def _version_of(checkpoint: Path, output_dir: str, name: str) -> str | None:
    """The run folder's version if `checkpoint` lies in DIR/NAME/version_N/checkpoints/."""
    run = checkpoint.resolve().parent.parent
    if checkpoint.parent.name == "checkpoints" and run.parent == Path(output_dir, name).resolve():
        return run.name
    return None


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
        print(f"epoch {trainer.current_epoch + 1}/{total}: {values} "
              f"({time.perf_counter() - self._started:.1f} s)", flush=True)


def build_callbacks(args: argparse.Namespace, validation: bool) -> list[Callback]:
    """Checkpoints (best by --monitor when there is a validation split; last always), learning
    rate, memory, the epoch summary, early stopping and the progress bar."""
    mode = "min" if args.monitor == "val/loss" else "max"
    short = args.monitor.split("/")[-1]
    callbacks: list[Callback] = []
    if validation:
        callbacks.append(ModelCheckpoint(
            monitor=args.monitor, mode=mode, save_top_k=1,
            filename=f"best-epoch={{epoch:03d}}-{short}={{{args.monitor}:.4f}}",
            auto_insert_metric_name=False))
    callbacks += [
        # every epoch's end, for --resume (save_last=True only writes when the best changes)
        ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        MemoryMonitorCallback(every_n_steps=args.memory_log_every),
        EpochSummary(),
        GraphCapture(),  # on a GPU: the whole classifier compiled, its step as CUDA graphs
        ThroughputMonitor(every_n_steps=args.memory_log_every),
    ]
    if args.patience > 0 and validation:
        # checked after each validation, not at the training epoch's end: a --max-steps run
        # that stops mid-epoch skips that epoch's validation and has nothing to check
        callbacks.append(EarlyStopping(monitor=args.monitor, mode=mode, patience=args.patience,
                                       check_on_train_epoch_end=False))
    if args.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return callbacks


def _quiet_known_warnings() -> None:
    for pattern in (r".*does not have many workers.*", r".*is smaller than the logging interval.*",
                    r".*`srun` command is available on your system.*",
                    r".*LeafSpec.*is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


# ---------------------------------------------------------------------------------- training


@dataclass
class Run:
    """Everything `train` sets up before fitting."""

    datamodule: SignalDataModule
    module: SignalClassifierModule
    trainer: pl.Trainer
    resume: Path | None
    precision: str
    effective_batch: int
    lr: float


def set_up(args: argparse.Namespace, extra_callbacks: list[Callback] | None = None,
           log_dir: tuple[Path, str] | None = None,
           datamodule: SignalDataModule | None = None) -> Run:
    """Data, Trainer and module for the options. Bad values raise ConfigError/DataError.
    log_dir: (folder, name) to log into (an ensemble member's), else --output-dir/--name;
    datamodule: one already set up for these options (an ensemble's members share one)."""
    # first: the CUDA allocator settings only take effect before CUDA initialises
    memory_settings = optimize_memory_usage()
    on_gpu, precision = resolve_hardware(args)
    check_options(args, on_gpu)  # output folder, devices, --length vs memory: before any work
    pl.seed_everything(args.seed, workers=True, verbose=False)
    if on_gpu:
        # Build the CUDA WKV extension here, before Lightning starts the other ranks; they find
        # it cached (models/wkv_build.py holds a file lock while building).
        from models.wkv_build import load_extension_or_none, why_unavailable

        if load_extension_or_none() is None:
            rank_zero_only(log.warning)("WKV CUDA kernel unavailable (%s)", why_unavailable())

    resume = None
    version = None
    resume_weights = None
    if args.resume:
        resume = (find_last_checkpoint(args.output_dir, args.name) if args.resume == "last"
                  else Path(args.resume))
        version = _version_of(resume, args.output_dir, args.name)
        if version is not None and is_launching_process():  # refused if a live run holds it
            lock_run_folder(Path(args.output_dir, args.name, version))
        checkpoint = read_checkpoint(resume)
        if "optimizer_states" not in checkpoint:
            raise ConfigError(f"--resume {resume}: the checkpoint holds weights only (no "
                              "optimizer state), so it cannot continue a run")
        resume_weights = checkpoint["state_dict"]
    run_folder = None
    try:
        if datamodule is None:
            datamodule = prepare_data(args)
        auto = fill_data_defaults(args, datamodule)
        batch_size = datamodule.batch_size
        check_before_training(args, datamodule, model_settings(args, datamodule.sample_rate, auto),
                              batch_size, on_gpu, precision)
        if log_dir is None:
            if version is None and is_launching_process():  # other ranks use rank 0's folder
                run_folder = claim_run_folder(args.output_dir, args.name)
                version = run_folder.name
            logger = TensorBoardLogger(args.output_dir, name=args.name, version=version,
                                       default_hp_metric=False)
        else:  # an ensemble member: FOLDER/NAME, no version level
            logger = TensorBoardLogger(log_dir[0], name=log_dir[1], version="",
                                       default_hp_metric=False)
        steps_per_epoch = max(1, len(datamodule.train_dataset) // batch_size)
        nonfinite_guard = NonFiniteGuard(hint=f"; lower --lr (now {args.lr:g}) or check the data")
        trainer = pl.Trainer(
            accelerator="gpu" if on_gpu else "cpu",
            devices=args.devices,
            num_nodes=args.num_nodes,
            strategy=args.strategy,
            precision=precision,
            max_epochs=args.epochs if args.max_steps is None else -1,
            max_steps=args.max_steps or -1,
            gradient_clip_val=args.grad_clip or None,
            accumulate_grad_batches=args.accumulate,
            sync_batchnorm=args.sync_batchnorm,
            logger=logger,
            callbacks=build_callbacks(args, datamodule.has_validation) + [nonfinite_guard]
            + list(extra_callbacks or []),
            plugins=[AtomicCheckpointIO()],  # checkpoints whole or absent, even on a full disk
            log_every_n_steps=min(50, steps_per_epoch),
            enable_progress_bar=args.progress_bar,
            num_sanity_val_steps=0,
        )
        check_steps_per_process(len(datamodule.train_dataset), batch_size, trainer.world_size)
        world = trainer.world_size * trainer.accumulate_grad_batches
        scale = {"none": 1.0, "linear": float(world), "sqrt": world**0.5}[args.lr_scaling]
        class_weights = datamodule.class_weights
        module = SignalClassifierModule(
            model=model_settings(args, datamodule.sample_rate, auto),
            num_classes=datamodule.num_classes,
            class_names=datamodule.class_names,
            class_weights=None if class_weights is None else class_weights.tolist(),
            lr=args.lr * scale, weight_decay=args.weight_decay, warmup=args.warmup,
            min_lr_ratio=args.min_lr_ratio, label_smoothing=args.label_smoothing,
            mixup=args.mixup, data=to_plain(datamodule.trained_settings()),
        )
        if resume_weights is not None:
            difference = state_dict_difference(module, resume_weights)
            if difference:
                raise ConfigError(f"--resume {resume}: the checkpoint's model does not fit "
                                  f"these options ({difference}); resume with the options of "
                                  "its run")
    except BaseException as exc:
        if run_folder is not None:  # a run refused at set-up leaves no empty folder behind
            release_run_folder(run_folder, remove_if_empty=True)
        if isinstance(exc, (ValueError, MisconfigurationException)):
            raise ConfigError(str(exc).strip().splitlines()[0]) from exc
        raise
    run = Run(datamodule, module, trainer, resume, precision, batch_size * world,
              args.lr * scale)
    n_params = sum(p.numel() for p in module.parameters())
    rank_zero_only(print)(
        f"model: branches={args.branches}, {n_params / 1e6:.3f} M parameters; "
        f"precision {precision}; {trainer.world_size} process(es) x batch {batch_size} x "
        f"accumulate {trainer.accumulate_grad_batches} = effective batch {run.effective_batch}, "
        f"lr {run.lr:.3g} (scaling {args.lr_scaling})\n"
        f"memory settings: {memory_settings}\n"
        f"logs: {logger.log_dir}" + (f"\nresuming from {resume}" if resume else ""),
        flush=True,
    )
    return run


def train(args: argparse.Namespace, extra_callbacks: list[Callback] | None = None
          ) -> dict[str, Any]:
    """Fit and test one model, or with --ensemble K, K models whose test probabilities are
    averaged. Returns the summary of train_one (or of the ensemble)."""
    if args.cv:
        return train_cv(args, extra_callbacks)
    datamodule = None
    if args.ensemble is None:  # automatic: by the size of the training part
        on_gpu, _ = resolve_hardware(args)  # the data module needs the hardware defaults
        check_options(args, on_gpu)  # before reading any data
        datamodule = prepare_data(args)
        args.ensemble = choose_ensemble(args, len(datamodule.train_dataset))
    if args.ensemble == 1:
        return train_one(args, extra_callbacks, datamodule=datamodule)
    return train_ensemble(args, extra_callbacks, datamodule=datamodule)


def prepare_data(args: argparse.Namespace) -> SignalDataModule:
    """The data module for the options, set up (read, split); ConfigError for bad values."""
    try:
        datamodule = SignalDataModule(data_config(args))
        datamodule.setup("fit")
    except DataError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc
    return datamodule


def choose_ensemble(args: argparse.Namespace, train_items: int) -> int:
    """--ensemble's automatic value: auto_ensemble's, or 1 where an ensemble cannot run
    (several processes, or resuming one run)."""
    one_process = args.devices in ("auto", 1, "1") and args.num_nodes == 1
    return auto_ensemble(train_items) if one_process and not args.resume else 1


def _one_process_only(args: argparse.Namespace, option: str) -> None:
    if args.resume:
        raise ConfigError(f"--resume continues one run; it cannot be combined with {option}")
    if args.devices not in ("auto", 1, "1") or args.num_nodes != 1:
        raise ConfigError(f"{option} trains its runs one after another in one process; "
                          "use --devices 1")


def train_cv(args: argparse.Namespace, extra_callbacks: list[Callback] | None = None
             ) -> dict[str, Any]:
    """--cv K: K runs, fold k of K stratified (and grouped) folds as the test part of run k,
    in DIR/NAME/version_N/fold_k; per-fold metrics, their mean and sd, and the metrics of
    all folds' predictions pooled (every record tested once) in DIR/NAME/version_N."""
    _one_process_only(args, "--cv")
    if args.test_data:
        raise ConfigError("--cv splits --data itself into folds; drop --test-data (an "
                          "official test set is for one final test, not for folds)")
    started = time.perf_counter()
    folder = claim_run_folder(args.output_dir, args.name)
    folds, probabilities, labels = [], [], []
    for k in range(args.cv):
        fold_args = argparse.Namespace(**vars(args), cv_fold=k)
        print(f"cross-validation fold {k + 1}/{args.cv}", flush=True)
        resolve_hardware(fold_args)
        fold_data = prepare_data(fold_args)
        if fold_args.ensemble is None:
            fold_args.ensemble = choose_ensemble(fold_args, len(fold_data.train_dataset))
        if fold_args.ensemble > 1:
            result = train_ensemble(fold_args, extra_callbacks, folder / f"fold_{k}",
                                    fold_data)
        else:
            result = train_one(fold_args, extra_callbacks, (folder, f"fold_{k}"), quiet=True,
                               datamodule=fold_data)
        if result.get("probabilities") is None:
            raise ConfigError(f"fold {k} has no test items; use fewer --cv folds")
        probabilities.append(result.pop("probabilities"))
        labels.append(result.pop("labels"))
        folds.append(result)
    names = folds[0]["class_names"]
    keys = [k for k in folds[0]["metrics"] if k in ("test/acc", "test/balanced_acc",
                                                   "test/macro_f1", "test/kappa")]
    per_fold = {k: [float(f["metrics"][k]) for f in folds] for k in keys}
    summary = {
        "cv_folds": args.cv,
        "fold_metrics": per_fold,
        "fold_mean": {k: float(np.mean(v)) for k, v in per_fold.items()},
        "fold_sd": {k: float(np.std(v, ddof=1)) for k, v in per_fold.items()},
        "folds": folds,
        "seconds": time.perf_counter() - started,
        "run_dir": str(folder),
        **evaluate_probabilities(torch.cat(probabilities), torch.cat(labels), names),
    }
    _write_results(folder, summary, args)
    return summary


def train_ensemble(args: argparse.Namespace, extra_callbacks: list[Callback] | None = None,
                   folder: Path | None = None,
                   datamodule: SignalDataModule | None = None) -> dict[str, Any]:
    """K members with seeds --seed + 1000 k in DIR/NAME/version_N/member_k (or
    FOLDER/member_k); the ensemble's test metrics (mean of the members' probabilities) in
    that folder. Returns the summary with the ensemble's test probabilities and labels."""
    _one_process_only(args, "--ensemble")
    started = time.perf_counter()
    nested = folder is not None
    if datamodule is not None and not nested:  # the members' set-up checks, before the folder
        probe = argparse.Namespace(**vars(args))
        on_gpu, precision = resolve_hardware(probe)
        try:
            auto = fill_data_defaults(probe, datamodule)
            check_before_training(probe, datamodule,
                                  model_settings(probe, datamodule.sample_rate, auto),
                                  datamodule.batch_size, on_gpu, precision)
        except ValueError as exc:
            raise ConfigError(str(exc).strip().splitlines()[0]) from exc
    folder = folder or claim_run_folder(args.output_dir, args.name)
    members = []
    for k in range(args.ensemble):
        member_args = argparse.Namespace(**vars(args))
        member_args.split_seed = getattr(args, "split_seed", args.seed)
        # 1000 apart: ensembles of neighbouring --seed values share no member
        member_args.seed = args.seed + MEMBER_SEED_STEP * k
        print(f"ensemble member {k + 1}/{args.ensemble} (seed {member_args.seed})", flush=True)
        members.append(train_one(member_args, extra_callbacks, (folder, f"member_{k}"),
                                 quiet=True, datamodule=datamodule))
    probabilities = [m.pop("probabilities") for m in members]
    labels = members[0].pop("labels")
    for m in members[1:]:
        m.pop("labels")
    summary = {
        "ensemble": args.ensemble,
        "members": members,
        "seconds": time.perf_counter() - started,
        "run_dir": str(folder),
    }
    mean = None
    if probabilities[0] is not None and labels is not None:
        mean = torch.stack(probabilities).mean(0)
        summary.update(evaluate_probabilities(mean, labels, members[0]["class_names"]))
    _write_results(folder, summary, args, quiet=nested)
    return {**summary, "probabilities": mean, "labels": labels}


def evaluate_probabilities(probabilities: torch.Tensor, labels: torch.Tensor,
                           class_names: list[str]) -> dict[str, Any]:
    """Test metrics, bootstrap 95% intervals, report and confusion matrix of (N, K) class
    probabilities against (N,) labels."""
    predicted = probabilities.argmax(-1).numpy()
    truth = labels.numpy()
    k = len(class_names)
    confusion = confusion_from_predictions(truth, predicted, k)
    text, report = classification_report_from_confusion(confusion, class_names)
    return {"metrics": metrics_from_predictions(truth, predicted, k),
            "confidence_95": bootstrap_intervals(truth, predicted, k),
            "report": report, "report_text": text, "confusion_matrix": confusion.tolist(),
            "class_names": list(class_names)}


def train_one(args: argparse.Namespace, extra_callbacks: list[Callback] | None = None,
              log_dir: tuple[Path, str] | None = None, quiet: bool = False,
              datamodule: SignalDataModule | None = None) -> dict[str, Any]:
    """Fit, then test the best checkpoint (or, without a validation split, the last
    weights); rank 0 writes the results. Returns a summary (test metrics, checkpoints, run
    folder, and the test probabilities for an ensemble) on every rank."""
    started = time.perf_counter()
    run = set_up(args, extra_callbacks, log_dir, datamodule)
    trainer, module = run.trainer, run.module
    trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.resume, weights_only=True)
    if trainer.global_step == 0:
        raise TrainingFailed(f"no training step was taken ({len(run.datamodule.train_dataset)} "
                             f"training items, batch {run.datamodule.batch_size}, "
                             f"{trainer.world_size} "
                             f"process(es)); nothing was tested, see {trainer.log_dir}")
    print(f"rank {trainer.global_rank}/{trainer.world_size}: trained on "
          f"{module.samples_trained} samples this session, global step {trainer.global_step}, "
          f"parameter checksum {_checksum(module):.9e}", flush=True)

    monitored = [c for c in trainer.checkpoint_callbacks if c.monitor is not None]
    best = monitored[0].best_model_path if monitored else ""
    last = next((c for c in trainer.checkpoint_callbacks if c.monitor is None), None)
    test_results = trainer.test(module, datamodule=run.datamodule, ckpt_path=best or None,
                                weights_only=True, verbose=False)
    run_dir = Path(trainer.log_dir or args.output_dir)
    test = module.test_results
    summary = {
        "metrics": to_plain(test_results[0] if test_results else {}),
        "best_checkpoint": best,
        "last_checkpoint": str(Path(last.dirpath, "last.ckpt")) if last else "",
        "epochs_completed": trainer.current_epoch,
        "global_step": trainer.global_step,
        "effective_batch_size": run.effective_batch,
        "lr": run.lr,
        "precision": run.precision,
        "world_size": trainer.world_size,
        "seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
        "validation_split": run.datamodule.has_validation,
        "report": test.get("report", {}),
        "report_text": test.get("report_text", ""),
        "confusion_matrix": test.get("confusion_matrix"),
        "class_names": test.get("class_names"),
    }
    probabilities, labels = test.get("probabilities"), test.get("labels")
    if trainer.world_size == 1 and probabilities is not None and labels is not None:
        # every test item is on this one rank: the intervals cover the whole test set
        summary["confidence_95"] = bootstrap_intervals(
            labels.numpy(), probabilities.argmax(-1).numpy(), len(test["class_names"]))
    if trainer.is_global_zero:
        try:
            _write_results(run_dir, summary, args, quiet=quiet)
        except OSError as exc:  # a full disk, a folder removed under the run
            raise write_failure(exc, Path(exc.filename or run_dir), atomic=False) from exc
    if log_dir is not None:  # an ensemble member: the ensemble averages these
        summary.update(probabilities=probabilities, labels=labels)
    return summary


def _write_results(run_dir: Path, summary: dict[str, Any], args: argparse.Namespace,
                   quiet: bool = False) -> None:
    """test_metrics.json, classification_report.txt, confusion_matrix.png and config.yaml in
    run_dir; the summary printed unless quiet."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = summary.pop("report_text", "")
    payload = {**summary, "options": vars(args)}
    write_json(run_dir / "test_metrics.json", payload)
    (run_dir / "classification_report.txt").write_text(text + "\n")
    if summary.get("confusion_matrix") is not None:
        save_confusion_matrix_png(summary["confusion_matrix"], summary["class_names"],
                                  run_dir / "confusion_matrix.png", title="test confusion matrix")
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(to_plain({k: v for k, v in vars(args).items() if k != "config"}), f,
                       sort_keys=False)
    if quiet:
        return
    metrics = summary.get("metrics", {})
    intervals = summary.get("confidence_95", {})
    lines = ["", "Test results" + (f" (ensemble of {summary['ensemble']})"
                                   if "ensemble" in summary else "") + ":"]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if key in intervals:
            low, high = intervals[key]
            shown += f"  (95% CI {low:.4f} - {high:.4f})"
        lines.append(f"  {key:<22} {shown}")
    lines += ["", text]
    if "best_checkpoint" in summary:
        why = "no validation ran" if summary["validation_split"] else "no validation split"
        lines.append("best checkpoint: " + (summary["best_checkpoint"]
                                            or f"none ({why}): tested the last weights"))
    lines += [f"results: {run_dir / 'test_metrics.json'}, {run_dir / 'confusion_matrix.png'}",
              f"time: {summary['seconds']:.0f} s"]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------- prediction


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A train.py checkpoint's contents, loaded with weights_only=True; ConfigError for a file
    that is not one (damaged, foreign, or not a dict with hyper_parameters and state_dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"cannot load checkpoint {path}: not a checkpoint of plain tensors "
                          "and containers (weights_only=True refuses other objects)") from exc
    except Exception as exc:  # a damaged or foreign file fails in many ways inside pickle
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"cannot load checkpoint {path}: {type(exc).__name__}: {reason}"
                          ) from exc
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("hyper_parameters"), dict)
            and isinstance(ckpt.get("state_dict"), dict)):
        raise ConfigError(f"{path} is not a train.py checkpoint (no hyper_parameters)")
    return ckpt


def state_dict_difference(module: torch.nn.Module, state: dict[str, Any]) -> str | None:
    """The first way `state` does not fit `module` (a missing or unexpected key, another
    shape), or None where `module.load_state_dict(state)` will succeed."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in state:
            return f"no {key}"
        shape = tuple(getattr(state[key], "shape", ()))
        if shape != tuple(value.shape):
            return f"{key} has shape {shape}, the model's {tuple(value.shape)}"
    unexpected = next((key for key in state if key not in own), None)
    return None if unexpected is None else f"unexpected {unexpected}"


def load_checkpoint(path: str | Path) -> SignalClassifierModule:
    """A SignalClassifierModule from a train.py checkpoint, loaded with weights_only=True."""
    ckpt = read_checkpoint(path)
    try:
        module = SignalClassifierModule(**ckpt["hyper_parameters"])
    except (TypeError, ValueError) as exc:  # another program's, or another version's
        raise ConfigError(f"{path}: its hyper_parameters do not build this train.py's model: "
                          f"{(str(exc).strip().splitlines() or [''])[0]}") from exc
    difference = state_dict_difference(module, ckpt["state_dict"])
    if difference:
        raise ConfigError(f"{path}: its weights do not fit its hyper_parameters ({difference})")
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def model_checkpoints(path: str | Path) -> list[Path]:
    """The checkpoint files `predict --checkpoint` names: a file itself; a run folder's best
    (else last) checkpoint; an ensemble run folder's, one per member."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"--checkpoint: {path} does not exist")

    def chosen(run: Path) -> Path | None:
        best = sorted((run / "checkpoints").glob("best-*.ckpt"))
        last = run / "checkpoints" / "last.ckpt"
        return best[-1] if best else (last if last.is_file() else None)

    members = sorted(path.glob("member_*"), key=lambda p: int(p.name.split("_")[1])
                     if p.name.split("_")[1].isdigit() else -1)
    found = [chosen(m) for m in members] if members else [chosen(path)]
    if not found or None in found:
        raise ConfigError(f"--checkpoint: {path} holds no train.py checkpoint (expected "
                          "checkpoints/last.ckpt, or member_*/checkpoints/ of an ensemble)")
    return found


def predict(args: argparse.Namespace) -> Path:
    """Write per-window class probabilities of --data to --output (CSV); the label column is
    empty for records without a label."""
    on_gpu, precision = resolve_device(args.accelerator, args.precision)
    checkpoints = model_checkpoints(args.checkpoint)
    if not source_exists(args.data):
        raise ConfigError(f"--data: {args.data} does not exist")
    # before predicting: a result that cannot be written, or that replaces an input, is lost
    check_prediction_output(args.output, [Path(args.data), *checkpoints])
    modules = [load_checkpoint(path) for path in checkpoints]
    module = modules[0]
    names = list(module.class_names)
    for other in modules[1:]:
        if list(other.class_names) != names or other.hparams.data != module.hparams.data:
            raise ConfigError(f"--checkpoint {args.checkpoint}: its members were not trained "
                              "on the same data (class names or data settings differ)")
    inputs = prediction_inputs(args.data, module.hparams.data, names, format=args.format,
                               reader_options=dict(args.reader_option or []),
                               window_stride=args.window_stride)
    loader = DataLoader(inputs.items, batch_size=args.batch_size)
    trainer = pl.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    # an ensemble: the mean of its members' probabilities, as in its test metrics
    probs = torch.stack([torch.cat(trainer.predict(m, loader)).float()
                         for m in modules]).mean(0).numpy()

    dataset, output = inputs.dataset, Path(args.output)
    try:
        _write_predictions(output, inputs, probs, names)
    except OSError as exc:
        raise write_failure(exc, output) from exc
    print(f"wrote {len(inputs.windows)} rows ({len(dataset)} signals) to {output}")
    return output


def _write_predictions(output: Path, inputs: Any, probs: Any, names: list[str]) -> None:
    """The prediction CSV, written whole or not at all (an older file stays until then)."""
    dataset = inputs.dataset
    with atomic_open(output, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["record", "group", "start", "end", "label", "predicted",
                         *[f"p_{n}" for n in names]])
        for (record, start), end, p in zip(inputs.windows, inputs.ends, probs, strict=True):
            group = "" if dataset.groups is None else dataset.groups[record]
            label = dataset.labels[record]
            writer.writerow([record, group, start, end,
                             "" if label == UNLABELLED else names[label],
                             names[int(p.argmax())], *[f"{v:.6f}" for v in p]])


# ---------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None, extra_callbacks: list[Callback] | None = None) -> int:
    """Command-line entry: `train.py [options]` or `train.py predict [options]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("train", "models", "data", "utils", "cuda"):
        logging.getLogger(name).setLevel(logging.INFO)
    _quiet_known_warnings()
    predicting = bool(argv) and argv[0] == "predict"
    parser = build_predict_parser() if predicting else build_parser()
    args = parser.parse_args(argv[1:]) if predicting else parse_args(argv)
    try:
        if predicting:
            predict(args)
        else:
            train(args, extra_callbacks)
    except (ConfigError, DataError, MisconfigurationException, FileNotFoundError) as exc:
        # bad options or data: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except TrainingFailed as exc:  # the run went wrong: status 1, apart from bad input
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:  # outside fit (Lightning handles Ctrl-C during it)
        parser.exit(130, f"{parser.prog}: interrupted (Ctrl-C)\n")
    except (MemoryError, torch.OutOfMemoryError) as exc:
        reason = (str(exc).strip().splitlines() or ["out of memory"])[0]
        parser.exit(1, f"{parser.prog}: error: out of memory ({reason[:200]}); pass a smaller "
                       "--batch-size or --length, or --gradient-checkpointing\n")
    except OSError as exc:  # the machine's, not the code's: a disk, a permission, a device
        where = f" ({exc.filename})" if exc.filename else ""
        parser.exit(1, f"{parser.prog}: error: {exc.strerror or exc}{where}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
