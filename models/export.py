"""Export the classifier to a `torch.export` program or an ONNX file, checked against eager.

Read top to bottom: `load_classifier` (a model, a LightningModule or a train.py checkpoint)
-> `prepare_for_export` (a copy that traces: eval mode, the WKV on the chunked PyTorch
backend, the STFT as a real-valued conv) -> `export_program` -> `export_onnx`.

What is exported: `DualBranchClassifier.forward` at inference (eval: no dropout, no SpecAugment,
BatchNorm running statistics) for a batch of signals of one fixed length T (`example_length`)
and any batch size B (dynamic). Inputs: x (B, T) float32, and with `with_lengths=True` also
lengths (B,) int64, so records shorter than T go in zero-padded to T and each gives what it
gives alone (the model's padded-batch behaviour, exported too). Output: (B, num_classes) logits.

What is not exported:
- other lengths T: the WKV scan over chunks is unrolled at trace time (ceil(T' / 16) steps per
  layer), so T is part of the program; export at the longest length and pass lengths, or
  export once per length;
- training (dropout, SpecAugment, batch statistics), gradient checkpointing, `compile_blocks`;
- the native WKV kernels (CUDA/C++): the program uses the chunked PyTorch backend in float64,
  which is the same math (tests compare it to the sequential reference) and runs anywhere;
- the input checks of eager forward (shape errors become export guard errors; NaN is not
  refused);
- the streaming state (models/streaming.py streams eagerly) and ensembles (export each member).
TorchScript is not offered: torch.jit is deprecated in favour of torch.export.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.dual_branch import DualBranchClassifier
from models.rwkv import RWKVEncoder, TimeMix

EXPORT_ATOL = 1e-4  # exported vs eager logits, float32 (measured ~1e-6 on tiny models)
MAX_BATCH = 65536  # upper bound of the dynamic batch dimension


def load_classifier(model_or_checkpoint: Any) -> DualBranchClassifier:
    """A `DualBranchClassifier` from itself, a `SignalClassifierModule` (its `.model`) or the
    path of a train.py checkpoint (models.checkpoint.load_checkpoint: weights_only=True, in
    eval mode; a file that is not one raises its one-line ConfigError, a ValueError)."""
    if isinstance(model_or_checkpoint, DualBranchClassifier):
        return model_or_checkpoint
    inner = getattr(model_or_checkpoint, "model", None)
    if isinstance(inner, DualBranchClassifier):  # SignalClassifierModule
        return inner
    if isinstance(model_or_checkpoint, (str, Path)):
        from models.checkpoint import load_checkpoint  # Lightning only for files

        return load_checkpoint(model_or_checkpoint).model
    raise ValueError(f"expected a DualBranchClassifier, a SignalClassifierModule or a "
                     f"checkpoint path; got {type(model_or_checkpoint).__name__}")


def prepare_for_export(model_or_checkpoint: Any, stft: str = "conv") -> DualBranchClassifier:
    """A copy of the classifier that torch.export can trace into a portable graph.

    The copy is in eval mode, without gradient checkpointing, its WKV on the "torch" backend
    (vectorised chunked PyTorch; a native kernel would leave a custom op in the graph that
    only this project's library runs) and its frequency branch's STFT `stft` ("conv": real
    ops only, which ONNX needs; "fft": torch.stft, complex). The model passed in is unchanged.
    """
    model = copy.deepcopy(load_classifier(model_or_checkpoint)).eval()
    for module in model.modules():
        if isinstance(module, TimeMix):
            module.backend = "torch"
        elif isinstance(module, RWKVEncoder):
            module.config = dataclasses.replace(module.config, wkv_backend="torch")
            module.set_gradient_checkpointing(False)
    if model.freq_branch is not None:
        model.freq_branch.set_stft(stft)
    return model


def example_inputs(model: DualBranchClassifier, length: int, batch_size: int = 2,
                   with_lengths: bool = False, seed: int = 0) -> tuple[Tensor, ...]:
    """Random signals (B, length) (and their lengths (B,), the first one full, the others
    shorter) on the model's device: what export traces with and checks against eager."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, length, generator=generator)
    if not with_lengths:
        return (x.to(device),)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch_size,), generator=generator)
    lengths[0] = length
    x = x * (torch.arange(length) < lengths[:, None])  # zero padding past each end
    return x.to(device), lengths.to(device)


def export_program(model_or_checkpoint: Any, example_length: int, batch_size: int = 2,
                   with_lengths: bool = False, stft: str = "conv", check: bool = True,
                   atol: float = EXPORT_ATOL) -> torch.export.ExportedProgram:
    """torch.export the classifier's inference forward for signals of `example_length` samples.

    Returns an ExportedProgram: `program.module()(x)` (or `(x, lengths)` with `with_lengths`)
    gives (B, num_classes) logits for any batch size B >= 1; T must equal example_length.
    Save and load it with `torch.export.save` / `torch.export.load`.
    check: run the program and the eager model (as given: its own WKV backend and STFT) on
    random example inputs and raise a RuntimeError when the logits differ by more than atol.
    """
    eager = load_classifier(model_or_checkpoint)
    model = prepare_for_export(eager, stft=stft)
    if example_length < model.min_length:
        raise ValueError(f"example_length must be >= {model.min_length}; got {example_length}")
    # trace with B >= 2: torch.export specialises a dimension whose example size is 1
    inputs = example_inputs(model, example_length, max(batch_size, 2), with_lengths)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = tuple({0: batch} for _ in inputs)
    with torch.no_grad():
        program = torch.export.export(model, inputs, dynamic_shapes=dynamic)
    if check:  # on other inputs than those traced
        check_export(program.module(), eager,
                     example_inputs(eager, example_length, 3, with_lengths, seed=1), atol)
    return program


def check_export(exported: nn.Module | Any, eager: nn.Module, inputs: tuple[Tensor, ...],
                 atol: float = EXPORT_ATOL) -> float:
    """The largest |exported - eager| over the logits of `inputs`; RuntimeError above atol.
    `exported` is any callable on the same inputs (a program's module, an ONNX session
    wrapper)."""
    was_training = eager.training
    eager.eval()
    try:
        with torch.no_grad():
            want = eager(*inputs).float().cpu()
            got = torch.as_tensor(exported(*inputs)).float().cpu()
    finally:
        eager.train(was_training)
    difference = float((got - want).abs().max())
    if not difference <= atol:  # also NaN
        raise RuntimeError(f"the exported model's logits differ from eager by {difference:.3g} "
                           f"(allowed {atol:.3g})")
    return difference


def export_onnx(model_or_checkpoint: Any, path: str | Path, example_length: int,
                batch_size: int = 2, with_lengths: bool = False, check: bool = True,
                atol: float = EXPORT_ATOL) -> Path:
    """Write the classifier as an ONNX file (through `export_program`, STFT as a conv).

    Inputs "x" (B, example_length) float32 (and "lengths" (B,) int64 with `with_lengths`),
    output "logits" (B, num_classes); B is dynamic. Needs the `onnx` and `onnxscript`
    packages (torch's dynamo exporter); check also needs `onnxruntime`, and compares the file
    run there with the eager model. Returns the path.
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as exc:
        raise ImportError("ONNX export needs the onnx and onnxscript packages "
                          "(pip install onnx onnxscript; onnxruntime to run the file)") from exc
    eager = load_classifier(model_or_checkpoint)
    program = export_program(eager, example_length, batch_size, with_lengths, stft="conv",
                             check=False)
    path = Path(path)
    names = ["x", "lengths"] if with_lengths else ["x"]
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=names,
                                     output_names=["logits"], verbose=False)
    onnx_program.save(str(path))
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"wrote {path}; checking it needs onnxruntime (pip install "
                              f"onnxruntime), or pass check=False") from exc
        inputs = example_inputs(eager, example_length, max(batch_size, 2), with_lengths, seed=1)
        check_export(OnnxRunner(path), eager, inputs, atol)
    return path


class OnnxRunner:
    """An ONNX file run by onnxruntime on the CPU, called like the model: runner(x[, lengths])
    -> (B, num_classes) logits as a tensor."""

    def __init__(self, path: str | Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path),
                                                    providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Tensor) -> Tensor:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.names, inputs,
                                                                  strict=True)}
        return torch.from_numpy(self.session.run(None, feed)[0])


__all__ = ["OnnxRunner", "check_export", "example_inputs", "export_onnx", "export_program",
           "load_classifier", "prepare_for_export"]
