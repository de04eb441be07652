"""Tests for utils/logs.py: the log filter and the known harmless warnings."""

from __future__ import annotations

import logging
import warnings

from utils.logs import DropLogMessages, quiet_known_warnings


def test_drop_log_messages_drops_only_records_with_a_part(caplog) -> None:
    logger = logging.getLogger("tests.test_logs.drop")
    noise = DropLogMessages("Tip: For seamless", "TPU available")
    logger.addFilter(noise)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("Tip: For seamless cloud logging, try ...")
            logger.info("TPU available: False, using: 0 TPU cores")
            logger.info("GPU available: True (cuda)")
    finally:
        logger.removeFilter(noise)
    assert [r.getMessage() for r in caplog.records] == ["GPU available: True (cuda)"]


def test_quiet_known_warnings_ignores_them_and_filters_lightning_once() -> None:
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    before = list(rank_zero.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        quiet_known_warnings()
        warnings.warn("The 'train_dataloader' does not have many workers which may be a "
                      "bottleneck.", UserWarning, stacklevel=1)
        warnings.warn("You have overridden `on_before_batch_transfer` in `LightningModule` but "
                      "have passed in a `LightningDataModule`. It will use the implementation "
                      "from `LightningModule` instance.", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
    added = [f for f in rank_zero.filters if f not in before]
    assert len(added) <= 1 and all(isinstance(f, DropLogMessages) for f in added)


def test_a_module_bound_warning_is_quiet_only_from_that_module() -> None:
    message = "To copy construct from a tensor, it is recommended to use sourceTensor.clone()"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for module in ("pytorch_lightning.callbacks.lr_monitor", "my_code"):
            warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module=module)
    assert [w.filename for w in caught] == ["my_code.py"]
