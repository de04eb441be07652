"""utils/report.py: the result files and printed summary of a tested run, and its pictures, in
the run folder and in TensorBoard."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from models.dual_branch import DualBranchClassifier
from utils.metrics import classification_report_from_confusion, evaluate_probabilities
from utils.report import example_items, pictures_of_test_set, report_pictures, write_results


class Items(torch.utils.data.Dataset):
    """(x (L,), y, n) items as SignalItems gives them: padded, with the real length."""

    def __init__(self, x, y, n):
        self.x, self.y, self.n = x, y, n

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.n[i]


def tiny_case(n=12, length=96, classes=3):
    torch.manual_seed(0)
    x = torch.randn(n, length)
    lengths = torch.tensor([length] * (n - 2) + [60, 40])
    for i, real in enumerate(lengths.tolist()):
        x[i, real:] = 0
    y = torch.arange(n) % classes
    model = DualBranchClassifier(classes, time={"hidden_size": 16, "num_layers": 1,
                                                "patch_size": 4},
                                 freq={"spectrogram": "linear", "n_fft": 32, "hop_length": 8,
                                       "channels": (4, 8)}).eval()
    with torch.no_grad():
        probabilities = model(x, lengths).softmax(-1)
    names = ["a", "b", "c"][:classes]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for t, p in zip(y.tolist(), probabilities.argmax(-1).tolist(), strict=True):
        confusion[t, p] += 1
    report = classification_report_from_confusion(confusion, names)[1]
    return model, Items(x, y, lengths), probabilities, y, names, report


def test_example_items_are_the_model_inputs():
    _, items, _, _, _, _ = tiny_case()
    x, lengths = example_items(items, [11, 0])
    assert torch.equal(x[0], items.x[11]) and torch.equal(x[1], items.x[0])
    assert lengths.tolist() == [40, 96]


def test_pictures_of_a_test_set_show_its_examples():
    model, items, probabilities, y, names, report = tiny_case()
    figures = pictures_of_test_set(model, items, probabilities, y, names, report, sample_rate=50.0)
    assert set(figures) == {"per_class_scores", "test_examples"}
    grid = figures["test_examples"]
    # two examples per class, each a signal panel with its attribution strip under it
    panels = [ax for ax in grid.axes if ax.get_title(loc="left")]
    assert len(panels) == 6
    strips = [ax for ax in grid.axes if ax.axison and ax not in panels]
    assert len(strips) == 6
    assert all([t.get_text() for t in strip.texts] == ["occlusion"] for strip in strips)
    assert all(ax.get_xlabel() == "time (s)" for ax in strips)  # the rate is known
    assert "under each signal, occlusion" in grid.get_suptitle()


def test_report_pictures_write_pngs_and_tensorboard_images(tmp_path):
    model, items, probabilities, y, names, report = tiny_case()
    writer = SummaryWriter(tmp_path)
    for step in range(1, 6):
        writer.add_scalar("train/loss_step", 1.0 / step, step)
        writer.add_scalar("lr-AdamW", 1e-3, step)
    writer.flush()
    paths = report_pictures(tmp_path, model, items, probabilities, y, names, report,
                            sample_rate=None, experiment=writer, step=5)
    writer.close()
    assert sorted(p.name for p in paths) == ["per_class_scores.png", "test_examples.png",
                                             "training_curves.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["pictures/per_class_scores",
                                               "pictures/test_examples",
                                               "pictures/training_curves"]


def test_unlabelled_test_items_get_no_example_grid(tmp_path):
    model, items, probabilities, y, names, report = tiny_case()
    y = y.clone()
    y[0] = -1
    assert report_pictures(tmp_path, model, items, probabilities, y, names, report) == []


def test_write_results_writes_the_files_and_prints_the_summary(tmp_path, capsys):
    _, _, probabilities, y, names, _ = tiny_case()
    summary = {"best_checkpoint": "", "validation_split": False, "seconds": 12.3,
               **evaluate_probabilities(probabilities, y, names)}
    config = {"data": {"length": 96, "aug_scale": (0.8, 1.25)}, "seed": 0}
    write_results(tmp_path / "run", summary, config)
    run = tmp_path / "run"
    saved = json.loads((run / "test_metrics.json").read_text())
    assert saved["options"] == {"data": {"length": 96, "aug_scale": [0.8, 1.25]}, "seed": 0}
    assert saved["metrics"] == summary["metrics"] and "report_text" not in saved
    assert "macro avg" in (run / "classification_report.txt").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["aug_scale"] == [0.8, 1.25]
    assert Image.open(run / "confusion_matrix.png").size[0] > 100
    out = capsys.readouterr().out
    acc, (low, high) = summary["metrics"]["test/acc"], summary["confidence_95"]["test/acc"]
    assert f"  test/acc               {acc:.4f}  (95% CI {low:.4f} - {high:.4f})" in out
    assert "best checkpoint: none (no validation split): tested the last weights" in out
    assert out.rstrip().endswith("time: 12 s")
    write_results(tmp_path / "quiet", dict(summary), config, quiet=True)
    assert capsys.readouterr().out == ""


@pytest.mark.cuda
def test_attributions_run_on_the_device_given():
    """A fitted model comes back from Lightning's teardown on the CPU; train.py passes the
    training device so that the occlusion runs there."""
    model, items, probabilities, y, names, report = tiny_case()
    figures = pictures_of_test_set(model, items, probabilities, y, names, report,
                                   device="cuda")
    assert "test_examples" in figures
    assert next(model.parameters()).device.type == "cuda"
