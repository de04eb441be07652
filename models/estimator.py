"""`SignalClassifier`: the dual-branch classifier as a scikit-learn estimator.

    from models.estimator import SignalClassifier
    clf = SignalClassifier(sample_rate=125).fit(X, y)   # X: (n, T) array or n 1-D arrays
    proba = clf.predict_proba(X_new)                     # (n, K); records of any length
    clf.save("clf.pt"); clf = SignalClassifier.load("clf.pt")

It trains what `train.py` trains: the same data pipeline (`InMemoryDataModule`, the
`SignalDataModule` over arrays: length policy, dataset normalisation, augmentation, the
automatic validation split), the same defaults (models/defaults.py: model size, STFT, step
budget, ensemble size, all from the data when left None), the same `SignalClassifierModule` and
Lightning's Trainer, but with no logger, no run folder and no output unless `verbose`.
`predict_proba` prepares new arrays with the preprocessing stored at fit (input length, the
training set's mean and std, the window stride): a record longer than the training length is
cut into windows whose probabilities are averaged per record (data/aggregate.py).

fit is deterministic for a given `seed` on the CPU (seeded split, initialisation, shuffles,
augmentation and mixup) and leaves the caller's random number generators as it found them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import assert_all_finite, check_array, column_or_1d
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted
from torch.utils.data import DataLoader

from data.aggregate import aggregate_windows
from data.datamodule import DataConfig, InMemoryDataModule, prepare_prediction_inputs
from data.formats import UNLABELLED, SignalDataset
from models.defaults import DataFacts, auto_ensemble, auto_model, auto_train_steps
from models.lightning_module import SignalClassifierModule, rng_states, set_rng_states
from utils.checkpoint_io import atomic_open
from utils.guards import NonFiniteGuard
from utils.metrics import to_plain

FORMAT = "rwkv-signal-classifier/SignalClassifier"
FORMAT_VERSION = 1
MEMBER_SEED_STEP = 1000  # as train.py: member k of an ensemble trains with seed + 1000 k
SEED_MAX = 2**32 - 1  # what numpy's and Lightning's seeding accept
PREDICT_BATCH = 64
MONITOR = "val/macro_f1"  # train.py's --monitor default: the best weights by validation F1
PRECISIONS = {"auto": "auto", "32": "32-true", "32-true": "32-true", "16": "16-mixed",
              "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_QUIET_WARNINGS = (r".*does not have many workers.*", r".*is smaller than the logging interval.*",
                   r".*`srun` command is available on your system.*", r".*LeafSpec.*deprecated.*",
                   r".*Total length of `list` across ranks is zero.*")  # no validation split


class SignalClassifier(ClassifierMixin, BaseEstimator):
    """Dual-branch (spectrogram CNN + RWKV) classifier of 1-channel signals, sklearn-style.

    X: an (n, T) array, or a list of n 1-D arrays of any lengths (one record each), in the
    same units and at the same `sample_rate` for fit and predict. y: n class labels (any
    hashable values sklearn accepts). groups: n record/subject ids that keep one group out of
    both sides of the internal validation split.

    Every parameter left None is chosen from the data as `train.py` chooses it
    (models/defaults.py): hidden_size, num_layers, patch_size, cnn_channels, spectrogram and
    n_fft from the training items, length and rate; max_steps from the items and batch size
    (unless epochs is given); batch_size a quarter of the items, 4 to 32; ensemble 3 models
    below 1000 training items, else 1; val_fraction 0.1 from 1000 records on, else none (the
    last weights are kept). The other defaults are train.py's.

    Model: branches ("both", "time", "freq"), hidden_size, num_layers, patch_size (RWKV),
    cnn_channels, spectrogram ("mel"/"linear"), n_fft (frequency branch), fusion ("concat"/
    "gated"), dropout, bidirectional, wkv_backend.
    Data: sample_rate (Hz of X, None when unknown), length (model input samples; None: the
    longest training record with "pad", the shortest with "crop"/"window"), length_policy,
    window_stride, normalize ("dataset", "window", "record", "none"), augment, balance,
    val_fraction.
    Training: epochs or max_steps, batch_size, lr, weight_decay, mixup, label_smoothing,
    grad_clip, ensemble, seed, accelerator ("auto", "cpu", "gpu"), precision ("auto": bf16 or
    fp16 mixed on a GPU, fp32 on CPU), verbose (Lightning's progress bar and messages).

    Attributes after fit: classes_ (K,), n_features_in_ (T, for an (n, T) array only),
    members_ (the trained `SignalClassifierModule`s, in eval mode, on the CPU),
    preprocessing_ (the data settings predict uses), max_steps_ (optimizer steps per member,
    or None when epochs set the length).
    """

    def __init__(
        self,
        *,
        branches: str = "both",
        hidden_size: int | None = None,
        num_layers: int | None = None,
        patch_size: int | None = None,
        cnn_channels: Sequence[int] | None = None,
        spectrogram: str | None = None,
        n_fft: int | None = None,
        fusion: str = "concat",
        dropout: float = 0.1,
        bidirectional: bool = True,
        wkv_backend: str = "auto",
        sample_rate: float | None = None,
        length: int | None = None,
        length_policy: str = "pad",
        window_stride: int | None = None,
        normalize: str = "dataset",
        augment: bool = True,
        balance: str = "none",
        val_fraction: float | None = None,
        epochs: int | None = None,
        max_steps: int | None = None,
        batch_size: int | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        mixup: float = 0.2,
        label_smoothing: float = 0.0,
        grad_clip: float = 1.0,
        ensemble: int | None = None,
        seed: int = 0,
        accelerator: str = "auto",
        precision: str = "auto",
        verbose: bool = False,
    ) -> None:
        # sklearn convention: store the parameters as given, check them in fit
        self.branches = branches
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.patch_size = patch_size
        self.cnn_channels = cnn_channels
        self.spectrogram = spectrogram
        self.n_fft = n_fft
        self.fusion = fusion
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.wkv_backend = wkv_backend
        self.sample_rate = sample_rate
        self.length = length
        self.length_policy = length_policy
        self.window_stride = window_stride
        self.normalize = normalize
        self.augment = augment
        self.balance = balance
        self.val_fraction = val_fraction
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.mixup = mixup
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip
        self.ensemble = ensemble
        self.seed = seed
        self.accelerator = accelerator
        self.precision = precision
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    def fit(self, X: Any, y: Any, groups: Any = None) -> SignalClassifier:
        """Train on X (an (n, T) array or n 1-D arrays) and labels y (n,); returns self."""
        signals, two_d = _check_signals(X)
        classes, codes = _check_targets(y, len(signals))
        if groups is not None:
            groups = np.asarray(groups).ravel()
            if len(groups) != len(signals):
                raise ValueError(f"groups has {len(groups)} ids for {len(signals)} signals; "
                                 "expected one per signal")
        self._check_params()
        on_gpu, precision = resolve_device(self.accelerator, self.precision)
        records = SignalDataset(signals, codes, [str(c) for c in classes], groups,
                                self.sample_rate, "SignalClassifier.fit(X)")
        with _quiet(self.verbose):
            datamodule = InMemoryDataModule(records, self._data_config())
            datamodule.setup("fit")
            train_items = len(datamodule.train_dataset)
            auto = auto_model(DataFacts(train_items, datamodule.signal_length,
                                        datamodule.sample_rate, datamodule.num_classes))
            model = self._model_settings(auto, datamodule.sample_rate)
            max_steps = self.max_steps
            if self.epochs is None and max_steps is None:
                max_steps = auto_train_steps(train_items, datamodule.batch_size)
            ensemble = self.ensemble or auto_ensemble(train_items)
            if self.seed + MEMBER_SEED_STEP * (ensemble - 1) > SEED_MAX:
                raise ValueError(f"seed {self.seed} is too large for {ensemble} members (seeds "
                                 f"seed + {MEMBER_SEED_STEP} k must stay <= 2**32 - 1)")
            module_args = {
                "model": model, "num_classes": datamodule.num_classes,
                "class_names": datamodule.class_names,
                "class_weights": (None if datamodule.class_weights is None
                                  else datamodule.class_weights.tolist()),
                "lr": self.lr, "weight_decay": self.weight_decay, "warmup": 0.05,
                "min_lr_ratio": 0.01, "label_smoothing": self.label_smoothing,
                "mixup": self.mixup, "data": to_plain(datamodule.trained_settings()),
            }
            members = [self._fit_member(module_args, datamodule, self.seed + MEMBER_SEED_STEP * k,
                                        on_gpu, precision, max_steps)
                       for k in range(ensemble)]
        self.classes_ = classes
        if two_d:
            self.n_features_in_ = signals.shape[1]
        elif hasattr(self, "n_features_in_"):
            del self.n_features_in_
        self.preprocessing_ = module_args["data"]
        self.max_steps_ = max_steps
        self.members_ = members
        return self

    def _fit_member(self, module_args: dict[str, Any], datamodule: InMemoryDataModule,
                    seed: int, on_gpu: bool, precision: str,
                    max_steps: int | None) -> SignalClassifierModule:
        """One model trained with `seed`; returned on the CPU in eval mode, with the best
        weights by validation macro-F1 when there is a validation split, else the last."""
        validation = datamodule.has_validation
        with _seeded(seed), tempfile.TemporaryDirectory(prefix="signal-classifier-") as tmp:
            module = SignalClassifierModule(**module_args)
            best = ModelCheckpoint(dirpath=tmp, monitor=MONITOR, mode="max", save_top_k=1)
            trainer = pl.Trainer(
                accelerator="gpu" if on_gpu else "cpu", devices=1, precision=precision,
                max_epochs=self.epochs if max_steps is None else -1,
                max_steps=max_steps or -1, gradient_clip_val=self.grad_clip or None,
                logger=False, default_root_dir=tmp, enable_checkpointing=validation,
                callbacks=[NonFiniteGuard(hint=f"; lower lr (now {self.lr:g}) or check X"),
                           *([best] if validation else [])],
                enable_progress_bar=self.verbose, enable_model_summary=self.verbose,
                num_sanity_val_steps=0, log_every_n_steps=1,
            )
            trainer.fit(module, datamodule=datamodule)
            state = module.state_dict()
            if validation and best.best_model_path:
                state = torch.load(best.best_model_path, map_location="cpu",
                                   weights_only=True)["state_dict"]
            # a fresh module: no trainer attached, so the estimator pickles and clones cleanly
            trained = SignalClassifierModule(**module_args)
        trained.load_state_dict({k: v.cpu() for k, v in state.items()})
        return trained.eval()

    def _data_config(self) -> DataConfig:
        return DataConfig(
            source="arrays", length=self.length, length_policy=self.length_policy,
            window_stride=self.window_stride, normalize=self.normalize,
            val_fraction=self.val_fraction, test_fraction=0.0, balance=self.balance,
            augment=self.augment, batch_size=self.batch_size, num_workers=0, seed=self.seed)

    def _model_settings(self, auto: dict[str, Any], sample_rate: float | None) -> dict[str, Any]:
        """The `DualBranchConfig` fields, as train.py's fill_data_defaults + model_settings
        make them: explicit parameters win over the automatic ones."""
        if self.n_fft is not None:  # an explicit STFT size moves the settings that follow it
            n_freq = self.n_fft // 2 + 1
            auto = {**auto, "hop_length": max(1, self.n_fft // 4),
                    "freq_mask_param": min(auto["freq_mask_param"], n_freq // 4)}
        chosen = {key: auto[key] if getattr(self, key, None) is None else getattr(self, key)
                  for key in ("hidden_size", "num_layers", "patch_size", "cnn_channels",
                              "spectrogram", "n_fft")}
        n_fft = int(chosen["n_fft"])
        n_mels = min(auto["n_mels"], n_fft // 2 + 1)
        n_freq = n_mels if chosen["spectrogram"] == "mel" else n_fft // 2 + 1
        return {
            "branches": self.branches, "fusion": self.fusion, "dropout": float(self.dropout),
            "instance_norm": True, "keep_amplitude": True,
            "time": {
                "hidden_size": int(chosen["hidden_size"]), "num_layers": int(chosen["num_layers"]),
                "patch_size": int(chosen["patch_size"]), "stem": "conv", "pooling": "meanmax",
                "bidirectional": bool(self.bidirectional), "dropout": 0.0,
                "gradient_checkpointing": False, "compile_blocks": False,
                "compile_mode": "default", "wkv_backend": self.wkv_backend,
            },
            "freq": {
                "spectrogram": chosen["spectrogram"], "sample_rate": round(sample_rate or 16000),
                "n_fft": n_fft, "hop_length": int(auto["hop_length"]), "n_mels": n_mels,
                "channels": [int(c) for c in chosen["cnn_channels"]],
                "freq_mask_param": min(auto["freq_mask_param"], max(0, n_freq - 1)),
                "time_mask_param": auto["time_mask_param"],
            },
        }

    def _check_params(self) -> None:
        """What DataConfig and the model do not check themselves (they check the rest)."""
        for name in ("hidden_size", "num_layers", "patch_size", "n_fft", "epochs", "max_steps",
                     "ensemble", "length", "window_stride", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip", "mixup", "dropout", "label_smoothing"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}")
        if self.sample_rate is not None and not (
                isinstance(self.sample_rate, (int, float)) and self.sample_rate > 0):
            raise ValueError(f"sample_rate must be positive Hz or None; got {self.sample_rate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, 2**32 - 1]; got {self.seed!r}")

    # ------------------------------------------------------------------ predict

    def predict_proba(self, X: Any) -> np.ndarray:
        """(n, K) float64 class probabilities, columns in `classes_` order. A record longer
        than the training input length gives the mean of its windows' probabilities, each
        window weighted by the samples it adds (the tail window overlaps the one before)."""
        check_is_fitted(self, "members_")
        signals, _ = _check_signals(X)
        settings = self.preprocessing_
        records = SignalDataset(signals, np.full(len(signals), UNLABELLED, dtype=np.int64),
                                [str(c) for c in self.classes_], None, self.sample_rate,
                                "SignalClassifier.predict(X)")
        inputs = prepare_prediction_inputs(records, settings)
        # its own generator: iterating a loader draws a seed, which would move the caller's RNG
        loader = DataLoader(inputs.items, batch_size=PREDICT_BATCH, generator=torch.Generator())
        on_gpu, precision = resolve_device(self.accelerator, self.precision)
        device = torch.device("cuda" if on_gpu else "cpu")
        probs = torch.stack([_member_probabilities(m, loader, device, precision)
                             for m in self.members_]).mean(0)
        windows = inputs.windows
        rows = aggregate_windows(windows[:, 0], windows[:, 1], inputs.ends, probs.numpy(),
                                 mode="mean")
        return rows.probabilities

    def predict(self, X: Any) -> np.ndarray:
        """(n,) predicted labels, values of `classes_`."""
        proba = self.predict_proba(X)  # first: it checks that the estimator is fitted
        return self.classes_[proba.argmax(1)]

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """(n, K) log of `predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> Path:
        """Write the fitted estimator to `path` (a torch file of plain tensors and
        containers, written whole or not at all); `SignalClassifier.load(path)` reads it."""
        check_is_fitted(self, "members_")
        payload = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "params": {k: _plain(v) for k, v in self.get_params(deep=False).items()},
            "classes": self.classes_.tolist(), "classes_dtype": self.classes_.dtype.str
            if self.classes_.dtype != object else "object",
            "n_features_in": getattr(self, "n_features_in_", None),
            "preprocessing": self.preprocessing_, "max_steps": self.max_steps_,
            "members": [{"hyper_parameters": to_plain(dict(m.hparams)),
                         "state_dict": {k: v.cpu() for k, v in m.state_dict().items()}}
                        for m in self.members_],
        }
        path = Path(path)
        with atomic_open(path, "wb") as f:
            torch.save(payload, f)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SignalClassifier:
        """A fitted estimator from a file `save` wrote, loaded with weights_only=True (no
        code from the file runs)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
            raise ValueError(f"{path} is not a file written by SignalClassifier.save")
        if payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {payload.get('version')}; this code reads "
                             f"version {FORMAT_VERSION}")
        estimator = cls(**payload["params"])
        members = []
        for member in payload["members"]:
            module = SignalClassifierModule(**member["hyper_parameters"])
            module.load_state_dict(member["state_dict"])
            members.append(module.eval())
        dtype = object if payload["classes_dtype"] == "object" else np.dtype(
            payload["classes_dtype"])
        estimator.classes_ = np.asarray(payload["classes"], dtype=dtype)
        if payload["n_features_in"] is not None:
            estimator.n_features_in_ = payload["n_features_in"]
        estimator.preprocessing_ = payload["preprocessing"]
        estimator.max_steps_ = payload["max_steps"]
        estimator.members_ = members
        return estimator


# ---------------------------------------------------------------------- helpers


def resolve_device(accelerator: str, precision: str) -> tuple[bool, str]:
    """(on_gpu, Lightning precision) for an accelerator ("auto", "cpu", "gpu") and precision
    ("auto", "32", "16-mixed", "bf16-mixed" ...), as train.py resolves them."""
    if accelerator not in ("auto", "cpu", "gpu"):
        raise ValueError(f"accelerator must be 'auto', 'cpu' or 'gpu'; got {accelerator!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("accelerator='gpu': no CUDA GPU is visible")
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    precision = PRECISIONS[precision]
    if precision == "auto":
        if not on_gpu:
            return on_gpu, "32-true"
        return on_gpu, "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision == "16-mixed" and not on_gpu:
        raise ValueError("precision='16-mixed' needs a GPU; use 'bf16-mixed' or '32' on CPU")
    return on_gpu, precision


def _plain(value: Any) -> Any:
    """A parameter as Python values (numpy scalars and arrays do not load with
    weights_only=True); lists stay lists and tuples tuples, so loaded params equal saved ones."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _check_signals(X: Any) -> tuple[np.ndarray | list[np.ndarray], bool]:
    """(signals, two_d): a checked (n, T) float array, or a list of n checked 1-D float
    arrays (n 1-D arrays, lists or an object array of them). Finite values, at least one
    sample each, no sparse or complex input; a single 1-D array is refused (ambiguous)."""
    if isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.dtype == object
                                        and X.ndim == 1):
        if len(X) == 0:
            raise ValueError("X holds no signals; expected at least one")
        dims = [np.ndim(s) for s in X]
        if all(d == 0 for d in dims):
            raise ValueError(_one_signal_message(len(X)))
        for i, d in enumerate(dims):
            if d != 1:
                raise ValueError(f"X[{i}] has {d} dimensions; expected a 1-D signal (X: an "
                                 "(n, T) array or a list of 1-D signals)")
        signals = [check_array(s, ensure_2d=False, dtype=(np.float64, np.float32),
                               input_name=f"X[{i}]") for i, s in enumerate(X)]
        return signals, False
    if isinstance(X, np.ndarray) and X.ndim == 1:
        raise ValueError(_one_signal_message(len(X)))
    return check_array(X, dtype=(np.float64, np.float32)), True


def _one_signal_message(n: int) -> str:
    return (f"X is one 1-D array of {n} values; expected an (n, T) array or a list of 1-D "
            "signals. Reshape your data: [X] (or X.reshape(1, -1)) for a single signal")


def _check_targets(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes (K,), codes (n,) int64 indices into classes) of class labels y."""
    if y is None:
        raise ValueError("SignalClassifier requires y to be passed, but the target y is None")
    y = column_or_1d(y, warn=True)
    if y.dtype.kind in "fc":
        assert_all_finite(y, input_name="y")
    check_classification_targets(y)
    if len(y) != n:
        raise ValueError(f"X has {n} signals but y has {len(y)} labels; expected one each")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"y holds one class ({classes[0]!r}); a classifier needs at least two "
                         "classes")
    return classes, codes.astype(np.int64)


def _member_probabilities(module: SignalClassifierModule, loader: DataLoader,
                          device: torch.device, precision: str) -> torch.Tensor:
    """(M, K) float32 probabilities of one model for every input of `loader`, on the CPU;
    the model goes to `device` for the pass and back afterwards."""
    module.to(device)
    try:
        out = []
        dtype = _AUTOCAST.get(precision)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            for i, batch in enumerate(loader):
                batch = [t.to(device) for t in batch]
                out.append(module.predict_step(batch, i).float().cpu())
        return torch.cat(out)
    finally:
        module.cpu()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed every RNG training draws from (as train.py does) and restore the caller's RNG
    states and Lightning's seed variables afterwards."""
    saved = rng_states()
    env = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        pl.seed_everything(seed, workers=True, verbose=False)
        yield
    finally:
        set_rng_states(saved)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Without verbose: Lightning's start-up messages and known harmless warnings hidden."""
    with warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        if verbose:
            yield
            return
        loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch",
                                                        "data", "models")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


__all__ = ["SignalClassifier", "resolve_device"]
