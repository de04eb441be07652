"""Set-up checks: everything about a run that can be known before training, checked before the
run folder is written, each failure one line that says what to change.

- `check_devices`: --devices that exist (GPUs on this host; on the CPU, no more processes
  than cores: each CPU "device" is a training process).
- `check_memory_for_length`: an explicit --length whose raw batch (or built-in dataset)
  cannot fit in memory, refused before anything is allocated.
- `check_model_for_data`: inputs shorter than the model's minimum length
  (`DualBranchClassifier.min_length`), and an estimate of the training activations (measured
  on a throwaway copy of the model at two short lengths, extrapolated) against free memory.
- `check_steps_per_process`: a split that gives no process a full batch (zero steps).
- `check_informative_signals`: training records that normalisation turns into zeros.

Option problems raise `ConfigError`, data problems `DataError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.formats import DataError
from models.dual_branch import DualBranchClassifier, DualBranchConfig
from models.wkv import backend_choices_unlogged
from utils.options import ConfigError

log = logging.getLogger(__name__)

GiB = 2**30
FLAT_STD = 1e-6  # the std floor of the normalisers: a signal below it becomes zeros
_PROBE_LENGTH = 2048  # samples; long enough that per-sample activations dominate
_FLAT_SCAN_SAMPLES = 1 << 26  # stop scanning for flat records after this many samples
# Backward holds the gradients of the activations it is working on beside what forward saved:
# a 2,000,000-sample CPU run (batch 8, the data-following model) peaked at 1.29x the saved
# bytes the probe measures.
_BACKWARD_FACTOR = 1.3


# ---------------------------------------------------------------------------------- devices


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the whole host)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_devices(devices: int | str, on_gpu: bool) -> None:
    """Refuse a --devices value this host cannot provide: GPU ids or a GPU count beyond the
    visible GPUs, or on the CPU more training processes than cores (each would get a sliver of
    the CPU, and of the data: ranks without a full batch train zero steps)."""
    if devices in ("auto", -1, "-1"):
        return
    ids = ([int(d) for d in devices.split(",") if d] if isinstance(devices, str) else None)
    if on_gpu:
        visible = torch.cuda.device_count()
        if ids is not None:
            missing = [i for i in ids if i >= visible]
            if missing:
                raise ConfigError(f"--devices {devices}: there is no GPU {missing[0]}; this "
                                  f"host has {visible} (ids 0..{visible - 1})")
        elif int(devices) > visible:
            raise ConfigError(f"--devices {devices}: this host has {visible} GPU(s); pass "
                              f"--devices {visible} or fewer (--num-nodes adds hosts)")
        return
    if ids is not None:
        raise ConfigError(f"--devices {devices}: GPU ids need a GPU (--accelerator gpu); on the "
                          "CPU pass a number of processes")
    cores = cpu_cores()
    if int(devices) > cores:
        raise ConfigError(f"--devices {devices}: on the CPU every device is a training process "
                          f"and this machine has {cores} CPU core(s); pass --devices {cores} or "
                          "fewer")


# ---------------------------------------------------------------------------------- memory


def _cgroup_free_bytes() -> int | None:
    """Memory left under this process's cgroup v2 limit (containers), or None."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_memory_bytes(on_gpu: bool = False) -> int | None:
    """Free memory for training: the first GPU's free memory, or the host's available RAM
    (MemAvailable, capped by a cgroup limit); None where it cannot be read."""
    if on_gpu:
        try:
            return int(torch.cuda.mem_get_info()[0])
        except (RuntimeError, AssertionError):
            return None
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = None
    limit = _cgroup_free_bytes()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _gib(n: float) -> str:
    return f"{n / GiB:.3g} GiB" if n >= GiB / 10 else f"{n / 2**20:.3g} MiB"


def check_memory_for_length(length: int | None, batch_size: int,
                            synthetic_signals: int | None) -> None:
    """Before anything is read: an explicit --length whose float32 batch (or, for the built-in
    dataset, whose N signals of that length) cannot fit in host memory."""
    if length is None:
        return
    available = available_memory_bytes(on_gpu=False)
    if available is None:
        return
    # a batch exists twice at once (the items and the collated tensor)
    needed = 2 * batch_size * length * 4
    what = f"a batch of {batch_size} inputs"
    if synthetic_signals is not None:
        # generation holds the signals and a noise array of the same size
        needed = max(needed, 2 * synthetic_signals * length * 4)
        what = f"the built-in dataset ({synthetic_signals} signals)"
    if needed > available:
        raise ConfigError(f"--length {length}: {what} of {length} samples needs at least "
                          f"{_gib(needed)} of memory, but {_gib(available)} is available; pass "
                          "a smaller --length (or --batch-size)")


def _saved_tensor_bytes(model: torch.nn.Module, length: int) -> int:
    """Bytes autograd keeps for backward in one training forward of a (2, length) batch
    (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(2, length)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(sizes.values())


def training_memory_bytes(model: DualBranchClassifier, length: int, batch_size: int,
                          mixed_precision: bool = False) -> int:
    """Estimated memory of one training step at (batch_size, length): the activations autograd
    saves (measured at two short lengths and extrapolated linearly: both branches' activations
    grow linearly with T) with backward's share on top, weights, gradients and AdamW's two
    moments, and the input batch."""
    short = max(_PROBE_LENGTH, model.min_length)
    model.train()
    if length <= 2 * short:
        per_pair = _saved_tensor_bytes(model, length)
    else:
        a, b = _saved_tensor_bytes(model, short), _saved_tensor_bytes(model, 2 * short)
        slope = max(0.0, (b - a) / short)
        per_pair = max(a, a + slope * (length - short))
    activations = (per_pair * batch_size / 2 * _BACKWARD_FACTOR
                   * (0.5 if mixed_precision else 1.0))
    weights = 4 * 4 * sum(p.numel() for p in model.parameters())
    return int(activations + weights + 2 * batch_size * length * 4)


def _probe_model(settings: Mapping[str, Any], num_classes: int) -> DualBranchClassifier:
    """A throwaway copy of the model the settings describe, eager and on the CPU, built
    without touching the global RNG (the run's seeded streams stay as they are)."""
    config = DualBranchConfig.from_dict({**settings, "num_classes": num_classes})
    backend = config.time.wkv_backend
    config.time = dataclasses.replace(config.time, compile_blocks=False,
                                      wkv_backend="auto" if backend == "cuda" else backend)
    with torch.random.fork_rng(devices=[]):
        return DualBranchClassifier(config)


def check_model_for_data(settings: Mapping[str, Any], num_classes: int, length: int,
                         length_source: str, batch_size: int, on_gpu: bool, precision: str,
                         processes_per_host: int = 1) -> None:
    """Refuse inputs the model cannot take, or a training step that cannot fit in memory.

    settings: the `DualBranchConfig` fields as a dict (as `SignalClassifierModule` takes
    them); length: the model input L; length_source: where L came from, for the message.
    """
    model = _probe_model(settings, num_classes)
    if length < model.min_length:
        # min_length is the model's own statement (e.g. an STFT window it cannot pad), so the
        # check follows however the model's settings are chosen
        raise ConfigError(
            f"the model inputs are {length} samples ({length_source}) but the model takes at "
            f"least {model.min_length} (DualBranchClassifier.min_length); pass a --length of "
            f"at least {model.min_length}, or model options with a shorter window (--n-fft "
            f"{2 ** int(math.log2(length)) if length >= 2 else 2} or less), or --branches time")
    available = available_memory_bytes(on_gpu)
    if available is None:
        return
    # the probe runs on the CPU: its "WKV backend: cpu" line would be wrong for a GPU run
    unlogged = backend_choices_unlogged() if on_gpu else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[]), unlogged:
            needed = training_memory_bytes(model, length, batch_size,
                                           mixed_precision="mixed" in precision)
    except (RuntimeError, ValueError) as exc:  # the probe is advisory: the run itself will tell
        log.debug("training memory estimate skipped: %s", exc)
        return
    needed *= 1 if on_gpu else processes_per_host  # CPU processes share the host's memory
    if needed > available:
        where = "on the GPU" if on_gpu else "in RAM"
        raise ConfigError(
            f"a training step on inputs of {length} samples ({length_source}) with --batch-size "
            f"{batch_size} needs about {_gib(needed)} {where}, but {_gib(available)} is "
            "available; pass a smaller --length (--length-policy crop or window cuts long "
            "records) or --batch-size, or --gradient-checkpointing")


# ---------------------------------------------------------------------------------- data


def check_steps_per_process(train_items: int, batch_size: int, world_size: int) -> None:
    """Refuse a split that gives no process a full training batch: with the last incomplete
    batch dropped (train_dataloader's drop_last), such a run would train zero steps."""
    if world_size <= 1 or train_items <= batch_size:
        return  # one process always gets a batch; drop_last is off for a single short batch
    per_process = math.ceil(train_items / world_size)
    if per_process < batch_size:
        raise ConfigError(f"{train_items} training items over {world_size} processes leave "
                          f"{per_process} per process, less than --batch-size {batch_size}: no "
                          "process gets a full batch, so no step would be trained; pass a "
                          f"--batch-size of at most {per_process} or fewer --devices")


def _refuse_one_value(signals: Sequence[np.ndarray] | np.ndarray, records: np.ndarray,
                      normalize: str, source: str) -> None:
    """Under --normalize dataset or none constant records of different levels still differ,
    but training records that all hold one and the same value make every input identical
    (zeros, for 'dataset'). Stops at the first record that varies or differs in level."""
    value = None
    for record in np.unique(records):
        signal = np.asarray(signals[record], dtype=np.float64)
        low, high = float(signal.min()), float(signal.max())
        if high - low > FLAT_STD or (value is not None and abs(low - value) > FLAT_STD):
            return
        value = low if value is None else value
    raise DataError(source, "signals", f"all {len(np.unique(records))} training records hold "
                                       f"the one value {value:g}, so every input is the same "
                                       f"under --normalize {normalize}; expected signals that "
                                       "vary")


def check_informative_signals(signals: Sequence[np.ndarray] | np.ndarray,
                              records: np.ndarray, length: int, normalize: str,
                              source: str) -> None:
    """Refuse training data that normalisation turns into all-zero inputs, and report flat
    (constant) training records: z-normalisation maps a signal whose std is at most 1e-6 to
    zeros, so such records carry no information (their level is erased).

    signals: the records; records: the training record indices; length: the input length L.
    """
    if normalize not in ("window", "record"):
        _refuse_one_value(signals, records, normalize, source)
        return  # 'none' and 'dataset' keep each record's level
    if normalize == "window" and length < 2:
        raise DataError(source, "length", f"model inputs of {length} sample are all zeros after "
                                          "per-window z-normalisation; expected --length of at "
                                          "least 2, or --normalize dataset or none")
    flat = checked = samples = 0
    informative = False
    for record in np.unique(records):
        signal = np.asarray(signals[record], dtype=np.float64)
        checked += 1
        samples += len(signal)
        if len(signal) < 2 or signal.std() <= FLAT_STD:
            flat += 1
        else:
            informative = True
        if informative and samples >= _FLAT_SCAN_SAMPLES:
            break  # a bounded scan: enough to know the data is not all flat
    if not informative:
        raise DataError(source, "signals", f"all {checked} training records are constant (std "
                                           f"<= {FLAT_STD:g}), so --normalize {normalize} turns "
                                           "every input into zeros; expected signals that vary, "
                                           "or --normalize dataset or none to keep their levels")
    if flat:
        log.warning("%s: %d of %d training records checked are constant (std <= %g); "
                    "--normalize %s turns them into all-zero inputs", source, flat, checked,
                    FLAT_STD, normalize)


# ---------------------------------------------------------------------------------- train.py


def check_options(options: Any, on_gpu: bool) -> None:
    """train.py's checks of its options (`utils.cli.TrainOptions`) before anything is read or
    written: --output-dir and --name, --devices, and an explicit --length against memory."""
    from utils.run_dir import check_output_dir

    data = options.data
    check_output_dir(options.run.output_dir, options.run.name)
    check_devices(options.hardware.devices, on_gpu)
    # an unset --batch-size follows the data: the lower bound takes one input
    check_memory_for_length(data.length, data.batch_size or 1,
                            data.synthetic_num_signals if data.source == "synthetic" else None)


def check_before_training(options: Any, datamodule: Any, settings: Mapping[str, Any],
                          batch_size: int, on_gpu: bool, precision: str) -> None:
    """train.py's checks once the data is set up and before the run folder is claimed: the
    training inputs carry information, the model takes inputs of their length, and a training
    step fits in memory. options: `utils.cli.TrainOptions`; settings: the model's
    `DualBranchConfig` fields; batch_size: the batch in use (the option, or the one that
    follows the data)."""
    data = options.data
    train = datamodule.train_dataset
    length = datamodule.signal_length
    check_informative_signals(train.signals, train.items[:, 0], length, data.normalize,
                              str(data.source))
    if data.length is not None:
        length_source = f"--length {data.length}"
    else:
        which = "longest" if data.length_policy == "pad" else "shortest"
        length_source = f"the {which} training record, --length-policy {data.length_policy}"
    devices = options.hardware.devices
    processes = int(devices) if str(devices).isdigit() and not on_gpu else 1
    check_model_for_data(settings, datamodule.num_classes, length, length_source,
                         batch_size, on_gpu, precision, processes)
