"""Tests for utils/cli.py: options derived from the dataclasses (flat and nested flags, YAML,
--print-config, --help), checked alike from every source, with one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from data.datamodule import DataConfig
from models.options import ModelOptions, OptimizationOptions
from utils.cli import (
    ConfigError,
    HardwareOptions,
    PredictOptions,
    RunOptions,
    format_help,
    parse_args,
    parse_command,
    schema,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_dataclasses() -> None:
    options = parse_args([])
    assert options.data == DataConfig() and options.model == ModelOptions()
    assert options.optimization == OptimizationOptions()
    assert options.hardware == HardwareOptions() and options.run == RunOptions()


def test_flat_and_nested_flags_set_the_same_fields() -> None:
    nested = ["--data.batch_size", "7", "--model.cnn_channels", "[4, 8]", "--data.augment",
              "false", "--optimization.lr=0.01", "--data.bandpass=[0.5, 40]"]
    flags = ["--batch-size", "7", "--cnn-channels", "4", "8", "--no-augment", "--lr", "0.01",
             "--bandpass", "0.5", "40"]
    a, b = parse_args(nested), parse_args(flags)
    assert a == b
    assert (a.data.batch_size, a.model.cnn_channels, a.data.augment) == (7, [4, 8], False)
    assert a.data.bandpass == (0.5, 40.0) and a.optimization.lr == 0.01


def test_every_data_config_field_is_reachable_by_flag_and_yaml(tmp_path) -> None:
    options = schema("fit")
    data_keys = {k for k in options if k.startswith("data.")}
    assert data_keys == {f"data.{f.name}" for f in dataclasses.fields(DataConfig)}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "bandpass": [0.5, 40.0], "notch": 60.0, "nan_policy": "interpolate",
        "aug_scale": [0.9, 1.1], "aug_noise": 0.01, "aug_shift": 0.1,
        "reader_options": {"channel": "MLII"}, "pin_memory": False,
        "persistent_workers": False}}))
    data = parse_args(["--config", str(config), "--reader-option", "window_seconds=10",
                       "--aug-noise", "0.02"]).data
    assert (data.bandpass, data.notch, data.nan_policy) == ((0.5, 40.0), 60.0, "interpolate")
    assert (data.aug_scale, data.aug_noise, data.aug_shift) == ((0.9, 1.1), 0.02, 0.1)
    assert data.reader_options == {"channel": "MLII", "window_seconds": 10}  # merged
    assert (data.pin_memory, data.persistent_workers) == (False, False)


def test_yaml_is_nested_as_the_dataclasses_and_flags_override_it(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"synthetic_num_signals": 300, "augment": False, "batch_size": 7},
        "model": {"branches": "time", "cnn_channels": [8, 16]},
        "optimization": {"lr": 0.01}, "run": None,
    }))
    options = parse_args(["--config", str(config), "--lr", "0.5"])
    data, model = options.data, options.model
    assert (data.synthetic_num_signals, data.augment, model.branches) == (300, False, "time")
    assert model.cnn_channels == [8, 16] and data.batch_size == 7
    assert options.optimization.lr == 0.5  # the flag wins


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_print_back(name: str, tmp_path, capsys) -> None:
    options = parse_args(["--config", str(ROOT / "configs" / name)])
    assert options.data.batch_size >= 1 and options.run.name == name.removesuffix(".yaml")
    with pytest.raises(SystemExit) as exit_info:
        parse_command(["--config", str(ROOT / "configs" / name), "--print-config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["data"]["batch_size"] == options.data.batch_size
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert parse_args(["--config", str(again)]) == options  # --print-config round-trips


def test_print_config_of_the_defaults_and_of_fit(capsys) -> None:
    for argv, gain in ((["--print-config"], None),
                       (["fit", "--print-config", "--epochs", "3", "--aug-scale", "0.8,1.25"],
                        [0.8, 1.25])):
        with pytest.raises(SystemExit):
            parse_command(argv)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert set(printed) == {"data", "model", "optimization", "hardware", "run"}
        assert printed["data"]["aug_scale"] == gain  # plain lists, safe_load reads it
    assert printed["optimization"]["epochs"] == 3


def test_commands_and_their_options(tmp_path) -> None:
    command, options = parse_command(["predict", "--checkpoint", "c.ckpt", "--data", "x.npz",
                                      "--aggregate", "vote", "--reader-option", "labels=none"])
    assert command == "predict" and isinstance(options, PredictOptions)
    assert (options.aggregate, options.reader_options) == ("vote", {"labels": "none"})
    command, options = parse_command(["test", "--checkpoint", "c.ckpt", "--data", "x.npz"])
    assert command == "test" and options.aggregate == "mean" and options.name == "test"
    with pytest.raises(ConfigError, match="invalid choice: 'max'"):
        parse_command(["predict", "--checkpoint", "c", "--data", "x", "--aggregate", "max"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--hidden-size", "0"], "--hidden-size: expected an integer >= 1; got 0"),
    (["--data.length", "-3"], "--data.length: expected an integer >= 1; got -3"),
    (["--dropout", "1.5"], "--dropout: expected a number in [0, 1); got 1.5"),
    (["--ema", "1.5"], "--ema: expected a number in [0, 1); got 1.5"),
    (["--ema", "x"], "--ema: expected a number in [0, 1); got 'x'"),
    (["--accelerator", "tpu"], "--accelerator: invalid choice: 'tpu'"),
    (["--nosuch"], "unknown option --nosuch"),
    (["--no-lr"], "unknown option --no-lr"),
    (["--bandpass", "1"], "--bandpass: expected"),
    (["--stem-depth", "0"], "--stem-depth: expected an integer >= 1; got 0"),
    (["--branch-loss", "-0.5"], "--branch-loss: expected a number in [0, 10]; got -0.5"),
    (["--stem", "patch", "--stem-depth", "3"], "stem_depth: expected 1 with stem 'patch'"),
])
def test_bad_values_are_one_line_errors(argv, message) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_yaml_value_names_the_file_and_key(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("optimization:\n  warmup: -1\nmodel:\n  n_fft: 64\n")
    with pytest.raises(ConfigError, match=r"config .*c.yaml: optimization.warmup: expected a "
                                          r"number in \[0, inf\); got -1"):
        parse_args(["--config", str(config)])
    config.write_text("model:\n  hidden_sise: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_size'"):
        parse_args(["--config", str(config)])


@pytest.mark.parametrize(("argv", "typed", "hint"), [
    # jsonargparse reported '1e11' as '100000000000.0', a number nobody typed
    (["--length", "1e11"], "'1e11'", " (write the integer without an exponent or a point: "
                                     "100000000000)"),
    (["--seed", "1e3"], "'1e3'", " (write the integer without an exponent or a point: 1000)"),
    (["--batch-size", "8.0"], "'8.0'", " (write the integer without an exponent or a point: 8)"),
    (["--length", "1.5"], "'1.5'", ""),  # not a whole number: nothing to rewrite
    (["--length", "1e30"], "'1e30'", ""),  # beyond 2**53 the float is not the integer meant
])
def test_an_integer_typed_as_a_float_is_shown_as_typed(argv, typed, hint, tmp_path) -> None:
    flag = argv[0]
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    assert str(info.value).endswith(f"got {typed}{hint}"), str(info.value)
    assert str(info.value).startswith(f"{flag}: expected an integer")
    key = next(o.key for o in schema("fit").values() if o.flag == flag)
    section, name = key.split(".")
    config = tmp_path / "c.yaml"  # a YAML value alike
    config.write_text(f"{section}:\n  {name}: {argv[1]}\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(config)])
    assert str(info.value).endswith(f"got {typed}{hint}"), str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    # the first line of PyYAML's message was all that was shown: "while parsing a flow
    # sequence", with neither the line nor the problem
    ("data:\n  reader_options: {window_seconds: [1}\n",
     "is not valid YAML at line 2, column 38: expected ',' or ']', but got '}'"),
    ("data:\n  reader_options: {x: !!python/object/apply:os.system [echo]}\n",
     "at line 2, column 23: YAML tags like '!!python/...' are not allowed; give a plain value "
     "(quote it to pass the text)"),
])
def test_a_config_file_that_is_not_yaml_names_the_line(tmp_path, text, message) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(config)])
    assert str(info.value) == f"config {config} {message}"


def test_the_dataclasses_check_their_values_in_python_too() -> None:
    with pytest.raises(ValueError, match="hidden_size: expected an integer >= 1; got 0"):
        ModelOptions(hidden_size=0)
    with pytest.raises(ValueError, match="notch: expected a positive finite number"):
        DataConfig(notch=-50.0)
    with pytest.raises(ValueError, match="name: expected a plain folder name"):
        RunOptions(name="../x")


def test_help_lists_flags_yaml_keys_and_defaults() -> None:
    text = " ".join(format_help("fit").split())  # wrapped lines joined
    assert "--batch-size N" in text and "[data.batch_size]" in text
    assert "--augment, --no-augment" in text and "(default: 0.002)" in text
    assert "--data PATH" in text and "[data.source]" in text
    assert "--checkpoint CKPT" in format_help("predict")
