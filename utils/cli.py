"""The train.py command line: options, their checks, and --config YAML files.

Every error is one line on stderr with exit status 2 (`_Parser.error`); YAML values are turned
into flags so they are checked exactly like the command line (`_config_argv`).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from data.formats import source_exists
from models.rwkv import COMPILE_MODES

# What follows the hardware; model sizes, STFT settings and the step budget follow the data
# (models/defaults.py), the same on a CPU and a GPU.
CPU_DEFAULTS = {"num_workers": 0}
GPU_DEFAULTS = {"num_workers": 4}
AUTO = "(default: from the data, see docs/training.md)"
PRECISIONS = {"auto": "auto", "32": "32-true", "32-true": "32-true", "16": "16-mixed",
              "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
GROUPS = ("data", "model", "optimization", "hardware", "run")  # YAML sections (optional)
SEED_MAX = 2**32 - 1

# opens the epilog of `train.py --help`
EXAMPLES = """examples:
  python train.py                                   # built-in dataset, then test; logs in runs/
  python train.py --config configs/gpu.yaml         # options from YAML; flags override them
  python train.py --data ecg.npz --branches time --epochs 30
  python train.py --devices 2 --strategy ddp        # DDP on one host (see docs/training.md)
  python train.py --resume last                     # continue the newest run of --name
  python train.py predict --checkpoint runs/dual_branch/version_0/checkpoints/last.ckpt \\
      --data new.npz --output probs.csv"""


class ConfigError(ValueError):
    """A bad option or option value; train.main() prints it as one line."""


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
    if not (value > 0 and math.isfinite(value)):  # inf would train NaN weights, or resample
        raise argparse.ArgumentTypeError(f"expected a positive finite number; got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1]; "
                                         f"got {text!r}") from None
    if not 0 <= value <= SEED_MAX:  # the range numpy's and Lightning's seeding accept
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}]; got {value}")
    return value


def _run_name(text: str) -> str:
    from utils.run_dir import check_run_name  # run_dir imports ConfigError from here

    try:
        return check_run_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _devices(text: str) -> int | str:
    if text == "auto" or re.fullmatch(r"\d+(,\d+)*,?", text) and "," in text:
        return text
    if text == "-1":
        return -1
    return _int_at_least(1)(text)


def _cv_folds(text: str) -> int:
    value = _int_at_least(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("expected 0 (off) or at least 2 folds; got 1")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE; got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.constructor.ConstructorError:  # a tag safe_load will not build, e.g. !!python
        raise argparse.ArgumentTypeError(
            f"{key.strip()}={value!r}: YAML tags like '!!python/...' are not allowed; give a "
            "plain value (quote it to pass the text)") from None
    except yaml.YAMLError as exc:
        reason = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise argparse.ArgumentTypeError(
            f"{key.strip()}={value!r} is not a valid YAML value ({reason}); quote it to pass "
            "the text") from None


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
        epilog=EXAMPLES + "\n\nOutputs, TensorBoard tags, DDP/torchrun/SLURM "
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
    g.add_argument("--normalize", choices=["dataset", "window", "record", "none"],
                   default="dataset",
                   help="scale by the training set's mean and std (keeps relative amplitude; "
                        "the model z-normalises each signal itself), z-normalise per model "
                        "input or per record, or not at all")
    g.add_argument("--synthetic-signals", type=_int_at_least(14), default=2000, metavar="N",
                   help="signals in the built-in dataset")
    g.add_argument("--synthetic-imbalance", type=_float_in(1.0, float("inf")), default=1.0,
                   metavar="RATIO",
                   help="built-in dataset: largest / smallest class count")
    g.add_argument("--val-fraction", type=_float_in(0.0, 1.0), metavar="F",
                   help="held out for validation (best checkpoint, early stopping); 0: none, "
                        "keep the last weights (default: 0.1 from 1000 training records on, "
                        "else 0)")
    g.add_argument("--test-fraction", type=_float_in(0.0, 1.0), default=0.15, metavar="F",
                   help="held out when there is no official test set")
    g.add_argument("--cv", type=_cv_folds, default=0, metavar="K",
                   help="K-fold cross-validation of --data (no official test set): stratified, "
                        "grouped by record/subject when the data has groups; per-fold and "
                        "mean +- sd metrics (0: one --test-fraction split)")
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
                   help="RWKV width " + AUTO)
    g.add_argument("--num-layers", type=_int_at_least(1), metavar="L",
                   help="RWKV blocks " + AUTO)
    g.add_argument("--patch-size", type=_int_at_least(1), metavar="N",
                   help="samples per RWKV step after the stem " + AUTO)
    g.add_argument("--stem", choices=["conv", "patch"], default="conv",
                   help="RWKV input stem: multi-scale convolution then patch means, or plain "
                        "patches (needed for streaming)")
    g.add_argument("--pooling", choices=["meanmax", "mean", "last"], default="meanmax",
                   help="RWKV per-step features -> one vector")
    g.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                   help="add a time-reversed WKV scan to every RWKV block (no streaming)")
    g.add_argument("--instance-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="z-normalise each signal inside the model")
    g.add_argument("--keep-amplitude", action=argparse.BooleanOptionalAction, default=True,
                   help="give the model each signal's level and gain beside its shape "
                        "(needs --instance-norm)")
    g.add_argument("--cnn-channels", type=_int_at_least(1), nargs="+", metavar="C",
                   help="frequency CNN stage widths " + AUTO)
    g.add_argument("--spectrogram", choices=["mel", "linear"],
                   help="frequency-branch input: mel or linear power spectrogram in dB "
                        "(default: mel when the sample rate is known and n_fft >= 128)")
    g.add_argument("--n-fft", type=_int_at_least(2), metavar="N",
                   help="STFT size in samples; also the shortest input the branch accepts "
                        "(default: a power of two near length / 4, 8 to 256)")
    g.add_argument("--hop-length", type=_int_at_least(1), metavar="N",
                   help="STFT hop in samples (default: n_fft / 4)")
    g.add_argument("--n-mels", type=_int_at_least(1), metavar="N",
                   help="mel bands (default: 64, capped at n_fft / 2 + 1)")
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
    g.add_argument("--compile-mode", choices=list(COMPILE_MODES), default="default",
                   help="torch.compile mode for --compile; reduce-overhead also replays each "
                        "block as a CUDA graph (fewer kernel launches, more memory)")
    g.add_argument("--wkv-backend", choices=["auto", "torch", "cuda", "cpu", "reference"],
                   default="auto", help="WKV operator backend")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=_int_at_least(1), metavar="N",
                   help="per device; the effective batch is this x devices x nodes x "
                        "--accumulate (default: a quarter of the training items, 4 to 32)")
    g.add_argument("--epochs", type=_int_at_least(1), metavar="N",
                   help="train for this many epochs instead of the step budget")
    g.add_argument("--max-steps", type=_int_at_least(1), metavar="N",
                   help="optimizer steps (overrides --epochs for the schedule; default: 20 "
                        "epochs, at least 1000 and at most 10000 steps)")
    g.add_argument("--mixup", type=_float_in(0.0, float("inf")), default=0.2, metavar="ALPHA",
                   help="mixup Beta(alpha, alpha) in training (0: off)")
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
    g.add_argument("--patience", type=_int_at_least(0), default=0, metavar="EPOCHS",
                   help="early stopping after this many validations without improvement "
                        "(0: off; needs a validation split)")

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
    g.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help="seeds the split, init and shuffles (0 .. 2**32 - 1)")
    g.add_argument("--output-dir", default="runs", metavar="DIR",
                   help="TensorBoard logs, checkpoints and results go to DIR/NAME/version_N")
    g.add_argument("--name", type=_run_name, default="dual_branch",
                   help="experiment name: one folder inside --output-dir")
    g.add_argument("--ensemble", type=_int_at_least(1), metavar="K",
                   help="train K models (seeds --seed + 1000 k) and average their "
                        "class probabilities (default: 3 below 1000 training items, else 1); "
                        "predict takes the ensemble's run folder")
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
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a train.py checkpoint, a run folder (its best, else last checkpoint) "
                        "or an --ensemble run folder (the mean of its members)")
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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: expected a mapping of option: value")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in GROUPS and (value is None or isinstance(value, dict)):
            flat.update(value or {})  # an empty section reads as null
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
    pre = _Parser(prog=parser.prog, add_help=False)  # `--config` without a file: one line too
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            argv = _config_argv(known.config, parser) + argv
        except ConfigError as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    if (args.val_fraction or 0) + args.test_fraction >= 1:
        parser.error("--val-fraction + --test-fraction must be < 1")
    if args.resume and args.resume != "last" and not Path(args.resume).is_file():
        parser.error(f"--resume: no checkpoint file {args.resume}")
    if args.data != "synthetic" and not source_exists(args.data):
        parser.error(f"--data: {args.data} does not exist")
    if args.test_data and not source_exists(args.test_data):
        parser.error(f"--test-data: {args.test_data} does not exist")
    return args
