"""Train, evaluate and predict with the dual-branch (spectrogram CNN + RWKV) signal classifier.

    python train.py [fit] [options]     train, then test on the held-out split (the default)
    python train.py test --checkpoint CKPT --data FILE     test metrics on labelled data
    python train.py predict --checkpoint CKPT --data FILE --output probs.csv [--aggregate mean]
    python train.py [command] --help | --print-config

Glue only. The options are the dataclasses of utils/cli.py (flags and YAML derived from them);
the data side is data.datamodule.SignalDataModule, the model and its loss/metrics/optimizer
models.lightning_module.SignalClassifierModule, the defaults that follow the data
models.defaults, the checkpoints that test and predict load models.checkpoint, the loop
Lightning's Trainer, and the cross-cutting work callbacks (RNG state, epoch lines, the
prediction CSV: utils/callbacks.py; throughput: utils/throughput.py; memory: utils/memory.py).
The experiment logger is utils/loggers.py's, the run folders utils/run_dir.py's, and the
results (metrics, files, pictures) come from utils/metrics.py and utils/report.py.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch and Lightning import: one line, no traceback
    def _interrupted_while_starting(signum, frame) -> None:
        sys.stderr.write("train.py: interrupted (Ctrl-C) while starting; nothing was written\n")
        os._exit(130)

    signal.signal(signal.SIGINT, _interrupted_while_starting)

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from data.datamodule import SignalDataModule
from data.formats import DataError, source_exists, why_missing
from models.checkpoint import (
    load_ensemble,
    model_checkpoints,
    read_checkpoint,
    state_dict_difference,
)
from models.defaults import (
    MEMBER_SEED_STEP,
    auto_ensemble,
    data_facts,
    fill_data_defaults,
    model_settings,
)
from models.lightning_module import SignalClassifierModule, SignalEnsemble
from utils.callbacks import (
    BudgetEMA,
    EpochSummary,
    LastCheckpoint,
    PredictionCSVWriter,
    RNGStateCheckpoint,
    StepLossBar,
)
from utils.checkpoint_io import AtomicCheckpointIO, write_failure
from utils.checks import check_before_training, check_options, check_steps_per_process
from utils.cli import (
    ConfigError,
    PredictOptions,
    TestOptions,
    TrainOptions,
    parse_command,
    resolve_device,
    to_yaml_dict,
)
from utils.guards import NonFiniteGuard, TrainingFailed
from utils.loggers import check_logger, log_final_metrics, make_logger
from utils.logs import quiet_known_warnings
from utils.memory import MemoryMonitorCallback, optimize_memory_usage
from utils.metrics import bootstrap_intervals, evaluate_probabilities, to_plain
from utils.report import report_pictures, write_results
from utils.run_dir import (
    check_output_dir,
    check_prediction_output,
    claim_run_folder,
    find_last_checkpoint,
    is_launching_process,
    lock_run_folder,
    release_run_folder,
    version_of_checkpoint,
)
from utils.throughput import GraphCapture, ThroughputMonitor

log = logging.getLogger("train")


# ---------------------------------------------------------------------------------- set-up


class TrainingInterrupted(Exception):
    """A signal stopped training: the message says how to continue; `code` is the exit
    status (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def resolve_hardware(options: TrainOptions) -> tuple[bool, str]:
    """(on_gpu, Lightning precision) for the options; fills hardware.sync_batchnorm."""
    hardware = options.hardware
    on_gpu, precision = resolve_device(hardware.accelerator, hardware.precision)
    if hardware.sync_batchnorm and not on_gpu:
        raise ConfigError("--sync-batchnorm needs GPUs (PyTorch's SyncBatchNorm is CUDA-only)")
    if hardware.sync_batchnorm is None:
        hardware.sync_batchnorm = on_gpu  # a no-op for a single process
    return on_gpu, precision


def build_callbacks(options: TrainOptions, validation: bool,
                    dirpath: Path | None = None) -> list[Callback]:
    """Checkpoints (best by --monitor when there is a validation split; last always), RNG
    states in them, learning rate, memory, throughput, the epoch summary, early stopping and
    the progress bar."""
    opt = options.optimization
    mode = "min" if opt.monitor == "val/loss" else "max"
    short = opt.monitor.split("/")[-1]
    callbacks: list[Callback] = []
    if validation:
        callbacks.append(ModelCheckpoint(
            dirpath=dirpath, monitor=opt.monitor, mode=mode, save_top_k=1,
            filename=f"best-epoch={{epoch:03d}}-{short}={{{opt.monitor}:.4f}}",
            auto_insert_metric_name=False))
    callbacks += [
        # an epoch's end at most once a minute and the last epoch's, for --resume
        # (save_last=True only writes when the best changes)
        LastCheckpoint(dirpath),
        RNGStateCheckpoint(),
        LearningRateMonitor(logging_interval="step"),
        MemoryMonitorCallback(every_n_steps=options.run.memory_log_every),
        # samples/s per epoch (train, val, test) and per window of steps (with step time,
        # data wait, GPU busy fraction, launches)
        ThroughputMonitor(every_n_steps=options.run.memory_log_every),
        EpochSummary(),
        # on a GPU: the train step recorded as a CUDA graph and replayed (--no-capture: eager)
        GraphCapture(enabled=options.hardware.capture),
    ]
    if opt.ema > 0:
        callbacks.append(BudgetEMA(opt.ema))
    if opt.patience > 0 and validation:
        # checked after each validation, not at the training epoch's end: a --max-steps run
        # that stops mid-epoch skips that epoch's validation and has nothing to check
        callbacks.append(EarlyStopping(monitor=opt.monitor, mode=mode, patience=opt.patience,
                                       check_on_train_epoch_end=False))
    if options.run.progress_bar:
        callbacks.append(StepLossBar(refresh_rate=10))
    return callbacks


def _checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


# ---------------------------------------------------------------------------------- training


@dataclass
class Run:
    """Everything `train_one` sets up before fitting."""

    options: TrainOptions  # with the automatic values filled in
    datamodule: SignalDataModule
    module: SignalClassifierModule
    trainer: pl.Trainer
    logger: Logger
    run_dir: Path
    resume: Path | None
    precision: str
    effective_batch: int
    lr: float


def resolve_options(options: TrainOptions, datamodule: SignalDataModule) -> TrainOptions:
    """A copy of the options with what follows the data filled in (models/defaults.py):
    model sizes, STFT settings and the step budget; explicit values win."""
    model, optimization = fill_data_defaults(options.model, options.optimization, datamodule)
    return dataclasses.replace(options, model=model, optimization=optimization)


def set_up(options: TrainOptions, extra_callbacks: list[Callback] | None = None,
           log_dir: tuple[Path, str] | None = None,
           datamodule: SignalDataModule | None = None) -> Run:
    """Data, Trainer and module for the options. Bad values raise ConfigError/DataError.
    log_dir: (folder, name) to log into (an ensemble member's), else --output-dir/--name;
    datamodule: one already set up for these options (an ensemble's members share one)."""
    # first: the CUDA allocator settings only take effect before CUDA initialises
    memory_settings = optimize_memory_usage()
    on_gpu, precision = resolve_hardware(options)
    check_options(options, on_gpu)  # output folder, devices, --length vs memory: before any work
    check_logger(options.run.logger)
    pl.seed_everything(options.seed, workers=True, verbose=False)
    if on_gpu:
        # Build the CUDA WKV extension here, before Lightning starts the other ranks; they find
        # it cached (models/wkv_build.py holds a file lock while building).
        from models.wkv_build import load_extension_or_none, why_unavailable

        if load_extension_or_none() is None:
            rank_zero_only(log.warning)("WKV CUDA kernel unavailable (%s)", why_unavailable())

    run_opts, hardware = options.run, options.hardware
    resume = None
    version = None
    resume_weights = None
    if run_opts.resume:
        resume = (find_last_checkpoint(run_opts.output_dir, run_opts.name)
                  if run_opts.resume == "last" else Path(run_opts.resume))
        version = version_of_checkpoint(resume, run_opts.output_dir, run_opts.name)
        if version is not None and is_launching_process():  # refused if a live run holds it
            lock_run_folder(Path(run_opts.output_dir, run_opts.name, version))
        checkpoint = read_checkpoint(resume)
        if "optimizer_states" not in checkpoint:
            raise ConfigError(f"--resume {resume}: the checkpoint holds weights only (no "
                              "optimizer state), so it cannot continue a run")
        resume_weights = checkpoint["state_dict"]
    run_folder = None
    try:
        if datamodule is None:
            datamodule = prepare_data(options)
        options = resolve_options(options, datamodule)
        opt = options.optimization
        batch_size = datamodule.batch_size
        check_before_training(options, datamodule,
                              model_settings(options.model, data_facts(datamodule)),
                              batch_size, on_gpu, precision)
        if log_dir is None:
            if version is None and is_launching_process():  # other ranks use rank 0's folder
                run_folder = claim_run_folder(run_opts.output_dir, run_opts.name)
                version = run_folder.name
            logger = make_logger(run_opts.logger, run_opts.output_dir, run_opts.name, version)
            run_dir = Path(run_opts.output_dir, run_opts.name, version or "")
        else:  # an ensemble member: FOLDER/NAME, no version level
            logger = make_logger(run_opts.logger, log_dir[0], log_dir[1], "")
            run_dir = Path(log_dir[0], log_dir[1])
        # TensorBoard and CSV loggers place checkpoints in their folder themselves (rank 0's,
        # broadcast); the others log elsewhere, so the run folder is named
        dirpath = None if run_opts.logger in ("tensorboard", "csv") else run_dir / "checkpoints"
        steps_per_epoch = max(1, len(datamodule.train_dataset) // batch_size)
        nonfinite_guard = NonFiniteGuard(hint=f"; lower --lr (now {opt.lr:g}) or check the data")
        trainer = pl.Trainer(
            accelerator="gpu" if on_gpu else "cpu",
            devices=hardware.devices,
            num_nodes=hardware.num_nodes,
            strategy=hardware.strategy,
            precision=precision,
            max_epochs=opt.epochs if opt.max_steps is None else -1,
            max_steps=opt.max_steps or -1,
            gradient_clip_val=opt.grad_clip or None,
            accumulate_grad_batches=opt.accumulate,
            sync_batchnorm=hardware.sync_batchnorm,
            logger=logger,
            callbacks=build_callbacks(options, datamodule.has_validation, dirpath)
            + [nonfinite_guard] + list(extra_callbacks or []),
            plugins=[AtomicCheckpointIO()],  # checkpoints whole or absent, even on a full disk
            log_every_n_steps=min(50, steps_per_epoch),
            enable_progress_bar=run_opts.progress_bar,
            num_sanity_val_steps=0,
        )
        check_steps_per_process(len(datamodule.train_dataset), batch_size, trainer.world_size)
        world = trainer.world_size * trainer.accumulate_grad_batches
        scale = {"none": 1.0, "linear": float(world), "sqrt": world**0.5}[opt.lr_scaling]
        module = SignalClassifierModule.from_options(options.model, opt, datamodule,
                                                     lr=opt.lr * scale)
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
    run = Run(options, datamodule, module, trainer, logger, run_dir, resume, precision,
              batch_size * world, opt.lr * scale)
    n_params = sum(p.numel() for p in module.parameters())
    rank_zero_only(print)(
        f"model: branches={options.model.branches}, {n_params / 1e6:.3f} M parameters; "
        f"precision {precision}; {trainer.world_size} process(es) x batch {batch_size} x "
        f"accumulate {trainer.accumulate_grad_batches} = effective batch {run.effective_batch}, "
        f"lr {run.lr:.3g} (scaling {opt.lr_scaling})\n"
        + (f"memory settings: {memory_settings}\n" if on_gpu else "")  # CUDA's only
        + f"logs: {run_dir}" + (f"\nresuming from {resume}" if resume else ""),
        flush=True,
    )
    return run


def train(options: TrainOptions, extra_callbacks: list[Callback] | None = None
          ) -> dict[str, Any]:
    """Fit and test one model, or with --ensemble K, K models whose test probabilities are
    averaged, or with --cv K one run per fold. Returns the summary of train_one (or of the
    ensemble / cross-validation)."""
    options = copy.deepcopy(options)  # the automatic values are filled into a copy
    check_logger(options.run.logger)  # before any folder is claimed
    if options.data.cv_folds:
        return train_cv(options, extra_callbacks)
    datamodule = None
    if options.run.ensemble is None:  # automatic: by the size of the training part
        on_gpu, _ = resolve_hardware(options)
        check_options(options, on_gpu)  # before reading any data
        datamodule = prepare_data(options)
        options.run.ensemble = choose_ensemble(options, len(datamodule.train_dataset))
    if options.run.ensemble == 1:
        return train_one(options, extra_callbacks, datamodule=datamodule)
    return train_ensemble(options, extra_callbacks, datamodule=datamodule)


def prepare_data(options: TrainOptions) -> SignalDataModule:
    """The data module for the options, set up (read, split); ConfigError for bad values."""
    try:
        datamodule = SignalDataModule(options.data)
        datamodule.setup("fit")
    except DataError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc
    return datamodule


def _one_process(options: TrainOptions) -> bool:
    return options.hardware.devices in ("auto", 1, "1") and options.hardware.num_nodes == 1


def choose_ensemble(options: TrainOptions, train_items: int) -> int:
    """--ensemble's automatic value: auto_ensemble's, or 1 where an ensemble cannot run
    (several processes, or resuming one run)."""
    return auto_ensemble(train_items) if _one_process(options) and not options.run.resume else 1


def _one_process_only(options: TrainOptions, option: str) -> None:
    if options.run.resume:
        raise ConfigError(f"--resume continues one run; it cannot be combined with {option}")
    if not _one_process(options):
        raise ConfigError(f"{option} trains its runs one after another in one process; "
                          "use --devices 1")


def train_cv(options: TrainOptions, extra_callbacks: list[Callback] | None = None
             ) -> dict[str, Any]:
    """--cv K: K runs, fold k of K stratified (and grouped) folds as the test part of run k,
    in DIR/NAME/version_N/fold_k; per-fold metrics, their mean and sd, and the metrics of
    all folds' predictions pooled (every record tested once) in DIR/NAME/version_N."""
    _one_process_only(options, "--cv")
    if options.data.test_source:
        raise ConfigError("--cv splits --data itself into folds; drop --test-data (an "
                          "official test set is for one final test, not for folds)")
    started = time.perf_counter()
    first = copy.deepcopy(options)  # the folds are checked (fold 0 read) before the folder
    first.data.cv_fold = 0
    resolve_hardware(first)
    first_data = prepare_data(first)
    folder = claim_run_folder(options.run.output_dir, options.run.name)
    folds, probabilities, labels = [], [], []
    for k in range(options.data.cv_folds):
        fold = copy.deepcopy(options)
        fold.data.cv_fold = k
        print(f"cross-validation fold {k + 1}/{options.data.cv_folds}", flush=True)
        resolve_hardware(fold)
        fold_data = first_data if k == 0 else prepare_data(fold)
        if fold.run.ensemble is None:
            fold.run.ensemble = choose_ensemble(fold, len(fold_data.train_dataset))
        if fold.run.ensemble > 1:
            result = train_ensemble(fold, extra_callbacks, folder / f"fold_{k}", fold_data)
        else:
            result = train_one(fold, extra_callbacks, (folder, f"fold_{k}"), quiet=True,
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
        "cv_folds": options.data.cv_folds,
        "fold_metrics": per_fold,
        "fold_mean": {k: float(np.mean(v)) for k, v in per_fold.items()},
        "fold_sd": {k: float(np.std(v, ddof=1)) for k, v in per_fold.items()},
        "folds": folds,
        "seconds": time.perf_counter() - started,
        "run_dir": str(folder),
        **evaluate_probabilities(torch.cat(probabilities), torch.cat(labels), names),
    }
    write_results(folder, summary, to_yaml_dict(options))
    return summary


def train_ensemble(options: TrainOptions, extra_callbacks: list[Callback] | None = None,
                   folder: Path | None = None,
                   datamodule: SignalDataModule | None = None) -> dict[str, Any]:
    """K members with seeds seed + 1000 k in DIR/NAME/version_N/member_k (or
    FOLDER/member_k); the ensemble's test metrics (mean of the members' probabilities) in
    that folder. Returns the summary with the ensemble's test probabilities and labels."""
    _one_process_only(options, "--ensemble")
    started = time.perf_counter()
    nested = folder is not None
    if datamodule is not None and not nested:  # the members' set-up checks, before the folder
        probe = copy.deepcopy(options)
        on_gpu, precision = resolve_hardware(probe)
        try:
            probe = resolve_options(probe, datamodule)
            check_before_training(probe, datamodule,
                                  model_settings(probe.model, data_facts(datamodule)),
                                  datamodule.batch_size, on_gpu, precision)
        except ValueError as exc:
            raise ConfigError(str(exc).strip().splitlines()[0]) from exc
    folder = folder or claim_run_folder(options.run.output_dir, options.run.name)
    members = []
    for k in range(options.run.ensemble):
        member = copy.deepcopy(options)
        # the members differ in their training seed only (models.defaults.MEMBER_SEED_STEP)
        member.run.seed = options.seed + MEMBER_SEED_STEP * k
        print(f"ensemble member {k + 1}/{options.run.ensemble} (seed {member.run.seed})",
              flush=True)
        members.append(train_one(member, extra_callbacks, (folder, f"member_{k}"),
                                 quiet=True, datamodule=datamodule))
    probabilities = [m.pop("probabilities") for m in members]
    labels = members[0].pop("labels")
    for m in members[1:]:
        m.pop("labels")
    summary = {
        "ensemble": options.run.ensemble,
        "members": members,
        "seconds": time.perf_counter() - started,
        "run_dir": str(folder),
    }
    mean = None
    if probabilities[0] is not None and labels is not None:
        mean = torch.stack(probabilities).mean(0)
        summary.update(evaluate_probabilities(mean, labels, members[0]["class_names"]))
    write_results(folder, summary, to_yaml_dict(options), quiet=nested)
    if mean is not None:  # the members' pictures are in their folders; no attribution here
        report_pictures(folder, None, datamodule.test_dataset if datamodule else None, mean,
                        labels, summary["class_names"], summary["report"],
                        datamodule.sample_rate if datamodule else None)
    return {**summary, "probabilities": mean, "labels": labels}


def train_one(options: TrainOptions, extra_callbacks: list[Callback] | None = None,
              log_dir: tuple[Path, str] | None = None, quiet: bool = False,
              datamodule: SignalDataModule | None = None) -> dict[str, Any]:
    """Fit, then test the best checkpoint (or, without a validation split, the last
    weights); rank 0 writes the results and logs the test metrics with the options. Returns
    a summary (test metrics, checkpoints, run folder, and the test probabilities for an
    ensemble) on every rank."""
    started = time.perf_counter()
    run = set_up(options, extra_callbacks, log_dir, datamodule)
    trainer, module, options = run.trainer, run.module, run.options
    try:
        trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.resume, weights_only=True)
    except SystemExit:  # Lightning's exit(1) after its graceful stop on Ctrl-C
        if not trainer.interrupted:
            raise
    if trainer.received_sigterm or trainer.interrupted:  # Lightning stopped the fit
        signal_name = "SIGTERM" if trainer.received_sigterm else "Ctrl-C"
        last = next((c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)),
                    None)
        where = ("no checkpoint was written yet: start the run again" if last is None
                 or last.saved_step is None else
                 f"continue with --resume last (from step {last.saved_step}, the newest epoch "
                 f"end's checkpoint in {run.run_dir / 'checkpoints'})")
        raise TrainingInterrupted(f"stopped by {signal_name} at step {trainer.global_step}; "
                                  f"nothing was tested; {where}",
                                  143 if trainer.received_sigterm else 130)
    if trainer.global_step == 0:
        raise TrainingFailed(f"no training step was taken ({len(run.datamodule.train_dataset)} "
                             f"training items, batch {run.datamodule.batch_size}, "
                             f"{trainer.world_size} "
                             f"process(es)); nothing was tested, see {run.run_dir}")
    if trainer.world_size > 1 or "ddp" in str(options.hardware.strategy):
        # each rank's share and weights: that the ranks agree, and match one process. One
        # write with its newline: unbuffered (PYTHONUNBUFFERED), print() writes the newline
        # apart, and the ranks, printing at the same moment, glued their lines together
        print(f"rank {trainer.global_rank}/{trainer.world_size}: trained on "
              f"{module.samples_trained} samples this session, global step "
              f"{trainer.global_step}, parameter checksum {_checksum(module):.9e}\n", end="",
              flush=True)

    monitored = [c for c in trainer.checkpoint_callbacks if c.monitor is not None]
    best = monitored[0].best_model_path if monitored else ""
    last = next((c for c in trainer.checkpoint_callbacks if c.monitor is None), None)
    try:
        test_results = trainer.test(module, datamodule=run.datamodule, ckpt_path=best or None,
                                    weights_only=True, verbose=False)
    except SystemExit:  # Lightning's exit(1) after Ctrl-C while testing: trained, not tested
        if not trainer.interrupted:
            raise
        raise TrainingInterrupted(f"stopped by Ctrl-C while testing, after training to step "
                                  f"{trainer.global_step}; nothing was tested; test with "
                                  "--resume last (it only tests a run that is done)",
                                  130) from None
    run_dir = run.run_dir
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
            config = to_yaml_dict(options)
            log_final_metrics(run.logger, config, summary["metrics"])
            write_results(run_dir, summary, config, quiet=quiet)
            if trainer.world_size == 1:  # every test item is here
                run.logger.save()  # the event files hold every scalar for the curves
                try:
                    report_pictures(run_dir, module.model, run.datamodule.test_dataset,
                                    probabilities, labels, summary["class_names"] or [],
                                    summary["report"], run.datamodule.sample_rate,
                                    monitor=options.optimization.monitor if best else None,
                                    experiment=getattr(run.logger, "experiment", None),
                                    step=trainer.global_step,
                                    # Lightning's teardown left the model on the CPU
                                    device=trainer.strategy.root_device)
                except KeyboardInterrupt:
                    raise TrainingInterrupted(
                        f"stopped by Ctrl-C while drawing the pictures; the results are kept "
                        f"in {run_dir} (test_metrics.json, the checkpoints); the pictures were "
                        "not drawn", 130) from None
        except OSError as exc:  # a full disk, a folder removed under the run
            raise write_failure(exc, Path(exc.filename or run_dir), atomic=False) from exc
    if log_dir is not None:  # an ensemble member: the ensemble averages these
        summary.update(probabilities=probabilities, labels=labels)
    return summary


# ---------------------------------------------------------------------------------- test, predict


def _predict_with(options: TestOptions | PredictOptions, ensemble: SignalEnsemble,
                  output: Path, labels: str) -> tuple[PredictionCSVWriter, SignalDataModule]:
    """Run the ensemble over --data (read with labels='optional' or 'required') and write the
    prediction CSV to `output`; returns the writer (its rows) and the data module."""
    on_gpu, precision = resolve_device(options.accelerator, options.precision)
    trained = ensemble.members[0].hparams.data
    # prediction: labels optional unless --reader-option says (labels=none for a headerless
    # CSV without them); testing: labels required
    reader_options = ({"labels": "optional", **options.reader_options} if labels == "optional"
                      else {**options.reader_options, "labels": "required"})
    datamodule = SignalDataModule.for_prediction(
        options.data, trained, ensemble.class_names, format=options.format,
        reader_options=reader_options,
        window_stride=options.window_stride, batch_size=options.batch_size)
    datamodule.setup("predict")
    writer = PredictionCSVWriter(output, datamodule.prediction, ensemble.class_names,
                                 options.aggregate)
    trainer = pl.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[writer])
    trainer.predict(ensemble, datamodule=datamodule, return_predictions=False)
    return writer, datamodule


def predict(options: PredictOptions) -> Path:
    """Write the class probabilities of --data to --output (CSV): one row per record
    (--aggregate mean or vote) or per window (none); the label column is empty for records
    without a label."""
    resolve_device(options.accelerator, options.precision)
    checkpoints = model_checkpoints(options.checkpoint)
    if not source_exists(options.data):
        raise ConfigError(f"--data: {options.data} {why_missing(options.data)}")
    # before predicting: a result that cannot be written, or that replaces an input, is lost
    check_prediction_output(options.output, [Path(options.data), *checkpoints])
    ensemble, _ = load_ensemble(options.checkpoint)
    writer, datamodule = _predict_with(options, ensemble, Path(options.output), "optional")
    inputs = datamodule.prediction
    print(f"wrote {len(writer.rows)} rows ({len(inputs.dataset)} signals, "
          f"{len(inputs.windows)} model inputs, --aggregate {options.aggregate}) to "
          f"{options.output}")
    return Path(options.output)


def evaluate_checkpoint(options: TestOptions) -> dict[str, Any]:
    """A checkpoint's (or an ensemble folder's) test metrics on the labelled file --data,
    per record (--aggregate mean or vote) or per model input (none): test_metrics.json,
    classification_report.txt, confusion_matrix.png and predictions.csv in
    --output-dir/--name/version_N."""
    resolve_device(options.accelerator, options.precision)
    checkpoints = model_checkpoints(options.checkpoint)
    if not source_exists(options.data):
        raise ConfigError(f"--data: {options.data} {why_missing(options.data)}")
    check_output_dir(options.output_dir, options.name)
    started = time.perf_counter()
    ensemble, checkpoints = load_ensemble(options.checkpoint)
    folder = claim_run_folder(options.output_dir, options.name)
    try:
        writer, datamodule = _predict_with(options, ensemble, folder / "predictions.csv",
                                           "required")
    except BaseException:
        release_run_folder(folder, remove_if_empty=True)
        raise
    rows, dataset = writer.rows, datamodule.prediction.dataset
    labels = torch.as_tensor(dataset.labels[rows.records], dtype=torch.int64)
    summary = {
        "checkpoints": [str(p) for p in checkpoints],
        "data": str(options.data),
        "aggregate": options.aggregate,
        "items": len(rows),
        "seconds": time.perf_counter() - started,
        "run_dir": str(folder),
        **evaluate_probabilities(torch.as_tensor(rows.probabilities), labels,
                                 ensemble.class_names, predicted=rows.predicted),
    }
    write_results(folder, summary, to_yaml_dict(options))
    return summary


# ---------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None, extra_callbacks: list[Callback] | None = None) -> int:
    """Command-line entry: `train.py [fit] [options]`, `train.py test ...`,
    `train.py predict ...`; errors are one line (exit 2 for bad options or data, 1 for a
    run that failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imports done: Ctrl-C as usual
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("train", "models", "data", "utils", "cuda"):
        logging.getLogger(name).setLevel(logging.INFO)
    quiet_known_warnings()
    prog = "train.py" + (f" {argv[0]}" if argv and argv[0] in ("fit", "test", "predict") else "")

    def fail(code: int, message: str) -> None:
        sys.stderr.write(f"{prog}: error: {message}\n")
        raise SystemExit(code)

    try:
        command, options = parse_command(argv)
        if command == "predict":
            predict(options)
        elif command == "test":
            evaluate_checkpoint(options)
        else:
            train(options, extra_callbacks)
    except (ConfigError, DataError, MisconfigurationException, FileNotFoundError) as exc:
        # bad options or data: one line, not a traceback
        hint = f" (see {prog} --help)" if isinstance(exc, ConfigError) and "\n" not in str(exc) \
            and _is_parse_error(exc) else ""
        fail(2, f"{exc}{hint}")
    except TrainingInterrupted as exc:  # a signal stopped the fit: 130 (Ctrl-C), 143 (TERM)
        sys.stderr.write(f"{prog}: {exc}\n")
        raise SystemExit(exc.code) from None
    except TrainingFailed as exc:  # the run went wrong: status 1, apart from bad input
        fail(1, str(exc))
    except KeyboardInterrupt:  # outside fit (Lightning handles Ctrl-C during it)
        sys.stderr.write(f"{prog}: interrupted (Ctrl-C)\n")
        raise SystemExit(130) from None
    except (MemoryError, torch.OutOfMemoryError) as exc:
        reason = (str(exc).strip().splitlines() or ["out of memory"])[0]
        fail(1, f"out of memory ({reason[:200]}); pass a smaller --batch-size or --length, or "
                "--gradient-checkpointing")
    except OSError as exc:  # the machine's, not the code's: a disk, a permission, a device
        where = f" ({exc.filename})" if exc.filename else ""
        fail(1, f"{exc.strerror or exc}{where}")
    return 0


def _is_parse_error(exc: ConfigError) -> bool:
    return str(exc).startswith(("argument ", "unknown option", "unexpected argument"))


if __name__ == "__main__":
    sys.exit(main())
