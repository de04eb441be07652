"""data/transforms.py: resampling, filters, normalisation, windows, length policy, augmentation."""

import numpy as np
import pytest
import torch

from data.formats import DataError, SignalDataset
from data.transforms import (
    GaussianNoise,
    RandomCrop,
    RandomScale,
    RandomShift,
    RandomSlice,
    bandpass,
    filter_dataset,
    fit_length,
    label_windows_by_events,
    label_windows_by_spans,
    make_augmentation,
    notch,
    plan_windows,
    prediction_windows,
    resample,
    resample_dataset,
    sliding_windows,
    window_dataset,
    window_starts,
    znormalize,
)


def sine(freq, rate, seconds, phase=0.0):
    t = np.arange(int(rate * seconds)) / rate
    return np.sin(2 * np.pi * freq * t + phase)


def dominant_freq(x, rate):
    spectrum = np.abs(np.fft.rfft(x))
    return np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()]


def amplitude_at(x, freq, rate):
    """Amplitude of the `freq` component (projection on sin/cos)."""
    t = np.arange(len(x)) / rate
    return 2 * np.abs(np.mean(x * np.exp(-2j * np.pi * freq * t)))


def dataset(signals, rate=None, labels=None):
    labels = np.arange(len(signals)) % 2 if labels is None else np.asarray(labels)
    return SignalDataset(signals, labels, ["a", "b"], None, rate, "mem.npz")


# ----------------------------------------------------------------------------------------------
# Resampling


@pytest.mark.parametrize(("orig", "new", "n_in", "n_out"),
                         [(360, 125, 3600, 1250), (100, 250, 1000, 2500), (128, 100, 640, 500)])
def test_resample_length_and_frequency(orig, new, n_in, n_out):
    x = sine(7.0, orig, n_in / orig)
    y = resample(x, orig, new)
    assert y.shape == (n_out,) and y.dtype == np.float32
    assert dominant_freq(y, new) == pytest.approx(7.0, abs=new / n_out)
    assert amplitude_at(y[50:-50], 7.0, new) == pytest.approx(1.0, abs=0.03)


def test_resample_tensor_batch_and_identity():
    x = torch.randn(3, 1000)
    y = resample(x, 250, 125)
    assert isinstance(y, torch.Tensor) and y.shape == (3, 500)
    assert resample(x, 100, 100) is x


def test_resample_dataset_needs_rate_and_scales_lengths():
    signals = [np.ones(300, np.float32), np.ones(150, np.float32)]
    with pytest.raises(DataError, match="unknown, so resampling to 50 Hz") as err:
        resample_dataset(dataset(signals), 50)
    assert err.value.field == "sample_rate" and err.value.path == "mem.npz"
    out = resample_dataset(dataset(signals, rate=100.0), 50)
    assert out.lengths.tolist() == [150, 75] and out.sample_rate == 50.0
    grid = resample_dataset(dataset(np.zeros((4, 300), np.float32), rate=300.0), 100)
    assert grid.signals.shape == (4, 100)


# ----------------------------------------------------------------------------------------------
# Filters and normalisation


def test_bandpass_keeps_band_without_phase_shift():
    rate = 200
    x = sine(5, rate, 10) + sine(40, rate, 10) + 3.0  # offset: removed by the band-pass
    y = bandpass(x, rate, 1, 10)
    middle = slice(200, -200)
    assert amplitude_at(y[middle], 5, rate) == pytest.approx(1.0, abs=0.02)
    assert amplitude_at(y[middle], 40, rate) < 1e-3
    assert abs(y[middle].mean()) < 1e-2
    # zero-phase: the 5 Hz output lines up with the 5 Hz input (no lag)
    lag = np.angle(np.mean(y[middle] * np.exp(-2j * np.pi * 5 * np.arange(2000)[middle] / rate)))
    ref = np.angle(np.mean(sine(5, rate, 10)[middle]
                           * np.exp(-2j * np.pi * 5 * np.arange(2000)[middle] / rate)))
    assert lag == pytest.approx(ref, abs=0.01)
    low = bandpass(x, rate, 0, 10)  # low == 0: low-pass, keeps the offset
    assert low[middle].mean() == pytest.approx(3.0, abs=1e-2)


def test_notch_removes_mains():
    rate = 250
    x = sine(10, rate, 8) + 0.5 * sine(50, rate, 8)
    y = notch(x, rate, 50)
    assert amplitude_at(y[250:-250], 50, rate) < 0.01
    assert amplitude_at(y[250:-250], 10, rate) == pytest.approx(1.0, abs=0.02)


def test_filter_dataset_errors_and_result():
    grid = np.stack([sine(5, 100, 4), sine(30, 100, 4)]).astype(np.float32)
    with pytest.raises(DataError, match="unknown, so bandpass filtering"):
        filter_dataset(dataset(grid), band=(1, 10))
    with pytest.raises(DataError, match="Nyquist") as err:
        filter_dataset(dataset(grid, rate=100.0), band=(1, 60))
    assert err.value.field == "bandpass"
    with pytest.raises(DataError, match="cannot be applied"):
        filter_dataset(dataset([np.ones(5, np.float32)] * 2, rate=100.0), notch_freq=20)
    out = filter_dataset(dataset(grid, rate=100.0), band=(1, 10))
    assert amplitude_at(out.signals[1][50:-50], 30, 100) < 0.01


def test_znormalize():
    x = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    z = znormalize(x)
    np.testing.assert_allclose(z[0].mean(), 0, atol=1e-6)
    np.testing.assert_allclose(z[0].std(), 1, atol=1e-6)
    np.testing.assert_array_equal(z[1], 0)  # flat: zeros, not NaN


# ----------------------------------------------------------------------------------------------
# Windows, label rules, length policies


def test_window_starts_and_views():
    assert window_starts(10, 4, 3).tolist() == [0, 3, 6]
    views = sliding_windows(np.arange(10), 4, 3)
    np.testing.assert_array_equal(views, [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    with pytest.raises(ValueError, match="longer than the signal"):
        window_starts(3, 4, 1)


def test_label_windows_by_spans_coverage():
    starts = np.array([0, 100, 200, 300])
    # label 0 on [0, 150) and (overlapping itself) [120, 160); label 1 on [160, 400)
    labels = label_windows_by_spans(starts, 100, [0, 120, 160, 250], [150, 160, 250, 400],
                                    [0, 0, 1, 1])
    assert labels.tolist() == [0, 0, 1, 1]  # window 1: label 0 covers 60, label 1 covers 40
    sparse = label_windows_by_spans(starts, 100, [0, 340], [30, 400], [0, -1])
    assert sparse.tolist() == [-1, -1, -1, -1]  # 30 % coverage, and an ignored span


def test_label_windows_by_events_majority():
    events = [10, 20, 30, 150, 160, 170, 180]
    labels = label_windows_by_events([0, 100, 200], 100, events, [0, 1, 1, 1, 1, 0, 2])
    assert labels.tolist() == [1, 1, -1]


def test_plan_windows_policies():
    lengths = np.array([10, 7, 12])
    length, items = plan_windows(lengths, "pad")
    assert length == 12 and items.tolist() == [[0, 0], [1, 0], [2, 0]]
    length, items = plan_windows(lengths, "crop", 6)
    assert length == 6 and items[:, 1].tolist() == [-1, -1, -1]
    length, items = plan_windows(lengths, "window", 5, 3)
    assert items.tolist() == [[0, 0], [0, 3], [1, 0], [2, 0], [2, 3], [2, 6]]
    with pytest.raises(DataError, match="1 records are shorter than the window length 8") as e:
        plan_windows(lengths, "window", 8, source="f.csv")
    assert e.value.path == "f.csv" and e.value.field == "length"
    with pytest.raises(DataError, match="shorter than the crop length"):
        plan_windows(lengths, "crop", 11)


def test_prediction_windows_cover_every_sample():
    items = prediction_windows(np.array([1100, 300, 512, 1024]), 512, 512)
    assert items.tolist() == [[0, 0], [0, 512], [0, 588], [1, 0], [2, 0], [3, 0], [3, 512]]
    assert prediction_windows([1100], 512, 256)[:, 1].tolist() == [0, 256, 512, 588]
    assert prediction_windows([], 8, 8).shape == (0, 2)
    with pytest.raises(ValueError, match="must be positive"):
        prediction_windows([10], 8, 0)


def test_fit_length_pads_and_truncates():
    np.testing.assert_array_equal(fit_length(np.array([1.0, 2.0]), 4), [1, 2, 0, 0])
    np.testing.assert_array_equal(fit_length(np.arange(5.0), 3), [0, 1, 2])


def test_window_dataset_inherits_labels_and_groups():
    ds = dataset([np.arange(10, dtype=np.float32), np.arange(100, 106, dtype=np.float32)],
                 labels=[1, 0])
    out = window_dataset(ds, 4, 2)
    np.testing.assert_array_equal(out.signals, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7],
                                                [6, 7, 8, 9], [100, 101, 102, 103],
                                                [102, 103, 104, 105]])
    assert out.labels.tolist() == [1, 1, 1, 1, 0, 0]
    assert out.groups.tolist() == [0, 0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------
# Augmentations


def test_random_crop_is_a_slice_and_pads_short_input():
    torch.manual_seed(0)
    x = torch.arange(100.0)
    starts = set()
    for _ in range(20):
        y = RandomCrop(30)(x)
        assert y.shape == (30,)
        torch.testing.assert_close(y, torch.arange(y[0].item(), y[0].item() + 30))
        starts.add(int(y[0]))
    assert len(starts) > 5
    torch.testing.assert_close(RandomCrop(5)(torch.ones(3)), torch.tensor([1.0, 1, 1, 0, 0]))


def test_random_scale_range_per_row():
    torch.manual_seed(0)
    x = torch.ones(500, 8)
    factors = RandomScale(0.5, 2.0)(x)
    assert torch.all(factors.std(dim=1) == 0)  # one factor per signal
    assert factors.min() >= 0.5 and factors.max() <= 2.0
    assert factors[:, 0].log().mean().abs() < 0.1  # log-uniform around 1


def test_gaussian_noise_std():
    torch.manual_seed(0)
    noise = GaussianNoise(0.1)(torch.zeros(20000))
    assert noise.std().item() == pytest.approx(0.1, rel=0.05)


def test_random_shift_circular_and_zero_fill():
    torch.manual_seed(0)
    x = torch.arange(1.0, 11.0).repeat(4, 1)
    y = RandomShift(0.3)(x)
    for row in y:
        shift = int(torch.nonzero(row == 1.0)[0])
        torch.testing.assert_close(row, torch.roll(x[0], shift))
    torch.manual_seed(1)
    z = RandomShift(0.3, circular=False)(x)
    for row in z:
        kept = row[row != 0]
        assert torch.all(kept[1:] - kept[:-1] == 1)  # a contiguous run of the original


def test_random_slice_stretches_a_random_window_back_to_the_length():
    torch.manual_seed(0)
    ramp = torch.arange(100.0).repeat(64, 1)
    y = RandomSlice(0.2)(ramp)
    assert y.shape == ramp.shape
    slopes = y[:, -1] - y[:, 0]  # a line stays a line: its ends are the window's ends
    torch.testing.assert_close(y[:, 1:] - y[:, :-1], (slopes / 99)[:, None].expand(-1, 99),
                               rtol=1e-4, atol=1e-4)
    assert (slopes >= 0.8 * 99 - 1e-3).all() and (slopes <= 99 + 1e-3).all()
    assert (y[:, 0] >= 0).all() and (y[:, -1] <= 99 + 1e-3).all()
    assert slopes.std() > 1  # each row its own window
    one = RandomSlice(0.2)(torch.sin(torch.arange(50.0)))  # a single signal (T,)
    assert one.shape == (50,)
    x = torch.randn(3, 40)
    torch.testing.assert_close(RandomSlice(0.0)(x), x)
    with pytest.raises(ValueError, match="slice fraction"):
        RandomSlice(1.0)


def test_make_augmentation():
    assert make_augmentation(None, 0.0, 0.0) is None
    chain = make_augmentation((0.9, 1.1), 0.01, 0.1)
    assert [type(m).__name__ for m in chain] == ["RandomScale", "RandomShift", "GaussianNoise"]
    assert chain(torch.zeros(2, 50)).shape == (2, 50)
    chain = make_augmentation(None, 0.0, 0.0, 0.1)
    assert [type(m).__name__ for m in chain] == ["RandomSlice"]
