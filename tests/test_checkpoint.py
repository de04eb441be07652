"""Tests for models/checkpoint.py: train.py checkpoints read, checked and loaded (one module, a
run folder, an ensemble), and the one-line refusals of files that are not one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import (
    load_checkpoint,
    load_ensemble,
    model_checkpoints,
    read_checkpoint,
    state_dict_difference,
)
from models.lightning_module import SignalClassifierModule, SignalEnsemble
from utils.options import ConfigError

MODEL = dict(time=dict(hidden_size=8, num_layers=1, patch_size=8, wkv_backend="torch"),
             branches="time")


def tiny_module(hidden_size: int = 8, class_names: tuple[str, ...] = ("a", "b", "c"),
                seed: int = 0) -> SignalClassifierModule:
    torch.manual_seed(seed)
    model = {**MODEL, "time": {**MODEL["time"], "hidden_size": hidden_size}}
    module = SignalClassifierModule(model=model, num_classes=len(class_names),
                                    class_names=class_names, data={"length": 64})
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def save(module: SignalClassifierModule, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
               path)
    return path


def test_load_checkpoint_gives_the_saved_weights_in_eval_mode(tmp_path) -> None:
    module = tiny_module()
    loaded = load_checkpoint(save(module, tmp_path / "m.ckpt"))
    assert not loaded.training and loaded.class_names == ["a", "b", "c"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.eval()(x))


def test_read_checkpoint_names_an_empty_or_truncated_file(tmp_path) -> None:
    whole = save(tiny_module(), tmp_path / "whole.ckpt").read_bytes()
    empty, truncated = tmp_path / "empty.ckpt", tmp_path / "truncated.ckpt"
    empty.write_bytes(b"")
    truncated.write_bytes(whole[:1000])
    for path, what in ((empty, "the file is empty"),
                       (truncated, "the file is damaged or truncated (1000 bytes)")):
        with pytest.raises(ConfigError) as err:
            read_checkpoint(path)
        assert str(err.value) == (f"cannot load checkpoint {path}: {what}; pass a checkpoint "
                                  "train.py wrote (e.g. checkpoints/last.ckpt of a run)")


def test_read_checkpoint_refuses_pickled_objects_and_foreign_contents(tmp_path) -> None:
    pickled, garbage = tmp_path / "object.ckpt", tmp_path / "garbage.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {}, "extra": Path("x")}, pickled)
    garbage.write_bytes(b"not a checkpoint")
    for path in (pickled, garbage):
        with pytest.raises(ConfigError, match="weights_only=True refuses other objects"):
            read_checkpoint(path)
    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ConfigError, match="is not a train.py checkpoint"):
        read_checkpoint(tensor)


def test_load_checkpoint_refuses_weights_or_hparams_that_do_not_fit(tmp_path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"hidden": 3}, "state_dict": {}}, foreign)
    with pytest.raises(ConfigError, match="hyper_parameters do not build this train.py's model"):
        load_checkpoint(foreign)
    small, large = tiny_module(8), tiny_module(16)
    mixed = tmp_path / "mixed.ckpt"
    torch.save({"hyper_parameters": dict(small.hparams), "state_dict": large.state_dict()},
               mixed)
    with pytest.raises(ConfigError, match=r"weights do not fit its hyper_parameters \(.* has "
                                          r"shape \(.*16.*\), the model's \(.*8.*\)\)"):
        load_checkpoint(mixed)


def test_state_dict_difference_names_the_first_mismatch() -> None:
    module = tiny_module()
    state = dict(module.state_dict())
    assert state_dict_difference(module, state) is None
    first = next(iter(state))
    assert state_dict_difference(module, {k: v for k, v in state.items() if k != first}) \
        == f"no {first}"
    assert state_dict_difference(module, {**state, "extra.weight": torch.zeros(1)}) \
        == "unexpected extra.weight"
    shape = tuple(state[first].shape)
    assert state_dict_difference(module, {**state, first: torch.zeros(*shape, 2)}) \
        == f"{first} has shape {(*shape, 2)}, the model's {shape}"


def test_model_checkpoints_of_a_file_a_run_and_an_ensemble(tmp_path) -> None:
    module = tiny_module()
    single = save(module, tmp_path / "single.ckpt")
    assert model_checkpoints(single) == [single]
    run = tmp_path / "run"
    last = save(module, run / "checkpoints" / "last.ckpt")
    assert model_checkpoints(run) == [last]
    best = save(module, run / "checkpoints" / "best-epoch=002-macro_f1=0.5000.ckpt")
    assert model_checkpoints(run) == [best]  # the best over the last
    ensemble = tmp_path / "ensemble"
    members = [save(module, ensemble / f"member_{k}" / "checkpoints" / "last.ckpt")
               for k in (0, 1, 2, 10)]
    assert model_checkpoints(ensemble) == members  # member 10 after member 2
    with pytest.raises(ConfigError, match="does not exist"):
        model_checkpoints(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no train.py checkpoint"):
        model_checkpoints(tmp_path / "empty")


def test_load_ensemble_averages_members_and_refuses_other_data(tmp_path) -> None:
    folder = tmp_path / "ensemble"
    modules = [tiny_module(seed=k) for k in range(2)]
    for k, module in enumerate(modules):
        save(module, folder / f"member_{k}" / "checkpoints" / "last.ckpt")
    ensemble, files = load_ensemble(folder)
    assert isinstance(ensemble, SignalEnsemble) and len(files) == 2
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m.eval()(x), -1) for m in modules]).mean(0)
        torch.testing.assert_close(ensemble(x), expected)
    save(tiny_module(class_names=("a", "b", "z")), folder / "member_2" / "checkpoints"
         / "last.ckpt")
    with pytest.raises(ConfigError, match="not trained on the same data"):
        load_ensemble(folder)
