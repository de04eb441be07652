"""utils/attribution.py: attributions over time concentrate where a model looks, are zero in
the padding, deterministic, and run for short and long series, in and out of inference mode."""

import pytest
import torch
from torch import nn

from models.dual_branch import DualBranchClassifier
from utils.attribution import attribute_over_time, occlusion_window


class RegionModel(nn.Module):
    """Two classes; the logit of class 0 is a weighted sum of the samples in [start, end)
    (padding beyond `lengths` left out), class 1's is 0: nothing else can matter."""

    def __init__(self, start: int, end: int):
        super().__init__()
        self.start, self.end = start, end
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, end - start))
        self.dropout = nn.Dropout(0.5)  # active in training mode only

    def forward(self, x, lengths=None):
        if lengths is not None:
            x = x * (torch.arange(x.shape[1], device=x.device) < lengths[:, None])
        region = x[:, self.start:self.end]  # any T: shorter signals see part of the region
        logit = (self.dropout(region) * self.weight[:region.shape[1]]).sum(1) / 10
        return torch.stack((logit, torch.zeros_like(logit)), -1)


def signals(batch, length, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, generator=generator) + 1.0).to(device)


def share(attributions, start, end):
    """Fraction of the absolute attribution inside [start, end), per signal."""
    total = attributions.abs().sum(1)
    return attributions[:, start:end].abs().sum(1) / total


@pytest.mark.parametrize("length, start, end", [(24, 8, 12), (1000, 600, 700),
                                                (10_000, 7000, 7500)])
def test_occlusion_concentrates_on_the_region_the_model_reads(length, start, end):
    model = RegionModel(start, end)
    x = signals(3, length)
    attributions = attribute_over_time(model, x, None, target=0)
    window, _ = occlusion_window(length)
    assert attributions.shape == (3, length) and attributions.dtype == torch.float32
    # windows that miss the region change nothing: exactly zero further than a window away
    assert attributions[:, :max(start - window + 1, 0)].abs().max() == 0
    assert attributions[:, end + window - 1:].abs().max() == 0
    assert (share(attributions, start, end) > 0.8).all()
    # the region's samples are mostly positive (x ~ 1 + noise, positive weights): raising
    # class 0, so occluding them lowers its probability
    assert (attributions[:, start:end].sum(1) > 0).all()


def test_integrated_gradients_is_zero_outside_and_complete():
    model = RegionModel(40, 60)
    x = signals(4, 200, seed=1)
    attributions = attribute_over_time(model, x, None, target=0,
                                       method="integrated_gradients", steps=64)
    assert attributions[:, :40].abs().max() == 0 and attributions[:, 60:].abs().max() == 0
    # completeness: the attributions sum to p(x) - p(baseline) of the target class
    with torch.no_grad():
        p = torch.softmax(model.eval()(x), -1)[:, 0]
        p0 = torch.softmax(model(torch.zeros_like(x)), -1)[:, 0]
    torch.testing.assert_close(attributions.sum(1), p - p0, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients"])
def test_padding_is_zero_and_batching_does_not_change_values(method):
    model = RegionModel(10, 50)
    x = signals(3, 120, seed=2)
    lengths = torch.tensor([120, 45, 30])
    x[1, 45:] = 0
    x[2, 30:] = 0
    one = attribute_over_time(model, x, lengths, target=torch.tensor([0, 0, 1]),
                              method=method, batch_size=1)
    many = attribute_over_time(model, x, lengths, target=torch.tensor([0, 0, 1]),
                               method=method, batch_size=64)
    torch.testing.assert_close(one, many)
    assert one[1, 45:].abs().max() == 0 and one[2, 30:].abs().max() == 0
    assert one[1, 10:45].abs().sum() > 0 and one[2, 10:30].abs().sum() > 0
    # target 1 is explained with the opposite sign of target 0 (two classes, softmax)
    alone = attribute_over_time(model, x[2:], lengths[2:], target=0, method=method)
    torch.testing.assert_close(one[2:], -alone, atol=1e-6, rtol=1e-4)


def test_window_and_stride_follow_the_length():
    assert occlusion_window(24) == (1, 1)
    assert occlusion_window(3750) == (118, 59)
    assert occlusion_window(10_000) == (313, 156)
    model = RegionModel(20, 30)
    x = signals(1, 100)
    explicit = attribute_over_time(model, x, None, 0, window=10, stride=10)
    # windows [20, 30) exactly: one window covers the region, the rest is zero
    assert explicit[0, :20].abs().max() == 0 and explicit[0, 30:].abs().max() == 0
    assert torch.unique(explicit[0, 20:30]).numel() == 1


def test_eval_mode_determinism_and_the_training_flag_restored():
    model = RegionModel(5, 15).train()
    x = signals(2, 40)
    first = attribute_over_time(model, x, None, 0, method="integrated_gradients")
    second = attribute_over_time(model, x, None, 0, method="integrated_gradients")
    assert model.training  # restored
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout was off


def test_refuses_bad_arguments():
    model = RegionModel(0, 4)
    x = signals(2, 10)
    with pytest.raises(ValueError, match="method must be one of"):
        attribute_over_time(model, x, None, 0, method="saliency")
    with pytest.raises(ValueError, match="lengths must be"):
        attribute_over_time(model, x, torch.tensor([10, 11]), 0)
    with pytest.raises(ValueError, match="target must be"):
        attribute_over_time(model, x, None, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="x must be"):
        attribute_over_time(model, x[0], None, 0)


def small_classifier():
    torch.manual_seed(0)
    return DualBranchClassifier.from_dict({
        "num_classes": 3,
        "time": {"hidden_size": 16, "num_layers": 1, "patch_size": 4, "wkv_backend": "torch"},
        "freq": {"n_fft": 32, "hop_length": 8, "channels": [8, 16], "spectrogram": "linear"},
    })


@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients"])
def test_dual_branch_classifier_inside_inference_mode(method):
    """As a test hook calls it: under inference mode, on the real model, padded batch."""
    model = small_classifier()
    with torch.inference_mode():
        x = signals(2, 160, seed=3)
        lengths = torch.tensor([160, 100])
        x[1, 100:] = 0
        first = attribute_over_time(model, x, lengths, target=torch.tensor([0, 2]),
                                    method=method, steps=8)
        second = attribute_over_time(model, x, lengths, target=torch.tensor([0, 2]),
                                     method=method, steps=8)
    assert first.shape == (2, 160) and torch.isfinite(first).all()
    assert first[1, 100:].abs().max() == 0 and first[0].abs().sum() > 0
    torch.testing.assert_close(first, second)
    # a signal attributes the same alone as padded in a batch (the model leaves padding out)
    alone = attribute_over_time(model, x[1:, :100], None, target=2, method=method, steps=8)
    torch.testing.assert_close(first[1, :100], alone[0], atol=1e-5, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients"])
def test_gpu_tensors_give_the_cpu_result(method):
    model = RegionModel(30, 60)
    x = signals(2, 256, seed=4)
    lengths = torch.tensor([256, 90])
    cpu = attribute_over_time(model, x, lengths, 0, method=method)
    gpu = attribute_over_time(model.cuda(), x.cuda(), lengths.cuda(), 0, method=method)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)


def test_a_compiled_model_is_explained_eagerly():
    """Each occluded batch has a new shape: a compiled model (a run with --capture or
    compiled blocks) would compile again for every one of them."""
    traced = []

    def counting_backend(graph, example_inputs):
        traced.append(graph)
        return graph.forward

    model = RegionModel(8, 12)
    eager = attribute_over_time(model, signals(3, 24), None, target=0)
    model.compile(backend=counting_backend)
    compiled = attribute_over_time(model, signals(3, 24), None, target=0)
    assert traced == []
    torch.testing.assert_close(compiled, eager)
    model(signals(2, 24))  # outside, the model is still compiled
    assert len(traced) == 1
