"""Frequency branch: spectrogram -> dB -> per-frequency normalisation -> SpecAugment -> 2D CNN.

Read top to bottom: `FrequencyConfig` -> `ConvStage` -> `FrequencyBranch`.
Shapes: B batch, T samples, F frequency bins (n_mels, or n_fft // 2 + 1 for a linear
spectrogram), N frames = 1 + T // hop_length.

The STFT is torch.stft (complex) by default; `FrequencyBranch(config, stft="conv")` or
`set_stft("conv")` computes the same power spectrogram with real-valued ops only (a strided
conv1d with a fixed cos/sin basis), for exporters without complex numbers (ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from models.rwkv import validate_signal

STFT_MODES = ("fft", "conv")


@dataclass
class FrequencyConfig:
    """Everything that shapes the frequency branch."""

    spectrogram: str = "mel"  # "mel" | "linear"
    sample_rate: int = 16000  # Hz, places the mel filters (unused by "linear")
    n_fft: int = 512  # STFT size (shorter signals are zero-padded to it)
    hop_length: int = 128
    win_length: int | None = None  # None: n_fft
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    top_db: float | None = 80.0  # floor each spectrogram at (its max - top_db) dB
    freq_norm: str = "batch"  # "batch" (per-bin stats over the data) | "instance" (per record)
    channels: tuple[int, ...] = (16, 32, 64, 128)  # CNN stage widths; out_features = last
    dropout: float = 0.0  # before the pooled features leave the branch
    freq_mask_param: int = 8  # SpecAugment: widest frequency mask in bins (0: none)
    time_mask_param: int = 16  # SpecAugment: widest time mask in frames (0: none)
    num_masks: int = 2  # masks of each kind per example
    max_time_mask_fraction: float = 0.2  # a time mask never covers more of a short record

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)  # YAML gives lists
        if self.spectrogram not in ("mel", "linear"):
            raise ValueError(f"FrequencyConfig.spectrogram must be 'mel' or 'linear'; "
                             f"got {self.spectrogram!r}")
        if self.freq_norm not in ("batch", "instance"):
            raise ValueError(f"FrequencyConfig.freq_norm must be 'batch' or 'instance'; "
                             f"got {self.freq_norm!r}")
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FrequencyConfig.{name} must be an integer >= 1; got {value!r}")
        for name in ("freq_mask_param", "time_mask_param", "num_masks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"FrequencyConfig.{name} must be an integer >= 0; got {value!r}")
        if self.hop_length > self.n_fft or not 1 <= self.window_length <= self.n_fft:
            raise ValueError(f"FrequencyConfig needs hop_length <= n_fft and win_length <= n_fft; "
                             f"got n_fft={self.n_fft}, hop_length={self.hop_length}, "
                             f"win_length={self.win_length}")
        if self.spectrogram == "mel" and self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(f"FrequencyConfig.n_mels = {self.n_mels} exceeds the "
                             f"{self.n_fft // 2 + 1} STFT bins of n_fft = {self.n_fft}")
        if not self.channels or not all(isinstance(c, int) and c >= 1 for c in self.channels):
            raise ValueError(f"FrequencyConfig.channels must be positive widths; "
                             f"got {self.channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FrequencyConfig.dropout must be in [0, 1); got {self.dropout!r}")
        if self.freq_mask_param >= self.n_freq:
            raise ValueError(f"FrequencyConfig.freq_mask_param = {self.freq_mask_param} must be "
                             f"below the {self.n_freq} frequency bins")

    @property
    def window_length(self) -> int:
        """The STFT window in samples: win_length, or n_fft when it is None."""
        return self.n_fft if self.win_length is None else self.win_length

    @property
    def n_freq(self) -> int:
        """F, the number of frequency bins the CNN sees."""
        return self.n_mels if self.spectrogram == "mel" else self.n_fft // 2 + 1

    @property
    def out_features(self) -> int:
        return self.channels[-1]


class CeilMeanPool2d(nn.Module):
    """2x2 average pooling that keeps a partial last window, averaged over its real entries:
    nn.AvgPool2d(2, ceil_mode=True), written as zero padding + plain pooling. torch.compile
    (torch 2.11) gets the backward of avg_pool2d(ceil_mode=True) wrong where a window is
    partial (tests/test_frequency.py), and the whole classifier is compiled on a GPU."""

    def forward(self, x: Tensor) -> Tensor:
        pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
        if not (pad_h or pad_w):
            return F.avg_pool2d(x, 2)
        real = F.pad(x.new_ones(1, 1, *x.shape[-2:]), (0, pad_w, 0, pad_h))
        return F.avg_pool2d(F.pad(x, (0, pad_w, 0, pad_h)), 2) / F.avg_pool2d(real, 2)


class ConvStage(nn.Module):
    """Conv3x3 -> BatchNorm -> ReLU -> 2x2 average pooling: (B, c_in, F, N) -> (B, c_out,
    ceil(F/2), ceil(N/2)). ceil_mode keeps a dimension of 1 alive on short records.

    forward(x, mask) also takes and returns the (B, N) mask of real frames: padding frames
    are zeroed before the convolution (they look like its zero padding) and left out of the
    pooling averages, so a padded record gives what it gives alone."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.pool = CeilMeanPool2d()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if mask is None:
            return self.pool(self.act(self.norm(self.conv(x)))), None
        m = mask[:, None, None, :].to(x.dtype)  # (B, 1, 1, N)
        h = self.act(self.norm(self.conv(x * m))) * m
        count = self.pool(m.expand(-1, 1, h.shape[2], -1))
        pooled = self.pool(h) / count.clamp_min(1e-6)
        return pooled * (count > 0), count[:, 0, 0] > 0


class FrequencyBranch(nn.Module):
    """Spectrogram CNN: (B, T) or (B, T, 1) float signal -> (B, out_features); a signal shorter
    than n_fft is zero-padded to one window.

    The spectrogram is computed in fp32 with autocast off (a bf16 FFT loses the quiet bins) on
    the input's device; SpecAugment masks are applied only in training. forward checks the
    input's shape, length and dtype (ValueError), not its values: NaN/Inf are the caller's to
    refuse (`DualBranchClassifier` does, once).

    stft: "fft" (torch.stft, the default for training) or "conv" (see `set_stft`).
    """

    def __init__(self, config: FrequencyConfig, stft: str = "fft"):
        super().__init__()
        self.config = config
        win_length = config.window_length
        # zero (not reflect) padding at the ends: a signal padded inside a batch then has the
        # very frames it has alone, which the length masks below rely on
        if config.spectrogram == "mel":
            self.spectrogram = torchaudio.transforms.MelSpectrogram(
                sample_rate=config.sample_rate, n_fft=config.n_fft, win_length=win_length,
                hop_length=config.hop_length, f_min=config.f_min, f_max=config.f_max,
                n_mels=config.n_mels, power=2.0, pad_mode="constant")
        else:
            self.spectrogram = torchaudio.transforms.Spectrogram(
                n_fft=config.n_fft, win_length=win_length, hop_length=config.hop_length,
                power=2.0, pad_mode="constant")
        # dB without a floor: log_spectrogram floors each record at its own max - top_db
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)
        # normalise each frequency bin on its own: dB levels differ by tens of dB between low
        # and high bins, and a shared scale would let the loudest bins dominate the CNN
        if config.freq_norm == "batch":
            self.freq_norm = nn.BatchNorm1d(config.n_freq)
        else:
            self.freq_norm = nn.InstanceNorm1d(config.n_freq, affine=True)
        self.freq_masks = nn.ModuleList(
            torchaudio.transforms.FrequencyMasking(config.freq_mask_param, iid_masks=True)
            for _ in range(config.num_masks if config.freq_mask_param > 0 else 0))
        self.time_masks = nn.ModuleList(
            torchaudio.transforms.TimeMasking(config.time_mask_param, iid_masks=True,
                                              p=config.max_time_mask_fraction)
            for _ in range(config.num_masks if config.time_mask_param > 0 else 0))
        widths = (1, *config.channels)
        self.cnn = nn.Sequential(*(ConvStage(a, b) for a, b in zip(widths, widths[1:],
                                                                       strict=False)))
        self.drop = nn.Dropout(config.dropout)
        self.set_stft(stft)

    @property
    def out_features(self) -> int:
        return self.config.out_features

    @property
    def _stft(self) -> torchaudio.transforms.Spectrogram:
        mel = isinstance(self.spectrogram, torchaudio.transforms.MelSpectrogram)
        return self.spectrogram.spectrogram if mel else self.spectrogram

    def set_stft(self, mode: str) -> None:
        """Choose how the STFT is computed: "fft" (torch.stft) or "conv".

        "conv" is a strided conv1d whose 2 * (n_fft // 2 + 1) kernels are the window times
        cos / sin of each bin, on the signal zero-padded by n_fft // 2 at both ends: the frames,
        window, centring and padding of the "fft" path, with real-valued ops only (ONNX has no
        complex STFT). Both are float32: the power spectrograms agree to ~5e-7 of the peak, the
        dB values to a few 1e-3 dB in bins far below it (rounding of either path, not a
        bias). It costs n_fft multiply-adds per bin and frame (an FFT far fewer). No parameter
        changes: the basis is a non-persistent buffer, so state_dicts load either way.
        """
        if mode not in STFT_MODES:
            raise ValueError(f"stft must be one of {STFT_MODES}; got {mode!r}")
        self.stft = mode
        if mode == "conv":
            self.register_buffer("stft_basis", self._stft_basis(), persistent=False)
        elif "stft_basis" in self._buffers:
            del self._buffers["stft_basis"]

    def _stft_basis(self) -> Tensor:
        """(2F, 1, n_fft) float32 kernels [window * cos; window * sin], built in float64."""
        stft = self._stft
        n_fft, window = stft.n_fft, stft.window.double()
        left = (n_fft - window.shape[0]) // 2  # torch.stft centres a shorter window
        window = nn.functional.pad(window, (left, n_fft - window.shape[0] - left))
        n = torch.arange(n_fft, dtype=torch.float64, device=window.device)
        bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=window.device)
        angle = 2 * torch.pi * bins[:, None] * n[None, :] / n_fft  # (F, n_fft)
        basis = torch.cat((torch.cos(angle), torch.sin(angle))) * window
        return basis.float().unsqueeze(1)

    def _conv_power(self, x: Tensor) -> Tensor:
        """(B, T) float32 -> (B, n_fft // 2 + 1, N) power spectrogram through the conv basis."""
        stft = self._stft
        if stft.center:
            half = stft.n_fft // 2
            x = nn.functional.pad(x, (half, half))  # pad_mode "constant": zeros
        parts = nn.functional.conv1d(x.unsqueeze(1), self.stft_basis.to(x.dtype),
                                     stride=stft.hop_length)  # (B, 2F, N)
        re, im = parts.chunk(2, dim=1)
        return re.square() + im.square()

    def power_spectrogram(self, x: Tensor) -> Tensor:
        """(B, T) float32 signal -> (B, 1, F, N) power spectrogram (mel or linear).

        Exactly what the torchaudio transform computes (tests compare the two), with its own
        window, sizes and mel filters, but through torch.stft directly: torchaudio's forward
        calls torch.jit.isinstance, which torch.compile cannot trace (a graph break).
        """
        mel = isinstance(self.spectrogram, torchaudio.transforms.MelSpectrogram)
        stft = self._stft
        if self.stft == "conv":
            spec = self._conv_power(x)
        else:
            spec = torch.stft(x, n_fft=stft.n_fft, hop_length=stft.hop_length,
                              win_length=stft.win_length, window=stft.window,
                              center=stft.center, pad_mode=stft.pad_mode,
                              onesided=stft.onesided, return_complex=True)
            spec = spec.abs().pow(2.0)
        if mel:
            spec = self.spectrogram.mel_scale(spec)
        return spec.unsqueeze(1)

    def frame_mask(self, lengths: Tensor, frames: int) -> Tensor:
        """(B,) signal lengths -> (B, N) float mask of the frames centred on a real sample."""
        real = 1 + lengths // self.config.hop_length
        return (torch.arange(frames, device=lengths.device) < real.unsqueeze(1)).float()

    def log_spectrogram(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T) signal -> (B, F, N) normalised dB spectrogram, float32; with lengths, the
        frames past each signal's end are 0 (the normalised mean)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = self.to_db(self.power_spectrogram(x.float())).squeeze(1)  # (B, F, N)
            mask = None if lengths is None else self.frame_mask(lengths, spec.shape[-1])
            if self.config.top_db is not None:
                # floor each record at its own max (over its real frames): a loud neighbour
                # in the batch must not change a quiet record
                peak = spec if mask is None else spec.masked_fill(mask.unsqueeze(1) == 0,
                                                                  -torch.inf)
                floor = peak.amax(dim=(1, 2), keepdim=True) - self.config.top_db
                spec = torch.maximum(spec, floor)
            spec = self.freq_norm(spec)
            return spec if mask is None else spec * mask.unsqueeze(1)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """x: (B, T) or (B, T, 1); lengths: (B,) real samples of each zero-padded signal, or
        None. Returns (B, out_features); a padded signal gives what it gives alone."""
        # shapes, length and dtype only: the finiteness check syncs with the device, and the
        # classifier has made it once already
        x = validate_signal(x, 1, check_finite=False).squeeze(-1)
        if x.shape[1] < self.config.n_fft:
            # shorter than one window: zero-pad to it and keep the real length, which gives
            # exactly the frames of the zero-padded (constant-mode) STFT of the short signal
            if lengths is None:
                lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
            x = nn.functional.pad(x, (0, self.config.n_fft - x.shape[1]))
        spec = self.log_spectrogram(x, lengths).unsqueeze(1)  # (B, 1, F, N)
        if self.training:
            # masks set bins to 0, the mean of the normalised spectrogram
            for mask in (*self.freq_masks, *self.time_masks):
                spec = mask(spec)
        mask = None if lengths is None else self.frame_mask(lengths, spec.shape[-1])
        h = spec
        for stage in self.cnn:
            h, mask = stage(h, mask)  # (B, C, F', N'), (B, N')
        # mean over frequency, then max + mean over time: brief events (max) and sustained
        # patterns (mean) both survive pooling
        h = h.mean(2)
        if mask is None:
            return self.drop(h.amax(-1) + h.mean(-1))
        m = mask.unsqueeze(1)
        peak = h.masked_fill(m == 0, torch.finfo(h.dtype).min).amax(-1)
        mean = (h * m).sum(-1) / m.sum(-1).clamp_min(1)
        return self.drop(peak + mean)


__all__ = ["STFT_MODES", "CeilMeanPool2d", "ConvStage", "FrequencyBranch", "FrequencyConfig"]
