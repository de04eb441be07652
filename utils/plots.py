"""Pictures of a run: per-class scores, example signals with their predictions and
attributions, and training curves.

Every function returns a bare matplotlib `Figure`, drawn as utils/metrics.py draws the
confusion matrix: no pyplot, so nothing global changes and no figure stays open; TensorBoard
takes it with `add_figure`, `save_png` writes it. Each picture is meant to be read at a
glance: a title, labelled axes, class names, and seconds on a time axis when the sample rate
is known (else samples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

SCORES = (("precision", "#4C72B0"), ("recall", "#DD8452"), ("f1-score", "#55A868"))
CORRECT, WRONG = "#1a7f37", "#c62828"  # titles of correctly / wrongly classified examples
RAISES, LOWERS = "#e66101", "#5e3c99"  # attribution towards / against the explained class
LINE_STYLES = ("-", "--", "-.", ":")
TITLE_CHARS = 64  # what fits on one line over an example panel at 9 pt


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` to `path` as PNG (parent folders made) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def _numpy(values: Any) -> np.ndarray:
    """Tensors (any device), lists and arrays -> a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


# ---------------------------------------------------------------------------------- per class


def plot_per_class_scores(report: Mapping[str, Any], class_names: Sequence[str],
                          title: str = "Test scores per class") -> Figure:
    """Grouped horizontal bars of precision, recall and F1 per class, support in the labels.

    report: sklearn's classification_report(output_dict=True) form, as
    `utils.metrics.classification_report_from_confusion` returns it; a class missing from it
    shows empty bars. The title carries accuracy and macro-F1 when the report has them, and a
    dashed line marks the macro-F1. The figure grows with the number of classes.
    """
    names = [str(n) for n in class_names]
    k = len(names)
    if k == 0:
        raise ValueError("class_names is empty; expected the classes of the report")
    rows = [report.get(n, {}) for n in names]
    support = [int(r.get("support", 0)) for r in rows]
    labels = [f"{n} (n={s})" for n, s in zip(names, support, strict=True)]
    widest = max(len(label) for label in labels)
    fig = Figure(figsize=(5.5 + 0.075 * widest, 1.6 + 0.36 * k), dpi=100, layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(SCORES)
    y = np.arange(k)
    small = 8 if k <= 30 else 7
    for j, (score, colour) in enumerate(SCORES):
        values = [float(r.get(score, 0.0) or 0.0) for r in rows]
        ax.barh(y + (j - 1) * height, values, height, color=colour,
                label="F1" if score == "f1-score" else score)
        if score == "f1-score":  # the number a reader compares; 0.00 also marks empty bars
            for yy, value in zip(y, values, strict=True):
                ax.text(value + 0.01, yy + (j - 1) * height, f"{value:.2f}", va="center",
                        fontsize=small, color="0.25", zorder=3,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    macro = report.get("macro avg", {}).get("f1-score")
    if macro is not None:
        ax.axvline(macro, color="0.3", linestyle="--", linewidth=1,
                   label=f"macro F1 {macro:.2f}")
    # room right of a full bar for its F1 number
    ax.set(yticks=y, yticklabels=labels, xlim=(0, 1.09), ylim=(k - 0.5, -0.5),
           xlabel="score (0 to 1)")
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    ax.tick_params(axis="y", labelsize=9 if k <= 30 else 8)
    handles, names_ = ax.get_legend_handles_labels()
    order = sorted(range(len(names_)), key=lambda i: names_[i].startswith("macro"))
    ax.legend([handles[i] for i in order], [names_[i] for i in order], loc="upper left",
              bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    parts = []
    if "accuracy" in report:
        parts.append(f"accuracy {float(report['accuracy']):.3f}")
    if macro is not None:
        parts.append(f"macro F1 {macro:.3f}")
    parts.append(f"{sum(support)} items")
    ax.set_title(f"{title}\n" + ", ".join(parts), fontsize=11)
    return fig


# ---------------------------------------------------------------------------------- examples


def select_examples(labels: Any, predicted: Any, probabilities: Any, per_class: int = 2,
                    max_classes: int = 12) -> np.ndarray:
    """Indices of example items to show, class by class (class order), per_class each.

    For each true class, alternately its most confident correct item (highest probability
    of the class) and its most confident mistake (highest probability of the wrong class),
    taking more of one kind where the other runs out. With more than `max_classes` classes,
    those with the most mistakes are shown (ties: class order). Selecting again from the
    selected items gives them back in the same order, so a caller can select, fetch only
    those signals (and their attributions) and pass them to `plot_examples`.
    """
    labels, predicted = _numpy(labels).astype(np.int64), _numpy(predicted).astype(np.int64)
    probabilities = _numpy(probabilities)
    if per_class < 1 or max_classes < 1:
        raise ValueError(f"per_class and max_classes must be >= 1; got {per_class}, "
                         f"{max_classes}")
    classes = [c for c in np.unique(labels) if c >= 0]  # -1: unlabelled, nothing to judge
    mistakes = {c: int(((labels == c) & (predicted != c)).sum()) for c in classes}
    shown = sorted(sorted(classes, key=lambda c: -mistakes[c])[:max_classes])
    chosen: list[int] = []
    for c in shown:
        correct = np.flatnonzero((labels == c) & (predicted == c))
        wrong = np.flatnonzero((labels == c) & (predicted != c))
        correct = correct[np.argsort(-probabilities[correct, c], kind="stable")]
        wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
        picks, i, j = [], 0, 0
        while len(picks) < per_class and (i < len(correct) or j < len(wrong)):
            if i < len(correct) and (len(picks) % 2 == 0 or j >= len(wrong)):
                picks.append(correct[i])
                i += 1
            else:
                picks.append(wrong[j])
                j += 1
        chosen += [int(p) for p in picks]
    return np.asarray(chosen, dtype=np.int64)


def _time_axis(n: int, sample_rate: float | None) -> tuple[np.ndarray, str]:
    if sample_rate:
        return np.arange(n) / float(sample_rate), "time (s)"
    return np.arange(n, dtype=np.float64), "sample"


def plot_examples(signals: Any, lengths: Any, labels: Any, predicted: Any, probabilities: Any,
                  class_names: Sequence[str], sample_rate: float | None = None,
                  attributions: Any = None, per_class: int | None = 2,
                  max_classes: int = 12, title: str = "Test examples",
                  attribution_label: str = "attribution") -> Figure:
    """A grid of example signals: a row per true class, per_class examples in it (a correct
    and a wrong one where they exist, see `select_examples`; None: every item given, in
    order, four to a row).

    signals: (N, T) array or tensor (or N 1-D arrays); lengths: (N,) real samples or None
    (all T); labels, predicted: (N,) class indices; probabilities: (N, K).
    attributions: None, or (N, T) like signals: `utils.attribution.attribute_over_time` with
    target=predicted, drawn under each signal on the same time axis (the mean over runs of
    samples where a signal is long), orange where the signal raised the predicted class's
    probability, purple where it lowered it; attribution_label names the method.
    Each panel's title gives the true and predicted class and the predicted probability, in
    green when they agree and red (with the true class's probability) when not.
    """
    names = [str(n) for n in class_names]
    labels, predicted = _numpy(labels).astype(np.int64), _numpy(predicted).astype(np.int64)
    probabilities = _numpy(probabilities)
    n_items = len(labels)
    rows_of = [np.asarray(_numpy(s), dtype=np.float64).ravel() for s in signals]
    if len(rows_of) != n_items or len(predicted) != n_items or len(probabilities) != n_items:
        raise ValueError(f"signals, labels, predicted and probabilities must have one entry "
                         f"per item; got {len(rows_of)}, {n_items}, {len(predicted)}, "
                         f"{len(probabilities)}")
    lengths = (np.array([len(s) for s in rows_of]) if lengths is None
               else _numpy(lengths).astype(np.int64))
    attrs = None if attributions is None else [np.asarray(_numpy(a), dtype=np.float64).ravel()
                                               for a in attributions]
    if attrs is not None and [len(a) for a in attrs] != [len(s) for s in rows_of]:
        raise ValueError("attributions must have the shape of signals")

    if per_class is None:
        order = np.arange(n_items)
        columns = min(4, max(n_items, 1))
        grid = [list(order[i:i + columns]) for i in range(0, n_items, columns)]
    else:
        order = select_examples(labels, predicted, probabilities, per_class, max_classes)
        columns = per_class
        grid = [[int(i) for i in order if labels[i] == c]
                for c in dict.fromkeys(labels[order].tolist())]
    if not grid:
        raise ValueError("no labelled item to show")
    shown_classes = len({int(labels[i]) for row in grid for i in row})
    total_classes = max(len(names), len({int(c) for c in labels if c >= 0}))

    panel_rows = 2 if attrs is not None else 1
    row_height = 2.3 if attrs is not None else 1.7
    fig = Figure(figsize=(6.2 * columns + 0.4, 1.1 + row_height * len(grid)), dpi=100,
                 layout="constrained")
    spec = fig.add_gridspec(len(grid) * panel_rows, columns,
                            height_ratios=[3, 1] * len(grid) if attrs is not None else None)
    for r, row in enumerate(grid):
        for c in range(columns):
            ax = fig.add_subplot(spec[r * panel_rows, c])
            if c >= len(row):
                true = names[labels[row[0]]] if per_class is not None else ""
                ax.set_axis_off()
                if true:
                    kind = ("misclassified" if any(predicted[i] == labels[i] for i in row)
                            else "correctly classified")
                    ax.text(0.5, 0.5, f"no {kind} {true} example", ha="center", va="center",
                            color="0.45", fontsize=9, transform=ax.transAxes)
                if attrs is not None:
                    fig.add_subplot(spec[r * panel_rows + 1, c]).set_axis_off()
                continue
            i = row[c]
            n = int(min(lengths[i], len(rows_of[i])))
            t, unit = _time_axis(n, sample_rate)
            ax.plot(t, rows_of[i][:n], color="0.15", linewidth=0.6)
            ax.set_xlim(t[0], t[-1] if n > 1 else t[0] + 1)
            ax.set_ylabel("signal", fontsize=8)
            ax.tick_params(labelsize=7)
            colour = ("0.1" if labels[i] < 0 else CORRECT if labels[i] == predicted[i]
                      else WRONG)
            ax.set_title(_example_title(i, labels, predicted, probabilities, names),
                         color=colour, fontsize=9, loc="left")
            bottom = ax
            if attrs is not None:
                ax.tick_params(labelbottom=False)
                bottom = fig.add_subplot(spec[r * panel_rows + 1, c], sharex=ax)
                _draw_attribution(bottom, t, attrs[i][:n], attribution_label)
            bottom.tick_params(labelsize=7)
            bottom.set_xlabel(unit, fontsize=8)
    heading = title
    if per_class is not None and shown_classes >= max_classes and shown_classes < total_classes:
        heading += f" ({shown_classes} of {total_classes} classes, those with most mistakes)"
    elif per_class is not None and shown_classes < total_classes:
        heading += f" ({shown_classes} of {total_classes} classes have items)"
    lines = [heading, "green: correct, red: misclassified as true \u2192 predicted; "
                      "p: probability of the predicted class"]
    if attrs is not None:
        lines.append(f"under each signal, {attribution_label}: orange raises, purple lowers "
                     "the predicted class's probability")
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def _example_title(i: int, labels, predicted, probabilities, names) -> str:
    true, pred = int(labels[i]), int(predicted[i])
    p = float(probabilities[i, pred])
    if true < 0:  # a record without a label
        return f"predicted {names[pred]}, p={p:.2f}"
    if true == pred:
        return f"{names[true]}: correct, p={p:.2f}"
    other = float(probabilities[i, true])
    title = f"{names[true]} \u2192 {names[pred]}: p={p:.2f} ({names[true]} {other:.2f})"
    if len(title) > TITLE_CHARS:  # long class names: two lines rather than cut off
        title = f"{names[true]} \u2192 {names[pred]}\np={p:.2f} ({names[true]} {other:.2f})"
    return title


ATTRIBUTION_BINS = 240  # about two screen pixels per bin at the panel's width


def _binned(t: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean of `values` over at most ATTRIBUTION_BINS equal runs of samples, at their
    centres: a per-sample attribution of thousands of samples is a comb of one-pixel spikes,
    its regional mean is what a reader sees at a glance."""
    if len(values) <= ATTRIBUTION_BINS:
        return t, values
    edges = np.linspace(0, len(values), ATTRIBUTION_BINS + 1).astype(np.int64)
    sums = np.add.reduceat(values, edges[:-1])
    centres = (t[edges[:-1]] + t[edges[1:] - 1]) / 2
    return centres, sums / np.diff(edges)


def _draw_attribution(ax, t: np.ndarray, values: np.ndarray, label: str) -> None:
    """A filled curve about zero, orange above, purple below, limits from its own range with
    its extreme values as ticks; `label` written inside, top left."""
    t, values = _binned(t, values)
    ax.fill_between(t, values, 0, where=values >= 0, color=RAISES, linewidth=0, step="mid")
    ax.fill_between(t, values, 0, where=values < 0, color=LOWERS, linewidth=0, step="mid")
    ax.axhline(0, color="0.5", linewidth=0.5)
    low = min(float(values.min()), 0.0) if len(values) else 0.0
    high = max(float(values.max()), 0.0) if len(values) else 0.0
    if low == high:
        low, high = -1.0, 1.0
    pad = 0.08 * (high - low)
    ax.set_ylim(low - pad, high + pad)
    # the extremes as ticks; a sliver of the other sign gets none (its digits would crowd)
    ax.set_yticks([v for v in (low, high) if abs(v) > 0.05 * (high - low)] or [0])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.tick_params(axis="y", labelsize=6)
    ax.text(0.005, 0.95, label, transform=ax.transAxes, ha="left", va="top", fontsize=7,
            color="0.3", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7,
                               "pad": 1})


# ---------------------------------------------------------------------------------- training


Scalars = Mapping[str, Sequence[tuple[int, float]]]


def _panel_of(tag: str) -> str | None:
    """Which training-curve panel a TensorBoard scalar belongs to (None: not drawn)."""
    if tag.startswith(("test/", "memory/")) or tag.endswith("samples_per_s") or tag in (
            "epoch", "hp_metric"):
        return None
    if tag.startswith("lr") or "learning_rate" in tag:
        return "learning rate"
    if tag.split("/")[-1].startswith("loss"):
        return "loss"
    if tag.startswith(("train/", "val/")):
        return "metrics"
    return None


def plot_training_curves(scalars: Scalars, monitor: str | None = "val/macro_f1",
                         title: str = "Training curves") -> Figure:
    """Loss (train and val), the metrics, and the learning rate against the optimizer step,
    one panel each (a panel without data is left out), x shared.

    scalars: {TensorBoard tag: [(step, value), ...]}, e.g. from `read_scalars(run_dir)`;
    test/, memory/ and throughput tags are not drawn. monitor: the checkpoint metric, its
    best value marked (lowest for a loss, else highest).
    """
    panels: dict[str, list[str]] = {"loss": [], "metrics": [], "learning rate": []}
    for tag in sorted(scalars):
        panel = _panel_of(tag)
        if panel is not None and len(scalars[tag]):
            panels[panel].append(tag)
    panels = {name: tags for name, tags in panels.items() if tags}
    if not panels:
        raise ValueError(f"no loss, metric or learning-rate scalars among {sorted(scalars)}")
    fig = Figure(figsize=(9, 1.2 + 2.6 * len(panels)), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, tags) in zip(axes, panels.items(), strict=True):
        for j, tag in enumerate(tags):
            steps, values = (np.asarray(v, dtype=np.float64)
                             for v in zip(*sorted(scalars[tag]), strict=True))
            thin = tag.endswith("_step")  # per-step values: noisy, drawn underneath
            # a line style each: curves that coincide (acc and balanced acc on balanced
            # data, the two lr groups) stay visible
            ax.plot(steps, values, label=tag, linewidth=0.8 if thin else 1.6,
                    alpha=0.5 if thin else 1.0, linestyle=LINE_STYLES[j % len(LINE_STYLES)],
                    marker=None if thin or len(steps) > 40 else "o", markersize=3)
            if tag == monitor:
                best = int(np.argmin(values) if "loss" in tag else np.argmax(values))
                ax.plot(steps[best], values[best], marker="*", markersize=13, color="gold",
                        markeredgecolor="0.2", linestyle="none",
                        label=f"best {tag} {values[best]:.3f} (step {int(steps[best])})")
        ax.set_ylabel({"loss": "loss", "metrics": "score",
                       "learning rate": "learning rate"}[name])
        ax.set_title(name, fontsize=10, loc="left")
        ax.grid(color="0.92")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        if name == "learning rate":  # plain numbers: no '1e-3' offset text over the title
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=11)
    return fig


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the TensorBoard event files directly in
    run_dir (a run's version_N folder; an ensemble's members and cv folds have their own),
    sorted by step; a step logged twice (a resumed run redoing part of an epoch) keeps its
    latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (events.out.tfevents.*)")
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep all
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {int(e.step): float(e.value) for e in accumulator.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out
