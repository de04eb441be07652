"""Fields of the option dataclasses: default, help and value check in one place.

The config dataclasses (`data.datamodule.DataConfig`, `models.options.ModelOptions`,
`models.options.OptimizationOptions`, `utils.cli.HardwareOptions` / `RunOptions`) declare every
option once with `option(default, help, check)`; utils/cli.py derives the command line, the
YAML schema and `--help` from them, and each dataclass runs the same checks in
`__post_init__` (`check_fields`), so a value is refused alike from a flag, a YAML file or
Python.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import field
from typing import Any

SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """A bad option or option value; train.main() prints it as one line (exit status 2)."""


class Check:
    """A value check: `describe` says what is expected ("an integer >= 1"), `accepts` tests."""

    def __init__(self, describe: str, accepts: Callable[[Any], bool]) -> None:
        self.describe, self.accepts = describe, accepts

    def problem(self, value: Any) -> str | None:
        """None when `value` passes (None always passes: it means automatic), else
        'expected ...; got ...'."""
        if value is None or self.accepts(value):
            return None
        return f"expected {self.describe}; got {value!r}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: int) -> Check:
    """An integer >= low."""
    return Check(f"an integer >= {low}",
                 lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)


def in_range(low: float, high: float, high_open: bool = True) -> Check:
    """A number in [low, high) (or [low, high])."""
    bracket = ")" if high_open else "]"
    shown = "inf" if math.isinf(high) else f"{high:g}"
    return Check(f"a number in [{low:g}, {shown}{bracket}",
                 lambda v: _number(v) and (low <= v < high if high_open else low <= v <= high))


def positive_finite() -> Check:
    """A number > 0 that is finite (inf would train NaN weights, or resample to nothing)."""
    return Check("a positive finite number", lambda v: _number(v) and v > 0 and math.isfinite(v))


def seed_range() -> Check:
    """The seeds numpy and Lightning accept."""
    return Check(f"an integer in [0, {SEED_MAX}]",
                 lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SEED_MAX)


def option(default: Any = None, help: str = "", check: Check | None = None, *,
           flag: str | None = None, metavar: str | None = None,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field carrying its help text, value check, and (when the flat flag is not
    the field name with '-') the flag users type, e.g. flag='data' for DataConfig.source."""
    metadata = {"help": help, "check": check, "flag": flag, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_fields(config: Any) -> None:
    """Run every field's check on a dataclass instance; ValueError 'NAME: expected ...'."""
    for f in dataclasses.fields(config):
        check = f.metadata.get("check")
        problem = check.problem(getattr(config, f.name)) if check else None
        if problem:
            raise ValueError(f"{f.name}: {problem}")
