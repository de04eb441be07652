"""models/streaming.py: a record fed in chunks gives what one pass gives."""

from __future__ import annotations

import pytest
import torch

from models.dual_branch import DualBranchClassifier, DualBranchConfig, signal_statistics
from models.streaming import StreamingClassifier

FREQ = dict(n_fft=64, hop_length=16, n_mels=16, channels=(8, 16), sample_rate=1000,
            freq_mask_param=4, time_mask_param=4)
LENGTH = 403  # not a multiple of the patch size: one pass pads the last patch
CHUNKS = (LENGTH, 7, 64, 150)  # one chunk, and sizes off and on the patch grid


def tiny_classifier(time: dict | None = None, seed: int = 0, **options) -> DualBranchClassifier:
    """A tiny classifier with every parameter perturbed: RWKV-4's init zeroes the key and
    output projections (each block starts as the identity), which would hide the recurrence."""
    torch.manual_seed(seed)
    time = {**dict(hidden_size=16, num_layers=2, patch_size=4, wkv_backend="torch"),
            **(time or {})}
    model = DualBranchClassifier(DualBranchConfig(num_classes=3, time=time, freq=FREQ,
                                                  **options))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def streamed(stream: StreamingClassifier, x: torch.Tensor, size: int) -> StreamingClassifier:
    stream.reset()
    for chunk in x.split(size, dim=1):
        stream.feed(chunk)
    return stream


def one_pass_time_features(model: DualBranchClassifier, x: torch.Tensor) -> torch.Tensor:
    signal = x.float()
    if model.config.instance_norm:
        mean, std = signal_statistics(signal, None)
        signal = model.branch_inputs(signal, mean, std)[0]
    return model.time_branch(signal)


@pytest.mark.parametrize("time,options,with_stats", [
    (dict(), dict(), False),  # the defaults: both branches, instance norm, record kept
    (dict(), dict(), True),  # ... given the record's statistics: the time branch streams
    (dict(pooling="meanmax"), dict(instance_norm=False, keep_amplitude=False), False),
    (dict(pooling="last", patch_size=1), dict(branches="time", fusion="gated"), True),
])
def test_chunks_give_the_one_pass_result(time: dict, options: dict, with_stats: bool) -> None:
    model = tiny_classifier(time, **options)
    x = torch.randn(2, LENGTH) * 3 + 1
    with torch.no_grad():
        want = torch.softmax(model(x), -1)
        want_time = one_pass_time_features(model, x)
    stats = None
    if with_stats:
        mean, std = signal_statistics(x, None)
        stats = (mean.squeeze(1), std.squeeze(1))
    stream = StreamingClassifier(model, stats=stats)
    for size in CHUNKS:
        streamed(stream, x, size)
        assert stream.samples == LENGTH
        torch.testing.assert_close(stream.time_features(), want_time, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stream.result(), want, atol=1e-5, rtol=0)


def test_result_midway_is_the_prefix_and_changes_nothing() -> None:
    model = tiny_classifier(instance_norm=False, keep_amplitude=False)
    x = torch.randn(1, LENGTH)
    stream = StreamingClassifier(model)
    stream.feed(x[:, :101])  # 25 whole patches and one sample waiting
    with torch.no_grad():
        torch.testing.assert_close(stream.result(), torch.softmax(model(x[:, :101]), -1),
                                   atol=1e-5, rtol=0)
    stream.feed(x[:, 101:])
    with torch.no_grad():
        torch.testing.assert_close(stream.result(), torch.softmax(model(x), -1),
                                   atol=1e-5, rtol=0)


def test_single_samples_give_the_one_pass_result() -> None:
    model = tiny_classifier(instance_norm=False, keep_amplitude=False)
    x = torch.randn(2, 61)
    stream = streamed(StreamingClassifier(model), x, 1)
    with torch.no_grad():
        torch.testing.assert_close(stream.time_features(), model.time_branch(x),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stream.result(), torch.softmax(model(x), -1),
                                   atol=1e-5, rtol=0)


def test_large_chunks_are_split_and_reset_starts_over() -> None:
    model = tiny_classifier(time=dict(num_layers=1))
    x = torch.randn(3, LENGTH)
    stream = StreamingClassifier(model, max_chunk=10)  # rounded down to a whole patch: 8
    assert stream.max_chunk == 8
    stream.feed(torch.randn(3, 50))
    stream.reset()
    stream.feed(x)
    with torch.no_grad():
        torch.testing.assert_close(stream.result(), torch.softmax(model(x), -1),
                                   atol=1e-5, rtol=0)


def test_what_cannot_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="bidirectional=False"):
        StreamingClassifier(tiny_classifier(time=dict(bidirectional=True)))
    with pytest.raises(ValueError, match="stem='patch'"):
        StreamingClassifier(tiny_classifier(time=dict(stem="conv", stem_kernels=(3,))))
    stream = StreamingClassifier(tiny_classifier())
    with pytest.raises(ValueError, match="nothing fed yet"):
        stream.result()
    stream.feed(torch.randn(2, 10))
    with pytest.raises(ValueError, match="this stream has 2 records"):
        stream.feed(torch.randn(3, 10))
    with pytest.raises(ValueError, match="NaN"):
        stream.feed(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="instance_norm"):
        StreamingClassifier(tiny_classifier(instance_norm=False, keep_amplitude=False),
                            stats=(0.0, 1.0))
