"""data/synthetic.py: deterministic, fast, balanced or imbalanced as asked, and the classes carry
the spectral and temporal signatures the docstring promises."""

import time

import numpy as np
import pytest
import scipy.signal

from data.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, class_counts, make_synthetic


@pytest.fixture(scope="module")
def data():
    return make_synthetic(SyntheticConfig(num_signals=700, seed=3))


def band_power(signals, rate, low, high):
    freqs, power = scipy.signal.welch(signals, fs=rate, nperseg=512, axis=-1)
    return power[:, (freqs >= low) & (freqs <= high)].mean(axis=1)


def test_shape_dtype_and_class_names(data):
    assert data.signals.shape == (700, 3750) and data.signals.dtype == np.float32
    assert data.labels.dtype == np.int64 and data.sample_rate == 125.0
    assert data.class_names == list(SYNTHETIC_CLASSES) and len(data.class_names) >= 5
    assert np.isfinite(data.signals).all()


def test_deterministic_for_a_seed():
    config = SyntheticConfig(num_signals=50, length=500, seed=11)
    a, b = make_synthetic(config), make_synthetic(config)
    np.testing.assert_array_equal(a.signals, b.signals)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = make_synthetic(SyntheticConfig(num_signals=50, length=500, seed=12))
    assert not np.allclose(a.signals, c.signals)


def test_balanced_and_imbalanced_counts():
    assert class_counts(2000, 7).tolist() == [286, 286, 286, 286, 286, 285, 285]
    counts = make_synthetic(SyntheticConfig(num_signals=700, length=200, imbalance=10)
                            ).class_counts()
    assert counts.sum() == 700 and np.all(np.diff(counts) <= 0)
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.05)
    with pytest.raises(ValueError, match="too few"):
        class_counts(10, 7, imbalance=100)


def test_class_subset_and_config_checks():
    ds = make_synthetic(SyntheticConfig(num_signals=20, length=100,
                                        classes=("early_transient", "late_transient")))
    assert ds.class_names == ["early_transient", "late_transient"]
    assert ds.class_counts().tolist() == [10, 10]
    with pytest.raises(ValueError, match="distinct names"):
        make_synthetic(SyntheticConfig(classes=("normal", "unknown")))
    with pytest.raises(ValueError, match="too low"):
        make_synthetic(SyntheticConfig(sample_rate=50.0))


def test_generation_is_fast():
    start = time.perf_counter()
    make_synthetic(SyntheticConfig(num_signals=2000))
    assert time.perf_counter() - start < 3.0


def test_spectral_classes_differ_in_background_band(data):
    x, y = data.signals, data.labels
    name = {n: i for i, n in enumerate(data.class_names)}
    slow = band_power(x, 125, 2, 4) / band_power(x, 125, 8, 12)
    fast = band_power(x, 125, 20, 30) / band_power(x, 125, 8, 12)
    assert np.median(slow[y == name["slow_wave"]]) > 5 * np.median(slow[y == name["normal"]])
    assert np.median(fast[y == name["fast_wave"]]) > 5 * np.median(fast[y == name["normal"]])


def test_temporal_classes_share_spectrum_but_not_timing(data):
    x, y = data.signals, data.labels
    name = {n: i for i, n in enumerate(data.class_names)}
    # same background band power (within 20 %) for normal and the temporal classes
    alpha = band_power(x, 125, 8, 12)
    normal = np.median(alpha[y == name["normal"]])
    for cls in ("irregular_rhythm", "paired_beats", "early_transient", "late_transient"):
        assert np.median(alpha[y == name[cls]]) == pytest.approx(normal, rel=0.2)
    # early vs late transient: same 5 Hz energy, in opposite halves of the signal
    burst = scipy.signal.sosfiltfilt(scipy.signal.butter(4, [4, 6], "bandpass", fs=125,
                                                         output="sos"), x, axis=-1) ** 2
    first, second = burst[:, :1875].sum(axis=1), burst[:, 1875:].sum(axis=1)
    early, late = y == name["early_transient"], y == name["late_transient"]
    assert np.mean(first[early] > second[early]) > 0.9
    assert np.mean(second[late] > first[late]) > 0.9
    total_early, total_late = np.median((first + second)[early]), np.median((first + second)[late])
    assert total_early == pytest.approx(total_late, rel=0.25)


def test_rhythm_classes_differ_in_interval_regularity():
    # noise and drift off; a 5 Hz low-pass keeps the 20 ms pulses and drops the 8-12 Hz
    # background, so the pulses are the only large peaks
    ds = make_synthetic(SyntheticConfig(num_signals=140, noise_std=0.0, drift=0.0, seed=5,
                                        classes=("normal", "irregular_rhythm", "paired_beats")))
    lowpass = scipy.signal.butter(4, 5, fs=125, output="sos")
    cv, alternation = [], []
    for x in scipy.signal.sosfiltfilt(lowpass, ds.signals, axis=-1):
        peaks, _ = scipy.signal.find_peaks(x, height=0.5 * x.max(), distance=25)
        intervals = np.diff(peaks)
        cv.append(intervals.std() / intervals.mean())
        alternation.append(np.abs(np.diff(intervals)).mean() / intervals.mean())
    cv, alternation = np.array(cv), np.array(alternation)
    normal, irregular, paired = (ds.labels == k for k in range(3))
    assert np.median(cv[normal]) < 0.1
    assert np.median(cv[irregular]) > 0.2
    assert np.median(alternation[paired]) > 0.7  # short-long-short-long
    assert np.median(alternation[irregular]) < np.median(alternation[paired])
