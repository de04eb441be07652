"""models/estimator.py: SignalClassifier as a scikit-learn estimator (tiny models, few steps)."""

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

from models.defaults import data_facts, fill_data_defaults, model_settings
from models.estimator import SignalClassifier, resolve_device
from utils.cli import PRECISIONS, TrainOptions, parse_args

# a model small enough for a 2-core CI machine: a few seconds per fit
TINY = {"hidden_size": 8, "num_layers": 1, "cnn_channels": (4,), "ensemble": 1}
LENGTH = 128  # samples per training signal


def tones(n: int, seed: int, length: int = LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """n noisy sines, class 'low' at 2 cycles per 100 samples, 'high' at 12: separable by
    either branch. X (n, length) float32, y (n,) str."""
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 2 == 0, "low", "high")
    t = np.arange(length) / 100
    freq = np.where(y == "low", 2.0, 12.0)[:, None]
    X = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    return (X + 0.3 * rng.standard_normal((n, length))).astype(np.float32), y


@pytest.fixture(scope="module")
def fitted() -> SignalClassifier:
    X, y = tones(48, seed=0)
    return SignalClassifier(**TINY, max_steps=30, lr=1e-2, sample_rate=100).fit(X, y)


def test_fits_an_easy_set_and_predicts_held_out_signals(fitted):
    X, y = tones(40, seed=1)
    assert list(fitted.classes_) == ["high", "low"]
    proba = fitted.predict_proba(X)
    assert proba.shape == (40, 2) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert fitted.score(X, y) >= 0.95  # 1.0 when written
    assert set(fitted.predict(X)) <= {"high", "low"}
    assert fitted.n_features_in_ == LENGTH and len(fitted.members_) == 1
    np.testing.assert_allclose(np.exp(fitted.predict_log_proba(X)), proba, rtol=1e-12)


def test_save_and_load_give_the_same_probabilities(fitted, tmp_path):
    X, _ = tones(10, seed=2)
    path = fitted.save(tmp_path / "clf.pt")
    torch.load(path, weights_only=True)  # plain tensors and containers only
    loaded = SignalClassifier.load(path)
    assert loaded.get_params() == fitted.get_params()
    assert list(loaded.classes_) == list(fitted.classes_)
    assert loaded.classes_.dtype == fitted.classes_.dtype
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict_proba(X), fitted.predict_proba(X))


def test_load_refuses_a_file_it_did_not_write(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by SignalClassifier.save"):
        SignalClassifier.load(tmp_path / "other.pt")


def test_clone_gives_an_unfitted_estimator_with_equal_params(fitted):
    copy_ = clone(fitted)
    assert copy_.get_params() == fitted.get_params()
    assert not hasattr(copy_, "members_")
    with pytest.raises(NotFittedError):
        check_is_fitted(copy_)
    with pytest.raises(NotFittedError):
        copy_.predict_proba(tones(2, seed=3)[0])
    assert copy_.set_params(hidden_size=16).hidden_size == 16 and fitted.hidden_size == 8


def test_fit_is_deterministic_for_a_seed_and_leaves_the_callers_rng_alone():
    X, y = tones(24, seed=4)
    Xt, _ = tones(8, seed=5)
    # val_fraction: also the path that keeps the best weights of a validation split
    params = {**TINY, "max_steps": 6, "val_fraction": 0.25}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    state = np.random.get_state()[1].copy()
    first = SignalClassifier(**params, seed=7).fit(X, y).predict_proba(Xt)
    assert torch.equal(torch.get_rng_state(), before)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    again = SignalClassifier(**params, seed=7).fit(X, y).predict_proba(Xt)
    other = SignalClassifier(**params, seed=8).fit(X, y).predict_proba(Xt)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_unequal_length_records_each_predict_as_alone(fitted):
    rng = np.random.default_rng(6)
    X, _ = tones(5, seed=6)
    records = [x[: int(n)] for x, n in zip(X, rng.integers(40, LENGTH, 5), strict=True)]
    together = fitted.predict_proba(records)
    alone = np.concatenate([fitted.predict_proba([r]) for r in records])
    assert together.shape == (5, 2)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_a_record_longer_than_the_training_length_averages_its_windows(fitted):
    X, _ = tones(1, seed=7, length=300)
    record = X[0]
    # windows of 128: [0, 128), [128, 256) and the tail [172, 300), which adds 44 samples
    windows = np.stack([record[0:128], record[128:256], record[172:300]])
    expected = np.average(fitted.predict_proba(windows), axis=0, weights=[128, 128, 44])
    np.testing.assert_allclose(fitted.predict_proba([record])[0], expected, rtol=1e-6)
    np.testing.assert_allclose(fitted.predict_proba(X)[0], expected, rtol=1e-6)


def test_fit_takes_unequal_lengths_and_groups():
    X, y = tones(16, seed=8)
    records = [x[: 64 + 4 * i] for i, x in enumerate(X)]
    clf = SignalClassifier(**TINY, max_steps=3).fit(records, y, groups=np.arange(16) // 2)
    assert not hasattr(clf, "n_features_in_")
    assert clf.preprocessing_["signal_length"] == max(len(r) for r in records)
    assert clf.predict_proba(records).shape == (16, 2)


def test_the_automatic_ensemble_averages_its_members():
    X, y = tones(16, seed=9)
    clf = SignalClassifier(**{**TINY, "ensemble": None}, max_steps=2).fit(X, y)
    assert len(clf.members_) == 3  # models/defaults.auto_ensemble below 1000 items
    single = []
    for member in clf.members_:
        one = copy.copy(clf)
        one.members_ = [member]
        single.append(one.predict_proba(X))
    np.testing.assert_allclose(clf.predict_proba(X), np.mean(single, axis=0), rtol=1e-6)
    assert not np.allclose(single[0], single[1])  # seeds seed + 1000 k


def test_cross_val_score_and_a_pipeline():
    X, y = tones(24, seed=10)
    scores = cross_val_score(SignalClassifier(**TINY, max_steps=3), X, y, cv=3)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    pipe = Pipeline([("gain", FunctionTransformer(lambda x: 2.0 * x)),
                     ("clf", SignalClassifier(**TINY, max_steps=3))]).fit(X, y)
    np.testing.assert_array_equal(pipe.predict(X), pipe[-1].predict(2.0 * X))


@pytest.mark.parametrize(("params", "X", "message"), [
    ({"hidden_size": 0}, None, "hidden_size: expected an integer >= 1"),  # ModelOptions' check
    ({"lr": -1.0}, None, "lr: expected a positive finite number"),
    ({"seed": 2**32}, None, "seed: expected an integer in"),
    ({"accelerator": "tpu"}, None, "accelerator must be one of"),
    ({"normalize": "Window"}, None, "normalize"),
    ({"branches": "neither"}, None, "branches must be"),
    ({}, np.zeros(50), "Reshape your data"),
    ({}, [np.zeros(50), np.zeros((2, 5))], "X\\[1\\]"),
    ({}, [np.array([1.0, np.nan])] * 4, "NaN"),
])
def test_bad_input_is_a_value_error_that_says_what(params, X, message):
    X = tones(4, seed=11)[0] if X is None else X
    y = np.array(["a", "b"] * (len(X) // 2)) if len(X) != 50 else np.zeros(50)
    with pytest.raises(ValueError, match=message):
        SignalClassifier(**{**TINY, "max_steps": 1, **params}).fit(X, y)


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="one class"):
        SignalClassifier(**TINY, max_steps=1).fit(tones(4, seed=12)[0], ["a"] * 4)


def train_py_options(**params) -> TrainOptions:
    """What train.py parses from the estimator's parameters as its flags (utils.cli.parse_args),
    with the data section's three differences: arrays in memory, no test split (the caller
    holds out its own), no loader workers."""
    argv = []
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        argv += ([flag, *map(str, value)] if isinstance(value, (list, tuple))
                 else [f"{flag}={value}"])
    options = parse_args(argv)
    data = dataclasses.replace(options.data, source="arrays", test_fraction=0.0, num_workers=0)
    return dataclasses.replace(options, data=data)


def test_defaults_are_train_pys():
    """Every parameter but verbose and sample_rate is a train.py option with its default, and
    the estimator's options are the ones train.py parses from the same values as flags."""
    options = parse_args([])
    sections = [options.data, options.model, options.optimization, options.hardware,
                options.run]
    # sample_rate: the rate of X (train.py reads it from the file; data.sample_rate resamples)
    own = {"verbose", "sample_rate"}
    for key, value in SignalClassifier().get_params().items():
        if key in own:
            continue
        where = [s for s in sections if key in {f.name for f in dataclasses.fields(s)}]
        assert where, f"{key} is not a train.py option"
        expected = options.seed if key == "seed" else getattr(where[0], key)
        assert value == expected, key
    for overrides in ({}, {"n_fft": 64, "hidden_size": 32},
                      {"spectrogram": "linear", "cnn_channels": (8, 16), "length": 500},
                      {"epochs": 3, "ensemble": 2, "precision": "bf16", "seed": 5,
                       "val_fraction": 0.2, "balance": "loss", "mixup": 0.0}):
        ours = SignalClassifier(**overrides)._train_options()
        assert ours == train_py_options(**overrides), overrides
    # numpy scalars (a parameter grid from np.arange) are the same options as Python ints
    ours = SignalClassifier(hidden_size=np.int64(32), cnn_channels=np.array([8, 16]))
    assert ours._train_options().model == train_py_options(
        hidden_size=32, cnn_channels=(8, 16)).model


def test_fit_trains_the_model_train_pys_library_builds(fitted):
    """The fitted model: fill_data_defaults + model_settings (train.py's set_up) of the
    fixture's options and data, and the optimizer settings of its OptimizationOptions."""
    options = train_py_options(**{k: v for k, v in TINY.items() if k != "ensemble"},
                               max_steps=30, lr=1e-2)

    class Data:  # what the defaults read from the fixture's data module after setup()
        # 48 signals, none held out (no validation split below 1000 records, no test split)
        train_dataset, signal_length, sample_rate, num_classes, batch_size = (
            range(48), LENGTH, 100.0, 2, 12)

    model, optimization = fill_data_defaults(options.model, options.optimization, Data)
    hparams = fitted.members_[0].hparams
    assert hparams["model"] == model_settings(model, data_facts(Data))
    for key in ("lr", "weight_decay", "warmup", "min_lr_ratio", "label_smoothing", "mixup"):
        assert hparams[key] == getattr(optimization, key), key
    assert fitted.max_steps_ == optimization.max_steps == 30
    assert hparams["data"] == fitted.preprocessing_


def test_device_resolution_is_train_pys():
    import train

    def resolved(resolve, accelerator, precision):
        try:
            return resolve(accelerator, precision)
        except ValueError:  # train.py's ConfigError is one
            return "refused"

    for accelerator in ("auto", "cpu", "gpu"):
        for precision in PRECISIONS:
            assert (resolved(resolve_device, accelerator, precision)
                    == resolved(train.resolve_device, accelerator, precision)), (accelerator,
                                                                                 precision)


# ---------------------------------------------------------------------- scikit-learn's checks

EXPECTED_FAILED_CHECKS = {
    "check_n_features_in_after_fitting": (
        "by design predict takes signals of any length: a longer record is cut into windows "
        "whose probabilities are averaged, a shorter one is zero-padded (issue 17), so X with "
        "another number of columns is not an error"),
}
# fail by design too; skipped rather than run as expected failures: three fits each
SKIPPED_CHECKS = {
    "check_classifiers_train": (
        "besides an accuracy of 0.83 on 2-feature blobs it asserts that predict refuses X with "
        "another number of columns, which this estimator accepts by design (see "
        "check_n_features_in_after_fitting); accuracy is tested on signals above"),
}


@parametrize_with_checks(
    [SignalClassifier(hidden_size=4, num_layers=1, cnn_channels=(4,), max_steps=2,
                      ensemble=1)],
    expected_failed_checks=lambda estimator: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    name = getattr(check, "func", check).__name__
    if name in SKIPPED_CHECKS:
        pytest.skip(SKIPPED_CHECKS[name])
    check(estimator)
