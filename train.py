"""Train, evaluate and predict with the dual-branch (spectrogram CNN + RWKV) signal classifier.

examples:
  python train.py                                   # built-in dataset, then test; logs in runs/
  python train.py --config configs/gpu.yaml         # options from YAML; flags override them
  python train.py --data ecg.npz --branches time --epochs 30
  python train.py --devices 2 --strategy ddp        # DDP on one host (see docs/training.md)
  python train.py --resume last                     # continue the newest run of --name
  python train.py predict --checkpoint runs/dual_branch/version_0/checkpoints/last.ckpt \\
      --data new.npz --output probs.csv

Glue only: the data side is data.datamodule.SignalDataModule, the model and its loss/metrics/
optimizer models.lightning_module.SignalClassifierModule, the loop Lightning's Trainer.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import logging
import pickle
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from data.formats import UNLABELLED, DataError
from models.lightning_module import SignalClassifierModule
from utils.memory import MemoryMonitorCallback, optimize_memory_usage
from utils.metrics import save_confusion_matrix_png, to_plain, write_json

log = logging.getLogger("train")

# Sizes that train to a useful result in minutes on a 2-core CPU, and the full model on a GPU.
CPU_DEFAULTS = {"hidden_size": 64, "num_layers": 2, "patch_size": 8,
                "cnn_channels": [16, 32, 64], "epochs": 12, "num_workers": 0}
GPU_DEFAULTS = {"hidden_size": 256, "num_layers": 6, "patch_size": 4,
                "cnn_channels": [16, 32, 64, 128], "epochs": 40, "num_workers": 4}
PRECISIONS = {"auto": "auto", "32": "32-true", "32-true": "32-true", "16": "16-mixed",
              "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
GROUPS = ("data", "model", "optimization", "hardware", "run")  # YAML sections (optional)


class ConfigError(ValueError):
    """A bad option or option value; main() prints it as one line."""


# ---------------------------------------------------------------------------------- parsing


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {value}")
        return value
    return parse


def _float_in(low: float, high: float, high_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        inside = low <= value < high if high_open else low <= value <= high
        if not inside:
            bracket = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"expected a number in [{low}, {high}{bracket}; "
                                             f"got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {value}")
    return value


def _devices(text: str) -> int | str:
    if text == "auto" or re.fullmatch(r"\d+(,\d+)*,?", text) and "," in text:
        return text
    if text == "-1":
        return -1
    return _int_at_least(1)(text)


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE; got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump) that points to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" says nothing; those options explain their default themselves
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The training command line. YAML keys (--config) are the option names with '_'."""
    p = _Parser(
        prog="train.py",
        description="Train and test the dual-branch signal classifier; "
                    "`train.py predict -h` for prediction.",
        epilog=__doc__.split("\n\n")[1] + "\n\nOutputs, TensorBoard tags, DDP/torchrun/SLURM "
               "and resume semantics: docs/training.md",
        formatter_class=_Formatter,
    )
    p.add_argument("--config", metavar="YAML",
                   help="YAML file of options (keys as below with '_', optionally under "
                        f"sections {', '.join(GROUPS)}); command-line flags override it")

    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", metavar="PATH",
                   help="'synthetic' (the built-in dataset) or a file/folder "
                        "(.npz .npy .csv .tsv .ts, WFDB, EDF; see docs/data.md)")
    g.add_argument("--test-data", metavar="PATH",
                   help="official test file (UCR *_TRAIN/*_TEST pairs are found alone); "
                        "default: hold out --test-fraction")
    g.add_argument("--format", choices=["npz", "npy", "csv", "tsv", "ts", "wfdb", "edf"],
                   help="reader for --data (default: by extension)")
    g.add_argument("--reader-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="reader option, repeatable (e.g. channel=MLII); YAML: a mapping")
    g.add_argument("--length", type=_int_at_least(1), metavar="N",
                   help="model input length in samples after resampling (default: the "
                        "dataset's; synthetic: 3750)")
    g.add_argument("--sample-rate", type=_positive_float, metavar="HZ",
                   help="resample to this rate (default: keep the source rate; synthetic: 125)")
    g.add_argument("--length-policy", choices=["pad", "crop", "window"], default="pad",
                   help="records vs --length: pad/truncate, random crop, or cut into windows")
    g.add_argument("--window-stride", type=_int_at_least(1), metavar="N",
                   help="stride of --length-policy window (default: --length)")
    g.add_argument("--normalize", choices=["window", "record", "none"], default="window",
                   help="z-normalise per model input, per record, or not at all")
    g.add_argument("--synthetic-signals", type=_int_at_least(14), default=2000, metavar="N",
                   help="signals in the built-in dataset")
    g.add_argument("--synthetic-imbalance", type=_float_in(1.0, float("inf")), default=1.0,
                   metavar="RATIO",
                   help="built-in dataset: largest / smallest class count")
    g.add_argument("--val-fraction", type=_float_in(0.0, 1.0), default=0.15, metavar="F",
                   help="held out for validation (early stopping, best checkpoint)")
    g.add_argument("--test-fraction", type=_float_in(0.0, 1.0), default=0.15, metavar="F",
                   help="held out when there is no official test set")
    g.add_argument("--balance", choices=["none", "loss", "sampler"], default="none",
                   help="class imbalance: class-weighted loss, or a class-balanced sampler")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random gain and noise on training inputs")
    g.add_argument("--num-workers", type=_int_at_least(0), metavar="N",
                   help=f"DataLoader workers per process (default: {CPU_DEFAULTS['num_workers']}"
                        f" on CPU, {GPU_DEFAULTS['num_workers']} on GPU)")

    g = p.add_argument_group("model")
    g.add_argument("--branches", choices=["both", "time", "freq"], default="both",
                   help="RWKV time branch, spectrogram-CNN frequency branch, or both")
    g.add_argument("--hidden-size", type=_int_at_least(1), metavar="C",
                   help=f"RWKV width (default: {CPU_DEFAULTS['hidden_size']} on CPU, "
                        f"{GPU_DEFAULTS['hidden_size']} on GPU)")
    g.add_argument("--num-layers", type=_int_at_least(1), metavar="L",
                   help=f"RWKV blocks (default: {CPU_DEFAULTS['num_layers']} on CPU, "
                        f"{GPU_DEFAULTS['num_layers']} on GPU)")
    g.add_argument("--patch-size", type=_int_at_least(1), metavar="N",
                   help="RWKV strided-conv stem: samples per step (default: "
                        f"{CPU_DEFAULTS['patch_size']} on CPU, "
                        f"{GPU_DEFAULTS['patch_size']} on GPU)")
    g.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=False,
                   help="add a time-reversed WKV scan to every RWKV block")
    g.add_argument("--cnn-channels", type=_int_at_least(1), nargs="+", metavar="C",
                   help="frequency CNN stage widths (default: "
                        f"{' '.join(map(str, CPU_DEFAULTS['cnn_channels']))} on CPU, "
                        f"{' '.join(map(str, GPU_DEFAULTS['cnn_channels']))} on GPU)")
    g.add_argument("--spectrogram", choices=["mel", "linear"], default="mel",
                   help="frequency-branch input: mel or linear power spectrogram (in dB)")
    g.add_argument("--n-fft", type=_int_at_least(2), default=256, metavar="N",
                   help="STFT size in samples; also the shortest input the branch accepts")
    g.add_argument("--hop-length", type=_int_at_least(1), default=64, metavar="N",
                   help="STFT hop in samples")
    g.add_argument("--n-mels", type=_int_at_least(1), default=64, metavar="N",
                   help="mel bands (capped at n_fft / 2 + 1)")
    g.add_argument("--spec-augment", action=argparse.BooleanOptionalAction, default=True,
                   help="SpecAugment frequency/time masks in training")
    g.add_argument("--fusion", choices=["concat", "gated"], default="concat",
                   help="how the two branches' features are combined")
    g.add_argument("--dropout", type=_float_in(0.0, 1.0), default=0.1, metavar="P",
                   help="dropout before the classifier head")
    g.add_argument("--rwkv-dropout", type=_float_in(0.0, 1.0), default=0.0, metavar="P",
                   help="residual dropout inside the RWKV blocks")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=False, help="recompute RWKV block activations in backward")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile every RWKV block (GPU; slow to start)")
    g.add_argument("--wkv-backend", choices=["auto", "torch", "cuda", "reference"],
                   default="auto", help="WKV operator backend")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=_int_at_least(1), default=32, metavar="N",
                   help="per device; the effective batch is this x devices x nodes x "
                        "--accumulate")
    g.add_argument("--epochs", type=_int_at_least(1), metavar="N",
                   help=f"maximum epochs (default: {CPU_DEFAULTS['epochs']} on CPU, "
                        f"{GPU_DEFAULTS['epochs']} on GPU)")
    g.add_argument("--max-steps", type=_int_at_least(1), metavar="N",
                   help="stop after this many optimizer steps (overrides --epochs for the "
                        "schedule)")
    g.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate")
    g.add_argument("--lr-scaling", choices=["none", "linear", "sqrt"], default="none",
                   help="scale --lr by (effective batch / --batch-size) for multi-device runs")
    g.add_argument("--weight-decay", type=_float_in(0.0, float("inf")), default=0.05,
                   metavar="W", help="AdamW weight decay, on weight matrices and conv kernels "
                                     "only (not on norms, biases or RWKV decay/first/mix)")
    g.add_argument("--warmup", type=_float_in(0.0, float("inf")), default=0.05, metavar="W",
                   help="warmup: fraction of all steps if < 1, else a step count")
    g.add_argument("--min-lr-ratio", type=_float_in(0.0, 1.0, high_open=False), default=0.01,
                   metavar="R",
                   help="the cosine schedule ends at lr x this")
    g.add_argument("--label-smoothing", type=_float_in(0.0, 1.0), default=0.0, metavar="E",
                   help="cross-entropy label smoothing")
    g.add_argument("--grad-clip", type=_float_in(0.0, float("inf")), default=1.0, metavar="NORM",
                   help="clip the gradient norm to this (0: off)")
    g.add_argument("--accumulate", type=_int_at_least(1), default=1, metavar="N",
                   help="batches per optimizer step")
    g.add_argument("--monitor", default="val/macro_f1",
                   choices=["val/macro_f1", "val/balanced_acc", "val/acc", "val/kappa",
                            "val/loss"],
                   help="metric for the best checkpoint and early stopping")
    g.add_argument("--patience", type=_int_at_least(0), default=6, metavar="EPOCHS",
                   help="early stopping after this many epochs without improvement (0: off)")

    g = p.add_argument_group("hardware")
    g.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto: a CUDA GPU if one is visible, else the CPU")
    g.add_argument("--devices", type=_devices, default="auto",
                   help="devices per node: a count, 'auto', or GPU ids like 0,1")
    g.add_argument("--strategy", default="auto",
                   help="Lightning strategy: auto, ddp, ddp_spawn, ddp_find_unused_parameters"
                        "_true, fsdp ...")
    g.add_argument("--num-nodes", type=_int_at_least(1), default=1, metavar="N",
                   help="hosts (torchrun/SLURM start the processes; see docs/training.md)")
    g.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto: bf16-mixed on GPUs that support it, 16-mixed on other GPUs, "
                        "32-true on CPU")
    g.add_argument("--sync-batchnorm", action=argparse.BooleanOptionalAction,
                   help="BatchNorm statistics over all ranks' batches (default: on for "
                        "multi-GPU runs; PyTorch's SyncBatchNorm needs GPUs)")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, init and shuffles")
    g.add_argument("--output-dir", default="runs", metavar="DIR",
                   help="TensorBoard logs, checkpoints and results go to DIR/NAME/version_N")
    g.add_argument("--name", default="dual_branch", help="experiment name under --output-dir")
    g.add_argument("--resume", metavar="CKPT",
                   help="checkpoint to continue from, or 'last': the newest last.ckpt of "
                        "--output-dir/--name")
    g.add_argument("--memory-log-every", type=_int_at_least(1), default=50, metavar="STEPS",
                   help="log memory to TensorBoard every this many steps")
    g.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True,
                   help="a live progress bar (off: one summary line per epoch only)")
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    """The `train.py predict` command line."""
    p = _Parser(
        prog="train.py predict",
        description="Write class probabilities per signal (or per window of a long signal)\n"
                    "to CSV, from a checkpoint written by train.py. Signals are resampled,\n"
                    "filtered, windowed and normalised as in training. The file needs no\n"
                    "labels (docs/data.md: files without labels).",
        formatter_class=_Formatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a train.py checkpoint")
    p.add_argument("--data", required=True, metavar="PATH", help="signal file or folder")
    p.add_argument("--format", choices=["npz", "npy", "csv", "tsv", "ts", "wfdb", "edf"],
                   help="reader (default: the training run's, else by extension)")
    p.add_argument("--reader-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="reader option, repeatable (default: the training run's)")
    p.add_argument("--output", default="predictions.csv", metavar="CSV",
                   help="columns: record, group, start, end, label (empty for a record "
                        "without one), predicted, p_<class>...")
    p.add_argument("--window-stride", type=_int_at_least(1), metavar="N",
                   help="stride between windows of signals longer than the model input "
                        "(default: the training stride, else the input length)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64, metavar="N")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto",
                   help="one device: a CUDA GPU if one is visible, else the CPU")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="as for training")
    return p


def _config_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A YAML config as command-line tokens, so its values are checked like flags."""
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: expected a mapping of option: value")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in flat.items():
        key = str(key).replace("-", "_")
        if key not in actions or key in ("config", "help"):
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config {path}: unknown option {key!r}{hint}")
        action = actions[key]
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ConfigError(f"config {path}: {key} must be true or false; got {value!r}")
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif key == "reader_option":
            if not isinstance(value, dict):
                raise ConfigError(f"config {path}: reader_option must be a mapping")
            for k, v in value.items():
                argv += [flag, f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse training options: defaults < --config YAML < flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            argv = _config_argv(known.config, parser) + argv
        except ConfigError as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    if args.val_fraction + args.test_fraction >= 1 or args.val_fraction == 0:
        parser.error("--val-fraction must be > 0 and --val-fraction + --test-fraction < 1")
    if args.resume and args.resume != "last" and not Path(args.resume).is_file():
        parser.error(f"--resume: no checkpoint file {args.resume}")
    if args.data != "synthetic" and not Path(args.data).exists():
        parser.error(f"--data: {args.data} does not exist")
    if args.test_data and not Path(args.test_data).exists():
        parser.error(f"--test-data: {args.test_data} does not exist")
    return args


# ---------------------------------------------------------------------------------- set-up


def resolve_hardware(args: argparse.Namespace) -> tuple[bool, str]:
    """(on_gpu, Lightning precision) for the options; fills CPU/GPU size defaults into args."""
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--accelerator gpu: no CUDA GPU is visible")
    on_gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and
                                           torch.cuda.is_available())
    for key, value in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    precision = PRECISIONS[args.precision]
    if precision == "auto":
        if not on_gpu:
            precision = "32-true"
        else:
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    elif precision == "16-mixed" and not on_gpu:
        raise ConfigError("--precision 16-mixed needs a GPU; use bf16-mixed or 32-true on CPU")
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
        batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
    )


def model_settings(args: argparse.Namespace, sample_rate: float | None) -> dict[str, Any]:
    """The `DualBranchConfig` fields (as a plain dict) the options describe."""
    masks = {} if args.spec_augment else {"freq_mask_param": 0, "time_mask_param": 0}
    return {
        "branches": args.branches,
        "fusion": args.fusion,
        "dropout": args.dropout,
        "time": {
            "hidden_size": args.hidden_size, "num_layers": args.num_layers,
            "patch_size": args.patch_size, "bidirectional": args.bidirectional,
            "dropout": args.rwkv_dropout, "gradient_checkpointing": args.gradient_checkpointing,
            "compile_blocks": args.compile, "wkv_backend": args.wkv_backend,
        },
        "freq": {
            "spectrogram": args.spectrogram, "sample_rate": round(sample_rate or 16000),
            "n_fft": args.n_fft, "hop_length": args.hop_length,
            "n_mels": min(args.n_mels, args.n_fft // 2 + 1), "channels": list(args.cnn_channels),
            **masks,
        },
    }


def find_last_checkpoint(output_dir: str, name: str) -> Path:
    """The newest DIR/NAME/version_*/checkpoints/last*.ckpt."""
    found = sorted(Path(output_dir, name).glob("version_*/checkpoints/last*.ckpt"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"--resume last: no last.ckpt under {Path(output_dir, name)}")
    return found[-1]


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

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        values = " ".join(f"{k.replace('_epoch', '')} {float(metrics[k]):.4g}"
                          for k in self.KEYS if k in metrics)
        total = "?" if trainer.max_epochs in (None, -1) else trainer.max_epochs
        print(f"epoch {trainer.current_epoch + 1}/{total}: {values} "
              f"({time.perf_counter() - self._started:.1f} s)", flush=True)


def build_callbacks(args: argparse.Namespace) -> list[Callback]:
    mode = "min" if args.monitor == "val/loss" else "max"
    short = args.monitor.split("/")[-1]
    callbacks: list[Callback] = [
        ModelCheckpoint(monitor=args.monitor, mode=mode, save_top_k=1,
                        filename=f"best-epoch={{epoch:03d}}-{short}={{{args.monitor}:.4f}}",
                        auto_insert_metric_name=False),
        # every epoch's end, for --resume (save_last=True only writes when the best changes)
        ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        MemoryMonitorCallback(every_n_steps=args.memory_log_every),
        EpochSummary(),
    ]
    if args.patience > 0:
        callbacks.append(EarlyStopping(monitor=args.monitor, mode=mode, patience=args.patience))
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


def set_up(args: argparse.Namespace, extra_callbacks: list[Callback] | None = None) -> Run:
    """Data, Trainer and module for the options. Bad values raise ConfigError/DataError."""
    # first: the CUDA allocator settings only take effect before CUDA initialises
    memory_settings = optimize_memory_usage()
    on_gpu, precision = resolve_hardware(args)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    if on_gpu:
        # Build the CUDA WKV extension here, before Lightning starts the other ranks; they find
        # it cached (cuda/build.py holds a file lock while building).
        from cuda.build import load_extension_or_none, why_unavailable

        if load_extension_or_none() is None:
            rank_zero_only(log.warning)("WKV CUDA kernel unavailable (%s)", why_unavailable())

    resume = None
    version = None
    if args.resume:
        resume = (find_last_checkpoint(args.output_dir, args.name) if args.resume == "last"
                  else Path(args.resume))
        version = _version_of(resume, args.output_dir, args.name)
    try:
        datamodule = SignalDataModule(data_config(args))
        datamodule.setup("fit")
        logger = TensorBoardLogger(args.output_dir, name=args.name, version=version,
                                   default_hp_metric=False)
        steps_per_epoch = max(1, len(datamodule.train_dataset) // args.batch_size)
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
            callbacks=build_callbacks(args) + list(extra_callbacks or []),
            log_every_n_steps=min(50, steps_per_epoch),
            enable_progress_bar=args.progress_bar,
            num_sanity_val_steps=0,
        )
        world = trainer.world_size * trainer.accumulate_grad_batches
        scale = {"none": 1.0, "linear": float(world), "sqrt": world**0.5}[args.lr_scaling]
        class_weights = datamodule.class_weights
        module = SignalClassifierModule(
            model=model_settings(args, datamodule.sample_rate),
            num_classes=datamodule.num_classes,
            class_names=datamodule.class_names,
            class_weights=None if class_weights is None else class_weights.tolist(),
            lr=args.lr * scale, weight_decay=args.weight_decay, warmup=args.warmup,
            min_lr_ratio=args.min_lr_ratio, label_smoothing=args.label_smoothing,
            data=to_plain(datamodule.trained_settings()),
        )
    except (ValueError, MisconfigurationException) as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc
    run = Run(datamodule, module, trainer, resume, precision, args.batch_size * world,
              args.lr * scale)
    n_params = sum(p.numel() for p in module.parameters())
    rank_zero_only(print)(
        f"model: branches={args.branches}, {n_params / 1e6:.3f} M parameters; "
        f"precision {precision}; {trainer.world_size} process(es) x batch {args.batch_size} x "
        f"accumulate {trainer.accumulate_grad_batches} = effective batch {run.effective_batch}, "
        f"lr {run.lr:.3g} (scaling {args.lr_scaling})\n"
        f"memory settings: {memory_settings}\n"
        f"logs: {logger.log_dir}" + (f"\nresuming from {resume}" if resume else ""),
        flush=True,
    )
    return run


def train(args: argparse.Namespace, extra_callbacks: list[Callback] | None = None
          ) -> dict[str, Any]:
    """Fit, then test the best checkpoint; rank 0 writes the results. Returns a summary
    (test metrics, checkpoints, run folder) on every rank."""
    started = time.perf_counter()
    run = set_up(args, extra_callbacks)
    trainer, module = run.trainer, run.module
    trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.resume, weights_only=True)
    print(f"rank {trainer.global_rank}/{trainer.world_size}: trained on "
          f"{module.samples_trained} samples this session, global step {trainer.global_step}, "
          f"parameter checksum {_checksum(module):.9e}", flush=True)

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    test_results = trainer.test(module, datamodule=run.datamodule, ckpt_path=best or None,
                                weights_only=True, verbose=False)
    run_dir = Path(trainer.log_dir or args.output_dir)
    summary = {
        "metrics": to_plain(test_results[0] if test_results else {}),
        "best_checkpoint": best,
        "last_checkpoint": str(Path(checkpoint.dirpath, "last.ckpt")) if checkpoint else "",
        "epochs_completed": trainer.current_epoch,
        "global_step": trainer.global_step,
        "effective_batch_size": run.effective_batch,
        "lr": run.lr,
        "precision": run.precision,
        "world_size": trainer.world_size,
        "seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    if trainer.is_global_zero:
        _write_results(run_dir, module.test_results, summary, args)
    return summary


def _write_results(run_dir: Path, test: dict[str, Any], summary: dict[str, Any],
                   args: argparse.Namespace) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {**summary, "report": test.get("report", {}),
               "confusion_matrix": test.get("confusion_matrix"),
               "class_names": test.get("class_names"),
               "options": vars(args)}
    write_json(run_dir / "test_metrics.json", payload)
    (run_dir / "classification_report.txt").write_text(test.get("report_text", "") + "\n")
    if test.get("confusion_matrix") is not None:
        save_confusion_matrix_png(test["confusion_matrix"], test["class_names"],
                                  run_dir / "confusion_matrix.png", title="test confusion matrix")
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(to_plain({k: v for k, v in vars(args).items() if k != "config"}), f,
                       sort_keys=False)
    metrics = summary["metrics"]
    lines = ["", "Test results:"]
    lines += [f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}"
              for k, v in metrics.items()]
    lines += ["", test.get("report_text", ""),
              f"best checkpoint: {summary['best_checkpoint']}",
              f"results: {run_dir / 'test_metrics.json'}, {run_dir / 'confusion_matrix.png'}",
              f"time: {summary['seconds']:.0f} s"]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------- prediction


def load_checkpoint(path: str | Path) -> SignalClassifierModule:
    """A SignalClassifierModule from a train.py checkpoint, loaded with weights_only=True."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"cannot load checkpoint {path}: not a checkpoint of plain tensors "
                          "and containers (weights_only=True refuses other objects)") from exc
    except Exception as exc:  # a damaged or foreign file fails in many ways inside pickle
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"cannot load checkpoint {path}: {type(exc).__name__}: {reason}"
                          ) from exc
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a train.py checkpoint (no hyper_parameters)")
    module = SignalClassifierModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def predict(args: argparse.Namespace) -> Path:
    """Write per-window class probabilities of --data to --output (CSV); the label column is
    empty for records without a label."""
    module = load_checkpoint(args.checkpoint)
    names = list(module.class_names)
    if not Path(args.data).exists():
        raise ConfigError(f"--data: {args.data} does not exist")
    inputs = prediction_inputs(args.data, module.hparams.data, names, format=args.format,
                               reader_options=dict(args.reader_option or []),
                               window_stride=args.window_stride)
    loader = DataLoader(inputs.items, batch_size=args.batch_size)

    on_gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and
                                           torch.cuda.is_available())
    precision = PRECISIONS[args.precision]
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") \
            if on_gpu else "32-true"
    trainer = pl.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    probs = torch.cat(trainer.predict(module, loader)).float().numpy()

    dataset, output = inputs.dataset, Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["record", "group", "start", "end", "label", "predicted",
                         *[f"p_{n}" for n in names]])
        for (record, start), end, p in zip(inputs.windows, inputs.ends, probs, strict=True):
            group = "" if dataset.groups is None else dataset.groups[record]
            label = dataset.labels[record]
            writer.writerow([record, group, start, end,
                             "" if label == UNLABELLED else names[label],
                             names[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    print(f"wrote {len(inputs.windows)} rows ({len(dataset)} signals) to {output}")
    return output


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
