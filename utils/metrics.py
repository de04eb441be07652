"""Evaluation reports built from a confusion matrix: per-class text/dict report, PNG, JSON.

The confusion matrix is the one thing every rank agrees on after a torchmetrics sync, so the
per-class report is derived from it rather than from per-rank predictions. Rows are true
classes, columns predicted classes (torchmetrics and sklearn convention).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
)


def _as_matrix(confusion: torch.Tensor | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    cm = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else confusion
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K); got shape {tuple(cm.shape)}")
    if (cm < 0).any():
        raise ValueError("confusion matrix counts must be non-negative")
    return np.rint(cm).astype(np.int64)


def labels_from_confusion(confusion: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand a confusion matrix back into (y_true, y_pred) label arrays.

    confusion: (K, K) counts, rows true, columns predicted. Returns two (N,) int64 arrays with
    N = confusion.sum(); the pair order is arbitrary but each (true, pred) pair appears exactly
    as often as its count, which is all any per-class metric depends on.
    """
    cm = _as_matrix(confusion)
    k = cm.shape[0]
    true_idx, pred_idx = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    counts = cm.ravel()
    return np.repeat(true_idx.ravel(), counts), np.repeat(pred_idx.ravel(), counts)


def metrics_from_predictions(labels: np.ndarray, predicted: np.ndarray,
                             num_classes: int) -> dict[str, float]:
    """accuracy, balanced accuracy, macro-F1 and Cohen's kappa of (N,) class indices, named as
    the test metrics are (test/acc ...)."""
    classes = list(range(num_classes))
    return {
        "test/acc": float(accuracy_score(labels, predicted)),
        "test/balanced_acc": float(balanced_accuracy_score(labels, predicted)),
        "test/macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro",
                                        zero_division=0)),
        "test/kappa": float(cohen_kappa_score(labels, predicted, labels=classes)),
    }


def confusion_from_predictions(labels: np.ndarray, predicted: np.ndarray,
                               num_classes: int) -> np.ndarray:
    """(K, K) counts, rows true, columns predicted."""
    return confusion_matrix(labels, predicted, labels=list(range(num_classes)))


def bootstrap_intervals(labels: np.ndarray, predicted: np.ndarray, num_classes: int,
                        resamples: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals of test accuracy and macro-F1: the test items
    resampled with replacement `resamples` times. Returns {"test/acc": [low, high],
    "test/macro_f1": [low, high]}. What a test set of this size can tell apart from chance
    variation: two runs whose intervals overlap widely are not shown to differ."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    n = len(labels)
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    accuracy, macro = np.empty(resamples), np.empty(resamples)
    correct = labels == predicted
    # per-class counts of each resample through one bincount over (resample, class) codes,
    # in blocks so memory stays bounded for large test sets
    block = max(1, (1 << 22) // n)
    for first in range(0, resamples, block):
        draws = rng.integers(0, n, size=(min(block, resamples - first), n))
        rows = np.arange(len(draws))[:, None] * num_classes
        size = len(draws) * num_classes

        def count(codes, weights=None, rows=rows, size=size):
            return np.bincount((rows + codes).ravel(), weights=None if weights is None
                               else weights.ravel(), minlength=size).reshape(-1, num_classes)

        tp = count(labels[draws], correct[draws].astype(np.float64))
        denominator = count(labels[draws]) + count(predicted[draws])
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        accuracy[first:first + len(draws)] = correct[draws].mean(1)
        macro[first:first + len(draws)] = f1.mean(1)
    tail = (1 - level) / 2 * 100
    return {name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            for name, values in (("test/acc", accuracy), ("test/macro_f1", macro))}


def classification_report_from_confusion(
    confusion: torch.Tensor | np.ndarray, class_names: Sequence[str]
) -> tuple[str, dict[str, Any]]:
    """sklearn's per-class precision/recall/F1/support report for a confusion matrix.

    Returns (text, dict): the text is sklearn's table, the dict its `output_dict=True` form with
    plain Python floats/ints (JSON-ready). Classes without support or predictions report 0.
    """
    cm = _as_matrix(confusion)
    if len(class_names) != cm.shape[0]:
        raise ValueError(
            f"got {len(class_names)} class names for a {cm.shape[0]}-class confusion matrix"
        )
    y_true, y_pred = labels_from_confusion(cm)
    labels = list(range(cm.shape[0]))
    names = [str(n) for n in class_names]
    kwargs = dict(labels=labels, target_names=names, zero_division=0, digits=4)
    text = classification_report(y_true, y_pred, **kwargs)
    report = classification_report(y_true, y_pred, output_dict=True, **kwargs)
    return text, to_plain(report)


def evaluate_probabilities(probabilities: torch.Tensor, labels: torch.Tensor,
                           class_names: Sequence[str],
                           predicted: np.ndarray | None = None) -> dict[str, Any]:
    """Test metrics, bootstrap 95% intervals, report and confusion matrix of (N, K) class
    probabilities against (N,) labels (predicted: (N,) classes, default the most probable):
    {"metrics", "confidence_95", "report", "report_text", "confusion_matrix", "class_names"}."""
    predicted = probabilities.argmax(-1).numpy() if predicted is None else np.asarray(predicted)
    truth = labels.numpy()
    k = len(class_names)
    confusion = confusion_from_predictions(truth, predicted, k)
    text, report = classification_report_from_confusion(confusion, class_names)
    return {"metrics": metrics_from_predictions(truth, predicted, k),
            "confidence_95": bootstrap_intervals(truth, predicted, k),
            "report": report, "report_text": text, "confusion_matrix": confusion.tolist(),
            "class_names": list(class_names)}


def plot_confusion_matrix(
    confusion: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    title: str = "Confusion matrix",
    normalize: bool = True,
) -> Figure:
    """A matplotlib figure of the confusion matrix (rows true, columns predicted).

    With normalize=True the colour is the row-normalised rate (recall per true class) and each
    cell is annotated with rate and raw count; otherwise colour and text are counts.
    """
    cm = _as_matrix(confusion)
    k = cm.shape[0]
    row_sums = cm.sum(axis=1, keepdims=True)
    rates = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)
    shown = rates if normalize else cm

    size = min(3.0 + 0.6 * k, 16.0)
    # a bare Figure, not pyplot: it renders with Agg, needs no backend set up and leaves no
    # open figure behind (importing this module changes no global matplotlib state)
    fig = Figure(figsize=(size, size * 0.85), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(cm.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xticklabels=list(class_names),
        yticklabels=list(class_names),
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    for label in ax.get_xticklabels():
        label.set(rotation=45, ha="right", rotation_mode="anchor")
    if k <= 30:  # annotations become unreadable beyond this
        threshold = (1.0 if normalize else max(cm.max(), 1)) / 2
        for i in range(k):
            for j in range(k):
                text = f"{rates[i, j]:.2f}\n({cm[i, j]})" if normalize else str(cm[i, j])
                colour = "white" if shown[i, j] > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    return fig


def save_confusion_matrix_png(
    confusion: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Write the confusion-matrix figure to `path` as PNG and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(confusion, class_names, title=title).savefig(path, format="png")
    return path


def to_plain(value: Any) -> Any:
    """Convert tensors, numpy values and nested containers into JSON-ready Python values.

    NaN and infinities become None (JSON has no NaN).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_plain(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, np.ndarray):
        return to_plain(value.tolist())
    if isinstance(value, np.generic):
        return to_plain(value.item())
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` (converted with `to_plain`) as indented JSON and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_plain(payload), indent=2, sort_keys=False) + "\n")
    return path
