"""utils/plots.py: what each picture shows (titles, labels, limits, bar lengths, chosen
examples), that it leaves no pyplot figure behind, and the TensorBoard scalars read back."""

import matplotlib.colors
import numpy as np
import pytest
from matplotlib import _pylab_helpers

from utils.metrics import classification_report_from_confusion
from utils.plots import (
    CORRECT,
    WRONG,
    _binned,
    plot_examples,
    plot_per_class_scores,
    plot_training_curves,
    read_scalars,
    save_png,
    select_examples,
)


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    yield
    assert _pylab_helpers.Gcf.get_num_fig_managers() == 0  # bare Figures only


def report_of(confusion, names):
    return classification_report_from_confusion(np.asarray(confusion), names)[1]


# ---------------------------------------------------------------------------------- per class


def test_per_class_bars_are_the_report_values(tmp_path):
    names = ["normal", "afib", "noise"]
    report = report_of([[8, 2, 0], [1, 4, 0], [0, 0, 0]], names)
    fig = plot_per_class_scores(report, names)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["normal (n=10)", "afib (n=5)",
                                                            "noise (n=0)"]
    assert "accuracy 0.800" in ax.get_title() and "15 items" in ax.get_title()
    assert f"macro F1 {report['macro avg']['f1-score']:.3f}" in ax.get_title()
    assert ax.get_xlabel() == "score (0 to 1)" and ax.get_xlim()[0] == 0
    bars = [p for p in ax.patches if p.get_height() > 0]
    widths = np.array([b.get_width() for b in bars]).reshape(3, 3)  # score x class
    for j, score in enumerate(("precision", "recall", "f1-score")):
        np.testing.assert_allclose(widths[j], [report[n][score] for n in names])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["precision", "recall", "F1"] and legend[3].startswith("macro F1")
    f1_numbers = [t.get_text() for t in ax.texts]
    assert f1_numbers == [f"{report[n]['f1-score']:.2f}" for n in names]
    ax_first = ax.get_ylim()
    assert ax_first[0] > ax_first[1]  # the first class on top
    path = save_png(fig, tmp_path / "sub" / "scores.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_class_figure_grows_with_the_classes():
    def height(k):
        names = [f"class_{i}" for i in range(k)]
        return plot_per_class_scores(report_of(np.eye(k, dtype=int) * 3, names),
                                     names).get_size_inches()[1]

    assert height(52) > 3 * height(7) > 3 * height(2)
    assert height(52) / 52 >= 0.3  # about a third of an inch per class: labels stay apart


# ---------------------------------------------------------------------------------- examples


def example_set():
    """12 items of 3 classes; class 0 has correct and wrong items, class 1 only correct,
    class 2 only wrong."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1])
    predicted = np.array([0, 0, 1, 2, 1, 1, 1, 0, 1, 0, 0, 1])
    probabilities = np.full((12, 3), 0.1)
    top = np.array([0.6, 0.9, 0.7, 0.55, 0.8, 0.95, 0.6, 0.5, 0.75, 0.6, 0.7, 0.65])
    probabilities[np.arange(12), predicted] = top
    return labels, predicted, probabilities


def test_select_examples_takes_the_most_confident_correct_and_wrong():
    labels, predicted, probabilities = example_set()
    chosen = select_examples(labels, predicted, probabilities, per_class=2)
    # class 0: correct 1 (0.9) then wrong 2 (0.7); class 1: correct 5 (0.95) and 4 (0.8);
    # class 2: only mistakes, 8 (0.75) and 9 (0.6)
    assert chosen.tolist() == [1, 2, 5, 4, 8, 9]
    assert select_examples(labels, predicted, probabilities, per_class=3).tolist()[:3] == [1, 2,
                                                                                          10]
    # the classes with the most mistakes first when there are too many
    assert select_examples(labels, predicted, probabilities, 2, max_classes=2).tolist() == [
        1, 2, 8, 9]
    # selecting from the selection gives it back
    again = select_examples(labels[chosen], predicted[chosen], probabilities[chosen], 2)
    assert chosen[again].tolist() == chosen.tolist()


def example_panels(fig):
    """The signal panels of an example grid (they carry the titles), in grid order."""
    return [ax for ax in fig.axes if ax.axison and ax.get_title(loc="left")]


def test_example_grid_titles_colours_and_time_axis():
    labels, predicted, probabilities = example_set()
    rng = np.random.default_rng(0)
    signals = rng.standard_normal((12, 500))
    lengths = np.full(12, 500)
    lengths[2] = 300  # the wrong example of class 0 is shorter
    fig = plot_examples(signals, lengths, labels, predicted, probabilities, ["a", "b", "c"],
                        sample_rate=100.0)
    panels = example_panels(fig)
    titles = [ax.get_title(loc="left") for ax in panels]
    assert titles == ["a: correct, p=0.90", "a \u2192 b: p=0.70 (a 0.10)",
                      "b: correct, p=0.95", "b: correct, p=0.80",
                      "c \u2192 b: p=0.75 (c 0.10)", "c \u2192 a: p=0.60 (c 0.10)"]
    colours = [matplotlib.colors.to_hex(ax._left_title.get_color()) for ax in panels]
    assert colours == [CORRECT, WRONG, CORRECT, CORRECT, WRONG, WRONG]
    assert all(ax.get_xlabel() == "time (s)" for ax in panels)
    assert panels[0].get_xlim() == pytest.approx((0, 4.99))
    assert panels[1].get_xlim() == pytest.approx((0, 2.99))  # real samples only
    np.testing.assert_allclose(panels[1].lines[0].get_ydata(), signals[2, :300])
    assert "green: correct, red: misclassified" in fig.get_suptitle()

    fig = plot_examples(signals, None, labels, predicted, probabilities, ["a", "b", "c"])
    assert all(ax.get_xlabel() == "sample" for ax in example_panels(fig))
    fig = plot_examples(signals[4:7], None, labels[4:7], predicted[4:7], probabilities[4:7],
                        ["a", "b", "c"])
    assert "(1 of 3 classes have items)" in fig.get_suptitle()
    # per_class=None: every item in order, unlabelled ones (-1) titled by the prediction
    fig = plot_examples(signals[:2], None, [-1, 0], predicted[:2], probabilities[:2],
                        ["a", "b", "c"], per_class=None)
    assert [ax.get_title(loc="left") for ax in example_panels(fig)] == [
        "predicted a, p=0.60", "a: correct, p=0.90"]


def test_examples_with_attributions_share_the_time_axis():
    labels, predicted, probabilities = example_set()
    keep = np.array([0, 1, 2, 4])  # class 0: two correct one wrong; class 1: one correct
    signals = np.random.default_rng(1).standard_normal((4, 2000))
    attributions = np.zeros((4, 2000))
    attributions[:, 500:600] = 1.0
    attributions[:, 1500:1550] = -0.5
    fig = plot_examples(signals, None, labels[keep], predicted[keep], probabilities[keep],
                        ["a", "b", "c"], sample_rate=250.0, attributions=attributions,
                        attribution_label="occlusion")
    panels = example_panels(fig)
    assert len(panels) == 3  # a correct and a wrong of class 0, one correct of class 1
    strips = [ax for ax in fig.axes if ax.axison and ax not in panels]
    assert len(strips) == 3
    for panel, strip in zip(panels, strips, strict=True):
        assert strip.get_shared_x_axes().joined(panel, strip)
        assert strip.get_xlabel() == "time (s)"
        assert strip.get_ylim()[1] >= 1.0 and strip.get_ylim()[0] <= -0.5
        assert [t.get_text() for t in strip.texts] == ["occlusion"]
    # class 1 has no misclassified example: the empty cell says so
    notes = [t.get_text() for ax in fig.axes if not ax.axison for t in ax.texts]
    assert notes == ["no misclassified b example"]
    assert "under each signal, occlusion" in fig.get_suptitle()


def test_many_classes_say_how_many_are_shown():
    k = 52
    names = [f"class_{i:02d}_normal_sinus_rhythm" for i in range(k)]
    labels = np.repeat(np.arange(k), 2)
    predicted = labels.copy()
    predicted[::7] = (predicted[::7] + 1) % k
    probabilities = np.full((len(labels), k), 0.5 / k)
    probabilities[np.arange(len(labels)), predicted] = 0.6
    chosen = select_examples(labels, predicted, probabilities, max_classes=12)
    fig = plot_examples(np.zeros((len(chosen), 24)), None, labels[chosen], predicted[chosen],
                        probabilities[chosen], names, max_classes=12)
    assert "(12 of 52 classes, those with most mistakes)" in fig.get_suptitle()
    long_titles = [ax.get_title(loc="left") for ax in example_panels(fig)
                   if "\u2192" in ax.get_title(loc="left")]
    assert long_titles and all(t.count("\n") == 1 for t in long_titles)  # wrapped, not cut


def test_binned_attribution_keeps_regional_means():
    t = np.arange(10_000) / 100.0
    values = np.zeros(10_000)
    values[2000:3000] = 2.0
    centres, means = _binned(t, values)
    assert len(means) == 240
    assert means.max() == pytest.approx(2.0) and means.min() == 0
    assert np.sum(means * np.diff(np.linspace(0, 10_000, 241))) == pytest.approx(2000.0)
    assert centres[0] < centres[-1] <= t[-1]
    short = np.arange(24.0)
    np.testing.assert_array_equal(_binned(short, short)[1], short)  # short: as it is


# ---------------------------------------------------------------------------------- training


def scalars():
    steps = [10, 20, 30, 40]
    return {
        "train/loss_step": [(s, 1.0 / s) for s in steps],
        "train/loss_epoch": [(s, 2.0 / s) for s in steps],
        "val/loss": [(s, 3.0 / s) for s in steps],
        "val/macro_f1": [(10, 0.5), (20, 0.7), (30, 0.9), (40, 0.8)],
        "val/acc": [(s, 0.6) for s in steps],
        "lr/pg1": [(s, 1e-3 / s) for s in steps],
        "test/acc": [(40, 0.9)],
        "memory/host_rss_mib": [(10, 100.0)],
        "train/samples_per_s": [(10, 5.0)],
        "epoch": [(10, 0.0)],
    }


def test_training_curves_panels_lines_and_best_mark():
    fig = plot_training_curves(scalars())
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["loss", "metrics", "learning rate"]
    loss, metrics, lr = fig.axes
    assert [line.get_label() for line in loss.lines] == ["train/loss_epoch", "train/loss_step",
                                                         "val/loss"]
    labels = [line.get_label() for line in metrics.lines]
    assert labels == ["val/acc", "val/macro_f1", "best val/macro_f1 0.900 (step 30)"]
    assert metrics.lines[-1].get_xdata()[0] == 30
    assert [line.get_label() for line in lr.lines] == ["lr/pg1"]
    np.testing.assert_allclose(lr.lines[0].get_ydata(), [1e-4, 5e-5, 1e-3 / 30, 2.5e-5])
    assert lr.get_xlabel() == "optimizer step" and lr.get_ylabel() == "learning rate"
    assert loss.get_shared_x_axes().joined(loss, lr)
    assert "1e" not in lr.yaxis.get_offset_text().get_text()  # plain tick numbers

    only_loss = plot_training_curves({"train/loss_epoch": [(1, 0.5), (2, 0.4)]})
    assert [ax.get_title(loc="left") for ax in only_loss.axes] == ["loss"]
    best_loss = plot_training_curves(scalars(), monitor="val/loss").axes[0]
    assert best_loss.lines[-1].get_label() == "best val/loss 0.075 (step 40)"
    with pytest.raises(ValueError, match="no loss, metric or learning-rate scalars"):
        plot_training_curves({"test/acc": [(1, 0.5)]})


def test_read_scalars_from_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_scalars(tmp_path)
    writer = SummaryWriter(str(tmp_path))
    for step, value in [(1, 0.9), (2, 0.7), (3, 0.5)]:
        writer.add_scalar("train/loss_epoch", value, step)
    writer.add_scalar("val/macro_f1", 0.6, 3)
    writer.add_scalar("val/macro_f1", 0.65, 3)  # the same step again: the latest wins
    writer.close()
    got = read_scalars(tmp_path)
    assert got["train/loss_epoch"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.7)),
                                       (3, pytest.approx(0.5))]
    assert got["val/macro_f1"] == [(3, pytest.approx(0.65))]
    fig = plot_training_curves(got)
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["loss", "metrics"]
