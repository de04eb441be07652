"""models/export.py: exported programs and ONNX files vs the eager model."""

from __future__ import annotations

import sys

import pytest
import torch

from models.dual_branch import DualBranchClassifier
from models.export import (
    OnnxRunner,
    check_export,
    example_inputs,
    export_onnx,
    export_program,
    prepare_for_export,
)
from models.wkv import wkv, wkv_reference

ATOL = 1e-4
LENGTH = 128  # samples: 32 steps of the time branch, two WKV chunks
FREQ = dict(n_fft=64, hop_length=16, n_mels=16, channels=(8, 16), sample_rate=1000,
            freq_mask_param=4, time_mask_param=4)


def tiny_classifier(time: dict | None = None, freq: dict | None = None, seed: int = 0,
                    **options) -> DualBranchClassifier:
    """A tiny classifier with every parameter perturbed: RWKV-4's init zeroes the key and
    output projections (each block starts as the identity), which would hide the recurrence."""
    torch.manual_seed(seed)
    time = {**dict(hidden_size=16, num_layers=1, patch_size=4, wkv_backend="torch"),
            **(time or {})}
    model = DualBranchClassifier(3, time=time, freq={**FREQ, **(freq or {})}, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_prepare_for_export_leaves_the_model_alone() -> None:
    model = tiny_classifier(time=dict(wkv_backend="auto"))
    copy = prepare_for_export(model)
    assert model.freq_branch.stft == "fft" and copy.freq_branch.stft == "conv"
    assert model.time_branch.blocks[0].att.backend == "auto"
    assert copy.time_branch.blocks[0].att.backend == "torch"
    assert not copy.training


@pytest.fixture(scope="module")
def program_and_model():
    model = tiny_classifier(time=dict(num_layers=2))
    return export_program(model, LENGTH), model  # check=True: compared with eager once inside


def test_exported_program_matches_eager_for_any_batch(program_and_model) -> None:
    program, model = program_and_model
    for batch in (1, 5):
        inputs = example_inputs(model, LENGTH, batch, seed=batch)
        assert check_export(program.module(), model, inputs) < ATOL


def test_exported_program_saves_and_loads(program_and_model, tmp_path) -> None:
    program, model = program_and_model
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    inputs = example_inputs(model, LENGTH, 3, seed=7)
    assert check_export(loaded.module(), model, inputs) < ATOL


def test_exported_program_has_a_fixed_length(program_and_model) -> None:
    program, _ = program_and_model
    with pytest.raises(Exception, match="(?i)expected|shape|guard|constraint"):
        program.module()(torch.randn(2, 300))


@pytest.mark.parametrize("time,options", [
    (dict(bidirectional=True, pooling="meanmax"), dict(fusion="gated")),
    (dict(stem="conv", pooling="last", stem_kernels=(3, 5)), dict(branches="both")),
])
def test_exported_padded_batches_match_eager(time: dict, options: dict) -> None:
    model = tiny_classifier(time=time, freq=dict(spectrogram="linear"), **options)
    program = export_program(model, LENGTH, with_lengths=True, check=False)  # checked here
    x, lengths = example_inputs(model, LENGTH, 4, with_lengths=True, seed=3)
    assert int(lengths.min()) < LENGTH  # some records are padded
    assert check_export(program.module(), model, (x, lengths)) < ATOL
    # a short record padded into the exported length gives what it gives alone
    alone = model(x[1:2, : int(lengths[1])])
    torch.testing.assert_close(program.module()(x[1:2], lengths[1:2]), alone, atol=ATOL, rtol=0)


def test_export_from_a_checkpoint(tmp_path) -> None:
    from models.lightning_module import SignalClassifierModule

    module = SignalClassifierModule(
        model=dict(time=dict(hidden_size=16, num_layers=1, patch_size=8, wkv_backend="torch"),
                   freq=FREQ),
        num_classes=3).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path / "m.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
               path)
    program = export_program(path, LENGTH, check=False)  # checked here
    inputs = example_inputs(module.model, LENGTH, 3, seed=2)
    assert check_export(program.module(), module.model, inputs) < ATOL


class WKVModule(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.decay = torch.nn.Parameter(torch.linspace(-3, 2, channels))
        self.first = torch.nn.Parameter(torch.linspace(-1, 1, channels))

    def forward(self, k, v, state):
        return wkv(self.decay, self.first, k, v, state, backend="torch", check_finite=False)


def test_exported_wkv_matches_the_reference_even_in_wide_chunks() -> None:
    """The chunked backend's step-by-step fallback (k spanning more than float64's range in
    one chunk) has no data-dependent branch in an exported graph."""
    module = WKVModule(4)
    k, v = torch.randn(2, 40, 4, dtype=torch.float64), torch.randn(2, 40, 4, dtype=torch.float64)
    k[0, 20, :2] = 900.0  # a wide chunk in one record, not the other
    state = torch.randn(2, 3, 4, dtype=torch.float64).abs()
    program = torch.export.export(module, (k, v, state))
    y, out = program.module()(k, v, state)
    w = -torch.exp(module.decay.detach().double())
    want_y, want_out = wkv_reference(w, module.first.detach().double(), k, v, state)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(out, want_out)


def test_onnx_export_names_the_missing_packages(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="onnx and onnxscript"):
        export_onnx(tiny_classifier(), tmp_path / "m.onnx", LENGTH)


@pytest.mark.slow
def test_onnx_file_matches_eager(tmp_path) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = tiny_classifier(time=dict(patch_size=8))
    path = export_onnx(model, tmp_path / "m.onnx", LENGTH)  # checks against eager itself
    runner = OnnxRunner(path)
    for batch in (1, 4):
        inputs = example_inputs(model, LENGTH, batch, seed=batch)
        assert check_export(runner, model, inputs) < ATOL
