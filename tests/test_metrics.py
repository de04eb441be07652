"""Tests for utils/metrics.py: reports derived from a confusion matrix, PNG and JSON output."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report, confusion_matrix

from utils.metrics import (
    classification_report_from_confusion,
    evaluate_probabilities,
    labels_from_confusion,
    plot_confusion_matrix,
    save_confusion_matrix_png,
    to_plain,
    write_json,
)


def _random_labels(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, size=n)
    # mostly right, sometimes wrong: a realistic, non-trivial matrix
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, k, size=n))
    return y_true, y_pred


@pytest.mark.parametrize("k", [2, 5])
def test_labels_from_confusion_round_trips(k: int) -> None:
    y_true, y_pred = _random_labels(400, k, seed=k)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    t, p = labels_from_confusion(torch.from_numpy(cm))
    assert len(t) == len(p) == 400
    np.testing.assert_array_equal(confusion_matrix(t, p, labels=list(range(k))), cm)


def test_report_matches_sklearn_on_the_original_labels() -> None:
    k = 4
    y_true, y_pred = _random_labels(500, k, seed=7)
    names = ["N", "AF", "other", "noisy"]
    cm = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    text, report = classification_report_from_confusion(cm, names)
    expected = classification_report(
        y_true, y_pred, labels=list(range(k)), target_names=names, output_dict=True,
        zero_division=0,
    )
    for name in names + ["macro avg", "weighted avg"]:
        for key in ("precision", "recall", "f1-score", "support"):
            assert report[name][key] == pytest.approx(expected[name][key], abs=1e-12)
    assert report["accuracy"] == pytest.approx((y_true == y_pred).mean())
    assert all(name in text for name in names)
    json.dumps(report)  # plain Python values only


def test_report_handles_a_class_never_seen() -> None:
    cm = np.array([[5, 0, 1], [0, 0, 0], [2, 0, 3]])
    _, report = classification_report_from_confusion(cm, ["a", "b", "c"])
    assert report["b"]["support"] == 0
    assert report["b"]["f1-score"] == 0.0
    assert report["a"]["recall"] == pytest.approx(5 / 6)
    assert report["c"]["precision"] == pytest.approx(3 / 4)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        labels_from_confusion(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        labels_from_confusion(np.array([[1, -1], [0, 1]]))
    with pytest.raises(ValueError, match="class names"):
        classification_report_from_confusion(np.eye(3), ["a", "b"])


def test_confusion_png_is_written(tmp_path) -> None:
    cm = torch.tensor([[8, 2], [1, 9]])
    path = save_confusion_matrix_png(cm, ["left", "right"], tmp_path / "sub" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_annotates_rates_and_counts() -> None:
    fig = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["x", "y"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "0.75\n(3)" in texts and "1.00\n(4)" in texts and "0.00\n(0)" in texts


def test_to_plain_and_write_json(tmp_path) -> None:
    payload = {
        "acc": torch.tensor(0.5),
        "vec": torch.arange(3),
        "np": np.float32(0.25),
        "nan": float("nan"),
        "nested": ({"inf": math.inf},),
    }
    assert to_plain(payload) == {
        "acc": 0.5, "vec": [0, 1, 2], "np": 0.25, "nan": None, "nested": [{"inf": None}]
    }
    path = write_json(tmp_path / "m.json", payload)
    assert json.loads(path.read_text())["vec"] == [0, 1, 2]


def test_evaluate_probabilities_scores_the_most_probable_class() -> None:
    y_true, y_pred = _random_labels(200, 4, seed=3)
    rng = np.random.default_rng(4)
    probabilities = rng.random((200, 4))
    probabilities[np.arange(200), y_pred] += 4  # y_pred is the most probable class
    probabilities /= probabilities.sum(1, keepdims=True)
    names = ["a", "b", "c", "d"]
    result = evaluate_probabilities(torch.as_tensor(probabilities), torch.as_tensor(y_true),
                                    names)
    assert result["confusion_matrix"] == confusion_matrix(y_true, y_pred,
                                                          labels=range(4)).tolist()
    assert result["metrics"]["test/acc"] == pytest.approx(float(np.mean(y_true == y_pred)))
    low, high = result["confidence_95"]["test/acc"]
    assert low <= result["metrics"]["test/acc"] <= high
    assert result["report"]["a"]["support"] == int(np.sum(y_true == 0))
    assert result["class_names"] == names and "macro avg" in result["report_text"]
    # given predictions (a vote per record) win over the probabilities
    given = evaluate_probabilities(torch.as_tensor(probabilities), torch.as_tensor(y_true),
                                   names, predicted=y_true)
    assert given["metrics"]["test/acc"] == 1.0
