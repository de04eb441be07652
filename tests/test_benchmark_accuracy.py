"""benchmark_accuracy.py: finding pairs, the baselines, and the whole path on a tiny suite."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import benchmark_accuracy  # noqa: E402


def write_ts(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    lines = ["@problemName Tiny", "@timeStamps false", "@univariate true",
             f"@classLabel true {' '.join(sorted(set(map(str, y))))}", "@data"]
    lines += [",".join(f"{v:.5f}" for v in x) + f":{c}" for x, c in zip(X, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def tiny_pair(folder: Path, name: str, rng, n_train: int = 24, n_test: int = 12,
              length: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("TRAIN", n_train), ("TEST", n_test)):
        y = np.arange(n) % 2
        t = np.linspace(0, 1, length)
        X = np.sin(2 * np.pi * (2 + 3 * y[:, None]) * t) + 0.3 * rng.standard_normal((n, length))
        write_ts(folder / f"{name}_{split}.ts", X, y)


def test_find_pairs_takes_one_file_kind_per_name(tmp_path):
    rng = np.random.default_rng(0)
    tiny_pair(tmp_path / "A", "A", rng)
    tiny_pair(tmp_path / "B", "B", rng)
    (tmp_path / "B" / "B_TRAIN.tsv").write_text("0\t1\t2\n")  # a second copy: .ts wins
    (tmp_path / "B" / "B_TEST.tsv").write_text("0\t1\t2\n")
    (tmp_path / "C_TRAIN.ts").write_text("")  # no test file: not a pair
    pairs = benchmark_accuracy.find_pairs(tmp_path)
    assert [(p.name, p.train.suffix) for p in pairs] == [("A", ".ts"), ("B", ".ts")]


def test_one_nn_is_sklearns():
    rng = np.random.default_rng(1)
    xtr, xte = rng.standard_normal((30, 8)), rng.standard_normal((20, 8))
    ytr, yte = rng.integers(0, 3, 30), rng.integers(0, 3, 20)
    knn = KNeighborsClassifier(1, algorithm="brute").fit(xtr, ytr)
    assert benchmark_accuracy.one_nn_accuracy(xtr, ytr, xte, yte) == pytest.approx(
        knn.score(xte, yte))


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path):
    rng = np.random.default_rng(2)
    tiny_pair(tmp_path / "suite" / "Tiny", "Tiny", rng)
    tiny_pair(tmp_path / "suite" / "Other", "Other", rng)
    out = tmp_path / "out"
    code = benchmark_accuracy.main([str(tmp_path / "suite"), "--quick", "--output", str(out),
                                    "--train-args", "--max-steps 3 --hidden-size 8 "
                                                    "--num-layers 1 --cnn-channels 4"])
    assert code == 0
    result = json.loads((out / "accuracy.json").read_text())
    [row] = result["datasets"]  # --quick: the first set, one seed
    assert row["dataset"] == "Other" and len(row["runs"]) == 1
    assert 0.0 <= row["mean"] <= 1.0
    run = row["runs"][0]  # 24 training series: an ensemble of 3 by default, 3 steps each
    assert run["ensemble"] == 3 and run["global_step"] == 9
    assert len(run["member_accuracies"]) == 3 and row["single_model_mean"] is not None
    assert row["one_nn_ed"] is not None
    table = (out / "accuracy.md").read_text()
    assert "| Other |" in table and "MiniRocket" in table


def test_no_baselines_says_so_in_the_table(tmp_path):
    rng = np.random.default_rng(3)
    tiny_pair(tmp_path / "suite" / "Tiny", "Tiny", rng)
    out = tmp_path / "out"
    code = benchmark_accuracy.main([str(tmp_path / "suite"), "--quick", "--no-baselines",
                                    "--ensemble", "1", "--output", str(out), "--train-args",
                                    "--max-steps 2 --hidden-size 8 --num-layers 1 "
                                    "--cnn-channels 4"])
    assert code == 0
    table = (out / "accuracy.md").read_text()
    assert "n/a (not run: --no-baselines)" in table and "pending" not in table


def test_train_args_may_be_one_option(tmp_path, capsys):
    # argparse alone stops at a value like '--no-augment' ("expected one argument")
    with pytest.raises(SystemExit):
        benchmark_accuracy.main([str(tmp_path / "missing"), "--train-args", "--no-augment"])
    err = capsys.readouterr().err
    assert "is not a folder" in err and "expected one argument" not in err
    assert benchmark_accuracy._join_train_args(["S", "--train-args", "--no-augment", "--quick"]) \
        == ["S", "--train-args=--no-augment", "--quick"]
