"""The results of a finished run: what `train.py` writes into the run folder after testing.

`write_results`, from the run's summary (utils.metrics.evaluate_probabilities' keys and the
run's facts) and its options, writes the files and prints the summary:

    test_metrics.json          the summary and the options
    classification_report.txt  sklearn's per-class table
    confusion_matrix.png       the test confusion matrix
    config.yaml                the options, loadable with --config

`report_pictures` draws, from the test predictions, the test items and the run's own event
files (also into TensorBoard):

    per_class_scores.png   precision / recall / F1 per class (utils/plots.plot_per_class_scores)
    test_examples.png      correct and misclassified test signals per class, with an occlusion
                           attribution over time under each (utils/attribution)
    training_curves.png    loss, metrics and learning rate against the step, from TensorBoard
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Dataset

from utils.attribution import attribute_over_time
from utils.metrics import save_confusion_matrix_png, to_plain, write_json
from utils.plots import (
    plot_examples,
    plot_per_class_scores,
    plot_training_curves,
    read_scalars,
    save_png,
    select_examples,
)

log = logging.getLogger(__name__)

EXAMPLES_PER_CLASS = 2  # a correct and a misclassified one where both exist


def write_results(run_dir: Path, summary: dict[str, Any], config: Mapping[str, Any],
                  quiet: bool = False) -> None:
    """test_metrics.json, classification_report.txt, confusion_matrix.png and config.yaml in
    run_dir (config: the nested options, `utils.cli.to_yaml_dict`'s); the summary printed
    unless quiet. The summary's "report_text" is taken out of it (it goes to the .txt)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = summary.pop("report_text", "")
    write_json(run_dir / "test_metrics.json", {**summary, "options": config})
    (run_dir / "classification_report.txt").write_text(text + "\n")
    if summary.get("confusion_matrix") is not None:
        save_confusion_matrix_png(summary["confusion_matrix"], summary["class_names"],
                                  run_dir / "confusion_matrix.png", title="test confusion matrix")
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(to_plain(config), f, sort_keys=False)
    if not quiet:
        print(results_text(run_dir, summary, text), flush=True)


def results_text(run_dir: Path, summary: Mapping[str, Any], report_text: str) -> str:
    """The printed summary of a tested run: the metrics with their 95% intervals, the
    per-class table, the checkpoint tested, where the results are and the time taken."""
    metrics = summary.get("metrics", {})
    intervals = summary.get("confidence_95", {})
    lines = ["", "Test results" + (f" (ensemble of {summary['ensemble']})"
                                   if "ensemble" in summary else "") + ":"]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if key in intervals:
            low, high = intervals[key]
            shown += f"  (95% CI {low:.4f} - {high:.4f})"
        lines.append(f"  {key:<22} {shown}")
    lines += ["", report_text]
    if "best_checkpoint" in summary:
        why = "no validation ran" if summary["validation_split"] else "no validation split"
        lines.append("best checkpoint: " + (summary["best_checkpoint"]
                                            or f"none ({why}): tested the last weights"))
    lines += [f"results: {run_dir / 'test_metrics.json'}, {run_dir / 'confusion_matrix.png'}",
              f"time: {summary['seconds']:.0f} s"]
    return "\n".join(lines)


def example_items(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, L), lengths (N,)) of the dataset's items at `indices`: the model's inputs, each
    item (x (L,), y, n) as the data module gives it."""
    xs, ns = [], []
    for i in indices:
        x, _, n = dataset[int(i)]
        xs.append(x)
        ns.append(int(n))
    return torch.stack(xs), torch.tensor(ns, dtype=torch.int64)


def pictures_of_test_set(model: nn.Module | None, dataset: Dataset | None, probabilities: Any,
                         labels: Any, class_names: Sequence[str], report: Mapping[str, Any],
                         sample_rate: float | None = None,
                         device: torch.device | str | None = None) -> dict[str, Figure]:
    """{name: Figure} of the per-class scores and the example grid of a test set.

    model: the classifier (x, lengths) -> logits, for the attributions (None: none drawn);
    dataset: the test items in the order of `probabilities` (N, K) and `labels` (N,) (None:
    no example grid);
    report: sklearn's classification_report dict (output_dict=True) over class_names;
    device: where the attributions run (the model is moved there; None: where it is).
    """
    probabilities = torch.as_tensor(probabilities).float()
    labels = torch.as_tensor(labels).long()
    predicted = probabilities.argmax(-1)
    figures = {"per_class_scores": plot_per_class_scores(report, class_names)}
    chosen = select_examples(labels, predicted, probabilities, per_class=EXAMPLES_PER_CLASS)
    if dataset is None or len(chosen) == 0:
        return figures
    x, lengths = example_items(dataset, chosen)
    attributions, label = None, "attribution"
    if model is not None:
        device = next(model.parameters()).device if device is None else torch.device(device)
        model.to(device)
        attributions = attribute_over_time(model, x.to(device), lengths.to(device),
                                           predicted[chosen].to(device),
                                           method="occlusion").cpu()
        label = "occlusion"
    figures["test_examples"] = plot_examples(
        x, lengths, labels[chosen], predicted[chosen], probabilities[chosen], class_names,
        sample_rate=sample_rate, attributions=attributions, per_class=EXAMPLES_PER_CLASS,
        attribution_label=label)
    return figures


def write_pictures(run_dir: str | Path, figures: Mapping[str, Figure],
                   experiment: Any = None, step: int = 0) -> list[Path]:
    """Each figure as run_dir/NAME.png and, where `experiment` is a TensorBoard
    SummaryWriter, as the image `pictures/NAME` at `step`. Returns the PNG paths."""
    paths = []
    for name, fig in figures.items():
        paths.append(save_png(fig, Path(run_dir) / f"{name}.png"))
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure(f"pictures/{name}", fig, global_step=step, close=False)
    return paths


def training_curves(run_dir: str | Path, monitor: str | None) -> Figure | None:
    """The training curves of the run whose event files are in run_dir (None: no scalars)."""
    if not any(Path(run_dir).glob("events.out.tfevents.*")):
        return None
    scalars = read_scalars(run_dir)
    if not scalars:
        return None
    return plot_training_curves(scalars, monitor=monitor)


def report_pictures(run_dir: str | Path, model: nn.Module | None, dataset: Dataset | None,
                    probabilities: Any, labels: Any, class_names: Sequence[str],
                    report: Mapping[str, Any], sample_rate: float | None = None,
                    monitor: str | None = None, experiment: Any = None,
                    step: int = 0, device: torch.device | str | None = None) -> list[Path]:
    """Draw and write every picture of a tested run (see the module docstring); the training
    curves only where run_dir holds event files; the attributions on `device` (None: where
    the model is). A picture that cannot be drawn is logged and skipped: the pictures never
    cost a run its results."""
    figures: dict[str, Figure] = {}
    try:
        if probabilities is not None and labels is not None:
            keep = np.asarray(labels) >= 0  # unlabelled test items have nothing to judge
            if keep.all():
                figures.update(pictures_of_test_set(model, dataset, probabilities, labels,
                                                    class_names, report, sample_rate, device))
        curves = training_curves(run_dir, monitor)
        if curves is not None:
            figures["training_curves"] = curves
    except (ValueError, RuntimeError) as exc:
        log.warning("pictures not drawn (%s)", exc)
    return write_pictures(run_dir, figures, experiment, step)
