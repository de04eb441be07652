"""Multi-process training through train.py: 2 CPU processes (gloo) with Lightning's DDP
strategy against 1 process with the same global batch, and resuming a DDP run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Time branch only, with the patch stem: the frequency CNN's and the conv stem's BatchNorm
# would see per-rank batches (PyTorch's SyncBatchNorm is CUDA-only), which no 1-process run
# reproduces. No dropout, augmentation, mixup or SpecAugment, so both runs draw nothing at
# random after initialisation. 175 signals:
# 121 train items (the last partial batch is dropped), 27 val and 27 test items, so the
# 2-rank evaluation must discard DistributedSampler's padding to match.
COMMON = ["--synthetic-signals", "175", "--length", "512", "--epochs", "2", "--patience", "0",
          "--branches", "time", "--stem", "patch", "--hidden-size", "16", "--num-layers", "1",
          "--dropout", "0", "--mixup", "0", "--val-fraction", "0.15", "--ensemble", "1",
          "--no-augment", "--no-progress-bar", "--accelerator", "cpu", "--strategy", "ddp"]
RANK_LINE = re.compile(r"rank (\d)/(\d): trained on (\d+) samples this session, global step "
                       r"(\d+), parameter checksum (\S+)")


def run(args: list[str], cwd: Path) -> tuple[list[tuple], dict]:
    """Run train.py; returns the per-rank summary lines and rank 0's test_metrics.json."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *COMMON, *args], cwd=cwd,
                            capture_output=True, text=True, timeout=240)
    # the rank lines are on stdout, Lightning's log on stderr: the tails of both
    log = f"{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    assert result.returncode == 0, log
    # a line glued to another (two ranks writing at once) does not match: the checksum's \S+
    # runs into the next line's "rank"
    ranks = sorted(RANK_LINE.findall(result.stdout))
    world = int(args[args.index("--devices") + 1])
    assert len(ranks) == world, log
    results = json.loads(next(cwd.glob("runs/*/version_0/test_metrics.json")).read_text())
    results["log"] = log
    return ranks, results


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path) -> None:
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    ranks2, two = run(["--devices", "2", "--batch-size", "8"], tmp_path / "two")
    ranks1, one = run(["--devices", "1", "--batch-size", "16"], tmp_path / "one")

    # both ranks trained: half of the 2 x 7 x 16 samples each, in lock-step, same weights
    assert [(r[0], r[1], r[2], r[3]) for r in ranks2] == [("0", "2", "112", "14"),
                                                          ("1", "2", "112", "14")]
    assert ranks2[0][4] == ranks2[1][4]
    assert [(r[0], r[1], r[2], r[3]) for r in ranks1] == [("0", "1", "224", "14")]
    assert float(ranks2[0][4]) == pytest.approx(float(ranks1[0][4]), rel=1e-6), (ranks2, ranks1)

    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["effective_batch_size"] == one["effective_batch_size"] == 16
    assert two["confusion_matrix"] == one["confusion_matrix"], (two["log"], one["log"])
    assert sum(map(sum, two["confusion_matrix"])) == 27  # no padded repeats counted
    for key, value in one["metrics"].items():
        if key != "test/samples_per_s":
            assert two["metrics"][key] == pytest.approx(value, abs=1e-4), key

    # checkpoints written once, by rank 0, holding both ranks' RNG states
    checkpoints = sorted(p.name for p in (tmp_path / "two").glob("runs/*/version_0/checkpoints/*"))
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints
    last = torch.load(next((tmp_path / "two").glob("runs/*/version_0/checkpoints/last.ckpt")),
                      weights_only=True)
    assert len(last["rng_states"]) == 2
    # TensorBoard from rank 0 only: one run folder, no second version made by rank 1
    assert [p.name for p in (tmp_path / "two" / "runs" / "dual_branch").iterdir()] == [
        "version_0"]

    # and a DDP run resumes: one more epoch from the last checkpoint, in the same folder
    ranks, resumed = run(["--devices", "2", "--batch-size", "8", "--epochs", "3",
                          "--resume", "last"], tmp_path / "two")
    assert [(r[0], r[2], r[3]) for r in ranks] == [("0", "56", "21"), ("1", "56", "21")]
    assert resumed["global_step"] == 21
