"""Console scripts that are not a module's own `main` (pyproject.toml [project.scripts])."""

from __future__ import annotations

import sys


def predict(argv: list[str] | None = None) -> int:
    """`rwkv-signal-predict ARGS`: the same as `python train.py predict ARGS`."""
    from train import main  # the entry point, imported only when this script runs

    return main(["predict", *(sys.argv[1:] if argv is None else argv)])
