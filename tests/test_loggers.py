"""Tests for utils/loggers.py: the --logger choice, missing packages refused in one line, and
the options logged flat beside the final test metrics."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import yaml
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from utils.loggers import check_logger, flat_hparams, log_final_metrics, make_logger
from utils.options import ConfigError


def test_missing_logger_packages_are_refused_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    for kind in ("mlflow", "wandb"):
        with pytest.raises(ConfigError) as err:
            check_logger(kind)
        assert str(err.value) == (f"--logger {kind} needs the {kind} package, which is not "
                                  f"installed (pip install {kind}); or pass --logger "
                                  "tensorboard or csv")
    check_logger("tensorboard")  # built in: nothing to check
    check_logger("csv")


def test_make_logger_logs_into_dir_name_version(tmp_path) -> None:
    tensorboard = make_logger("tensorboard", tmp_path, "exp", "version_3")
    assert isinstance(tensorboard, TensorBoardLogger)
    assert Path(tensorboard.log_dir) == tmp_path / "exp" / "version_3"
    table = make_logger("csv", tmp_path, "exp", "")
    assert isinstance(table, CSVLogger) and Path(table.log_dir) == tmp_path / "exp"


def test_flat_hparams_joins_sections_and_keeps_plain_values() -> None:
    config = {"seed": 0, "data": {"length": 512, "source": None, "aug_scale": [0.8, 1.25],
                                  "reader_options": {}},
              "model": {"time": {"hidden_size": 16}, "augment": True}}
    assert flat_hparams(config) == {
        "seed": 0, "data.length": 512, "data.source": "None", "data.aug_scale": "[0.8, 1.25]",
        "data.reader_options": "{}", "model.time.hidden_size": 16, "model.augment": True}


def test_final_metrics_are_logged_beside_the_options(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="exp", version="")
    log_final_metrics(logger, {"data": {"length": 512}}, {"test/acc": 0.75})
    with open(tmp_path / "exp" / "metrics.csv") as f:
        assert [float(r["test/acc"]) for r in csv.DictReader(f)] == [0.75]
    assert yaml.safe_load((tmp_path / "exp" / "hparams.yaml").read_text()) == {
        "data.length": 512}
    log_final_metrics(None, {}, {"test/acc": 1.0})  # no logger: nothing to do
