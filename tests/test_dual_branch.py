"""Tests for models/dual_branch.py: building, branches, fusion, input checks, param groups."""

from __future__ import annotations

import math

import pytest
import torch

from models.dual_branch import ClassifierConfig, DualBranchClassifier, DualBranchConfig
from models.frequency import FrequencyConfig
from models.rwkv import RWKVConfig

cuda = pytest.mark.cuda

TIME = dict(hidden_size=16, num_layers=2, ffn_mult=2, patch_size=4, bidirectional=True)
FREQ = dict(n_fft=128, hop_length=32, n_mels=24, channels=[4, 8], freq_mask_param=4,
            time_mask_param=4)


def make(branches: str = "both", fusion: str = "concat", **overrides) -> DualBranchClassifier:
    return DualBranchClassifier.from_dict({"num_classes": 3, "time": TIME, "freq": FREQ,
                                           "branches": branches, "fusion": fusion, **overrides})


@pytest.mark.parametrize("branches", ["both", "time", "freq"])
@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_logits_shape_for_every_branch_and_fusion(branches, fusion):
    model = make(branches, fusion)
    assert (model.time_branch is not None) == (branches != "freq")
    assert (model.freq_branch is not None) == (branches != "time")
    logits = model(torch.randn(2, 600))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_fusion_widths():
    assert make("both", "concat").fusion.out_features == 16 + 8
    assert make("both", "gated", fusion_dim=12).fusion.out_features == 12
    assert make("time", "gated").fusion.out_features == 16  # one branch: nothing to gate


def test_gated_fusion_is_a_convex_mix():
    model = make("both", "gated", fusion_dim=5).eval()
    fusion = model.fusion
    a, b = torch.randn(3, 16), torch.randn(3, 8)
    g = torch.sigmoid(fusion.gate(torch.cat((fusion.norms[0](a), fusion.norms[1](b)), -1)))
    pa, pb = fusion.projections[0](fusion.norms[0](a)), fusion.projections[1](fusion.norms[1](b))
    torch.testing.assert_close(fusion([a, b]), g * pa + (1 - g) * pb)


def test_missing_branch_config_means_defaults():
    """An empty `time:` section in YAML arrives as None: the defaults, as when left out."""
    config = DualBranchConfig.from_dict({"num_classes": 3, "time": None, "freq": None})
    assert config == DualBranchConfig(num_classes=3)
    assert config.time == RWKVConfig() and config.freq == FrequencyConfig()


def test_time_only_accepts_any_length():
    model = make("time").eval()
    for T in (1, 3, 100_000):
        with torch.no_grad():
            assert model(torch.randn(1, T, 1)).shape == (1, 3)


def test_built_the_same_from_config_kwargs_and_dict():
    config = DualBranchConfig(num_classes=3, time=RWKVConfig(**TIME),
                              freq=FrequencyConfig(**FREQ), fusion="gated")
    assert ClassifierConfig is DualBranchConfig
    assert DualBranchConfig.from_dict({"num_classes": 3, "time": TIME, "freq": FREQ,
                                       "fusion": "gated"}) == config
    a = DualBranchClassifier(config)
    b = DualBranchClassifier(3, time=TIME, freq=FREQ, fusion="gated")
    assert a.config == b.config
    assert a.state_dict().keys() == b.state_dict().keys()
    assert config.to_dict()["time"]["hidden_size"] == 16


@pytest.mark.parametrize("values,match", [
    ({"num_classes": 3, "tiem": {}}, r"unknown model setting\(s\) \['tiem'\]"),
    ({"num_classes": 3, "time": {"hiden_size": 4}}, "unknown time setting"),
    ({"num_classes": 3, "freq": {"nfft": 4}}, "unknown freq setting"),
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 3, "fusion": "sum"}, "fusion"),
    ({"num_classes": 3, "branches": "none"}, "branches"),
    ({"num_classes": 3, "time": {"input_size": 2}}, "1-channel"),
    ({"num_classes": 3, "time": [16, 2]}, "time must be a RWKVConfig, a dict"),
    ({"num_classes": 3, "fusion": "gated", "fusion_dim": 0}, "fusion_dim"),
])
def test_bad_config_raises(values, match):
    with pytest.raises(ValueError, match=match):
        DualBranchConfig.from_dict(values)


@pytest.mark.parametrize("x,match", [
    (torch.randn(600), r"shape \(B, T, 1\) or \(B, T\); got 1 dims"),
    (torch.randn(2, 3, 600), r"1 channel\(s\).*got shape \(2, 3, 600\)"),
    (torch.full((2, 600), float("nan")), "NaN or Inf"),
    (torch.tensor([[float("inf")] * 600]), "NaN or Inf"),
    ([[0.0] * 600], "torch.Tensor"),
])
def test_bad_input_raises_clear_error(x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


def test_time_branch_does_not_check_again():
    model = make()
    assert model.config.time.check_input_finite is True
    assert model.time_branch.config.check_input_finite is False


@pytest.mark.parametrize("branches", ["both", "time", "freq"])
def test_optimizer_groups_cover_each_parameter_once(branches):
    model = make(branches, "gated")
    decay, no_decay = model.optimizer_groups(0.05)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # accepted as is


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = make().eval()
    ckpt = make().eval()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_gradient_checkpointing(True)
    assert ckpt.time_branch.gradient_checkpointing
    x = torch.randn(2, 700)
    for model in (plain, ckpt):
        model(x).pow(2).sum().backward()
    for (name, p0), p1 in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p0.grad, p1.grad, msg=name)


def test_learns_a_toy_task():
    """Low vs high tone in noise: a few AdamW steps must separate them (values, not just runs)."""
    torch.manual_seed(0)
    t = torch.arange(512)

    def batch(n):
        y = torch.randint(0, 2, (n,))
        freq = torch.where(y == 1, 0.6, 0.1)[:, None] * (1 + 0.1 * torch.rand(n, 1))
        x = torch.sin(freq * t + 6.28 * torch.rand(n, 1)) + 0.3 * torch.randn(n, 512)
        return x, y

    model = DualBranchClassifier(2, time=TIME, freq=FREQ)
    opt = torch.optim.AdamW(model.optimizer_groups(0.01), lr=3e-3)
    for _ in range(25):
        x, y = batch(16)
        loss = torch.nn.functional.cross_entropy(model.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(64)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.9
    assert loss.item() < math.log(2)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_finite_on_gpu(dtype):
    model = make("both", "gated").cuda().train()
    x = torch.randn(4, 4000, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        logits = model(x)
    logits.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(logits).all()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@cuda
@pytest.mark.parametrize("training", [False, True])
def test_compile_fullgraph_classifier(training):
    try:
        from models.wkv_build import load_extension_or_none
    except ImportError:
        load_extension_or_none = None
    if load_extension_or_none is None or load_extension_or_none() is None:
        pytest.skip("the CUDA WKV kernel is not built")
    torch._dynamo.reset()
    model = make("both", "gated").cuda().train(training)
    x = torch.randn(2, 2048, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    if training:  # SpecAugment draws random masks: compare finiteness and gradients flow
        out.float().sum().backward()
        assert torch.isfinite(out).all()
        assert model.time_branch.blocks[0].att.time_decay.grad is not None
    else:
        torch.testing.assert_close(out, model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("branches", ["both", "time", "freq"])
def test_padding_never_changes_a_prediction(branches):
    """One series alone and the same series zero-padded in a batch of longer ones (with
    lengths) give the same logits, whatever its level and gain."""
    torch.manual_seed(0)
    model = make(branches, time={**TIME, "stem": "conv", "pooling": "meanmax"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    short, long = 3 + 2 * torch.randn(1, 200), torch.randn(1, 300)
    batch = torch.zeros(2, 300)
    batch[0, :200], batch[1] = short, long
    with torch.no_grad():
        together = model(batch, torch.tensor([200, 300]))
        torch.testing.assert_close(together[0], model(short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[1], model(long)[0], atol=1e-5, rtol=1e-5)


def test_a_batch_of_full_length_series_takes_the_unmasked_path():
    """lengths that are all T change nothing, to the bit: the model drops them (the masked
    path would round differently) and skips the masks and gathers."""
    torch.manual_seed(0)
    model = make("both", time={**TIME, "stem": "conv", "pooling": "meanmax"}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = 3 + 2 * torch.randn(3, 300)
        assert torch.equal(model(x, torch.full((3,), 300)), model(x))


def test_amplitude_reaches_the_model_only_when_kept():
    """With instance_norm alone a signal and its scaled copy look the same; keep_amplitude
    tells them apart (their level and gain are features)."""
    torch.manual_seed(0)
    x = torch.randn(2, 300)
    for keep, same in ((False, True), (True, False)):
        model = make("both", keep_amplitude=keep).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            a, b = model(x), model(5 * x + 1)
        assert torch.allclose(a, b, atol=1e-4) == same


def test_bad_lengths_raise():
    model = make("time").eval()
    with pytest.raises(ValueError, match="lengths must be a"):
        model(torch.randn(2, 300), torch.tensor([300]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        model(torch.randn(2, 300), torch.tensor([300, 301]))


def test_series_shorter_than_the_stft_window_is_padded_to_it():
    """A 29-sample series with n_fft = 128: the frequency branch zero-pads it to one window,
    and alone it gives what it gives padded in a batch."""
    torch.manual_seed(0)
    model = make("both").eval()
    short = torch.randn(1, 29)
    batch = torch.zeros(2, 300)
    batch[0, :29], batch[1] = short, torch.randn(300)
    with torch.no_grad():
        together = model(batch, torch.tensor([29, 300]))
        torch.testing.assert_close(together[0], model(short)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("branches,heads", [("both", 2), ("time", 0), ("freq", 0)])
def test_branch_heads_score_each_branch_alone_in_training(branches, heads):
    model = make(branches, branch_loss=0.5)
    assert len(model.branch_heads) == heads  # one branch: nothing to blend
    x = torch.randn(2, 600)
    model.eval()
    scored = model(x, branch_heads=True)
    assert scored.shape == (2, 1 + heads, 3)
    torch.testing.assert_close(scored[:, 0], model(x))  # the fused head's logits first
    if heads:
        # each branch head sees its own branch's features only
        features, _, _ = model._features(x, None)
        for j, (head, norm, f) in enumerate(
                zip(model.branch_heads, model.fusion.norms, features, strict=True), 1):
            torch.testing.assert_close(scored[:, j], head(norm(f)))
        model.train()
        model(x, branch_heads=True)[:, 1:].sum().backward()
        assert all(p.grad is not None for p in model.branch_heads.parameters())
        assert not model.head.weight.grad.any()  # their loss does not reach the fused head


def test_no_branch_heads_by_default():
    model = make()
    assert len(model.branch_heads) == 0
    assert model(torch.randn(2, 600), branch_heads=True).shape == (2, 1, 3)
    with pytest.raises(ValueError, match="branch_loss"):
        make(branch_loss=-1.0)
