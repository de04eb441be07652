"""data/datamodule.py: splits (stratified, grouped, official test kept apart), length policies,
normalisation, resampling, class balancing, augmentation in training only, memmaps, loaders,
and prediction inputs prepared as in training."""

import pickle
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data.datamodule import DataConfig, SignalDataModule, prediction_inputs, split_indices
from data.formats import UNLABELLED, DataError
from data.transforms import bandpass, resample

pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword")


def make_dm(**overrides) -> SignalDataModule:
    defaults = dict(synthetic_num_signals=140, length=500, batch_size=8, val_fraction=0.15)
    dm = SignalDataModule(DataConfig(**{**defaults, **overrides}))
    dm.setup("fit")
    return dm


def records(items_dataset) -> set[int]:
    return set(items_dataset.items[:, 0].tolist())


def write_grouped_npz(path, rng, n_groups=20, per_group=5, length=64):
    X = rng.standard_normal((n_groups * per_group, length)).astype(np.float32)
    groups = np.repeat([f"subject{g}" for g in range(n_groups)], per_group)
    y = np.repeat(np.arange(n_groups) % 3, per_group)  # a subject's windows share a class
    np.savez(path, X=X, y=y, groups=groups, fs=100.0)
    return X, y, groups


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_synthetic_batches_and_properties():
    dm = make_dm()
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 500) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert dm.num_classes == 7 and dm.class_names[0] == "normal"
    assert dm.signal_length == 500 and dm.sample_rate == 125.0
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sum(sizes) == 140 and sizes[1] == pytest.approx(21, abs=2)
    assert not records(dm.train_dataset) & records(dm.val_dataset)
    assert not records(dm.train_dataset) & records(dm.test_dataset)
    assert not records(dm.val_dataset) & records(dm.test_dataset)
    assert dm.class_counts.tolist() == [14] * 7  # stratified: 70 % of 20 per class
    assert dm.class_weights is None and not dm.has_official_test
    xv, *_ = next(iter(make_dm(normalize="window").val_dataloader()))
    torch.testing.assert_close(xv.mean(dim=1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(xv.std(dim=1, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)


def test_same_seed_same_split_and_batches():
    a, b = make_dm(augment=False), make_dm(augment=False)
    assert records(a.val_dataset) == records(b.val_dataset)
    torch.testing.assert_close(next(iter(a.val_dataloader())), next(iter(b.val_dataloader())))
    assert records(make_dm(seed=1).val_dataset) != records(a.val_dataset)


def test_grouped_split_keeps_records_together(tmp_path, rng):
    _, _, groups = write_grouped_npz(tmp_path / "g.npz", rng)
    dm = make_dm(source=str(tmp_path / "g.npz"), length=None)
    parts = [set(groups[list(records(d))]) for d in
             (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert all(parts) and sum(len(p) for p in parts) == 20
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_split_indices_grouped_needs_enough_groups():
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(DataError, match="too few to hold out"):
        split_indices(labels, np.array(["a", "a", "b", "b"]), 0.2, 0, "x.npz")
    kept, held = split_indices(np.arange(40) % 2, None, 0.25, 0)
    assert len(held) == 10 and np.bincount(np.arange(40)[held] % 2).tolist() == [5, 5]


def test_official_test_set_is_untouched(tmp_path, rng):
    def ts(path, n):
        X, y = rng.standard_normal((n, 30)), np.arange(n) % 2 + 1
        lines = ["@problemName P", "@univariate true", "@classLabel true 1 2", "@data"]
        lines += [",".join(f"{v:.6f}" for v in x) + f":{c}" for x, c in zip(X, y, strict=True)]
        path.write_text("\n".join(lines))
        return np.round(X, 6), y - 1

    ts(tmp_path / "P_TRAIN.ts", 40)
    X_test, y_test = ts(tmp_path / "P_TEST.ts", 12)
    dm = make_dm(source=str(tmp_path), length=None, normalize="none", batch_size=12)
    assert dm.has_official_test and len(dm.test_dataset) == 12
    assert len(dm.train_dataset) + len(dm.val_dataset) == 40  # val comes from training only
    x, y, _ = next(iter(dm.test_dataloader()))
    np.testing.assert_allclose(x.numpy(), X_test, rtol=1e-5)
    np.testing.assert_array_equal(y.numpy(), y_test)


def test_length_policies_on_unequal_lengths(tmp_path, rng):
    signals = [rng.standard_normal(n).astype(np.float32) for n in rng.integers(80, 120, 30)]
    np.savez(tmp_path / "u.npz", X=np.concatenate(signals), lengths=[len(s) for s in signals],
             y=np.arange(30) % 2)
    longest = max(len(s) for s in signals)
    dm = make_dm(source=str(tmp_path / "u.npz"), length=None, length_policy="pad")
    assert dm.signal_length <= longest and next(iter(dm.val_dataloader()))[0].shape[1] == \
        dm.signal_length
    dm = make_dm(source=str(tmp_path / "u.npz"), length=60, length_policy="window",
                 window_stride=20, augment=False, normalize="none")
    record, start = dm.train_dataset.items[1]
    x, *_ = dm.train_dataset[1]
    np.testing.assert_array_equal(x.numpy(), signals[record][start:start + 60])
    expected = sum((len(signals[r]) - 60) // 20 + 1 for r in records(dm.train_dataset))
    assert len(dm.train_dataset) == expected
    dm = make_dm(source=str(tmp_path / "u.npz"), length=70, length_policy="crop",
                 augment=False, normalize="none")
    index = 0
    record = dm.val_dataset.items[index, 0]
    centre = (len(signals[record]) - 70) // 2
    np.testing.assert_array_equal(dm.val_dataset[index][0].numpy(),
                                  signals[record][centre:centre + 70])
    crops = {float(dm.train_dataset[0][0][0]) for _ in range(10)}
    assert len(crops) > 1  # a random crop per load in training
    with pytest.raises(DataError, match="shorter than the window length 100"):
        make_dm(source=str(tmp_path / "u.npz"), length=100, length_policy="window")


def test_pad_policy_zero_pads_after_normalising(tmp_path):
    # even records: 4 samples; odd records: 2 samples, padded to 4 with the (normalised) mean
    parts = [np.array([1.0, 2, 3, 4]) if i % 2 == 0 else np.array([10.0, 20]) for i in range(20)]
    np.savez(tmp_path / "p.npz", X=np.concatenate(parts), lengths=[len(p) for p in parts],
             y=np.arange(20) % 2)
    for normalize in ("record", "window"):
        dm = make_dm(source=str(tmp_path / "p.npz"), length=None, normalize=normalize,
                     augment=False)
        assert dm.signal_length == 4
        for i, (record, _) in enumerate(dm.val_dataset.items):
            x = dm.val_dataset[i][0].numpy()
            if record % 2:
                np.testing.assert_allclose(x, [-1, 1, 0, 0], rtol=1e-6)
            else:
                np.testing.assert_allclose(x, (np.arange(4) - 1.5) / np.std(np.arange(4)),
                                           rtol=1e-6)


def test_resampling_and_missing_rate(tmp_path, rng):
    write_grouped_npz(tmp_path / "g.npz", rng, length=200)
    dm = make_dm(source=str(tmp_path / "g.npz"), length=None, sample_rate=50.0)
    assert dm.signal_length == 100 and dm.sample_rate == 50.0
    np.savez(tmp_path / "norate.npz", X=rng.standard_normal((20, 50)), y=np.arange(20) % 2)
    with pytest.raises(DataError, match="unknown, so resampling") as err:
        make_dm(source=str(tmp_path / "norate.npz"), length=None, sample_rate=50.0)
    assert err.value.path.endswith("norate.npz")
    with pytest.raises(DataError, match="unknown, so bandpass"):
        make_dm(source=str(tmp_path / "norate.npz"), length=None, bandpass=(1.0, 10.0))
    dm = make_dm(source=str(tmp_path / "norate.npz"), length=None, bandpass=(1.0, 10.0),
                 reader_options={"sample_rate": 100.0})
    assert dm.sample_rate == 100.0


def test_class_weights_and_weighted_sampler():
    dm = make_dm(synthetic_imbalance=8.0, synthetic_num_signals=280, balance="loss")
    counts = dm.class_counts
    expected = counts.sum() / (7 * counts)
    np.testing.assert_allclose(dm.class_weights.numpy(), expected, rtol=1e-6)
    assert dm.class_weights[0] < 1 < dm.class_weights[-1]
    dm = make_dm(synthetic_imbalance=8.0, synthetic_num_signals=280, balance="sampler",
                 batch_size=len(make_dm(synthetic_imbalance=8.0, synthetic_num_signals=280)
                                .train_dataset) // 2)
    drawn = torch.cat([torch.cat([y for _, y, _ in dm.train_dataloader()]) for _ in range(5)])
    share = torch.bincount(drawn, minlength=7).float() / len(drawn)
    assert share.min() > 0.08 and share.max() < 0.2  # ~1/7 each, despite 8:1 counts


def test_augmentation_only_in_training():
    dm = make_dm(aug_noise=0.1)
    first = dm.train_dataset[0][0]
    assert not torch.allclose(first, dm.train_dataset[0][0])
    torch.testing.assert_close(dm.val_dataset[0][0], dm.val_dataset[0][0])
    torch.testing.assert_close(dm.test_dataset[3][0], dm.test_dataset[3][0])
    plain = make_dm(augment=False)
    torch.testing.assert_close(plain.train_dataset[0][0], plain.train_dataset[0][0])


def test_memmap_source_stays_on_disk_and_loads_in_workers(tmp_path, rng):
    X = rng.standard_normal((60, 128)).astype(np.float32)
    np.save(tmp_path / "big.npy", X)
    (tmp_path / "big.labels.csv").write_text("label\n" + "\n".join("ab"[i % 2]
                                                                   for i in range(60)) + "\n")
    dm = make_dm(source=str(tmp_path / "big.npy"), length=None, normalize="none", num_workers=1,
                 augment=False, batch_size=4)
    assert isinstance(dm.train_dataset.signals, np.memmap)
    clone = pickle.loads(pickle.dumps(dm.val_dataset))
    assert isinstance(clone.signals, np.memmap)  # re-opened, not copied
    torch.testing.assert_close(clone[2][0], dm.val_dataset[2][0])
    x, y, _ = next(iter(dm.val_dataloader()))
    rows = dm.val_dataset.items[:4, 0]
    np.testing.assert_array_equal(x.numpy(), X[rows])
    np.testing.assert_array_equal(y.numpy(), rows % 2)


def test_wfdb_folder_grouped_by_record(tmp_path, rng):
    with warnings.catch_warnings():  # wfdb 4.3 calls pandas 3.1 with a deprecated keyword
        warnings.filterwarnings("ignore", message="The inplace keyword")
        wfdb = pytest.importorskip("wfdb")  # optional (requirements-formats.txt)
    for i in range(10):
        signal = rng.standard_normal((3000, 1))
        wfdb.wrsamp(f"r{i}", fs=100, units=["mV"], sig_name=["II"], p_signal=signal,
                    fmt=["16"], write_dir=str(tmp_path))
        rhythm = "(AFIB" if i % 2 else "(N"
        wfdb.wrann(f"r{i}", "atr", np.array([0]), symbol=["+"], aux_note=[rhythm],
                   write_dir=str(tmp_path))
    dm = make_dm(source=str(tmp_path), length=None, val_fraction=0.2, test_fraction=0.2,
                 reader_options={"window_seconds": 5})
    assert dm.signal_length == 500 and dm.class_names == ["AFIB", "N"]
    splits = [{int(r) // 6 for r in records(d)} for d in
              (dm.train_dataset, dm.val_dataset, dm.test_dataset)]  # 6 windows per record
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


def test_trainer_runs_one_batch():
    class Tiny(pl.LightningModule):
        def __init__(self, length: int, classes: int):
            super().__init__()
            self.net = torch.nn.Linear(length, classes)

        def training_step(self, batch, _):
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y, _ = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_dm()
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(dm.signal_length, dm.num_classes), datamodule=dm)
    assert trainer.state.finished


def test_no_test_part_when_test_fraction_is_zero():
    dm = make_dm(test_fraction=0.0)
    assert len(dm.test_dataset) == 0 and len(dm.train_dataset) + len(dm.val_dataset) == 140


def test_config_checks():
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=-0.1)
    with pytest.raises(ValueError, match="leave a training part"):
        DataConfig(val_fraction=0.5, test_fraction=0.5)
    for bad in ({"normalize": "Window"}, {"balance": "loss "}, {"nan_policy": "Drop"},
                {"length_policy": "Pad"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be one of"):
            DataConfig(**bad)
    with pytest.raises(ValueError, match="window_stride must be positive"):
        DataConfig(length_policy="window", window_stride=0)
    with pytest.raises(ValueError, match="sample_rate must be positive"):
        DataConfig(sample_rate=-1.0)


def test_prediction_inputs_prepare_data_as_in_training(tmp_path, rng):
    write_grouped_npz(tmp_path / "train.npz", rng, length=200)  # 100 Hz
    dm = make_dm(source=str(tmp_path / "train.npz"), length=64, sample_rate=50.0,
                 bandpass=(0.5, 20.0), normalize="record")
    trained = dm.trained_settings()
    assert trained["signal_length"] == 64 and trained["trained_sample_rate"] == 50.0
    assert trained["normalize"] == "record" and trained["source"].endswith("train.npz")
    # new recordings without labels, at the training file's rate: 200 and 100 samples
    signals = [rng.standard_normal(n).astype(np.float32) for n in (200, 100)]
    np.savez(tmp_path / "new.npz", X=np.concatenate(signals), lengths=[200, 100], fs=100.0)
    inputs = prediction_inputs(tmp_path / "new.npz", trained, dm.class_names)
    assert inputs.dataset.sample_rate == 50.0 and inputs.length == 64
    assert inputs.dataset.class_names == dm.class_names
    # 100 samples at 50 Hz: windows at 0 and one ending at the last sample; 50: one, padded
    assert inputs.windows.tolist() == [[0, 0], [0, 36], [1, 0]]
    assert inputs.ends.tolist() == [64, 100, 50]
    for (record, start), end, (x, y, _) in zip(inputs.windows, inputs.ends, inputs.items,
                                            strict=True):
        prepared = bandpass(resample(signals[record], 100.0, 50.0), 50.0, 0.5, 20.0)
        expected = (prepared - prepared.mean()) / prepared.std()  # per record
        np.testing.assert_allclose(x[:end - start].numpy(), expected[start:end], atol=1e-4)
        assert (x[end - start:] == 0).all() and x.shape == (64,)
        assert int(y) == UNLABELLED
    inputs = prediction_inputs(tmp_path / "new.npz", trained, dm.class_names, window_stride=16)
    assert inputs.windows[:, 1].tolist() == [0, 16, 32, 36, 0]
    # labels a file has are mapped onto the training classes; the caller may demand them
    with pytest.raises(DataError, match="is missing") as err:
        prediction_inputs(tmp_path / "new.npz", trained, dm.class_names,
                          reader_options={"labels": "required"})
    assert err.value.field == "y"
    inputs = prediction_inputs(tmp_path / "train.npz", trained, dm.class_names)
    assert inputs.dataset.labels.tolist() == np.repeat(np.arange(20) % 3, 5).tolist()


def test_training_refuses_unlabelled_reading():
    with pytest.raises(ValueError, match="training needs labelled data"):
        DataConfig(source="x.npz", reader_options={"labels": "optional"})
    assert DataConfig(reader_options={"labels": "required"}).reader_options


def test_automatic_validation_split_batch_size_and_dataset_scaling(tmp_path, rng):
    """Few records: no validation split (train on all, keep the last weights), a quarter of
    them per batch, and one (mean, std) of the training set for every signal, so a signal
    twice as loud stays twice as loud."""
    X = rng.standard_normal((40, 30)) * np.repeat([1.0, 2.0], 20)[:, None] + 5.0
    np.savez(tmp_path / "a.npz", X=X, y=np.repeat([0, 1], 20))
    dm = make_dm(source=str(tmp_path / "a.npz"), length=None, val_fraction=None,
                 batch_size=None, test_fraction=0.25, augment=False)
    assert len(dm.val_dataset) == 0 and not dm.has_validation and dm.val_dataloader() == []
    assert len(dm.train_dataset) == 30 and dm.batch_size == 7  # 30 // 4
    mean, std = dm.dataset_stats
    rows = dm.train_dataset.items[:, 0]
    np.testing.assert_allclose([mean, std], [X[rows].mean(), X[rows].std()], rtol=1e-6)
    x, y, n = dm.train_dataset[0]
    np.testing.assert_allclose(x.numpy(), (X[rows[0]] - mean) / std, atol=1e-5)
    assert int(n) == 30 and dm.trained_settings()["dataset_stats"] == [mean, std]
    many = make_dm(synthetic_num_signals=1500, length=64, val_fraction=None, batch_size=None)
    assert len(many.val_dataset) == pytest.approx(150, abs=5) and many.batch_size == 32


def test_items_give_their_real_length_and_zero_padding(tmp_path, rng):
    signals = [rng.standard_normal(n).astype(np.float32) for n in (50, 20, 35, 50)] * 5
    np.savez(tmp_path / "u.npz", X=np.concatenate(signals), lengths=[len(s) for s in signals],
             y=np.arange(20) % 2)
    dm = make_dm(source=str(tmp_path / "u.npz"), length=None, test_fraction=0.0,
                 aug_shift=0.2, aug_slice=0.2)
    for dataset in (dm.train_dataset, dm.val_dataset):  # training: noise stays out of the pad
        for i, (record, _) in enumerate(dataset.items):
            x, _, n = dataset[i]
            assert int(n) == len(signals[record]) and (x[int(n):] == 0).all()


def test_in_memory_records_are_served_as_a_file_of_them(tmp_path, rng):
    """InMemoryDataModule (the estimator's) splits, scales and serves records in memory as
    SignalDataModule does the same records read from a file; prepare_prediction_inputs on
    them gives what prediction_inputs gives for the file."""
    from data.datamodule import InMemoryDataModule, prepare_prediction_inputs
    from data.formats import read_dataset

    X, _, _ = write_grouped_npz(tmp_path / "g.npz", rng)
    config = dict(val_fraction=0.2, test_fraction=0.2, batch_size=4, augment=False)
    from_file = SignalDataModule(DataConfig(source=str(tmp_path / "g.npz"), **config))
    in_memory = InMemoryDataModule(read_dataset(tmp_path / "g.npz"),
                                   DataConfig(source="arrays", **config))
    for dm in (from_file, in_memory):
        dm.setup("fit")
    for part in ("train_dataset", "val_dataset", "test_dataset"):
        np.testing.assert_array_equal(getattr(in_memory, part).items,
                                      getattr(from_file, part).items)
    assert in_memory.dataset_stats == from_file.dataset_stats
    trained = from_file.trained_settings()
    names = from_file.class_names
    expected = prediction_inputs(tmp_path / "g.npz", trained, names)
    got = prepare_prediction_inputs(read_dataset(tmp_path / "g.npz"), trained)
    np.testing.assert_array_equal(got.windows, expected.windows)
    torch.testing.assert_close(got.items[3][0], expected.items[3][0])
    torch.testing.assert_close(got.items[3][0], torch.from_numpy(
        (X[3] - trained["dataset_stats"][0]) / trained["dataset_stats"][1]).float())
