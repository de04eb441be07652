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
)


class DropLogMessages(logging.Filter):
    """Drops log records whose message contains one of `parts`."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in str(record.msg) for part in self.parts)


# Lightning advertises a cloud logger and reports TPUs nobody asked about
_LIGHTNING_NOISE = DropLogMessages("Tip: For seamless cloud logging", "TPU available")


def quiet_known_warnings() -> None:
    """For the rest of the process: `KNOWN_WARNINGS` ignored, and Lightning's advertisement of
    a cloud logger and its report of TPUs dropped (once, however often this is called)."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_LIGHTNING_NOISE)


__all__ = ["KNOWN_WARNINGS", "DropLogMessages", "quiet_known_warnings"]
