"""Streaming inference: a long record fed chunk by chunk, classified at any point.

```python
stream = StreamingClassifier(model)          # a DualBranchClassifier, module or checkpoint
for chunk in record.split(4096, dim=1):      # (B, t) pieces of B records, any sizes
    stream.feed(chunk)
probabilities = stream.result()              # (B, num_classes), as model(record).softmax(-1)
stream.reset()                               # the next record
```

The time branch carries its recurrent state across chunks (per layer: the WKV state (a, b, p)
and the two token-shift inputs, `RWKVEncoder.init_state`), so its memory does not grow with the
record; a chunk that is not a multiple of patch_size leaves its remainder waiting for the next
chunk (or for `result()`, which zero-pads it to a whole patch as one pass pads the record's end).
Pooling is carried as a running sum, max and last step. `result()` may be called at any point:
it classifies the record fed so far and changes nothing.

What is exact (equal to one pass of the model over the whole record, to float32 rounding:
tests measure ~1e-6 on the features and the probabilities):
- a model without instance_norm: the time branch streams as chunks arrive;
- an instance_norm model (the default) given `stats=(mean, std)` of each record (what
  `signal_statistics` computes): the time branch streams as chunks arrive. The record's own
  statistics are not known before its end; other statistics (e.g. of a prefix) give another,
  inexact, result;
- an instance_norm model without stats: the record is kept and its time branch runs at
  `result()`, still chunk by chunk through the recurrent state (the time branch's activation
  memory stays one chunk's), but not as the chunks arrive.
The frequency branch always needs the whole record (its dB floor is the record's peak, and its
pooling spans all frames): the samples are kept (4 bytes each) and it runs at `result()`.

Not streamable (ValueError at construction): bidirectional time branches (a reverse scan starts
at the record's end) and the "conv" stem (its kernels look across chunk edges). Padded batches
(lengths) are not taken: every record of a batch gets the same chunks.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import Tensor

from models.dual_branch import DualBranchClassifier, signal_statistics
from models.export import load_classifier
from models.rwkv import RWKVState, validate_signal

MAX_CHUNK = 65536  # samples the time branch takes per call (bounds its activation memory)


@dataclasses.dataclass
class _Pool:
    """Running pooling of the time branch's per-step outputs (B, t', C)."""

    total: Tensor  # (B, C) float64 sum
    peak: Tensor  # (B, C) max
    last: Tensor  # (B, C) last step
    steps: int

    def add(self, h: Tensor) -> _Pool:
        return _Pool(self.total + h.sum(1, dtype=torch.float64),
                     torch.maximum(self.peak, h.amax(1)), h[:, -1], self.steps + h.shape[1])

    def features(self, pooling: str) -> Tensor:
        mean = (self.total / self.steps).to(self.last.dtype)
        if pooling == "mean":
            return mean
        if pooling == "last":
            return self.last
        return torch.cat((mean, self.peak), -1)  # "meanmax"


class StreamingClassifier:
    """Classifies B records (B >= 1, fed together) fed chunk by chunk; see the module docstring
    for what is exact.

    model: a `DualBranchClassifier`, a `SignalClassifierModule` or a train.py checkpoint path;
        it is put in eval mode (streaming is inference).
    stats: for instance_norm models, each record's (mean, std) as floats or (B,) tensors, so
        the time branch can run as chunks arrive; None keeps the record and runs it at result().
    max_chunk: the most samples the time branch takes in one call (larger chunks are split).
    """

    def __init__(self, model: Any, stats: tuple[Any, Any] | None = None,
                 max_chunk: int = MAX_CHUNK):
        self.model: DualBranchClassifier = load_classifier(model).eval()
        cfg = self.model.config
        encoder = self.model.time_branch
        self.patch_size = 1
        if encoder is not None:
            if encoder.config.bidirectional:
                raise ValueError("streaming needs bidirectional=False: a time-reversed scan "
                                 "starts at the record's end")
            if encoder.config.stem != "patch":
                raise ValueError("streaming needs stem='patch': the 'conv' stem's kernels look "
                                 "across chunk edges")
            self.patch_size = encoder.config.patch_size
            # the same encoder (shared parameters), returning per-step features for our pooling
            self._encoder = copy.copy(encoder)
            self._encoder.config = dataclasses.replace(encoder.config, return_sequence=True)
        if stats is not None and not cfg.instance_norm:
            raise ValueError("stats are for instance_norm models; this one has none")
        self.stats = stats
        self.max_chunk = max(self.patch_size, max_chunk // self.patch_size * self.patch_size)
        needs_stats = cfg.instance_norm and stats is None
        self._streams_time = encoder is not None and not needs_stats
        self._keeps_record = self.model.freq_branch is not None or needs_stats
        self.reset()

    def reset(self) -> None:
        """Forget everything fed: the next feed starts a new record."""
        self._batch: int | None = None
        self._samples = 0
        self._chunks: list[Tensor] = []  # the record, when the frequency branch or stats need it
        self._pending: Tensor | None = None  # samples short of a whole patch
        self._state: RWKVState | None = None
        self._pool: _Pool | None = None
        self._mean = self._std = None  # (B, 1) given statistics

    @property
    def samples(self) -> int:
        """Samples of each record fed so far."""
        return self._samples

    @torch.no_grad()
    def feed(self, chunk: Tensor) -> None:
        """chunk: (B, t) or (B, t, input_size) float, the next t >= 1 samples of each record
        (the same B on every call until reset)."""
        channels = self.model.config.time.input_size
        x = validate_signal(chunk, channels).to(self._device)  # (B, t, channels)
        if self._batch is None:
            self._start(x.shape[0])
        elif x.shape[0] != self._batch:
            raise ValueError(f"this stream has {self._batch} records; got a chunk of "
                             f"{x.shape[0]} (call reset() for a new batch)")
        self._samples += x.shape[1]
        if self._keeps_record:
            self._chunks.append(x)
        if not self._streams_time:
            return
        if self._pending is not None:
            x = torch.cat((self._pending, x), 1)
        whole = x.shape[1] // self.patch_size * self.patch_size
        self._pending = x[:, whole:] if whole < x.shape[1] else None
        for piece in x[:, :whole].split(self.max_chunk, dim=1) if whole else ():
            h, self._state = self._encoder(self._time_input(piece, self._mean, self._std),
                                           self._state)
            self._pool = self._pool.add(h)

    @torch.no_grad()
    def logits(self) -> Tensor:
        """(B, num_classes) logits of the records fed so far (the stream is unchanged)."""
        if not self._samples:
            raise ValueError("nothing fed yet: call feed(chunk) first")
        mean, std = self._statistics()
        features = []
        if self.model.time_branch is not None:
            features.append(self.time_features())
        if self.model.freq_branch is not None:
            signal = self._record().squeeze(-1)
            freq_input = (signal if mean is None
                          else self.model.branch_inputs(signal, mean, std)[1])
            features.append(self.model.freq_branch(freq_input))
        return self.model.head_logits(features, mean, std)

    def result(self) -> Tensor:
        """(B, num_classes) class probabilities of the records fed so far."""
        return torch.softmax(self.logits().float(), dim=-1)

    @torch.no_grad()
    def time_features(self) -> Tensor:
        """The time branch's pooled features (B, out_features) of the records fed so far, as
        `model.time_branch(time_input)` gives them in one pass."""
        if self.model.time_branch is None:
            raise ValueError("this model has no time branch")
        if not self._samples:
            raise ValueError("nothing fed yet: call feed(chunk) first")
        mean, std = self._statistics()
        if self._streams_time:
            pool, state, rest = self._pool, self._state, self._pending
        else:  # instance_norm without stats: the whole record now, chunk by chunk
            pool, state = self._empty_pool(), self._encoder.init_state(self._batch,
                                                                       self._device)
            rest = self._record()
        if rest is not None:
            for piece in rest.split(self.max_chunk, dim=1):
                # the encoder zero-pads the last piece to a whole patch, as one pass does
                h, state = self._encoder(self._time_input(piece, mean, std), state)
                pool = pool.add(h)
        return pool.features(self.model.time_branch.config.pooling)

    # ------------------------------------------------------------------ internals

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _start(self, batch: int) -> None:
        self._batch = batch
        if self.stats is not None:
            self._mean, self._std = (
                torch.as_tensor(s, dtype=torch.float32, device=self._device).reshape(-1, 1)
                .expand(batch, 1) for s in self.stats)
        if self._streams_time:
            self._state = self._encoder.init_state(batch, self._device)
            self._pool = self._empty_pool()

    def _empty_pool(self) -> _Pool:
        C = self.model.time_branch.config.hidden_size
        dtype = self.model.time_branch.ln_out.weight.dtype
        full = torch.full((self._batch, C), torch.finfo(dtype).min, device=self._device,
                          dtype=dtype)
        return _Pool(torch.zeros(self._batch, C, device=self._device, dtype=torch.float64),
                     full, torch.zeros_like(full), 0)

    def _record(self) -> Tensor:
        return torch.cat(self._chunks, 1) if len(self._chunks) > 1 else self._chunks[0]

    def _statistics(self) -> tuple[Tensor | None, Tensor | None]:
        if not self.model.config.instance_norm:
            return None, None
        if self._mean is not None:
            return self._mean, self._std
        return signal_statistics(self._record().squeeze(-1).float(), None)

    def _time_input(self, x: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
        """Raw samples (B, t, channels) -> what the time branch takes for them, given the
        records' (B, 1) statistics (None without instance_norm)."""
        if mean is None:
            return x
        return self.model.branch_inputs(x.squeeze(-1).float(), mean, std)[0]


__all__ = ["StreamingClassifier"]
