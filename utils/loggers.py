"""The experiment logger of a run (`--logger`: TensorBoard, CSV, MLflow or Weights & Biases) and
what a finished run logs to it: its options beside its final test metrics.

    logger = make_logger("tensorboard", "runs", "dual_branch", "version_0")
    log_final_metrics(logger, to_yaml_dict(options), {"test/acc": 0.93})

(Python's own log records and warnings: utils/logs.py.)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from utils.options import ConfigError

# the loggers that need a package of their own: --logger value -> the package
LOGGER_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


def check_logger(kind: str) -> None:
    """Refuse --logger mlflow / wandb where the package is missing, in one line."""
    package = LOGGER_PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"--logger {kind} needs the {package} package, which is not installed "
                          f"(pip install {package}); or pass --logger tensorboard or csv")


def make_logger(kind: str, save_dir: str | Path, name: str, version: str | None) -> Logger:
    """The experiment logger of --logger, logging into SAVE_DIR/NAME/VERSION."""
    check_logger(kind)
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir, name=name, version=version, default_hp_metric=False)
    if kind == "csv":
        return CSVLogger(save_dir, name=name, version=version)
    if kind == "mlflow":
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=name, run_name=version or None,
                            save_dir=str(Path(save_dir, "mlruns")))
    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(project=name, name=version or None, save_dir=str(save_dir))


def flat_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """Nested options (`utils.cli.to_yaml_dict`'s) as one level of 'section.key': value, every
    value a number, bool or text (what TensorBoard's HParams tab compares)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)
    walk("", dict(config))
    return flat


def log_final_metrics(logger: Logger | None, config: Mapping[str, Any],
                      metrics: Mapping[str, float]) -> None:
    """The run's final test metrics beside its options (`config`, nested): TensorBoard's
    HParams tab then compares runs by them; other loggers get both as hyperparameters and
    metrics."""
    if logger is None or not metrics:
        return
    metrics = {k: float(v) for k, v in metrics.items()}
    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(flat_hparams(config), metrics)
    else:
        logger.log_hyperparams(flat_hparams(config))
        logger.log_metrics(metrics)
    logger.save()


__all__ = ["LOGGER_PACKAGES", "check_logger", "flat_hparams", "log_final_metrics",
           "make_logger"]
