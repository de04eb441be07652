"""What a user chooses about the model and its training: the `model:` and `optimization:`
sections of a config, and the flags train.py derives from them (utils/cli.py).

None means automatic: `models.defaults.fill_model_defaults` fills those fields from the data
(size, length, sample rate), and `models.defaults.model_settings` turns the filled options into
the `DualBranchConfig` fields the classifier is built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.rwkv import COMPILE_MODES
from utils.options import at_least, check_fields, in_range, option, positive_finite

AUTO = " (default: from the data, see docs/training.md)"
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
assert set(CompileMode.__args__) == set(COMPILE_MODES)  # one list of modes
MONITORS = ("val/macro_f1", "val/balanced_acc", "val/acc", "val/kappa", "val/loss")


@dataclass
class ModelOptions:
    """The classifier's options; None = chosen from the data."""

    branches: Literal["both", "time", "freq"] = option(
        "both", "RWKV time branch, spectrogram-CNN frequency branch, or both")
    hidden_size: int | None = option(None, "RWKV width" + AUTO, at_least(1), metavar="C")
    num_layers: int | None = option(None, "RWKV blocks" + AUTO, at_least(1), metavar="L")
    patch_size: int | None = option(None, "samples per RWKV step after the stem" + AUTO,
                                    at_least(1), metavar="N")
    stem: Literal["conv", "patch"] = option(
        "conv", "RWKV input stem: multi-scale convolution then patch means, or plain patches "
        "(needed for streaming)")
    stem_depth: int = option(1, "layers of the conv stem at full resolution (InceptionTime-"
                             "style, residual)", at_least(1), metavar="N")
    pooling: Literal["meanmax", "mean", "last"] = option(
        "meanmax", "RWKV per-step features -> one vector")
    bidirectional: bool = option(True, "add a time-reversed WKV scan to every RWKV block (no "
                                 "streaming)")
    instance_norm: bool = option(True, "z-normalise each signal inside the model")
    keep_amplitude: bool = option(True, "give the model each signal's level and gain beside its "
                                  "shape (needs instance_norm)")
    cnn_channels: list[int] | None = option(None, "frequency CNN stage widths" + AUTO,
                                            metavar="C [C ...]")
    spectrogram: Literal["mel", "linear"] | None = option(
        None, "frequency-branch input: mel or linear power spectrogram in dB (default: mel when "
        "the sample rate is known and n_fft >= 128)")
    n_fft: int | None = option(None, "STFT size in samples; also the shortest input the branch "
                               "accepts (default: a power of two near length / 4, 8 to 256)",
                               at_least(2), metavar="N")
    hop_length: int | None = option(None, "STFT hop in samples (default: n_fft / 4)",
                                    at_least(1), metavar="N")
    n_mels: int | None = option(None, "mel bands (default: 64, capped at n_fft / 2 + 1)",
                                at_least(1), metavar="N")
    spec_augment: bool = option(True, "SpecAugment frequency/time masks in training")
    fusion: Literal["concat", "gated"] = option(
        "concat", "how the two branches' features are combined")
    dropout: float = option(0.1, "dropout before the classifier head", in_range(0.0, 1.0),
                            metavar="P")
    branch_loss: float = option(0.0, "in training, a head of each branch's own features whose "
                                "loss counts with this weight beside the fused head's (0: none)",
                                in_range(0.0, 10.0, high_open=False), metavar="W")
    rwkv_dropout: float = option(0.0, "residual dropout inside the RWKV blocks",
                                 in_range(0.0, 1.0), metavar="P")
    gradient_checkpointing: bool = option(False, "recompute RWKV block activations in backward")
    compile: bool = option(False, "torch.compile every RWKV block (GPU; slow to start); "
                           "where the train step is one CUDA graph, the whole classifier "
                           "inside it instead")
    compile_mode: CompileMode = option(
        "default", "torch.compile mode for compile; reduce-overhead also replays each block "
        "as a CUDA graph (fewer kernel launches, more memory)")
    wkv_backend: Literal["auto", "torch", "cuda", "cpu", "reference"] = option(
        "auto", "WKV operator backend")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.stem == "patch" and self.stem_depth > 1:
            raise ValueError(f"stem_depth: expected 1 with stem 'patch' (only the conv stem "
                             f"has further layers); got {self.stem_depth}")
        if self.cnn_channels is not None:
            self.cnn_channels = [int(c) for c in self.cnn_channels]
            if not self.cnn_channels or min(self.cnn_channels) < 1:
                raise ValueError(f"cnn_channels: expected one or more integers >= 1; got "
                                 f"{self.cnn_channels}")


@dataclass
class OptimizationOptions:
    """Loss, optimizer, schedule and training budget."""

    epochs: int | None = option(None, "train for this many epochs instead of the step budget",
                                at_least(1), metavar="N")
    max_steps: int | None = option(None, "optimizer steps (overrides epochs for the schedule; "
                                   "default: 20 epochs, at least 1000 and at most 10000 steps)",
                                   at_least(1), metavar="N")
    mixup: float = option(0.2, "mixup Beta(alpha, alpha) in training (0: off)",
                          in_range(0.0, float("inf")), metavar="ALPHA")
    lr: float = option(2e-3, "peak learning rate", positive_finite(), metavar="LR")
    lr_scaling: Literal["none", "linear", "sqrt"] = option(
        "none", "scale lr by (effective batch / batch_size) for multi-device runs")
    weight_decay: float = option(0.05, "AdamW weight decay, on weight matrices and conv kernels "
                                 "only (not on norms, biases or RWKV decay/first/mix)",
                                 in_range(0.0, float("inf")), metavar="W")
    warmup: float = option(0.05, "warmup: fraction of all steps if < 1, else a step count",
                           in_range(0.0, float("inf")), metavar="W")
    min_lr_ratio: float = option(0.01, "the cosine schedule ends at lr x this",
                                 in_range(0.0, 1.0, high_open=False), metavar="R")
    ema: float = option(0.0, "validate, checkpoint and test an exponential moving average of "
                        "the weights whose horizon is this fraction of all optimizer steps "
                        "(0: off, the weights as trained)", in_range(0.0, 1.0), metavar="F")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", in_range(0.0, 1.0),
                                    metavar="E")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)",
                              in_range(0.0, float("inf")), metavar="NORM")
    accumulate: int = option(1, "batches per optimizer step", at_least(1), metavar="N")
    monitor: Literal["val/macro_f1", "val/balanced_acc", "val/acc", "val/kappa",
                     "val/loss"] = option(
        "val/macro_f1", "metric for the best checkpoint and early stopping")
    patience: int = option(0, "early stopping after this many validations without improvement "
                           "(0: off; needs a validation split)", at_least(0), metavar="EPOCHS")

    def __post_init__(self) -> None:
        check_fields(self)
