"""Python log records and warnings: which of them are noise, and how they are dropped.

`DropLogMessages` is a logging filter; `KNOWN_WARNINGS` the harmless warnings torch and
Lightning give on every small run (train.py hides them for the whole process through
`quiet_known_warnings`, the scikit-learn estimator for the length of a fit).
"""

from __future__ import annotations

import logging
import warnings

# message patterns (warnings.filterwarnings' `message`) of harmless warnings
KNOWN_WARNINGS = (
    r".*does not have many workers.*",  # Lightning, of a loader with few workers
    r".*is smaller than the logging interval.*",  # Lightning: an epoch of few steps
    r".*`srun` command is available on your system.*",  # Lightning, on a SLURM host
    r".*LeafSpec.*is deprecated.*",  # torch's pytree, as Lightning calls it
    # Lightning, on every fit with a data module: SignalClassifierModule's own hook (it drops
    # lengths that pad nothing, on the host) is the one meant, and the one Lightning runs
    r".*overridden `on_before_batch_transfer` in `LightningModule` but have passed in a.*",
)


class DropLogMessages(logging.Filter):
    """Drops log records whose message contains one of `parts`."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in str(record.msg) for part in self.parts)


# (message, module) patterns of harmless warnings that are only harmless from that module:
# LearningRateMonitor copies each learning rate with torch.tensor(), which warns when the
# rate is already a tensor (the captured train step's optimizer keeps it on the GPU)
KNOWN_MODULE_WARNINGS = (
    (r"To copy construct from a tensor", r"pytorch_lightning\.callbacks\.lr_monitor"),
)

# Lightning advertises a cloud logger and reports TPUs nobody asked about
_LIGHTNING_NOISE = DropLogMessages("Tip: For seamless cloud logging", "TPU available")


def quiet_known_warnings() -> None:
    """For the rest of the process: `KNOWN_WARNINGS` ignored, and Lightning's advertisement of
    a cloud logger and its report of TPUs dropped (once, however often this is called)."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for pattern, module in KNOWN_MODULE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, module=module)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_LIGHTNING_NOISE)


__all__ = ["KNOWN_MODULE_WARNINGS", "KNOWN_WARNINGS", "DropLogMessages", "quiet_known_warnings"]
