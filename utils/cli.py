"""The train.py command line, derived from the option dataclasses.

The dataclasses are the one source of truth: `TrainOptions` is the tree `data` (DataConfig),
`model` (ModelOptions), `optimization` (OptimizationOptions), `hardware` (HardwareOptions) and
`run` (RunOptions); `TestOptions` and `PredictOptions` are the `test` and `predict` commands.
From their fields (type, default, help and check, see utils/options.py) come:

- the nested flags `--data.length 512` and YAML keys `data: {length: 512}` (jsonargparse, on
  which Lightning's CLI is built, parses and type-checks them);
- the flat flags users type, `--length 512`: the field name with '-' (or the field's `flag`,
  e.g. `--data` for data.source), booleans as `--augment` / `--no-augment`, lists as
  `--cnn-channels 16 32`, `--reader-option KEY=VALUE` repeatable;
- `--help` and `--print-config` (the whole nested YAML, loadable with `--config`).

Values are applied in order: defaults < `--config` YAML < flags. Every error is one line,
exit status 2, naming the flag or YAML key, and an unknown key or flag suggests the nearest one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from data.datamodule import FORMATS, DataConfig
from data.formats import source_exists, why_missing
from models.options import ModelOptions, OptimizationOptions
from utils.metrics import to_plain
from utils.options import Check, ConfigError, at_least, check_fields, option

__all__ = ["COMMANDS", "ConfigError", "HardwareOptions", "PRECISIONS", "PredictOptions",
           "RunOptions", "TestOptions", "TrainOptions", "build_parser", "format_help",
           "parse_args", "parse_command", "to_yaml_dict"]

PRECISIONS = {"auto": "auto", "32": "32-true", "32-true": "32-true", "16": "16-mixed",
              "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
Precision = Literal["auto", "32", "32-true", "16", "16-mixed", "bf16", "bf16-mixed"]
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")


def _devices_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value == -1 or value >= 1
    return value == "auto" or bool(re.fullmatch(r"\d+(,\d+)*,?", str(value))
                                    and "," in str(value))


def _run_name_ok(value: Any) -> bool:
    from utils.run_dir import check_run_name  # run_dir imports ConfigError via this package

    try:
        check_run_name(value)
    except ValueError:
        return False
    return True


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


@dataclass
class HardwareOptions:
    """Where and how precisely to train."""

    accelerator: Literal["auto", "cpu", "gpu"] = option(
        "auto", "auto: a CUDA GPU if one is visible, else the CPU")
    devices: int | str = option("auto", "devices per node: a count, 'auto', -1, or GPU ids "
                                "like 0,1", Check("a count >= 1, -1, 'auto' or GPU ids like "
                                                  "0,1", _devices_ok))
    strategy: str = option("auto", "Lightning strategy: auto, ddp, ddp_spawn, "
                           "ddp_find_unused_parameters_true, fsdp ...")
    num_nodes: int = option(1, "hosts (torchrun/SLURM start the processes; see "
                            "docs/training.md)", at_least(1), metavar="N")
    precision: Precision = option("auto", "auto: bf16-mixed on GPUs that support it, 16-mixed "
                                  "on other GPUs, 32-true on CPU")
    sync_batchnorm: bool | None = option(None, "BatchNorm statistics over all ranks' batches "
                                         "(default: on for multi-GPU runs; PyTorch's "
                                         "SyncBatchNorm needs GPUs)")
    capture: bool | None = option(
        None, "GPU: the whole train step (forward, loss, backward, clipping, AdamW update) "
        "recorded once as a CUDA graph and replayed (eager, with the reason logged, where it "
        "cannot be); --capture also compiles the classifier with reduce-overhead where the whole "
        "step cannot be one graph (DDP); --no-capture: eager (default: on for one GPU; see "
        "docs/benchmarks.md)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RunOptions:
    """Where a run writes, how it is logged, seeds, ensembles and resume."""

    output_dir: str = option("runs", "logs, checkpoints and results go to DIR/NAME/version_N",
                             metavar="DIR")
    name: str = option("dual_branch", "experiment name: one folder inside output_dir",
                       Check("a plain folder name inside --output-dir (no '/', '..' or "
                             "absolute path)", _run_name_ok))
    seed: int | None = option(None, "seeds init, shuffles and augmentation (default: "
                              "data.seed, which --seed sets)", at_least(0), flag="run-seed",
                              metavar="N")
    ensemble: int | None = option(None, "train K models (seeds seed + 1000 k) and average their "
                                  "class probabilities (default: 3 below 1000 training items, "
                                  "else 1); predict takes the ensemble's run folder",
                                  at_least(1), metavar="K")
    resume: str | None = option(None, "checkpoint to continue from, or 'last': the newest "
                                "last.ckpt of output_dir/name", metavar="CKPT")
    logger: Literal["tensorboard", "csv", "mlflow", "wandb"] = option(
        "tensorboard", "experiment logger (mlflow and wandb when installed)")
    memory_log_every: int = option(50, "log memory every this many steps", at_least(1),
                                   metavar="STEPS")
    progress_bar: bool = option(True, "a live progress bar (off: one summary line per epoch)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TrainOptions:
    """`train.py [fit]`: every option of a training run, one section per dataclass."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    optimization: OptimizationOptions = dataclasses.field(default_factory=OptimizationOptions)
    hardware: HardwareOptions = dataclasses.field(default_factory=HardwareOptions)
    run: RunOptions = dataclasses.field(default_factory=RunOptions)

    @property
    def seed(self) -> int:
        """The training seed: run.seed, else data.seed."""
        return self.data.seed if self.run.seed is None else self.run.seed


@dataclass
class _CheckpointInput:
    checkpoint: str = option(None, "a train.py checkpoint, a run folder (its best, else last "
                             "checkpoint) or an ensemble run folder (the mean of its members)",
                             metavar="CKPT")
    data: str = option(None, "signal file or folder", metavar="PATH")
    format: FORMATS | None = option(None, "reader (default: the training run's, else by "
                                    "extension)")
    reader_options: dict[str, Any] = option(
        help="reader options (default: the training run's); flag: --reader-option KEY=VALUE",
        flag="reader-option", metavar="KEY=VALUE", default_factory=dict)
    window_stride: int | None = option(None, "stride between windows of signals longer than the "
                                       "model input (default: the training stride, else the "
                                       "input length)", at_least(1), metavar="N")
    aggregate: Literal["none", "mean", "vote"] = option(
        "mean", "one row per record from its windows: probabilities averaged over the samples "
        "each window newly covers (mean), the majority class by samples (vote), or one row per "
        "window (none)")
    batch_size: int = option(64, "inputs per batch", at_least(1), metavar="N")
    accelerator: Literal["auto", "cpu", "gpu"] = option(
        "auto", "one device: a CUDA GPU if one is visible, else the CPU")
    precision: Precision = option("auto", "as for training")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PredictOptions(_CheckpointInput):
    """`train.py predict`: class probabilities of new signals to CSV."""

    output: str = option("predictions.csv", "CSV: record (its id), index, group, start/end "
                         "(seconds when the rate is known, else samples), windows, label (empty "
                         "when unknown), predicted, p_<class>...", metavar="CSV")


@dataclass
class TestOptions(_CheckpointInput):
    """`train.py test`: a checkpoint's test metrics on labelled data."""

    __test__ = False  # not a pytest test class

    output_dir: str = option("runs", "results go to DIR/NAME/version_N", metavar="DIR")
    name: str = option("test", "folder inside output_dir",
                       Check("a plain folder name inside --output-dir", _run_name_ok))


COMMANDS = {"fit": TrainOptions, "test": TestOptions, "predict": PredictOptions}
DESCRIPTIONS = {
    "fit": "Train and test the dual-branch signal classifier (the default command).",
    "test": "Test metrics (JSON, report, confusion matrix) of a checkpoint on labelled data.",
    "predict": "Class probabilities of new signals to CSV, from a checkpoint written by\n"
               "train.py. Signals are resampled, filtered, windowed and normalised as in\n"
               "training. The file needs no labels (docs/data.md: files without labels).",
}
EXAMPLES = """examples:
  python train.py                                   # built-in dataset, then test; logs in runs/
  python train.py --config configs/gpu.yaml         # options from YAML; flags override them
  python train.py --data ecg.npz --branches time --epochs 30
  python train.py --devices 2 --strategy ddp        # DDP on one host (see docs/training.md)
  python train.py --resume last                     # continue the newest run of --name
  python train.py --print-config > my.yaml          # every option as nested YAML
  python train.py test --checkpoint runs/dual_branch/version_0 --data test.npz
  python train.py predict --checkpoint runs/dual_branch/version_0 --data new.npz \\
      --output probs.csv --aggregate mean"""


# ---------------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Option:
    """One leaf option: its nested key, flat flag, field and dataclass."""

    key: str  # 'data.length' (or 'checkpoint' for a command without sections)
    flag: str  # '--length'
    field: dataclasses.Field
    owner: type

    @property
    def kind(self) -> str:
        """'bool', 'list' (one or more values), 'dict', 'literal' or 'scalar'."""
        args = _non_none(self.field.type)
        if args == [bool]:
            return "bool"
        origin = typing.get_origin(args[0]) if len(args) == 1 else None
        if origin in (list, tuple):
            return "list"
        if origin is dict:
            return "dict"
        if len(args) == 1 and typing.get_origin(args[0]) is Literal:
            return "literal"
        return "scalar"

    @property
    def choices(self) -> list[str]:
        args = _non_none(self.field.type)
        return list(typing.get_args(args[0])) if self.kind == "literal" else []

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _resolved_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    for f in fields:
        f.type = hints[f.name]
    return list(fields)


def _non_none(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def sections(command: str) -> dict[str, type]:
    """Section name -> dataclass of a command ('' for a command without sections)."""
    cls = COMMANDS[command]
    if cls is TrainOptions:
        return {f.name: f.type for f in _resolved_fields(cls)}
    return {"": cls}


def schema(command: str) -> dict[str, Option]:
    """Every option of a command by nested key."""
    options: dict[str, Option] = {}
    flags: set[str] = set()
    for section, cls in sections(command).items():
        for f in _resolved_fields(cls):
            key = f"{section}.{f.name}" if section else f.name
            flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
            assert flag not in flags, f"two options share the flag {flag}"  # noqa: S101
            flags.add(flag)
            options[key] = Option(key, flag, f, cls)
    return options


def build_parser(command: str = "fit"):
    """The jsonargparse parser of a command's nested options (type checks, --print-config)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=_prog(command), exit_on_error=False, add_help=False)
    for section, cls in sections(command).items():
        parser.add_class_arguments(cls, section or None, sub_configs=False,
                                   instantiate=False, fail_untyped=True)
    return parser


def _prog(command: str) -> str:
    return "train.py" if command == "fit" else f"train.py {command}"


# ---------------------------------------------------------------------------------- parsing


def _yaml_value(text: str, flag: str, shown: str | None = None) -> Any:
    """text read as a YAML value; errors name it as `shown` (default: the flag and the text)."""
    shown = shown or f"{flag} {text!r}"
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError:  # a tag safe_load will not build, e.g. !!python
        raise ConfigError(f"{shown}: YAML tags like '!!python/...' are not allowed; give a plain "
                          "value (quote it to pass the text)") from None
    except yaml.YAMLError as exc:
        reason = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"{shown} is not a valid YAML value ({reason}); quote it to pass the "
                          "text") from None


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--reader-option: expected KEY=VALUE; got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    return key, _yaml_value(value, "--reader-option", f"--reader-option: {key}={value!r}")


def _yaml_file_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    """One line for a YAML file safe_load refused: where (line, column) and what (the first
    line of str(exc) is only the context, e.g. 'while parsing a flow sequence')."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, yaml.constructor.ConstructorError):  # a tag safe_load will not build
        return ConfigError(f"config {path}{where}: YAML tags like '!!python/...' are not "
                           "allowed; give a plain value (quote it to pass the text)")
    problem = (getattr(exc, "problem", None) or str(exc)).strip().splitlines()[0]
    return ConfigError(f"config {path} is not valid YAML{where}: {problem}")


def read_config(path: str, command: str) -> dict[str, Any]:
    """A --config YAML file as {nested key: value}; one-line errors for an unreadable file,
    invalid YAML, or an unknown key (with the nearest known one)."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise _yaml_file_error(path, exc) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: expected a mapping of option: value")
    known = schema(command)
    names = sections(command)
    values: dict[str, Any] = {}

    def unknown(key: str) -> ConfigError:
        # the nearest known key, by its last part: 'batch_sise' and 'data.batch_sise' both
        # suggest 'data.batch_size', naming where the option lives in the tree
        leaf = key.split(".")[-1]
        by_leaf = {k: k for k in names if k}
        by_leaf.update({k.split(".")[-1]: k for k in known})
        by_leaf.update({o.flag[2:].replace("-", "_"): k for k, o in known.items()})
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1)
        hint = f" (did you mean {by_leaf[close[0]]!r}?)" if close else ""
        return ConfigError(f"config {path}: unknown option {key!r}{hint}")

    for top, value in loaded.items():
        top = str(top).replace("-", "_")
        if "" in names:
            if top not in known:
                raise unknown(top)
            values[top] = value
            continue
        if top not in names:
            raise unknown(top)
        if value is None:  # an empty section
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config {path}: {top} must be a mapping of option: value")
        for key, inner in value.items():
            full = f"{top}.{str(key).replace('-', '_')}"
            if full not in known:
                raise unknown(full)
            values[full] = inner
    return values


class _Tokens:
    """Command-line tokens rewritten to nested `--key=value` for jsonargparse, remembering
    where each value came from (a flag or a config file) for the error messages."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.origin: dict[str, str] = {}
        self.text: dict[str, str] = {}  # each value as it was typed
        self.dicts: dict[str, dict[str, Any]] = {}

    def add(self, option: Option, text: str, origin: str) -> None:
        self.argv.append(f"--{option.key}={text}")
        self.origin[option.key] = origin
        self.text[option.key] = text


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _rewrite(argv: list[str], command: str) -> tuple[_Tokens, bool, bool]:
    """(tokens, help asked, print-config asked) for a command's argv."""
    known = schema(command)
    by_flag = {o.flag: o for o in known.values()}
    negated = {"--no-" + o.flag[2:]: o for o in known.values() if o.kind == "bool"}
    tokens = _Tokens()
    want_help = want_print = False
    i = 0
    config_values: list[tuple[str, dict[str, Any]]] = []
    cli: list[tuple[Option, Any, str]] = []  # (option, text or parsed dict item, origin)
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            want_help = True
            continue
        if token in ("--print-config", "--print_config"):
            want_print = True
            continue
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options start with '--'")
        name, has_value, inline = token.partition("=")
        if name == "--config":
            if not has_value:
                if i >= len(argv) or argv[i].startswith("--"):
                    raise ConfigError("argument --config: expected one argument")
                inline, i = argv[i], i + 1
            config_values.append((inline, read_config(inline, command)))
            continue
        option = by_flag.get(name) or known.get(name[2:].replace("-", "_"))
        if option is None and name in negated:
            cli.append((negated[name], "false", name))
            continue
        if option is None:
            choices = list(by_flag) + list(negated) + ["--config", "--help", "--print-config"]
            close = difflib.get_close_matches(name, choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown option {name}{hint}")
        values: list[str] = [inline] if has_value else []
        if not has_value:
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
                if option.kind != "list":
                    break
        if option.kind == "bool" and not values:
            values = ["true"]
        if not values:
            raise ConfigError(f"argument {name}: expected "
                              + ("one or more values" if option.kind == "list" else "a value"))
        if option.kind == "dict":
            key, value = _key_value(values[0])
            cli.append((option, (key, value), name))
        elif option.kind == "list":
            text = values[0] if len(values) == 1 and values[0].startswith("[") else (
                "[" + ", ".join(values) + "]")
            cli.append((option, text, name))
        else:
            cli.append((option, values[0], name))

    for path, values in config_values:
        for key, value in values.items():
            option = known[key]
            if option.kind == "dict":
                if not isinstance(value, dict):
                    raise ConfigError(f"config {path}: {key} must be a mapping")
                tokens.dicts.setdefault(key, {}).update(value)
                tokens.origin[key] = f"config {path}: {key}"
            elif value is not None or option.default is None:
                tokens.add(option, _as_text(value), f"config {path}: {key}")
    for option, value, origin in cli:
        if option.kind == "dict":
            tokens.dicts.setdefault(option.key, {}).update([value])
            tokens.origin[option.key] = origin
        else:
            tokens.add(option, value, origin)
    for key, mapping in tokens.dicts.items():
        tokens.argv.append(f"--{key}={json.dumps(mapping)}")
    return tokens, want_help, want_print


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_GIVEN = re.compile(r"(?:Given value|Got value): (.*)$", re.S)


def _shown(text: str) -> str:
    try:
        return repr(float(text)) if text.strip().lower() in ("inf", "-inf", "nan") else repr(text)
    except ValueError:
        return repr(text)


def _type_error(message: str, known: dict[str, Option], tokens: _Tokens) -> ConfigError:
    """jsonargparse's multi-line type error as one line naming the flag or YAML key."""
    match = _PARSER_KEY.search(message)
    if not match or match.group(1) not in known:
        return ConfigError(message.strip().splitlines()[0])
    option = known[match.group(1)]
    origin = tokens.origin.get(option.key, option.flag)
    given = _GIVEN.search(message)
    # the value as typed: jsonargparse's "Got value" is its conversion ('1e11' ->
    # 100000000000.0), a number the user never wrote
    value = tokens.text.get(option.key) or (
        given.group(1).strip().splitlines()[0] if given else "?")
    if option.kind == "literal":
        choices = ", ".join(repr(c) for c in option.choices)
        return ConfigError(f"{origin}: invalid choice: {value!r} (choose from {choices})")
    if option.kind == "bool":
        return ConfigError(f"{origin}: expected true or false; got {value}")
    check = option.field.metadata.get("check")
    args = _non_none(option.field.type)
    what = (check.describe if check else
            {int: "an integer", float: "a number", str: "text"}.get(args[0], str(args[0])))
    hint = _whole_number_hint(value) if int in args and float not in args else ""
    return ConfigError(f"{origin}: expected {what}; got {_shown(value)}{hint}")


def _whole_number_hint(text: str) -> str:
    """For an integer typed with an exponent or a point ('1e11', '8.0'): how to write it."""
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number) or number != int(number) or abs(number) >= 2**53:
        return ""  # from 2**53 on, the float need not be the integer that was meant
    return f" (write the integer without an exponent or a point: {int(number)})"


def parse_command(argv: list[str] | None = None) -> tuple[str, Any]:
    """(command, options) for a train.py command line: 'fit' (also with no command word),
    'test' or 'predict', and its `TrainOptions` / `TestOptions` / `PredictOptions`. `--help`
    and `--print-config` print and exit 0; bad options raise ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "fit"
    tokens, want_help, want_print = _rewrite(argv, command)
    if want_help:
        print(format_help(command))
        raise SystemExit(0)
    from jsonargparse import ArgumentError

    parser = build_parser(command)
    known = schema(command)
    try:
        namespace = parser.parse_args(tokens.argv)
    except ArgumentError as exc:
        raise _type_error(str(exc), known, tokens) from None
    values = namespace.as_dict()
    for key, leaf in known.items():  # the ranges the fields declare
        check = leaf.field.metadata.get("check")
        problem = check.problem(_get(values, key)) if check else None
        if problem:
            raise ConfigError(f"{tokens.origin.get(key, leaf.flag)}: {problem}")
    if command == "fit" and (values["data"]["val_fraction"] or 0) + \
            values["data"]["test_fraction"] >= 1:
        raise ConfigError("--val-fraction + --test-fraction must be < 1")
    options = _instantiate(command, values)
    if want_print:
        print(yaml.safe_dump(to_yaml_dict(options), sort_keys=False), end="")
        raise SystemExit(0)
    _check_paths(command, options)
    return command, options


def _get(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


def _instantiate(command: str, values: dict[str, Any]) -> Any:
    cls = COMMANDS[command]
    try:
        if cls is TrainOptions:
            return TrainOptions(**{name: section(**values[name])
                                   for name, section in sections(command).items()})
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc


def _check_paths(command: str, options: Any) -> None:
    """What can be told from the options alone, before anything is read."""
    if command != "fit":
        for name in ("checkpoint", "data"):
            if getattr(options, name) is None:
                raise ConfigError(f"the following arguments are required: --{name}")
        return
    data = options.data
    resume = options.run.resume
    if resume and resume != "last" and not Path(resume).is_file():
        raise ConfigError(f"--resume: no checkpoint file {resume}")
    if data.source != "synthetic" and not source_exists(data.source):
        raise ConfigError(f"--data: {data.source} {why_missing(data.source)}")
    if data.test_source and not source_exists(data.test_source):
        raise ConfigError(f"--test-data: {data.test_source} {why_missing(data.test_source)}")


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    """Training options: defaults < --config YAML < flags."""
    command, options = parse_command(["fit", *(sys.argv[1:] if argv is None else argv)])
    return options


def to_yaml_dict(options: Any) -> dict[str, Any]:
    """Options as plain nested data (tuples as lists): what --print-config prints,
    config.yaml holds and `yaml.safe_load` reads back."""
    return to_plain(dataclasses.asdict(options))


# ---------------------------------------------------------------------------------- help

SECTION_TITLES = {
    "data": "files, preprocessing, splits and loaders (DataConfig)",
    "model": "the dual-branch classifier (ModelOptions)",
    "optimization": "loss, optimizer, schedule and budget (OptimizationOptions)",
    "hardware": "devices and precision (HardwareOptions)",
    "run": "output folder, logger, seeds, ensembles and resume (RunOptions)",
}


def format_help(command: str = "fit") -> str:
    """`train.py [command] --help`: every option by section with its flag, YAML key, help and
    default, all from the dataclasses."""
    lines = [f"usage: {_prog(command)} [--config YAML] [--print-config] [options]",
             "       train.py {fit,test,predict} ... (fit is the default)", "",
             DESCRIPTIONS[command], "",
             "  --config YAML      options from a YAML file of nested sections (as "
             "--print-config writes); flags override it",
             "  --print-config     print every option as nested YAML and exit",
             "  -h, --help         this help (`train.py test --help`, `train.py predict --help`)"]
    for section, cls in sections(command).items():
        title = SECTION_TITLES.get(section) or (cls.__doc__ or "").strip().splitlines()[0]
        lines += ["", f"{section or 'options'}: {title}"]
        for f in _resolved_fields(cls):
            key = f"{section}.{f.name}" if section else f.name
            option = Option(key, "--" + (f.metadata.get("flag") or f.name.replace("_", "-")),
                            f, cls)
            if option.kind == "bool":
                shown = f"{option.flag}, --no-{option.flag[2:]}"
            else:
                metavar = (f.metadata.get("metavar") or
                           ("{" + ",".join(option.choices) + "}" if option.choices else "VALUE"))
                shown = f"{option.flag} {metavar}"
            text = f.metadata.get("help", "")
            if option.default is not None and option.default != {} and "(default:" not in text:
                text += f" (default: {option.default})"
            if section:
                text += f" [{key}]"
            lines.append(f"  {shown}")
            lines += textwrap.wrap(text, 96, initial_indent="      ",
                                   subsequent_indent="      ")
    if command == "fit":
        lines += ["", EXAMPLES, "", "Outputs, TensorBoard tags, DDP/torchrun/SLURM and resume "
                  "semantics: docs/training.md"]
    return "\n".join(lines)
