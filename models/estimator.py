"""`SignalClassifier`: the dual-branch classifier as a scikit-learn estimator.

    from models.estimator import SignalClassifier
    clf = SignalClassifier(sample_rate=125).fit(X, y)   # X: (n, T) array or n 1-D arrays
    proba = clf.predict_proba(X_new)                     # (n, K); records of any length
    clf.save("clf.pt"); clf = SignalClassifier.load("clf.pt")

It trains what `train.py` trains, through the same library: its parameters become the option
dataclasses train.py parses (`DataConfig`, `ModelOptions`, `OptimizationOptions`, the ensemble
of `RunOptions`, the device of `HardwareOptions`: `_train_options`), whose defaults are its
defaults and whose checks refuse its bad values; the data pipeline is `InMemoryDataModule` (the
`SignalDataModule` over arrays: length policy, dataset normalisation, augmentation, the
automatic validation split); models.defaults.fill_data_defaults fills what follows the data
(model size, STFT, step budget) and auto_ensemble the ensemble size;
`SignalClassifierModule.from_options` builds each model, and Lightning's Trainer trains it,
with no logger, no run folder and no output unless `verbose`. `predict_proba` prepares new
arrays with the preprocessing stored at fit (input length, the training set's mean and std,
the window stride): a record longer than the training length is cut into windows whose
probabilities are averaged per record (data/aggregate.py).

fit is deterministic for a given `seed` on the CPU (seeded split, initialisation, shuffles,
augmentation and mixup) and leaves the caller's random number generators as it found them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import typing
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
from models.checkpoint import read_checkpoint
from models.defaults import MEMBER_SEED_STEP, auto_ensemble, fill_data_defaults
from models.lightning_module import SignalClassifierModule, rng_states, set_rng_states
from models.options import ModelOptions, OptimizationOptions
from utils.checkpoint_io import atomic_open
from utils.cli import PRECISIONS, HardwareOptions, RunOptions, TrainOptions
from utils.cli import resolve_device as cli_resolve_device
from utils.guards import NonFiniteGuard
from utils.logs import KNOWN_WARNINGS
from utils.metrics import to_plain
from utils.options import SEED_MAX

FORMAT = "rwkv-signal-classifier/SignalClassifier"
FORMAT_VERSION = 1
PREDICT_BATCH = 64
# what differs from train.py's data options: arrays in memory, no test split (the caller holds
# out its own), no loader workers (a few dozen arrays; workers would copy them per epoch)
ARRAY_DATA = {"source": "arrays", "test_fraction": 0.0, "num_workers": 0}
ACCELERATORS = typing.get_args(typing.get_type_hints(HardwareOptions)["accelerator"])
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_QUIET_WARNINGS = (*KNOWN_WARNINGS,
                   r".*Total length of `list` across ranks is zero.*")  # no validation split


def _defaults(cls: type) -> dict[str, Any]:
    """The field defaults of an option dataclass: the estimator's defaults are train.py's."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


_MODEL, _OPTIMIZATION, _DATA, _HARDWARE, _RUN = map(
    _defaults, (ModelOptions, OptimizationOptions, DataConfig, HardwareOptions, RunOptions))
# the estimator's parameters, by the option section they fill (the rest are its own:
# sample_rate, the rate of X rather than DataConfig's resampling rate, and verbose)
MODEL_PARAMS = ("branches", "hidden_size", "num_layers", "patch_size", "cnn_channels",
                "spectrogram", "n_fft", "fusion", "dropout", "bidirectional", "wkv_backend")
DATA_PARAMS = ("length", "length_policy", "window_stride", "normalize", "augment", "balance",
               "val_fraction", "batch_size", "seed")
OPTIMIZATION_PARAMS = ("epochs", "max_steps", "lr", "weight_decay", "mixup", "label_smoothing",
                       "grad_clip")
HARDWARE_PARAMS = ("accelerator", "precision")
RUN_PARAMS = ("ensemble",)


class SignalClassifier(ClassifierMixin, BaseEstimator):
    """Dual-branch (spectrogram CNN + RWKV) classifier of 1-channel signals, sklearn-style.

    X: an (n, T) array, or a list of n 1-D arrays of any lengths (one record each), in the
    same units and at the same `sample_rate` for fit and predict. y: n class labels (any
    hashable values sklearn accepts). groups: n record/subject ids that keep one group out of
    both sides of the internal validation split.

    The parameters are train.py's options of the same names, with train.py's defaults (the
    option dataclasses' fields), and every one left None is chosen from the data as train.py
    chooses it (models/defaults.py): hidden_size, num_layers, patch_size, cnn_channels,
    spectrogram and n_fft from the training items, length and rate; max_steps from the items
    and batch size (unless epochs is given); batch_size a quarter of the items, 4 to 32;
    ensemble 3 models below 1000 training items, else 1; val_fraction 0.1 from 1000 records on,
    else none (the last weights are kept). The options without a parameter here (stem,
    pooling, warmup, monitor ...) keep train.py's defaults.

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
        branches: str = _MODEL["branches"],
        hidden_size: int | None = _MODEL["hidden_size"],
        num_layers: int | None = _MODEL["num_layers"],
        patch_size: int | None = _MODEL["patch_size"],
        cnn_channels: Sequence[int] | None = _MODEL["cnn_channels"],
        spectrogram: str | None = _MODEL["spectrogram"],
        n_fft: int | None = _MODEL["n_fft"],
        fusion: str = _MODEL["fusion"],
        dropout: float = _MODEL["dropout"],
        bidirectional: bool = _MODEL["bidirectional"],
        wkv_backend: str = _MODEL["wkv_backend"],
        sample_rate: float | None = None,
        length: int | None = _DATA["length"],
        length_policy: str = _DATA["length_policy"],
        window_stride: int | None = _DATA["window_stride"],
        normalize: str = _DATA["normalize"],
        augment: bool = _DATA["augment"],
        balance: str = _DATA["balance"],
        val_fraction: float | None = _DATA["val_fraction"],
        epochs: int | None = _OPTIMIZATION["epochs"],
        max_steps: int | None = _OPTIMIZATION["max_steps"],
        batch_size: int | None = _DATA["batch_size"],
        lr: float = _OPTIMIZATION["lr"],
        weight_decay: float = _OPTIMIZATION["weight_decay"],
        mixup: float = _OPTIMIZATION["mixup"],
        label_smoothing: float = _OPTIMIZATION["label_smoothing"],
        grad_clip: float = _OPTIMIZATION["grad_clip"],
        ensemble: int | None = _RUN["ensemble"],
        seed: int = _DATA["seed"],
        accelerator: str = _HARDWARE["accelerator"],
        precision: str = _HARDWARE["precision"],
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
        options = self._train_options()
        on_gpu, precision = resolve_device(options.hardware.accelerator,
                                           options.hardware.precision)
        records = SignalDataset(signals, codes, [str(c) for c in classes], groups,
                                self.sample_rate, "SignalClassifier.fit(X)")
        with _quiet(self.verbose):
            datamodule = InMemoryDataModule(records, options.data)
            datamodule.setup("fit")
            # as train.py's resolve_options: sizes, STFT and step budget from the data
            model, optimization = fill_data_defaults(options.model, options.optimization,
                                                     datamodule)
            # as train.py's choose_ensemble (the estimator is always one process, no resume)
            ensemble = options.run.ensemble or auto_ensemble(len(datamodule.train_dataset))
            if options.seed + MEMBER_SEED_STEP * (ensemble - 1) > SEED_MAX:
                raise ValueError(f"seed {options.seed} is too large for {ensemble} members "
                                 f"(seeds seed + {MEMBER_SEED_STEP} k must stay <= 2**32 - 1)")
            members = [self._fit_member(model, optimization, datamodule,
                                        options.seed + MEMBER_SEED_STEP * k, on_gpu, precision)
                       for k in range(ensemble)]
        self.classes_ = classes
        if two_d:
            self.n_features_in_ = signals.shape[1]
        elif hasattr(self, "n_features_in_"):
            del self.n_features_in_
        self.preprocessing_ = to_plain(datamodule.trained_settings())  # what from_options keeps
        self.max_steps_ = optimization.max_steps
        self.members_ = members
        return self

    def _fit_member(self, model: ModelOptions, optimization: OptimizationOptions,
                    datamodule: InMemoryDataModule, seed: int, on_gpu: bool,
                    precision: str) -> SignalClassifierModule:
        """One model trained with `seed`; returned on the CPU in eval mode, with the best
        weights by optimization.monitor (validation macro-F1) when there is a validation split,
        else the last."""
        validation = datamodule.has_validation
        monitor = optimization.monitor
        with _seeded(seed), tempfile.TemporaryDirectory(prefix="signal-classifier-") as tmp:
            module = SignalClassifierModule.from_options(model, optimization, datamodule)
            best = ModelCheckpoint(dirpath=tmp, monitor=monitor, save_top_k=1,
                                   mode="min" if monitor == "val/loss" else "max")
            trainer = pl.Trainer(
                accelerator="gpu" if on_gpu else "cpu", devices=1, precision=precision,
                max_epochs=optimization.epochs if optimization.max_steps is None else -1,
                max_steps=optimization.max_steps or -1,
                gradient_clip_val=optimization.grad_clip or None,
                accumulate_grad_batches=optimization.accumulate,
                logger=False, default_root_dir=tmp, enable_checkpointing=validation,
                callbacks=[NonFiniteGuard(hint=f"; lower lr (now {optimization.lr:g}) or "
                                          "check X"), *([best] if validation else [])],
                enable_progress_bar=self.verbose, enable_model_summary=self.verbose,
                num_sanity_val_steps=0, log_every_n_steps=1,
            )
            trainer.fit(module, datamodule=datamodule)
            state = module.state_dict()
            if validation and best.best_model_path:
                state = read_checkpoint(best.best_model_path)["state_dict"]
            # a fresh module: no trainer attached, so the estimator pickles and clones cleanly
            trained = SignalClassifierModule.from_options(model, optimization, datamodule)
        trained.load_state_dict({k: v.cpu() for k, v in state.items()})
        return trained.eval()

    def _train_options(self) -> TrainOptions:
        """The train.py options these parameters are (data, model, optimization, hardware and
        the ensemble), automatic values still None; the dataclasses check the values as they
        check train.py's flags (ValueError 'NAME: expected ...')."""
        params = {key: _plain(value) for key, value in self.get_params(deep=False).items()}
        if params["sample_rate"] is not None and not (
                isinstance(params["sample_rate"], (int, float)) and params["sample_rate"] > 0
                and math.isfinite(params["sample_rate"])):
            raise ValueError(f"sample_rate must be positive Hz or None; got {self.sample_rate!r}")

        def section(cls: type, names: tuple[str, ...], **fixed: Any) -> Any:
            return cls(**{name: params[name] for name in names}, **fixed)

        return TrainOptions(
            data=section(DataConfig, DATA_PARAMS, **ARRAY_DATA),
            model=section(ModelOptions, MODEL_PARAMS),
            optimization=section(OptimizationOptions, OPTIMIZATION_PARAMS),
            hardware=section(HardwareOptions, HARDWARE_PARAMS),
            run=section(RunOptions, RUN_PARAMS),
        )

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
    ("auto", "32", "16-mixed", "bf16-mixed" ...): train.py's utils.cli.resolve_device, with the
    values checked here (train.py's command line checks them before)."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}; got {accelerator!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    return cli_resolve_device(accelerator, precision)


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
