"""The classifier: RWKV time branch + spectrogram CNN frequency branch -> fusion -> logits.

Read top to bottom: `DualBranchConfig` (nested `RWKVConfig` and `FrequencyConfig`) -> `Fusion`
-> `DualBranchClassifier`. Either branch can be switched off for ablations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.frequency import FrequencyBranch, FrequencyConfig
from models.rwkv import (
    RWKVConfig,
    RWKVEncoder,
    config_from_dict,
    optimizer_groups,
    validate_signal,
)


def _branch_config(cls: type, value: Any, where: str):
    """A branch's config from a config object, a dict of its fields or None (the defaults)."""
    if value is None:  # also an empty `time:` section in a YAML file
        return cls()
    if isinstance(value, Mapping):
        return config_from_dict(cls, dict(value), f"{where} setting")
    if not isinstance(value, cls):
        raise ValueError(f"{where} must be a {cls.__name__}, a dict of its fields or None; "
                         f"got {type(value).__name__}")
    return value


@dataclass
class DualBranchConfig:
    """The whole model in one object; `from_dict` builds it from a YAML mapping."""

    num_classes: int = 2
    time: RWKVConfig = field(default_factory=RWKVConfig)
    freq: FrequencyConfig = field(default_factory=FrequencyConfig)
    fusion: str = "concat"  # "concat" | "gated"
    branches: str = "both"  # "both" | "time" | "freq"
    fusion_dim: int = 256  # width both branches are projected to by "gated" fusion
    dropout: float = 0.1  # before the final linear layer
    # z-normalise each signal inside the model (over its real samples): the branches see its
    # shape whatever its level and gain
    instance_norm: bool = True
    # ...and keep what that erases: the signal as given (the data module scales it by the
    # training set's statistics, not per signal) as a second time-branch channel, and its
    # mean and log std as features beside the branches' (some classes differ in amplitude)
    keep_amplitude: bool = True
    # each branch's pooled features also get a linear head of their own in training, whose
    # cross-entropy counts with this weight beside the fused head's (0: none): every branch
    # learns to classify alone, not only through the fusion (gradient blending)
    branch_loss: float = 0.0

    def __post_init__(self) -> None:
        self.time = _branch_config(RWKVConfig, self.time, "time")
        self.freq = _branch_config(FrequencyConfig, self.freq, "freq")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {self.num_classes!r}")
        if self.fusion not in ("concat", "gated"):
            raise ValueError(f"fusion must be 'concat' or 'gated'; got {self.fusion!r}")
        if self.branches not in ("both", "time", "freq"):
            raise ValueError(f"branches must be 'both', 'time' or 'freq'; got {self.branches!r}")
        if self.use_freq and self.time.input_size != 1:
            raise ValueError(f"the frequency branch takes 1-channel signals; "
                             f"time.input_size = {self.time.input_size}")
        if self.time.return_sequence:
            raise ValueError("time.return_sequence must be False: the classifier pools features")
        if not isinstance(self.fusion_dim, int) or self.fusion_dim < 1:
            raise ValueError(f"fusion_dim must be an integer >= 1; got {self.fusion_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not (isinstance(self.branch_loss, (int, float)) and 0.0 <= self.branch_loss <= 10.0):
            raise ValueError(f"branch_loss must be a weight in [0, 10]; got {self.branch_loss!r}")
        if self.keep_amplitude and not self.instance_norm:
            raise ValueError("keep_amplitude needs instance_norm: without it nothing is erased")
        if self.instance_norm and self.time.input_size != 1:
            raise ValueError("instance_norm takes 1-channel signals; "
                             f"time.input_size = {self.time.input_size}")

    @property
    def use_time(self) -> bool:
        return self.branches in ("both", "time")

    @property
    def use_freq(self) -> bool:
        return self.branches in ("both", "freq")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DualBranchConfig:
        """{"num_classes": 5, "time": {...RWKVConfig fields}, "freq": {...}, "fusion": ...}.
        Unknown keys raise a ValueError naming them."""
        return config_from_dict(cls, dict(values), "model setting")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Fusion(nn.Module):
    """Combines the branches' pooled features into one (B, out_features) vector.

    Each branch is LayerNorm'd first: RWKV features are already normalised, CNN features are
    ReLU-scale, and without it the larger one would dominate the head (and the gate).
    "concat": [time, freq]. "gated": both projected to fusion_dim and mixed per feature by a
    learned gate g = sigmoid(W [time, freq]) as g * time + (1 - g) * freq.
    """

    def __init__(self, widths: list[int], mode: str, fusion_dim: int):
        super().__init__()
        self.mode = mode if len(widths) > 1 else "concat"  # one branch: nothing to gate
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        if self.mode == "gated":
            self.projections = nn.ModuleList(nn.Linear(w, fusion_dim) for w in widths)
            self.gate = nn.Linear(sum(widths), fusion_dim)
            self.out_features = fusion_dim
        else:
            self.out_features = sum(widths)

    def forward(self, features: list[Tensor]) -> Tensor:
        features = [norm(f) for norm, f in zip(self.norms, features, strict=True)]
        if self.mode == "concat":
            return torch.cat(features, dim=-1)
        g = torch.sigmoid(self.gate(torch.cat(features, dim=-1)))
        a, b = (proj(f) for proj, f in zip(self.projections, features, strict=True))
        return g * a + (1 - g) * b


AMPLITUDE_FEATURES = 16  # width of the embedded (mean, log std) of each signal


def check_length_range(low: int, high: int, least: int, steps: int,
                       what: str = "lengths") -> None:
    """Signal lengths low..high of a batch of `steps` samples must lie in [least, steps]."""
    if low < least or high > steps:
        raise ValueError(f"{what} must lie in [{least}, T = {steps}]; got {low}..{high}")


def signal_statistics(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and std (at least 1e-6) of each signal over its real samples: (B, T) -> (B, 1) x2."""
    if mask is None:
        return x.mean(1, keepdim=True), x.std(1, correction=0, keepdim=True).clamp_min(1e-6)
    count = mask.sum(1, keepdim=True).clamp_min(1)
    mean = (x * mask).sum(1, keepdim=True) / count
    var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / count
    return mean, var.sqrt().clamp_min(1e-6)


class DualBranchClassifier(nn.Module):
    """(B, T) or (B, T, 1) float signal -> (B, num_classes) logits.

    forward(x, lengths) takes a zero-padded batch of signals of `lengths` (B,) samples; each
    gives the logits it gives alone (the branches, the normalisation and the pooling all
    leave the padding out).

    Build it from a whole `DualBranchConfig` (`DualBranchClassifier(config)`) or from its fields
    (`DualBranchClassifier(5, time={...}, freq={...}, fusion="gated")`); time and freq may be
    `RWKVConfig` / `FrequencyConfig` or dicts of their fields (None: defaults). The input is
    checked once here (shape, dtype, finite values); the branches trust it.
    """

    def __init__(self, num_classes: int | DualBranchConfig = 2,
                 time: RWKVConfig | dict | None = None,
                 freq: FrequencyConfig | dict | None = None, fusion: str = "concat",
                 branches: str = "both", fusion_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        if isinstance(num_classes, DualBranchConfig):
            config = num_classes
        else:
            config = DualBranchConfig(num_classes=num_classes, time=time, freq=freq,
                                      fusion=fusion, branches=branches, fusion_dim=fusion_dim,
                                      dropout=dropout)
        self.config = config
        widths = []
        self.time_branch = self.freq_branch = None
        if config.use_time:
            # this class checks finiteness itself: one device sync per forward, not two
            channels = 2 if config.keep_amplitude else config.time.input_size
            self.time_branch = RWKVEncoder(dataclasses.replace(
                config.time, check_input_finite=False, input_size=channels))
            widths.append(self.time_branch.out_features)
        if config.use_freq:
            self.freq_branch = FrequencyBranch(config.freq)
            widths.append(self.freq_branch.out_features)
        self.fusion = Fusion(widths, config.fusion, config.fusion_dim)
        self.amplitude = None
        width = self.fusion.out_features
        if config.keep_amplitude:
            self.amplitude = nn.Sequential(nn.Linear(2, AMPLITUDE_FEATURES), nn.ReLU(),
                                           nn.LayerNorm(AMPLITUDE_FEATURES))
            width += AMPLITUDE_FEATURES
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(width, config.num_classes)
        # training-only heads of each branch alone (branch_loss); none with one branch
        self.branch_heads = nn.ModuleList(
            nn.Linear(w, config.num_classes) for w in widths
        ) if config.branch_loss > 0 and len(widths) > 1 else nn.ModuleList()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DualBranchClassifier:
        """Build from a plain mapping (e.g. the `model:` section of a YAML config)."""
        return cls(DualBranchConfig.from_dict(values))

    @property
    def min_length(self) -> int:
        """The shortest signal the model accepts: one sample (the frequency branch zero-pads
        a signal shorter than its STFT window)."""
        return 1

    def forward(self, x: Tensor, lengths: Tensor | None = None,
                branch_heads: bool = False) -> Tensor:
        """x: (B, T) or (B, T, input_size) float; lengths: (B,) int real samples per signal
        (the rest is zero padding), or None. Returns (B, num_classes) logits; with
        `branch_heads`, what training scores: (B, 1 + H, num_classes), the fused head's
        logits first, then those of the H branch heads (`branch_loss`; H = 0 without them)."""
        features, mean, std = self._features(x, lengths)
        logits = self.head_logits(features, mean, std)
        if not branch_heads:
            return logits
        scored = [logits]
        if len(self.branch_heads) > 0:
            scored += [head(self.drop(norm(f))) for head, norm, f in
                       zip(self.branch_heads, self.fusion.norms, features, strict=True)]
        return torch.stack(scored, 1)

    def _features(self, x: Tensor, lengths: Tensor | None
                  ) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
        """The branches' pooled features (time first) and each signal's (B, 1) mean and std
        (None without instance_norm)."""
        cfg = self.config
        x = validate_signal(x, cfg.time.input_size, min_length=self.min_length)
        if lengths is not None:
            lengths = self._check_lengths(lengths, x)
        time_input = freq_input = x
        mean = std = None
        if cfg.instance_norm:
            signal = x.squeeze(-1).float()  # (B, T)
            mask = None
            if lengths is not None:
                mask = (torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1)).float()
            mean, std = signal_statistics(signal, mask)
            time_input, freq_input = self.branch_inputs(signal, mean, std, mask)
        features = []
        if self.time_branch is not None:
            features.append(self.time_branch(time_input, lengths=lengths))
        if self.freq_branch is not None:
            features.append(self.freq_branch(freq_input, lengths))
        return features, mean, std

    def branch_inputs(self, signal: Tensor, mean: Tensor, std: Tensor,
                      mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What instance_norm models feed their branches: signal (B, T) float32 and its
        (B, 1) mean and std (`signal_statistics`) -> (time input (B, T, 2) with keep_amplitude
        (the z-normalised signal and the signal as given) else (B, T), freq input (B, T));
        mask (B, T) zeroes the padding. Pointwise in T, so a chunk of a signal can be
        prepared on its own (streaming)."""
        shape = (signal - mean) / std
        time_input = freq_input = shape if mask is None else shape * mask
        if self.config.keep_amplitude:
            time_input = torch.stack((time_input, signal), -1)  # signal is 0 in padding
        return time_input, freq_input

    def head_logits(self, features: list[Tensor], mean: Tensor | None = None,
                    std: Tensor | None = None) -> Tensor:
        """The branches' pooled features (time first, as the branches are on) -> (B,
        num_classes) logits: fusion, the embedded (B, 1) mean and std of each signal
        (keep_amplitude models need them), dropout, the linear head."""
        fused = self.fusion(features)
        if self.amplitude is not None:
            if mean is None or std is None:
                raise ValueError("this model keeps amplitude: head_logits needs mean and std")
            fused = torch.cat((fused, self.amplitude(torch.cat((mean, std.log()), -1))), -1)
        return self.head(self.drop(fused))

    def _check_lengths(self, lengths: Tensor, x: Tensor) -> Tensor | None:
        """lengths on x's device, checked; None (eagerly) where every signal is full, so an
        equal-length batch skips the masks and the reversed scan's gathers. Not read while
        compiling or recording a CUDA graph (a host sync breaks both): a captured train step
        checks them on the host instead."""
        if not isinstance(lengths, Tensor) or lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths must be a ({x.shape[0]},) tensor of sample counts; "
                             f"got {getattr(lengths, 'shape', type(lengths).__name__)}")
        lengths = lengths.to(device=x.device, dtype=torch.long)
        if not torch.compiler.is_compiling() and not (
                x.is_cuda and torch.cuda.is_current_stream_capturing()):
            low, high = torch.stack(torch.aminmax(lengths)).tolist()  # one host sync
            check_length_range(low, high, self.min_length, x.shape[1])
            if low == x.shape[1]:
                return None
        return lengths

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint every RWKV block (the frequency CNN is small and is left alone)."""
        if self.time_branch is not None:
            self.time_branch.set_gradient_checkpointing(enabled)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on weight matrices and conv kernels; none on RWKV decay/first/
        time-mix, norms and biases. Each trainable parameter appears exactly once."""
        return optimizer_groups(self, weight_decay)


ClassifierConfig = DualBranchConfig  # the name used in the project issue

__all__ = ["ClassifierConfig", "DualBranchClassifier", "DualBranchConfig", "Fusion"]
