"""RWKV-4 time branch: blocks, the encoder, and the sequential 'original' model.

Read top to bottom: `RWKVConfig` -> `PatchEmbedding` (stem) -> `TimeMix` (token shift + WKV) ->
`ChannelMix` (squared ReLU) -> `Block` -> `RWKVEncoder` (the optimized model) -> `SequentialRWKV`
(the same parameters computed with plain per-op code and the sequential reference WKV) ->
`create_optimized_rwkv` / `create_original_rwkv`.

Shapes: B batch, T input samples, T' = ceil(T / patch_size) steps after the stem, C hidden_size,
L num_layers. The WKV operator itself lives in models/wkv.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.wkv import BACKENDS, empty_state, prepare_backend, wkv

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
POOLINGS = ("mean", "last", "meanmax")
STEMS = ("patch", "conv")


@dataclass
class RWKVConfig:
    """Everything that shapes the time branch; passed down to every module unchanged."""

    input_size: int = 1  # channels per input sample
    hidden_size: int = 256  # C, the width of every block
    num_layers: int = 6  # L
    ffn_mult: int = 4  # channel-mix hidden width = ffn_mult * C (RWKV-4 uses 4)
    dropout: float = 0.0  # residual dropout after each time mix and channel mix
    patch_size: int = 1  # strided-conv stem: T samples -> ceil(T / patch_size) steps
    # "patch": non-overlapping patches -> Linear (streams exactly); "conv": a multi-scale
    # convolution (Inception-style kernels) at full resolution, then mean over each patch:
    # local shape detectors the recurrence alone learns slowly from little data (no streaming)
    stem: str = "patch"
    stem_kernels: tuple[int, ...] = (9, 19, 39)  # "conv" stem kernel sizes (odd)
    # "conv" stem layers at full resolution; layers after the first take a 1x1 bottleneck of
    # the previous layer and add it back (residual), as in InceptionTime's modules
    stem_depth: int = 1
    bidirectional: bool = False  # add a time-reversed WKV scan to every block (no streaming)
    # per-step features -> (B, C): "mean", "last", or "meanmax" (mean and max side by side,
    # (B, 2C): a brief event survives the max where a mean would dilute it)
    pooling: str = "mean"
    return_sequence: bool = False  # forward returns (B, T', C) per-step features, not pooled
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    compile_blocks: bool = False  # torch.compile every block (GPU; slow to start on CPU)
    # torch.compile mode for compile_blocks; "reduce-overhead" also replays each block as a
    # CUDA graph, which removes the per-kernel launch cost that dominates eager GPU steps
    compile_mode: str = "default"
    wkv_backend: str = "auto"  # models.wkv backend: "auto" | "torch" | "cuda" | "cpu" | ...
    check_input_finite: bool = True  # refuse NaN/Inf input (one device sync per forward)

    def __post_init__(self) -> None:
        for name in ("input_size", "hidden_size", "num_layers", "ffn_mult", "patch_size",
                     "stem_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RWKVConfig.{name} must be an integer >= 1; got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RWKVConfig.dropout must be in [0, 1); got {self.dropout!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"RWKVConfig.pooling must be one of {POOLINGS}; "
                             f"got {self.pooling!r}")
        if self.stem not in STEMS:
            raise ValueError(f"RWKVConfig.stem must be one of {STEMS}; got {self.stem!r}")
        self.stem_kernels = tuple(self.stem_kernels)  # YAML gives lists
        if not self.stem_kernels or not all(isinstance(k, int) and k >= 1 and k % 2 == 1
                                            for k in self.stem_kernels):
            raise ValueError(f"RWKVConfig.stem_kernels must be odd positive sizes; "
                             f"got {self.stem_kernels!r}")
        if self.stem == "patch" and self.stem_depth > 1:
            raise ValueError(f"RWKVConfig.stem_depth = {self.stem_depth} needs the 'conv' stem "
                             f"(the 'patch' stem is one layer)")
        if self.stem == "conv" and self.hidden_size < len(self.stem_kernels) + 1:
            raise ValueError(f"RWKVConfig.hidden_size = {self.hidden_size} is too narrow for a "
                             f"conv stem of {len(self.stem_kernels)} kernels")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"RWKVConfig.compile_mode must be one of {COMPILE_MODES}; "
                             f"got {self.compile_mode!r}")
        if self.wkv_backend not in BACKENDS:
            raise ValueError(f"RWKVConfig.wkv_backend must be one of {BACKENDS}; "
                             f"got {self.wkv_backend!r}")


class RWKVState(NamedTuple):
    """What the unidirectional encoder carries from one chunk of a signal to the next.

    Its size does not depend on the signal's length. A NamedTuple of tensors, so it moves
    through torch.compile, checkpointing and `torch.save` as plain data.
    """

    att_shift: Tensor  # (L, B, C) last normalised input of each time mix (token shift)
    ffn_shift: Tensor  # (L, B, C) last normalised input of each channel mix
    wkv: Tensor  # (L, B, 3, C) WKV state [a, b, p] of each layer, float32
    pool_sum: Tensor  # (B, C) sum of all output steps so far (mean pooling across chunks)
    steps: Tensor  # () number of output steps so far

    def detach(self) -> RWKVState:
        """The same state cut from the autograd graph (truncated backprop between chunks)."""
        return RWKVState(*(t.detach() for t in self))


def validate_signal(x: Tensor, channels: int, min_length: int = 1, why: str = "",
                    check_finite: bool = True) -> Tensor:
    """Check a batch of signals at a model's public boundary; return it as (B, T, channels).

    x: (B, T, channels), or (B, T) when channels == 1, floating point. Raises ValueError naming
    the problem and the expected shape. `min_length`/`why`: the shortest T the model can take
    and the reason (e.g. the STFT window).
    """
    expected = f"(B, T, {channels})" + (" or (B, T)" if channels == 1 else "")
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a torch.Tensor of shape {expected}; got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.dim() == 2 and channels == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 3:
        raise ValueError(f"expected a signal batch of shape {expected}; got {len(shape)} dims, "
                         f"shape {shape}")
    if x.shape[-1] != channels:
        raise ValueError(f"expected {channels} channel(s) in the last dim, shape {expected}; got "
                         f"shape {shape} (a (B, C, T) batch needs x.transpose(1, 2))")
    if x.shape[0] < 1:
        raise ValueError(f"expected at least one signal, shape {expected}; got {shape}")
    if x.shape[1] < min_length:
        reason = f" ({why})" if why else ""
        raise ValueError(f"signal too short: T = {x.shape[1]}, but at least {min_length} samples "
                         f"are needed{reason}; shape {expected}, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point signal; got dtype {x.dtype} "
                         f"(convert integer PCM with x.float() and scale it)")
    # not while compiling or recording a CUDA graph (a host sync breaks both; the readers
    # refuse non-finite samples and NonFiniteGuard watches the loss there)
    if (check_finite and not torch.compiler.is_compiling()
            and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
            and not bool(torch.isfinite(x).all())):
        raise ValueError(f"the signal contains NaN or Inf values (shape {shape})")
    return x


def token_shift(x: Tensor, last: Tensor | None) -> Tensor:
    """Each step's previous input: (B, T, C) -> (B, T, C), step 0 gets `last` (B, C) or zeros."""
    if last is None:
        return F.pad(x, (0, 0, 1, -1))  # RWKV-LM's ZeroPad2d((0, 0, 1, -1))
    return torch.cat((last.unsqueeze(1).to(x.dtype), x[:, :-1]), dim=1)


def shift_mix(x: Tensor, last: Tensor | None, ratios: Tensor) -> Tensor:
    """Token shift and every mix of one block in one pass: (B, T, C), ratios (n, C) ->
    (n, B, T, C) with out[i] = ratios[i] * x + (1 - ratios[i]) * token_shift(x, last).

    One launch instead of n (and no separate mixed copies): each out[i] is a contiguous
    (B, T, C) slab, so the projections read it without a copy; under torch.compile the shift,
    the mixes and the LayerNorm before them become one kernel. The ratios follow x's dtype
    (bf16 under autocast or in bf16-true models).
    """
    xx = token_shift(x, last)
    return torch.lerp(xx.unsqueeze(0), x.unsqueeze(0), ratios.to(x.dtype)[:, None, None, :])


def _activation(x: Tensor) -> Tensor:
    """x in the dtype the projections run in: autocast's (bf16) where autocast is on, so the
    mixes are written once in bf16 and the GEMMs read them without a cast kernel (the
    residual stream itself stays in its own dtype: fp32 under mixed precision)."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _fan_ratio(layer_id: int, num_layers: int) -> tuple[float, float]:
    """RWKV-LM v4's depth ratios: (0 at the bottom -> 1 at the top, 1 -> almost 0)."""
    return layer_id / max(num_layers - 1, 1), 1.0 - layer_id / num_layers


def _channel_position(channels: int) -> Tensor:
    return torch.arange(channels, dtype=torch.float32) / channels  # 0 .. (C-1)/C


def _decay_init(channels: int, layer_id: int, num_layers: int) -> Tensor:
    """RWKV-LM v4: decay from -5 (w ~ -0.007, remembers ~150 steps) to 3 (w ~ -20, forgets at
    once) across channels, bending towards slow decay in deeper layers: every layer gets a
    spread of memory lengths."""
    ratio_0_to_1, _ = _fan_ratio(layer_id, num_layers)
    h = torch.arange(channels, dtype=torch.float32) / max(channels - 1, 1)
    return -5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1)


def _first_init(channels: int) -> Tensor:
    """RWKV-LM v4: the current step's bonus u = log(0.3) with a zigzag of +-0.5 across channels."""
    zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(channels)], dtype=torch.float32) * 0.5
    return math.log(0.3) + zigzag


class PatchEmbedding(nn.Module):
    """Strided-conv stem: non-overlapping patches of `patch_size` samples -> C features.

    (B, T, input_size) -> (B, ceil(T / patch_size), C); the end is zero-padded to whole patches.
    Written as reshape + Linear, which is exactly Conv1d(kernel_size=stride=patch_size) but one
    GEMM with no transposes. Non-overlapping patches need no context across a chunk boundary, so
    streaming stays exact when every chunk but the last is a multiple of patch_size.
    """

    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Linear(config.patch_size * config.input_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        bsz, steps, channels = x.shape
        pad = -steps % self.patch_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return self.proj(x.reshape(bsz, (steps + pad) // self.patch_size, -1))


class ConvStem(nn.Module):
    """Multi-scale convolution stem: (B, T, input_size) -> (B, ceil(T / patch_size), C).

    `stem_depth` Inception-style layers at full resolution. The first: convolutions of
    `stem_kernels` sizes (9, 19, 39 samples) plus a max-pool -> 1x1 path, concatenated to C
    channels, BatchNorm, ReLU. Each further layer does the same on a 1x1 bottleneck of the
    previous one's C channels and adds its input back before the ReLU. Then the mean over each
    patch of `patch_size` samples. With `lengths`, samples past a signal's end are zeroed
    before every convolution and patches are averaged over real samples only, so a padded
    signal gives exactly what it gives alone.
    """

    def __init__(self, config: RWKVConfig):
        super().__init__()
        C, c_in = config.hidden_size, config.input_size
        kernels = config.stem_kernels
        width = C // (len(kernels) + 1)
        self.patch_size = config.patch_size
        self.convs = nn.ModuleList(nn.Conv1d(c_in, width, k, padding=k // 2, bias=False)
                                   for k in kernels)
        self.pool_conv = nn.Conv1d(c_in, C - width * len(kernels), 1, bias=False)
        self.norm = nn.BatchNorm1d(C)
        self.layers = nn.ModuleList(_InceptionLayer(C, kernels, width)
                                    for _ in range(config.stem_depth - 1))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, T, input_size); mask: (B, T) 1 for real samples, 0 for padding, or None."""
        h = _masked(x.transpose(1, 2), mask)  # (B, input_size, T)
        h = F.relu(self.norm(_inception(self.convs, self.pool_conv, h, h, mask)))
        for layer in self.layers:
            h = layer(_masked(h, mask), mask)
        h = _patch_mean(h, mask, self.patch_size) if self.patch_size > 1 else _masked(h, mask)
        return h.transpose(1, 2)


class _InceptionLayer(nn.Module):
    """(B, C, T) -> (B, C, T): a 1x1 bottleneck to `width` channels, convolutions of each
    kernel size on it beside a max-pool -> 1x1 path on the input, BatchNorm, the input added
    back, ReLU. The input's padding must already be zero."""

    def __init__(self, C: int, kernels: tuple[int, ...], width: int):
        super().__init__()
        self.bottleneck = nn.Conv1d(C, width, 1, bias=False)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, k, padding=k // 2, bias=False)
                                   for k in kernels)
        self.pool_conv = nn.Conv1d(C, C - width * len(kernels), 1, bias=False)
        self.norm = nn.BatchNorm1d(C)

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        z = self.bottleneck(h)  # a 1x1 convolution keeps zero padding zero
        return F.relu(self.norm(_inception(self.convs, self.pool_conv, z, h, mask)) + h)


def _inception(convs: nn.ModuleList, pool_conv: nn.Module, z: Tensor, h: Tensor,
               mask: Tensor | None) -> Tensor:
    """The convolutions of z beside the max-pool -> 1x1 path of h, concatenated on channels."""
    return torch.cat([*(conv(z) for conv in convs), pool_conv(_max3(h, mask))], 1)


def _masked(h: Tensor, mask: Tensor | None) -> Tensor:
    """(B, C, T) with the padding steps (mask 0) set to zero; h itself when mask is None."""
    return h if mask is None else h * mask.unsqueeze(1).to(h.dtype)


def _max3(h: Tensor, mask: Tensor | None) -> Tensor:
    """Max over each sample and its two neighbours, (B, C, T) -> (B, C, T), where a missing
    neighbour (past either end, or padding) does not count: max_pool1d(3, 1, padding=1)
    computed so a padded signal gives what it gives alone."""
    padded = F.pad(h, (1, 1), mode="replicate")
    left, right = padded[..., :-2], padded[..., 2:]
    if mask is not None:  # padding is at the end: only a right neighbour can be padding
        real_right = F.pad(mask, (0, 1))[:, 1:].unsqueeze(1) > 0
        right = torch.where(real_right, right, h)
    return torch.maximum(h, torch.maximum(left, right))


def _patch_mean(h: Tensor, mask: Tensor | None, patch: int) -> Tensor:
    """(B, C, T) -> (B, C, ceil(T / patch)): mean over the real samples of each patch."""
    if mask is None:
        mask = torch.ones(h.shape[0], h.shape[2], device=h.device, dtype=h.dtype)
    m = mask.unsqueeze(1).to(h.dtype)
    # zero padding to whole patches, not ceil_mode: torch.compile (torch 2.11) gets the
    # backward of avg_pool1d(ceil_mode=True) wrong where the last patch is partial
    pad = -h.shape[-1] % patch
    total = F.avg_pool1d(F.pad(h * m, (0, pad)), patch, patch)
    count = F.avg_pool1d(F.pad(m, (0, pad)), patch, patch)
    return total / count.clamp_min(1e-6)


def step_mask(lengths: Tensor, steps: int, patch_size: int = 1) -> Tensor:
    """(B,) signal lengths in samples -> (B, steps) float mask of the steps that hold at least
    one real sample (ceil(length / patch_size) of them)."""
    real = (lengths + patch_size - 1) // patch_size
    return (torch.arange(steps, device=lengths.device) < real.unsqueeze(1)).float()


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of (B, T', C) within its own length (padding stays at the end),
    so a time-reversed scan starts at a signal's last real step, not in its padding."""
    if lengths is None:
        return x.flip(1)
    steps = torch.arange(x.shape[1], device=x.device)
    index = torch.where(steps < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - steps, steps)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


def masked_pool(h: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """(B, T', C) -> (B, C) or (B, 2C) for "meanmax"; padding steps (mask 0) are left out."""
    if mask is None:
        if pooling == "last":
            return h[:, -1]
        mean = h.mean(1)
        return mean if pooling == "mean" else torch.cat((mean, h.amax(1)), -1)
    m = mask.unsqueeze(-1).to(h.dtype)
    count = m.sum(1).clamp_min(1)
    if pooling == "last":
        last = (count.squeeze(-1).long() - 1).clamp_min(0)
        return h[torch.arange(h.shape[0], device=h.device), last]
    mean = (h * m).sum(1) / count
    if pooling == "mean":
        return mean
    peak = h.masked_fill(m == 0, torch.finfo(h.dtype).min).amax(1)
    return torch.cat((mean, peak), -1)


class TimeMix(nn.Module):
    """RWKV-4 time mixing: token shift, k/v/r projections, WKV, receptance gate, output.

    Fused: the shift and the three mixes are one pass (`shift_mix`), k/v/r one batched GEMM,
    and sigmoid(r) * wkv happens in the WKV operator's epilogue; the same function as the
    per-op code of `SequentialRWKV` (tests compare outputs and gradients in float64).

    With `bidirectional`, a second WKV with its own decay/first runs over the reversed sequence
    and the two are averaged (both are weighted averages of v, so the mean keeps the scale).
    """

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.bidirectional = config.bidirectional
        self.backend = config.wkv_backend
        ratio_0_to_1, ratio_1_to_0 = _fan_ratio(layer_id, config.num_layers)
        position = _channel_position(C)
        self.time_decay = nn.Parameter(_decay_init(C, layer_id, config.num_layers))
        self.time_first = nn.Parameter(_first_init(C))
        if config.bidirectional:
            self.time_decay_reverse = nn.Parameter(_decay_init(C, layer_id, config.num_layers))
            self.time_first_reverse = nn.Parameter(_first_init(C))
        # how much of the current (vs previous) step each channel sees; lower layers lean on
        # the previous step more, as in RWKV-LM v4
        self.time_mix_k = nn.Parameter(position ** ratio_1_to_0)
        self.time_mix_v = nn.Parameter(position ** ratio_1_to_0 + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(position ** (0.5 * ratio_1_to_0))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        # RWKV-LM v4 init: k = 0 (WKV starts as a plain decayed average), r = 0 (gate 0.5),
        # output = 0 (each block starts as the identity, so deep stacks train stably)
        nn.init.zeros_(self.key.weight)
        nn.init.zeros_(self.receptance.weight)
        nn.init.zeros_(self.output.weight)
        nn.init.orthogonal_(self.value.weight)

    def forward(self, x: Tensor, last: Tensor | None = None, state: Tensor | None = None,
                lengths: Tensor | None = None):
        """x: (B, T', C) normalised input; last: (B, C) previous chunk's last x or None;
        state: (B, 3, C) WKV state or None; lengths: (B,) real steps per sequence (the reverse
        scan starts at each one's last real step) or None. Returns (out (B, T', C), x[:, -1],
        WKV state)."""
        last_x = x[:, -1]
        x = _activation(x)
        bsz, steps, C = x.shape
        mixed = shift_mix(x, last, torch.stack((self.time_mix_k, self.time_mix_v,
                                                self.time_mix_r)))
        weight = torch.stack((self.key.weight, self.value.weight, self.receptance.weight))
        # k, v and r in one batched GEMM; each comes out as its own contiguous (B, T, C)
        k, v, r = torch.bmm(mixed.view(3, bsz * steps, C), weight.transpose(1, 2)).view(
            3, bsz, steps, C).unbind(0)
        # sigmoid(r) * wkv in the operator's epilogue (forward and backward): neither the
        # gate nor the ungated wkv is written out or saved. The model checks its input once
        # at its boundary: no per-layer device sync here.
        y, state = wkv(self.time_decay, self.time_first, k, v, state,
                       backend=self.backend, check_finite=False, r=r)
        if self.bidirectional:
            # r * (y + y_rev) / 2: the reversed scan gates with r in its own (reversed) order
            y_rev, _ = wkv(self.time_decay_reverse, self.time_first_reverse,
                           reverse_padded(k, lengths), reverse_padded(v, lengths),
                           backend=self.backend, check_finite=False,
                           r=reverse_padded(r, lengths))
            y = 0.5 * (y + reverse_padded(y_rev, lengths))
        return self.output(y), last_x, state


class ChannelMix(nn.Module):
    """RWKV-4 channel mixing: token shift, squared-ReLU MLP, receptance gate."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C = config.hidden_size
        _, ratio_1_to_0 = _fan_ratio(layer_id, config.num_layers)
        position = _channel_position(C)
        self.time_mix_k = nn.Parameter(position ** ratio_1_to_0)
        self.time_mix_r = nn.Parameter(position ** ratio_1_to_0)
        self.key = nn.Linear(C, config.ffn_mult * C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.ffn_mult * C, C, bias=False)
        # RWKV-LM v4 init: orthogonal key scaled by sqrt(fan_out / fan_in), zero r and value
        nn.init.orthogonal_(self.key.weight, gain=math.sqrt(config.ffn_mult))
        nn.init.zeros_(self.receptance.weight)
        nn.init.zeros_(self.value.weight)

    def forward(self, x: Tensor, last: Tensor | None = None):
        """x: (B, T', C) normalised input; last: (B, C) or None. Returns (out, x[:, -1])."""
        last_x = x[:, -1]
        xk, xr = shift_mix(_activation(x), last,
                           torch.stack((self.time_mix_k, self.time_mix_r))).unbind(0)
        k = torch.square(torch.relu(self.key(xk)))
        r = torch.sigmoid(self.receptance(xr))
        return r * self.value(k), last_x


class Block(nn.Module):
    """Pre-norm residual block: x + TimeMix(LN(x)), then + ChannelMix(LN(x))."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size)
        self.att = TimeMix(config, layer_id)
        self.ln2 = nn.LayerNorm(config.hidden_size)
        self.ffn = ChannelMix(config, layer_id)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None,
                lengths: Tensor | None = None):
        """x: (B, T', C); state: (att_shift (B, C), ffn_shift (B, C), wkv (B, 3, C)) or None;
        lengths: (B,) real steps (bidirectional blocks need them for padded batches) or None.
        Returns (x (B, T', C), the block's new state, same layout)."""
        att_last, ffn_last, wkv_state = (None, None, None) if state is None else state
        att, att_last, wkv_state = self.att(self.ln1(x), att_last, wkv_state, lengths)
        x = x + self.drop(att)
        ffn, ffn_last = self.ffn(self.ln2(x), ffn_last)
        x = x + self.drop(ffn)
        return x, (att_last, ffn_last, wkv_state)


class RWKVEncoder(nn.Module):
    """RWKV-4 encoder: stem -> LayerNorm -> L blocks -> LayerNorm -> pooling.

    forward(x) with x (B, T, input_size) (or (B, T) for one channel) returns pooled features
    (B, C) ((B, 2C) with "meanmax" pooling), or (B, T', C) per-step features with
    `return_sequence`. forward(x, lengths=n) takes a zero-padded batch of signals of n (B,)
    samples: each gives what it gives alone (padding never reaches a real step or the pooling).
    forward(x, state) (unidirectional, "patch" stem only) streams: it continues from `state` (see
    `init_state`) and returns (out, new_state); a signal fed chunk by chunk gives the same
    per-step outputs as one pass, and with mean pooling the pooled output after the last chunk
    is the mean over the whole signal.
    """

    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.config = config
        self.stem = PatchEmbedding(config) if config.stem == "patch" else ConvStem(config)
        self.ln_in = nn.LayerNorm(config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size)
        self.gradient_checkpointing = config.gradient_checkpointing
        if config.compile_blocks:
            for block in self.blocks:
                # in place: parameter names and state_dict stay the same
                block.compile(mode=None if config.compile_mode == "default"
                              else config.compile_mode)

    @property
    def out_features(self) -> int:
        return self.config.hidden_size * (2 if self.config.pooling == "meanmax" else 1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RWKVState:
        """An empty streaming state for `batch_size` signals (on the parameters' device)."""
        if self.config.bidirectional:
            raise ValueError("streaming needs a unidirectional encoder; this one is bidirectional")
        param = self.ln_in.weight
        device = param.device if device is None else device
        L, C = self.config.num_layers, self.config.hidden_size
        # the WKV state is fp32 whatever the model's dtype: bf16 loses the tail of long decays
        wkv_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        shift = torch.zeros(L, batch_size, C, device=device, dtype=param.dtype)
        return RWKVState(
            att_shift=shift,
            ffn_shift=shift.clone(),
            wkv=empty_state(batch_size, C, device, wkv_dtype).expand(L, -1, -1, -1).clone(),
            pool_sum=torch.zeros(batch_size, C, device=device, dtype=wkv_dtype),
            steps=torch.zeros((), device=device, dtype=torch.long),
        )

    def forward(self, x: Tensor, state: RWKVState | None = None,
                lengths: Tensor | None = None):
        """x: (B, T, input_size), or (B, T) for one channel; lengths: (B,) int samples of each
        zero-padded signal, or None (all T).
        Without state: (B, C) pooled features, or (B, T', C) with return_sequence.
        With state (from `init_state` or the previous call): (out, new_state), out as above
        for this chunk, except mean pooling covers every chunk so far."""
        cfg = self.config
        x = validate_signal(x, cfg.input_size, check_finite=cfg.check_input_finite)
        if cfg.wkv_backend in ("auto", "cuda", "cpu") and not torch.compiler.is_compiling():
            # build or load the kernel at the first eager call, outside any torch.compile trace
            # (a trace can only use a kernel that is already loaded); a lookup afterwards
            prepare_backend(x.device)
        if state is not None:
            self._check_state(state, x.shape[0])
            if lengths is not None:
                raise ValueError("streaming takes whole chunks: pass lengths=None with a state")
        mask = None if lengths is None else step_mask(lengths, x.shape[1])
        if (cfg.compile_blocks and cfg.compile_mode == "reduce-overhead"
                and not torch.compiler.is_compiling()):
            # a new iteration of the blocks' CUDA graphs: what the previous call's graphs
            # returned is dead now and their memory may be reused (without this, a forward
            # after a training step or in inference mode reads overwritten outputs)
            torch.compiler.cudagraph_mark_step_begin()
        h = self.stem(x) if cfg.stem == "patch" else self.stem(x, mask)
        h = self.ln_in(h)
        steps = None if lengths is None else (lengths + cfg.patch_size - 1) // cfg.patch_size
        new_layers = []
        for i, block in enumerate(self.blocks):
            layer = None if state is None else (state.att_shift[i], state.ffn_shift[i],
                                                state.wkv[i])
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, layer = checkpoint(block, h, layer, steps, use_reentrant=False)
            else:
                h, layer = block(h, layer, steps)
            new_layers.append(layer)
        h = self.ln_out(h)
        if state is None:
            if cfg.return_sequence:
                return h
            return masked_pool(h, None if steps is None else step_mask(steps, h.shape[1]),
                               cfg.pooling)
        pool_sum = state.pool_sum + h.sum(1).to(state.pool_sum.dtype)
        steps = state.steps + h.shape[1]
        if cfg.return_sequence:
            out = h
        elif cfg.pooling == "mean":
            out = (pool_sum / steps).to(h.dtype)
        elif cfg.pooling == "last":
            out = h[:, -1]
        else:
            raise ValueError("streaming pools with 'mean' or 'last', not 'meanmax'")
        att_shift, ffn_shift, wkv_state = (torch.stack(s) for s in zip(*new_layers, strict=True))
        return out, RWKVState(att_shift, ffn_shift, wkv_state, pool_sum, steps)

    def _check_state(self, state: RWKVState, batch_size: int) -> None:
        if self.config.bidirectional:
            raise ValueError("streaming needs a unidirectional encoder; this one is bidirectional")
        if self.config.stem != "patch":
            raise ValueError("streaming needs the 'patch' stem; the 'conv' stem looks across "
                             "chunk boundaries")
        if not isinstance(state, RWKVState):
            raise ValueError(f"state must be an RWKVState from init_state(); "
                             f"got {type(state).__name__}")
        L, C = self.config.num_layers, self.config.hidden_size
        if state.wkv.shape != (L, batch_size, 3, C):
            raise ValueError(f"state does not fit this input: expected wkv of shape (L, B, 3, C) "
                             f"= {(L, batch_size, 3, C)}; got {tuple(state.wkv.shape)}")


class SequentialRWKV(RWKVEncoder):
    """The 'original' RWKV-4: the same parameters as `RWKVEncoder` (load its state_dict) computed
    the plain way: explicit token shift and mixing, per-op code, and the sequential reference
    WKV (a Python loop over time steps). No streaming, checkpointing or compilation; slow by
    design. The test oracle for the encoder and the benchmark's baseline."""

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        x = validate_signal(x, cfg.input_size, check_finite=cfg.check_input_finite)
        h = self.ln_in(self.stem(x))
        for block in self.blocks:
            h = h + block.drop(self._time_mix(block.att, block.ln1(h)))
            h = h + block.drop(self._channel_mix(block.ffn, block.ln2(h)))
        h = self.ln_out(h)
        return h if cfg.return_sequence else masked_pool(h, None, cfg.pooling)

    @staticmethod
    def _shifted(x: Tensor) -> Tensor:
        previous = torch.zeros_like(x)
        previous[:, 1:] = x[:, :-1]
        return previous

    @staticmethod
    def _project(x: Tensor, xx: Tensor, ratio: Tensor, linear: nn.Linear) -> Tensor:
        return (x * ratio + xx * (1 - ratio)) @ linear.weight.t()

    def _time_mix(self, att: TimeMix, x: Tensor) -> Tensor:
        xx = self._shifted(x)
        k = self._project(x, xx, att.time_mix_k, att.key)
        v = self._project(x, xx, att.time_mix_v, att.value)
        r = torch.sigmoid(self._project(x, xx, att.time_mix_r, att.receptance))
        y, _ = wkv(att.time_decay, att.time_first, k, v, backend="reference", check_finite=False)
        if self.config.bidirectional:
            backwards = torch.arange(x.shape[1] - 1, -1, -1, device=x.device)
            y_rev, _ = wkv(att.time_decay_reverse, att.time_first_reverse, k[:, backwards],
                           v[:, backwards], backend="reference", check_finite=False)
            y = (y + y_rev[:, backwards]) / 2
        return (r * y) @ att.output.weight.t()

    def _channel_mix(self, ffn: ChannelMix, x: Tensor) -> Tensor:
        xx = self._shifted(x)
        k = self._project(x, xx, ffn.time_mix_k, ffn.key)
        r = torch.sigmoid(self._project(x, xx, ffn.time_mix_r, ffn.receptance))
        return r * ((torch.relu(k) ** 2) @ ffn.value.weight.t())


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups the RWKV way: weight decay only on matrices and conv kernels;
    none on decay/first/time-mix ratios, norms and biases (decaying them toward 0 changes what
    they mean: a decay of 0 is w = -1, a mix of 0 ignores the current step). Every trainable
    parameter lands in exactly one group."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_time = name.rsplit(".", 1)[-1].startswith("time_")
        (decay if param.dim() >= 2 and not is_time else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def config_from_dict(cls: type, values: dict[str, Any], what: str):
    """cls(**values) for a config dataclass, with unknown keys (typos in a call or a YAML file)
    named in a ValueError: "unknown {what}(s) [...]; known: [...]"."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def _config(input_size: int, hidden_size: int, num_layers: int, dropout: float,
            options: dict) -> RWKVConfig:
    return config_from_dict(RWKVConfig, dict(input_size=input_size, hidden_size=hidden_size,
                                             num_layers=num_layers, dropout=dropout, **options),
                            "RWKV option")


def create_optimized_rwkv(input_size: int = 1, hidden_size: int = 256, num_layers: int = 6,
                          dropout: float = 0.0, compile_kernels: bool = True,
                          **options) -> RWKVEncoder:
    """The fast RWKV-4 encoder: (B, T, input_size) -> (B, hidden_size) features.

    compile_kernels: True uses WKV backend "auto" (the CUDA kernel where it builds and the input
        is on a GPU, the C++ kernel on CPU where it builds, else vectorised PyTorch); False
        forces the "torch" backend. An explicit
        `wkv_backend` option wins over it.
    options: any other `RWKVConfig` field, e.g. patch_size=8, bidirectional=True,
        return_sequence=True, gradient_checkpointing=True, compile_blocks=True, pooling="last".
    """
    options.setdefault("wkv_backend", "auto" if compile_kernels else "torch")
    return RWKVEncoder(_config(input_size, hidden_size, num_layers, dropout, options))


def create_original_rwkv(input_size: int = 1, hidden_size: int = 256, num_layers: int = 6,
                         dropout: float = 0.0, compile_kernels: bool = False,
                         **options) -> SequentialRWKV:
    """The 'original' sequential RWKV-4 with the same architecture and parameter names as
    `create_optimized_rwkv(...)` given the same arguments, so one state_dict loads into both.
    compile_kernels, gradient_checkpointing and compile_blocks are accepted (for symmetric
    calls) and ignored: the original is always plain and uses the reference WKV."""
    del compile_kernels
    options.update(wkv_backend="reference", gradient_checkpointing=False, compile_blocks=False)
    return SequentialRWKV(_config(input_size, hidden_size, num_layers, dropout, options))


__all__ = [
    "Block",
    "ChannelMix",
    "PatchEmbedding",
    "RWKVConfig",
    "RWKVEncoder",
    "RWKVState",
    "SequentialRWKV",
    "TimeMix",
    "config_from_dict",
    "create_optimized_rwkv",
    "create_original_rwkv",
    "optimizer_groups",
    "shift_mix",
    "token_shift",
    "validate_signal",
]
