"""Tests for train.py: the CLI end to end (TensorBoard tags, checkpoints, results), exact
resume, prediction to CSV, YAML configs, and one-line errors for bad options."""

from __future__ import annotations

import csv
import errno
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pytorch_lightning.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from data.synthetic import SyntheticConfig, make_synthetic
from data.transforms import fit_length
from models.checkpoint import load_checkpoint
from models.lightning_module import WarmupCosine
from utils.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
# A model and dataset small enough for seconds per epoch on two CPU cores.
TINY = ["--synthetic-signals", "140", "--length", "512", "--batch-size", "16",
        "--hidden-size", "16", "--num-layers", "1", "--cnn-channels", "4", "8",
        "--n-fft", "64", "--hop-length", "32", "--n-mels", "16", "--no-progress-bar",
        "--val-fraction", "0.15", "--ensemble", "1"]


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny end-to-end run of `python train.py` in a temporary folder."""
    cwd = tmp_path_factory.mktemp("cli")
    result = run_cli([*TINY, "--epochs", "2", "--memory-log-every", "1"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "runs" / "dual_branch" / "version_0", result


def test_cli_end_to_end_writes_logs_checkpoints_and_results(cli_run) -> None:
    run_dir, result = cli_run
    assert "Test results:" in result.stdout and "macro avg" in result.stdout

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0,
                                                           "tensors": 0})
    events.Reload()
    tags = events.Tags()
    expected_scalars = {
        "train/loss_step", "train/loss_epoch", "train/acc", "train/samples_per_s",
        "val/loss", "val/acc", "val/balanced_acc", "val/macro_f1", "val/kappa",
        "val/samples_per_s", "test/loss", "test/acc", "test/balanced_acc", "test/macro_f1",
        "test/kappa", "test/samples_per_s", "lr/pg1", "memory/host_rss_mib",
        "throughput/samples_per_s", "throughput/step_ms", "throughput/data_wait_fraction",
    }
    assert expected_scalars <= set(tags["scalars"])
    assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(tags["images"])
    assert "test/classification_report/text_summary" in tags["tensors"]
    # one validation point per epoch, and a real PNG behind the image tag
    assert len(events.Scalars("val/acc")) == 2
    image = events.Images("test/confusion_matrix")[-1]
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100
    # the lr follows warmup + cosine per step: 98 training signals / 16 = 6 steps per epoch
    schedule = WarmupCosine(total_steps=12, warmup_steps=1, min_ratio=0.01)
    lrs = events.Scalars("lr/pg1")  # logged every log_every_n_steps = 6 steps
    assert [p.step for p in lrs] == [5, 11]
    for point in lrs:
        assert point.value == pytest.approx(2e-3 * schedule(point.step), rel=1e-5)

    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("best-epoch=") for name in checkpoints)

    results = json.loads((run_dir / "test_metrics.json").read_text())
    cm = np.array(results["confusion_matrix"])
    assert cm.sum() == 21  # 15 % of 140 signals held out for test
    assert results["metrics"]["test/acc"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-6)
    assert results["report"]["accuracy"] == pytest.approx(results["metrics"]["test/acc"],
                                                          abs=1e-6)
    assert results["class_names"] == list(SyntheticConfig.classes)
    assert results["effective_batch_size"] == 16 and results["world_size"] == 1
    assert (run_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "macro avg" in (run_dir / "classification_report.txt").read_text()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 16 and config["model"]["cnn_channels"] == [4, 8]
    assert results["options"] == config
    # hparams.yaml holds plain data only (no !!python/tuple)
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["aug_scale"] is None and hparams["model"]["time"]["hidden_size"] == 16
    # the final test metrics beside the options, for TensorBoard's HParams tab
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    sessions = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
    experiment = next(s.experiment for s in sessions if s.HasField("experiment"))
    assert "test/acc" in {m.name.tag for m in experiment.metric_infos}
    start = next(s.session_start_info for s in sessions if s.HasField("session_start_info"))
    assert start.hparams["data.length"].number_value == 512
    assert start.hparams["model.branches"].string_value == "both"
    test_acc = [e.value for e in events.Scalars("test/acc")]
    assert test_acc[-1] == pytest.approx(results["metrics"]["test/acc"], abs=1e-6)


def test_predict_writes_probabilities_per_window(cli_run, tmp_path) -> None:
    run_dir, _ = cli_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    # 3 new signals of 1100 samples: windows of 512 at 0 and 512, plus one ending at 1100
    signals = make_synthetic(SyntheticConfig(num_signals=7, length=1100, seed=5)).subset(
        np.arange(3))
    names = np.array(signals.class_names)
    np.savez(tmp_path / "new.npz", X=signals.signals, y=names[signals.labels], fs=125.0)
    output = tmp_path / "out" / "probs.csv"
    code = train.main(["predict", "--checkpoint", str(checkpoint), "--data",
                       str(tmp_path / "new.npz"), "--output", str(output), "--aggregate", "none"])
    assert code == 0
    with open(output) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(r["windows"] == "1" for r in rows)
    # the rate is known (125 Hz): times in seconds
    assert [(r["record"], round(float(r["start_s"]) * 125), round(float(r["end_s"]) * 125))
            for r in rows[:3]] == [("0", 0, 512), ("0", 512, 1024), ("0", 588, 1100)]
    probs = np.array([[float(r[f"p_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert [r["predicted"] for r in rows] == list(names[probs.argmax(1)])
    assert rows[0]["label"] == names[signals.labels[0]]

    module = load_checkpoint(checkpoint)  # weights_only=True inside
    mean, std = module.hparams.data["dataset_stats"]  # the training set's
    x = torch.from_numpy((signals.signals[0, 588:1100] - mean) / std).float()[None]
    with torch.no_grad():
        expected = torch.softmax(module(x), -1)[0].numpy()
    np.testing.assert_allclose(probs[2], expected, atol=1e-5)


def test_predict_aggregates_windows_per_record(cli_run, tmp_path) -> None:
    run_dir, _ = cli_run
    # 2 records: 1100 samples (windows at 0, 512 and 588) and 400 (one padded input)
    rng = np.random.default_rng(7)
    signals = [rng.standard_normal(n).astype(np.float32) for n in (1100, 400)]
    np.savez(tmp_path / "new.npz", X=np.concatenate(signals), lengths=[1100, 400], fs=125.0,
             ids=np.array(["rec_a", "rec_b"]))

    def rows(aggregate: str) -> list[dict]:
        output = tmp_path / f"{aggregate}.csv"
        assert train.main(["predict", "--checkpoint", str(run_dir), "--data",
                           str(tmp_path / "new.npz"), "--output", str(output),
                           "--aggregate", aggregate]) == 0
        with open(output) as f:
            return list(csv.DictReader(f))

    names = list(SyntheticConfig.classes)
    windows, mean, vote = rows("none"), rows("mean"), rows("vote")
    probs = np.array([[float(r[f"p_{n}"]) for n in names] for r in windows])
    assert [r["record"] for r in windows] == ["rec_a"] * 3 + ["rec_b"]  # ids from the file
    assert [(r["record"], r["index"], r["windows"]) for r in mean] == [("rec_a", "0", "3"),
                                                                      ("rec_b", "1", "1")]
    assert float(mean[0]["start_s"]) == 0 and float(mean[0]["end_s"]) == pytest.approx(8.8)
    # the tail window [588, 1100) adds only its 76 new samples: no duplicated coverage
    expected = (512 * probs[0] + 512 * probs[1] + 76 * probs[2]) / 1100
    got = np.array([[float(r[f"p_{n}"]) for n in names] for r in mean])
    np.testing.assert_allclose(got[0], expected, atol=2e-6)
    np.testing.assert_allclose(got[1], probs[3], atol=2e-6)
    assert mean[0]["predicted"] == names[int(expected.argmax())]
    votes = np.zeros(len(names))
    for weight, p in zip((512, 512, 76), probs[:3], strict=True):
        votes[p.argmax()] += weight
    winners = np.flatnonzero(votes == votes.max())
    assert vote[0]["predicted"] == names[winners[np.argmax(expected[winners])]]


def write_unlabelled_npz(path: Path, signals: list[np.ndarray]) -> None:
    np.savez(path, X=np.concatenate(signals), lengths=[len(s) for s in signals], fs=125.0)


def write_unlabelled_csv(path: Path, signals: list[np.ndarray]) -> None:
    width = max(len(s) for s in signals)  # shorter rows end in empty cells
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"t{j}" for j in range(width)])  # a header without a label column
        writer.writerows([[repr(float(v)) for v in s] + [""] * (width - len(s))
                          for s in signals])


def write_unlabelled_ts(path: Path, signals: list[np.ndarray]) -> None:
    lines = ["@problemName New", "@timeStamps false", "@univariate true",
             "@equalLength false", "@classLabel false", "@data"]
    lines += [",".join(repr(float(v)) for v in s) for s in signals]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("writer", [write_unlabelled_npz, write_unlabelled_csv,
                                    write_unlabelled_ts])
def test_predict_on_files_without_labels(writer, cli_run, tmp_path) -> None:
    run_dir, _ = cli_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    # new recordings at the training rate (125 Hz), L = 512: windows at 0 and 88; one; padded
    rng = np.random.default_rng(11)
    signals = [rng.standard_normal(n).astype(np.float32) for n in (600, 512, 300)]
    suffix = {write_unlabelled_npz: ".npz", write_unlabelled_csv: ".csv",
              write_unlabelled_ts: ".ts"}[writer]
    data = tmp_path / f"new{suffix}"
    writer(data, signals)
    output = tmp_path / "probs.csv"
    code = train.main(["predict", "--checkpoint", str(checkpoint), "--data", str(data),
                       "--output", str(output), "--aggregate", "none"])
    assert code == 0
    with open(output) as f:
        rows = list(csv.DictReader(f))
    names = list(SyntheticConfig.classes)
    rate = 125.0 if suffix == ".npz" else None  # only the .npz states its rate
    times = ["start_s", "end_s"] if rate else ["start", "end"]
    assert list(rows[0]) == ["record", "index", "group", *times, "windows", "label",
                             "predicted", *[f"p_{n}" for n in names]]
    for r in rows:
        r["start"], r["end"] = (str(round(float(r[t]) * (rate or 1))) for t in times)
    assert [(r["record"], r["start"], r["end"]) for r in rows] == [
        ("0", "0", "512"), ("0", "88", "600"), ("1", "0", "512"), ("2", "0", "300")]
    assert all(r["label"] == "" for r in rows)  # unknown: left empty
    probs = np.array([[float(r[f"p_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert [r["predicted"] for r in rows] == [names[i] for i in probs.argmax(1)]

    module = load_checkpoint(checkpoint)
    mean, std = module.hparams.data["dataset_stats"]
    windows = [(signals[int(r["record"])][int(r["start"]):int(r["end"])] - mean) / std
               for r in rows]
    x = torch.stack([torch.from_numpy(fit_length(w.astype(np.float32), 512)) for w in windows])
    lengths = torch.tensor([len(w) for w in windows])
    with torch.no_grad():
        expected = torch.softmax(module(x, lengths), -1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


@pytest.mark.parametrize(("writer", "message"), [
    (write_unlabelled_npz, "new.npz [y]: is missing"),
    (write_unlabelled_csv, "new.csv [label]: holds non-integer numbers"),
    (write_unlabelled_ts, "new.ts [@classLabel]: is missing or false; expected class labels"),
])
def test_training_on_a_file_without_labels_fails_clearly(writer, message, tmp_path,
                                                         capsys) -> None:
    suffix = message.split(" ")[0].split(".")[1]
    data = tmp_path / f"new.{suffix}"
    rng = np.random.default_rng(3)
    writer(data, [rng.standard_normal(600).astype(np.float32) for _ in range(20)])
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", str(data), "--output-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and message in err[-1], err
    with pytest.raises(SystemExit):  # asking the reader for optional labels is refused too
        train.main([*TINY, "--data", str(data), "--reader-option", "labels=optional",
                    "--output-dir", str(tmp_path / "runs")])
    assert "training needs labelled data" in capsys.readouterr().err


def test_test_command_evaluates_a_checkpoint_on_labelled_data(cli_run, tmp_path,
                                                              capsys) -> None:
    run_dir, _ = cli_run
    signals = make_synthetic(SyntheticConfig(num_signals=14, length=512, seed=9))
    names = np.array(signals.class_names)
    np.savez(tmp_path / "labelled.npz", X=signals.signals, y=names[signals.labels], fs=125.0)
    runs = tmp_path / "runs"
    code = train.main(["test", "--checkpoint", str(run_dir), "--data",
                       str(tmp_path / "labelled.npz"), "--output-dir", str(runs)])
    assert code == 0
    folder = runs / "test" / "version_0"
    results = json.loads((folder / "test_metrics.json").read_text())
    with open(folder / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14 and [r["label"] for r in rows] == list(names[signals.labels])
    correct = np.mean([r["label"] == r["predicted"] for r in rows])
    assert results["metrics"]["test/acc"] == pytest.approx(correct)
    cm = np.array(results["confusion_matrix"])
    assert cm.sum() == 14 and np.trace(cm) == round(14 * correct)
    assert results["checkpoints"][0].endswith(".ckpt") and results["aggregate"] == "mean"
    assert (folder / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "macro avg" in (folder / "classification_report.txt").read_text()
    assert "Test results:" in capsys.readouterr().out
    # a file without labels cannot be tested: refused in one line, no folder left
    write_unlabelled_npz(tmp_path / "new.npz", [np.ones(512, dtype=np.float32)])
    with pytest.raises(SystemExit) as exit_info:
        train.main(["test", "--checkpoint", str(run_dir), "--data", str(tmp_path / "new.npz"),
                    "--output-dir", str(runs)])
    assert "new.npz [y]: is missing" in _one_line_error(capsys, 2, exit_info)
    assert not (runs / "test" / "version_1").exists()


def test_csv_logger_records_metrics_and_plain_hparams(tmp_path) -> None:
    result = run_cli([*TINY, "--max-steps", "2", "--logger", "csv"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "runs" / "dual_branch" / "version_0"
    results = json.loads((folder / "test_metrics.json").read_text())
    with open(folder / "metrics.csv") as f:
        logged = [r["test/acc"] for r in csv.DictReader(f) if r.get("test/acc")]
    assert float(logged[-1]) == pytest.approx(results["metrics"]["test/acc"], abs=1e-6)
    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert hparams["data.length"] == 512 and hparams["aug_scale"] is None
    assert (folder / "checkpoints" / "last.ckpt").is_file()


class StopAfterEpochs(Callback):
    """Stops a run after `epochs` epochs, as if it had been killed right after the
    checkpoint at that epoch's end."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.mark.parametrize("ema", ["0", "0.3"])
def test_resume_continues_exactly(tmp_path, ema) -> None:
    # dropout, SpecAugment and augmentation on: the RNG streams must continue exactly too;
    # with --ema the averaged weights and the training weights both continue
    common = [*TINY, "--synthetic-signals", "112", "--epochs", "3", "--patience", "0",
              "--rwkv-dropout", "0.1", "--dropout", "0.2", "--ema", ema]
    full = tmp_path / "full"
    part = tmp_path / "part"
    train.main([*common, "--output-dir", str(full)])
    train.main([*common, "--output-dir", str(part)], extra_callbacks=[StopAfterEpochs(1)])
    stopped = torch.load(part / "dual_branch/version_0/checkpoints/last.ckpt",
                         weights_only=True)
    steps_per_epoch = stopped["global_step"]
    assert stopped["epoch"] == 0 and steps_per_epoch == 78 // 16  # 112 - 17 val - 17 test
    train.main([*common, "--output-dir", str(part), "--resume", "last"])

    a = torch.load(full / "dual_branch/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(part / "dual_branch/version_0/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 * steps_per_epoch
    states = ["state_dict"] + (["current_model_state"] if ema != "0" else [])
    assert ("current_model_state" in a) == (ema != "0")
    for state in states:
        for key, value in a[state].items():
            torch.testing.assert_close(b[state][key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, state=state, key=key: f"{state} {key}: {m}")
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(),
                      b["optimizer_states"][0]["state"].values(), strict=True):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    ra = json.loads((full / "dual_branch/version_0/test_metrics.json").read_text())
    rb = json.loads((part / "dual_branch/version_0/test_metrics.json").read_text())
    for key, value in ra["metrics"].items():
        if key != "test/samples_per_s":
            assert rb["metrics"][key] == pytest.approx(value, abs=1e-5), key
    # the resumed run kept writing into the same run folder
    assert not (part / "dual_branch" / "version_1").exists()


def test_max_steps_may_stop_mid_epoch(tmp_path) -> None:
    # 98 training signals / 16 = 6 steps per epoch: 3 steps end the run before any validation,
    # which early stopping and the best checkpoint must survive
    result = run_cli([*TINY, "--max-steps", "3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "none (no validation ran): tested the last weights" in result.stdout
    last = torch.load(tmp_path / "runs/dual_branch/version_0/checkpoints/last.ckpt",
                      weights_only=True)
    assert last["global_step"] == 3
    # resuming that mid-epoch checkpoint: no epoch start hook runs for the rest of the epoch
    result = run_cli([*TINY, "--max-steps", "8", "--resume", "last"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "epoch 2/" in result.stdout


def test_help_is_complete(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--data", "--test-data", "--format", "--length", "--sample-rate",
                   "--branches", "--hidden-size", "--num-layers", "--precision",
                   "--gradient-checkpointing", "--batch-size", "--epochs", "--max-steps",
                   "--lr", "--devices", "--strategy", "--num-nodes", "--seed", "--output-dir",
                   "--resume", "predict"):
        assert option in text, option
    with pytest.raises(SystemExit):
        train.main(["predict", "--help"])
    text = capsys.readouterr().out
    assert "--checkpoint" in text and "--output" in text


def _config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # lone surrogates: raw bytes
    return str(path)


BAD_OPTIONS = [
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1; got 0"),
    (["--lr", "-1"], "--lr: expected a positive finite number; got -1.0"),
    (["--epochs", "two"], "--epochs: expected an integer >= 1; got 'two'"),
    (["--branches", "spectral"], "invalid choice: 'spectral'"),
    (["--compile-mode", "fast"], "invalid choice: 'fast'"),
    (["--config", "CONFIG:model: {compile_mode: fast}"], "invalid choice: 'fast'"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "--val-fraction + --test-fraction"),
    (["--data", "no/such/file.npz"], "--data: no/such/file.npz does not exist"),
    (["--resume", "missing.ckpt"], "--resume: no checkpoint file missing.ckpt"),
    (["--precision", "16-mixed", "--accelerator", "cpu"], "16-mixed needs a GPU"),
    (["--sync-batchnorm", "--accelerator", "cpu"], "--sync-batchnorm needs GPUs"),
    (["--resume", "last"], "--resume last: no last.ckpt under"),
    (["--n-fft", "32", "--hop-length", "64"], "hop_length <= n_fft"),
    (["--config", "CONFIG:batch_sise: 3"], "unknown option 'batch_sise' (did you mean "
                                           "'data.batch_size'?)"),
    (["--config", "CONFIG:data: {augment: 3}"], "data.augment: expected true or false; got 3"),
    (["--batch-sise", "3"], "unknown option --batch-sise (did you mean --batch-size?)"),
    (["--logger", "mlflow"] if importlib.util.find_spec("mlflow") is None
     else ["--logger", "nope"], "--logger"),
    (["--config", "CONFIG:lr: [1, 2"], "is not valid YAML"),
    (["--config", "CONFIG:\udcff\udcfebad"], "is not UTF-8 text (byte 0)"),
    (["--config"], "argument --config: expected one argument (see train.py --help)"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295]; got -1"),
    (["--seed", "4294967296"], "--seed: expected an integer in [0, 4294967295]; got 4294967296"),
    (["--lr", "inf"], "--lr: expected a positive finite number; got inf"),
    (["--sample-rate", "inf"], "--sample-rate: expected a positive finite number; got inf"),
    (["--name", "../../x"], "--name: expected a plain folder name inside --output-dir"),
    (["--name", "/tmp/x"], "--name: expected a plain folder name inside --output-dir"),
    (["--reader-option", "window_seconds=[1"], "window_seconds='[1' is not a valid YAML value"),
    (["--reader-option", "x=!!python/object/apply:os.system [echo]"],
     "YAML tags like '!!python/...' are not allowed"),
    (["--devices", "100000"], "--devices 100000: "),
    (["--length", "100000000000"], "--length 100000000000: the built-in dataset (70 signals) "
                                   "of 100000000000 samples needs at least"),
    (["--length", "1e11"], "--length: expected an integer >= 1; got '1e11' (write the integer "
                           "without an exponent or a point: 100000000000)"),
    (["predict", "--checkpoint", "x.ckpt"], "the following arguments are required: --data"),
    (["predict", "--checkpoint", "x.ckpt", "--data", "x.npz", "--precision", "16-mixed",
      "--accelerator", "cpu"], "--precision 16-mixed needs a GPU"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS)
def test_bad_options_give_one_line_errors(argv, message, tmp_path, capsys,
                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [_config_file(tmp_path, a[len("CONFIG:"):]) if a.startswith("CONFIG:") else a
            for a in argv]
    if argv[0] != "predict":
        argv += ["--synthetic-signals", "70", "--output-dir", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "error:" in err[-1] and message in err[-1], err
    assert not list(tmp_path.glob("runs/*/version_*"))  # refused before a run folder


def test_predict_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys) -> None:
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["predict", "--checkpoint", str(bogus), "--data", str(bogus)])
    assert exit_info.value.code == 2
    assert "cannot load checkpoint" in capsys.readouterr().err


def test_too_many_folds_are_refused_before_the_run_folder(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--synthetic-signals", "70", "--cv", "100",
                    "--output-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert "expected --cv 10 or fewer" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_empty_and_truncated_checkpoints_are_named_as_such(cli_run, tmp_path, capsys) -> None:
    run_dir, _ = cli_run
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    for path, what in ((empty, "the file is empty"),
                       (truncated, "the file is damaged or truncated (5000 bytes)")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["predict", "--checkpoint", str(path), "--data", str(path)])
        assert exit_info.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"cannot load checkpoint {path}: {what}; pass a checkpoint train.py wrote" in line


@pytest.mark.slow
def test_sigterm_stops_the_run_with_its_own_status_and_a_way_on(tmp_path) -> None:
    import signal
    import threading

    args = [*TINY, "--max-steps", "100000", "--no-progress-bar"]
    # stderr to a file: a pipe nobody reads while waiting for stdout can fill and block the run
    log = tmp_path.parent / f"{tmp_path.name}.stderr"
    with open(log, "w") as stderr:
        run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
    # decided within 5 minutes: without an epoch line the 100000-step run is killed, not waited on
    deadline = threading.Timer(300, run.kill)
    deadline.start()
    started = any(line.startswith("epoch 1/") for line in run.stdout)  # training under way
    deadline.cancel()
    assert started, log.read_text()[-2000:]
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=300)
    err = log.read_text()
    assert run.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: stopped by SIGTERM at step ") and "--resume last" in last
    assert not list(tmp_path.rglob("test_metrics.json"))  # nothing tested, nothing claimed


def test_predict_rejects_checkpoints_of_other_programs(tmp_path, capsys) -> None:
    tensor_file = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor_file)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"hidden": 3}, "state_dict": {}}, foreign)
    for path, message in ((tensor_file, "is not a train.py checkpoint"),
                          (foreign, "hyper_parameters do not build this train.py's model")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["predict", "--checkpoint", str(path), "--data", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and message in err[-1], err


def test_resume_refuses_a_checkpoint_that_cannot_continue(cli_run, tmp_path, capsys) -> None:
    run_dir, _ = cli_run
    last = run_dir / "checkpoints" / "last.ckpt"
    weights_only = tmp_path / "weights.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer_states"}, weights_only)
    common = [*TINY, "--epochs", "3", "--output-dir", str(tmp_path / "runs")]
    for argv, message in (
            (["--resume", str(last), "--hidden-size", "8"],
             "the checkpoint's model does not fit these options (model.time_branch."),
            (["--resume", str(weights_only)], "holds weights only (no optimizer state)")):
        with pytest.raises(SystemExit) as exit_info:
            train.main([*common, *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and message in err[-1], err


def test_ensemble_averages_its_members(tmp_path) -> None:
    result = run_cli([*TINY, "--max-steps", "3", "--ensemble", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test results (ensemble of 2):" in result.stdout and "95% CI" in result.stdout
    folder = tmp_path / "runs" / "dual_branch" / "version_0"
    summary = json.loads((folder / "test_metrics.json").read_text())
    members = [json.loads((folder / f"member_{k}" / "test_metrics.json").read_text())
               for k in range(2)]
    assert [m["options"]["run"]["seed"] for m in members] == [0, 1000]
    assert summary["ensemble"] == 2 and len(summary["members"]) == 2
    cm = np.array(summary["confusion_matrix"])
    assert cm.sum() == 21 and summary["metrics"]["test/acc"] == pytest.approx(
        np.trace(cm) / 21)
    low, high = summary["confidence_95"]["test/acc"]
    assert low <= summary["metrics"]["test/acc"] <= high
    assert (folder / "member_1" / "checkpoints" / "last.ckpt").is_file()
    assert (folder / "confusion_matrix.png").is_file()
    # predict on the ensemble's folder: the mean of its members' probabilities
    signals = [np.random.default_rng(3).standard_normal(512).astype(np.float32)] * 2
    write_unlabelled_npz(tmp_path / "new.npz", signals)

    def probabilities(checkpoint: Path) -> np.ndarray:
        out = tmp_path / f"{checkpoint.name}.csv"
        assert train.main(["predict", "--checkpoint", str(checkpoint), "--data",
                           str(tmp_path / "new.npz"), "--output", str(out)]) == 0
        with open(out) as f:
            return np.array([[float(v) for k, v in row.items() if k.startswith("p_")]
                             for row in csv.DictReader(f)])

    members = [probabilities(folder / f"member_{k}" / "checkpoints" / "last.ckpt")
               for k in range(2)]
    np.testing.assert_allclose(probabilities(folder), np.mean(members, 0), atol=2e-6)


def test_cross_validation_tests_every_record_once(tmp_path) -> None:
    result = run_cli([*TINY, "--max-steps", "2", "--cv", "3", "--synthetic-signals", "42"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/dual_branch/version_0/test_metrics.json").read_text())
    assert len(summary["fold_metrics"]["test/acc"]) == 3
    assert summary["fold_mean"]["test/acc"] == pytest.approx(
        np.mean(summary["fold_metrics"]["test/acc"]))
    assert np.array(summary["confusion_matrix"]).sum() == 42  # every record tested once
    assert run_cli([*TINY, "--cv", "1"], tmp_path).returncode == 2


def test_small_data_trains_an_ensemble_by_default(tmp_path) -> None:
    assert TINY[-2:] == ["--ensemble", "1"]
    args = TINY[:-2]
    result = run_cli([*args, "--max-steps", "2", "--synthetic-signals", "28"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "runs" / "dual_branch" / "version_0"
    assert sorted(p.name for p in folder.glob("member_*")) == ["member_0", "member_1",
                                                                "member_2"]
    assert json.loads((folder / "test_metrics.json").read_text())["ensemble"] == 3


# ---------------------------------------------------------------------------------- reliability:
# nothing lost, nothing silently wrong; each refusal is one line and leaves nothing behind


def _one_line_error(capsys, code: int, exit_info) -> str:
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_output_dir_naming_a_file_is_refused(tmp_path, capsys) -> None:
    output = tmp_path / "runs"
    output.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--output-dir", str(output)])
    line = _one_line_error(capsys, 2, exit_info)
    assert line == f"train.py: error: --output-dir: {output} is a file, not a folder; pass a folder"
    assert output.read_text() == "not a folder"


def _write_series_csv(path: Path, length: int, n: int = 40, constant: bool = False) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        for i in range(n):
            values = np.full(length, 0.5) if constant else rng.standard_normal(length)
            csv.writer(f).writerow([i % 2, *values])


def test_series_shorter_than_the_model_takes_fail_at_set_up(tmp_path, capsys,
                                                            monkeypatch) -> None:
    from models.dual_branch import DualBranchClassifier

    # a model that cannot take short inputs (the check asks its min_length, whatever it is)
    monkeypatch.setattr(DualBranchClassifier, "min_length", property(lambda self: 64))
    data = tmp_path / "short.csv"
    _write_series_csv(data, 40)
    tiny = [a for a in TINY if a not in ("--length", "512")]  # L = the longest record, 40
    with pytest.raises(SystemExit) as exit_info:
        train.main([*tiny, "--data", str(data), "--output-dir", str(tmp_path / "runs")])
    line = _one_line_error(capsys, 2, exit_info)
    assert ("the model inputs are 40 samples (the longest training record, --length-policy "
            "pad) but the model takes at least 64 (DualBranchClassifier.min_length); pass a "
            "--length of at least 64") in line
    assert not (tmp_path / "runs").exists()  # before the run folder


def test_constant_series_are_refused(tmp_path, capsys) -> None:
    data = tmp_path / "one_sample.csv"
    _write_series_csv(data, 1)  # length-1 series: z-normalised, every input is zeros
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--branches", "time", "--normalize", "window", "--data", str(data),
                    "--output-dir", str(tmp_path / "runs")])
    line = _one_line_error(capsys, 2, exit_info)
    assert "all 40 training records are constant" not in line  # only the training split
    assert "training records are constant (std <= 1e-06), so --normalize window turns every " \
           "input into zeros" in line
    assert not (tmp_path / "runs").exists()


def test_length_one_series_train_with_the_time_branch(tmp_path, capsys) -> None:
    # one sample per record: no STFT to take, but the levels tell the records apart under
    # --normalize dataset (the default), so this trains and tests, with finite metrics
    data = tmp_path / "one_sample.csv"
    _write_series_csv(data, 1)
    tiny = [a for a in TINY if a not in ("--length", "512")]  # L = the longest record, 1
    assert train.main([*tiny, "--branches", "time", "--max-steps", "2", "--data", str(data),
                       "--output-dir", str(tmp_path / "runs")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    results = json.loads(next(tmp_path.glob("runs/*/version_0/test_metrics.json")).read_text())
    assert results["options"]["data"]["normalize"] == "dataset"
    assert np.isfinite(results["metrics"]["test/loss"]) and results["global_step"] == 2


def test_a_step_that_cannot_fit_in_memory_is_refused(tmp_path, capsys, monkeypatch) -> None:
    from utils import checks

    monkeypatch.setattr(checks, "available_memory_bytes", lambda on_gpu=False: 2**20)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--output-dir", str(tmp_path / "runs")])
    line = _one_line_error(capsys, 2, exit_info)
    assert "a training step on inputs of 512 samples (--length 512) with --batch-size 16 " \
           "needs about" in line and "but 1 MiB is available" in line
    assert not (tmp_path / "runs").exists()


def test_a_nan_loss_stops_the_run_and_keeps_no_nan_checkpoint(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--lr", "1e30", "--max-steps", "8",
                    "--output-dir", str(tmp_path / "runs")])
    line = _one_line_error(capsys, 1, exit_info)
    assert "NaN/Inf" in line and "lower --lr (now 1e+30)" in line, line
    for path in (tmp_path / "runs").rglob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path
    assert not list((tmp_path / "runs").rglob("test_metrics.json"))


class StopBeforeTraining(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_a_run_that_trained_zero_steps_exits_non_zero(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--output-dir", str(tmp_path / "runs")],
                   extra_callbacks=[StopBeforeTraining()])
    line = _one_line_error(capsys, 1, exit_info)
    assert "no training step was taken (" in line and "nothing was tested" in line
    assert not list((tmp_path / "runs").rglob("test_metrics.json"))


class CtrlCWhileTesting(Callback):
    def on_test_batch_start(self, *args) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_while_testing_says_how_to_test(tmp_path, capsys) -> None:
    # it was exit 1 with Lightning's "Detected KeyboardInterrupt, attempting graceful
    # shutdown ..." as the last line: no word of what was kept or how to go on
    import signal

    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main([*TINY, "--max-steps", "2", "--output-dir", str(tmp_path / "runs")],
                       extra_callbacks=[CtrlCWhileTesting()])
    finally:  # Lightning ignores further Ctrl-C while it shuts down, and leaves it so
        signal.signal(signal.SIGINT, signal.default_int_handler)
    line = _one_line_error(capsys, 130, exit_info)
    assert line == ("train.py: stopped by Ctrl-C while testing, after training to step 2; "
                    "nothing was tested; test with --resume last (it only tests a run that is "
                    "done)")
    run_dir = tmp_path / "runs" / "dual_branch" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "test_metrics.json").exists()
    # and --resume last does what the line says: the trained run is tested, not trained on
    assert train.main([*TINY, "--max-steps", "2", "--output-dir", str(tmp_path / "runs"),
                       "--resume", "last"]) == 0
    results = json.loads((run_dir / "test_metrics.json").read_text())
    assert results["global_step"] == 2 and "test/acc" in results["metrics"]


def test_ctrl_c_while_drawing_the_pictures_says_the_results_are_kept(tmp_path, capsys,
                                                                    monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "report_pictures", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--max-steps", "2", "--output-dir", str(tmp_path / "runs")])
    run_dir = tmp_path / "runs" / "dual_branch" / "version_0"
    line = _one_line_error(capsys, 130, exit_info)
    assert line == (f"train.py: stopped by Ctrl-C while drawing the pictures; the results are "
                    f"kept in {run_dir} (test_metrics.json, the checkpoints); the pictures were "
                    "not drawn")
    assert json.loads((run_dir / "test_metrics.json").read_text())["global_step"] == 2


def test_a_full_disk_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch) -> None:
    from utils import checkpoint_io

    real_save, calls = torch.save, []

    def save_until_full(obj, f) -> None:  # the second checkpoint meets a full disk
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f)
        f.write(b"PK\x03\x04" + b"\0" * 80_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", save_until_full)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--epochs", "1", "--output-dir", str(tmp_path / "runs")])
    monkeypatch.undo()
    line = _one_line_error(capsys, 1, exit_info)
    folder = tmp_path / "runs" / "dual_branch" / "version_0" / "checkpoints"
    assert line.startswith(f"train.py: error: no space left in {folder} to write ")
    assert "it needs about" in line and "pass --output-dir on a disk with room" in line
    left = sorted(p.name for p in folder.iterdir())
    assert len(left) == 1 and not any(name.endswith(".tmp") for name in left)  # no partial
    torch.load(folder / left[0], weights_only=True)  # every checkpoint left loads


def test_resume_refuses_a_run_that_is_still_running(cli_run, tmp_path, capsys) -> None:
    import fcntl
    import os
    import shutil

    run_dir, _ = cli_run
    copy = tmp_path / "runs" / "dual_branch" / "version_0"
    shutil.copytree(run_dir, copy)
    fd = os.open(copy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run of that folder holds it
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main([*TINY, "--epochs", "3", "--output-dir", str(tmp_path / "runs"),
                        "--resume", "last"])
    finally:
        os.close(fd)
    line = _one_line_error(capsys, 2, exit_info)
    assert f"{copy} is in use by another train.py process that is still running" in line


@pytest.mark.slow
def test_two_runs_started_together_write_two_folders(tmp_path) -> None:
    args = [*TINY, "--max-steps", "1", "--synthetic-signals", "28"]
    runs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    logs = sorted(line for out, _ in outputs for line in out.splitlines()
                  if line.startswith("logs: "))
    assert logs == ["logs: runs/dual_branch/version_0", "logs: runs/dual_branch/version_1"]
    for version in ("version_0", "version_1"):
        results = json.loads((tmp_path / "runs/dual_branch" / version / "test_metrics.json")
                             .read_text())
        assert results["run_dir"].endswith(version)


def test_predict_refuses_to_overwrite_its_input(cli_run, tmp_path, capsys) -> None:
    run_dir, _ = cli_run
    data = tmp_path / "in.csv"
    write_unlabelled_csv(data, [np.ones(600, dtype=np.float32)])
    before = data.read_bytes()
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    for output, message in ((data, "which prediction reads"),
                            (tmp_path, "is a folder; pass a file name such as"),
                            (data / "probs.csv", "is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["predict", "--checkpoint", checkpoint, "--data", str(data),
                        "--output", str(output)])
        assert message in _one_line_error(capsys, 2, exit_info)
    assert data.read_bytes() == before


def test_wfdb_record_names_are_accepted_as_data(tmp_path) -> None:
    (tmp_path / "100.hea").write_text("100 1 360 3600\n")
    options = parse_args(["--data", str(tmp_path / "100")])  # records/100, as documented
    assert options.data.source == str(tmp_path / "100")


def test_ctrl_c_while_reading_exits_with_one_line(tmp_path, capsys, monkeypatch) -> None:
    import data.datamodule

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.datamodule, "read_train_test", interrupted)
    data_file = tmp_path / "d.csv"
    _write_series_csv(data_file, 600)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", str(data_file), "--output-dir", str(tmp_path / "runs")])
    assert _one_line_error(capsys, 130, exit_info) == "train.py: interrupted (Ctrl-C)"
    assert not (tmp_path / "runs").exists()


class _TestedWeights(Callback):
    """The model's weights when testing starts."""

    def on_test_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_ema_tests_the_average_of_the_best_checkpoint(tmp_path) -> None:
    # with a validation split the best checkpoint is tested: its averaged weights, not the
    # training weights stored beside them for --resume
    tested = _TestedWeights()
    assert train.main([*TINY, "--epochs", "2", "--ema", "0.3", "--output-dir", str(tmp_path)],
                      extra_callbacks=[tested]) == 0
    [best] = (tmp_path / "dual_branch/version_0/checkpoints").glob("best-*.ckpt")
    saved = torch.load(best, weights_only=True)
    key = "model.head.weight"
    assert not torch.equal(saved["state_dict"][key], saved["current_model_state"][key])
    torch.testing.assert_close(tested.state[key], saved["state_dict"][key])
