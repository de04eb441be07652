"""Reading train.py's checkpoints: the model(s) a `--checkpoint` path names, loaded with
weights_only=True (no code from the file runs).

    from models.checkpoint import load_checkpoint, load_ensemble
    module = load_checkpoint("runs/dual_branch/version_0/checkpoints/last.ckpt")
    ensemble, files = load_ensemble("runs/dual_branch/version_0")   # a file, a run, an ensemble

`read_checkpoint` checks that a file is one (a dict with `hyper_parameters` and `state_dict`),
`state_dict_difference` whether its weights fit a model, `model_checkpoints` which files a run
folder's `--checkpoint` means (best, else last; one per ensemble member). Every refusal is a
one-line `ConfigError` (a ValueError) naming the file and what is wrong with it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from models.lightning_module import SignalClassifierModule, SignalEnsemble
from utils.options import ConfigError


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A train.py checkpoint's contents, loaded with weights_only=True; ConfigError for a file
    that is not one (damaged, foreign, or not a dict with hyper_parameters and state_dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"cannot load checkpoint {path}: not a checkpoint of plain tensors "
                          "and containers (weights_only=True refuses other objects)") from exc
    except Exception as exc:  # a damaged or foreign file fails in many ways inside pickle
        size = Path(path).stat().st_size if Path(path).is_file() else None
        if size == 0:
            what = "the file is empty"
        elif isinstance(exc, (EOFError, OSError, RuntimeError)):
            what = f"the file is damaged or truncated ({size} bytes)"
        else:
            what = f"{type(exc).__name__}: {_first_line(exc)}"
        raise ConfigError(f"cannot load checkpoint {path}: {what}; pass a checkpoint train.py "
                          "wrote (e.g. checkpoints/last.ckpt of a run)") from exc
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("hyper_parameters"), dict)
            and isinstance(ckpt.get("state_dict"), dict)):
        raise ConfigError(f"{path} is not a train.py checkpoint (no hyper_parameters)")
    return ckpt


def state_dict_difference(module: torch.nn.Module, state: dict[str, Any]) -> str | None:
    """The first way `state` does not fit `module` (a missing or unexpected key, another
    shape), or None where `module.load_state_dict(state)` will succeed."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in state:
            return f"no {key}"
        shape = tuple(getattr(state[key], "shape", ()))
        if shape != tuple(value.shape):
            return f"{key} has shape {shape}, the model's {tuple(value.shape)}"
    unexpected = next((key for key in state if key not in own), None)
    return None if unexpected is None else f"unexpected {unexpected}"


def load_checkpoint(path: str | Path) -> SignalClassifierModule:
    """A SignalClassifierModule from a train.py checkpoint, loaded with weights_only=True;
    in eval mode, on the CPU."""
    ckpt = read_checkpoint(path)
    try:
        module = SignalClassifierModule(**ckpt["hyper_parameters"])
    except (TypeError, ValueError) as exc:  # another program's, or another version's
        raise ConfigError(f"{path}: its hyper_parameters do not build this train.py's model: "
                          f"{_first_line(exc)}") from exc
    difference = state_dict_difference(module, ckpt["state_dict"])
    if difference:
        raise ConfigError(f"{path}: its weights do not fit its hyper_parameters ({difference})")
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def model_checkpoints(path: str | Path) -> list[Path]:
    """The checkpoint files `predict --checkpoint` names: a file itself; a run folder's best
    (else last) checkpoint; an ensemble run folder's, one per member."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"--checkpoint: {path} does not exist")

    def chosen(run: Path) -> Path | None:
        best = sorted((run / "checkpoints").glob("best-*.ckpt"))
        last = run / "checkpoints" / "last.ckpt"
        return best[-1] if best else (last if last.is_file() else None)

    members = sorted(path.glob("member_*"), key=lambda p: int(p.name.split("_")[1])
                     if p.name.split("_")[1].isdigit() else -1)
    found = [chosen(m) for m in members] if members else [chosen(path)]
    if not found or None in found:
        raise ConfigError(f"--checkpoint: {path} holds no train.py checkpoint (expected "
                          "checkpoints/last.ckpt, or member_*/checkpoints/ of an ensemble)")
    return found


def load_ensemble(checkpoint: str | Path) -> tuple[SignalEnsemble, list[Path]]:
    """The model(s) `--checkpoint` names (a file, a run folder, an ensemble's folder) as one
    `SignalEnsemble`, and their checkpoint files; ConfigError where members disagree."""
    checkpoints = model_checkpoints(checkpoint)
    modules = [load_checkpoint(path) for path in checkpoints]
    first = modules[0]
    for other in modules[1:]:
        if list(other.class_names) != list(first.class_names) or \
                other.hparams.data != first.hparams.data:
            raise ConfigError(f"--checkpoint {checkpoint}: its members were not trained "
                              "on the same data (class names or data settings differ)")
    return SignalEnsemble(modules).eval(), checkpoints


__all__ = ["load_checkpoint", "load_ensemble", "model_checkpoints", "read_checkpoint",
           "state_dict_difference"]
