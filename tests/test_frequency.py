"""Tests for models/frequency.py: shapes, fp32 spectrogram, per-record dB floor, SpecAugment."""

from __future__ import annotations

import pytest
import torch

from models.frequency import CeilMeanPool2d, FrequencyBranch, FrequencyConfig

cuda = pytest.mark.cuda

SMALL = dict(n_fft=128, hop_length=32, n_mels=24, channels=(4, 8), freq_mask_param=4,
             time_mask_param=4)


@pytest.mark.parametrize("T", [128, 129, 1000, 100_000])
@pytest.mark.parametrize("kind", ["mel", "linear"])
def test_output_shape(T, kind):
    branch = FrequencyBranch(FrequencyConfig(**SMALL, spectrogram=kind)).eval()
    with torch.no_grad():
        out = branch(torch.randn(2, T))
    assert out.shape == (2, 8) and branch.out_features == 8
    assert torch.isfinite(out).all()


def test_spectrogram_shape_and_bins():
    linear = FrequencyBranch(FrequencyConfig(**SMALL, spectrogram="linear"))
    assert linear.log_spectrogram(torch.randn(3, 640)).shape == (3, 65, 1 + 640 // 32)
    mel = FrequencyBranch(FrequencyConfig(**SMALL))
    assert mel.log_spectrogram(torch.randn(3, 640)).shape == (3, 24, 21)


@pytest.mark.parametrize("kind", ["mel", "linear"])
def test_power_spectrogram_is_torchaudios(kind):
    branch = FrequencyBranch(FrequencyConfig(**SMALL, spectrogram=kind, win_length=100))
    x = torch.randn(3, 1000)
    torch.testing.assert_close(branch.power_spectrogram(x), branch.spectrogram(x).unsqueeze(1))


def test_accepts_trailing_channel_dim():
    branch = FrequencyBranch(FrequencyConfig(**SMALL)).eval()
    x = torch.randn(2, 500)
    torch.testing.assert_close(branch(x), branch(x.unsqueeze(-1)))


def test_spectrogram_is_fp32_under_autocast():
    branch = FrequencyBranch(FrequencyConfig(**SMALL)).eval()
    # a fixed input: the max difference below is set by the quietest bins in dB, which a
    # rare random draw pushes past the bound (about 3% of draws)
    x = torch.randn(2, 800, generator=torch.Generator().manual_seed(0))
    plain = branch.log_spectrogram(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = branch.log_spectrogram(x.bfloat16())
        out = branch(x)
    assert autocast.dtype == torch.float32
    # same numbers up to the bf16 rounding of the *input*, not a bf16 FFT
    torch.testing.assert_close(autocast, branch.log_spectrogram(x.bfloat16().float()))
    assert (plain - autocast).abs().max() < 0.5
    assert torch.isfinite(out).all()


def test_db_floor_is_per_record():
    """top_db must floor each record at its own max: a loud neighbour in the batch must not
    change a quiet record's features (torchaudio's 3D layout would share one max)."""
    branch = FrequencyBranch(FrequencyConfig(**SMALL, top_db=40.0)).eval()
    tone = torch.sin(torch.arange(1000) * 0.3).unsqueeze(0)  # > 40 dB between peak and floor
    quiet = 1e-3 * (tone + 1e-4 * torch.randn(1, 1000))
    loud = 1e3 * torch.randn(1, 1000)
    alone = branch.log_spectrogram(quiet)
    together = branch.log_spectrogram(torch.cat((quiet, loud)))[:1]
    torch.testing.assert_close(alone, together)
    branch.freq_norm = torch.nn.Identity()  # the dB values themselves
    spec = branch.log_spectrogram(quiet)
    assert spec.max() - spec.min() == pytest.approx(40.0, abs=1e-3)


def test_spec_augment_only_in_training():
    branch = FrequencyBranch(FrequencyConfig(**SMALL))
    x = torch.randn(4, 2000)
    branch.eval()
    torch.manual_seed(0)
    a = branch(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a, branch(x))
    branch.train()
    torch.manual_seed(0)
    b = branch(x)
    torch.manual_seed(1)
    assert not torch.allclose(b, branch(x))
    # masks write 0 (the mean of the normalised spectrogram) over whole rows/columns
    spec = branch.log_spectrogram(x).unsqueeze(1)
    torch.manual_seed(0)
    masked = branch.freq_masks[0](spec)
    zero_rows = (masked == 0).all(-1)  # (B, 1, F)
    assert zero_rows.any() and zero_rows.sum(-1).max() <= SMALL["freq_mask_param"]


def test_training_is_deterministic_without_masks():
    branch = FrequencyBranch(FrequencyConfig(**{**SMALL, "freq_mask_param": 0,
                                                "time_mask_param": 0})).train()
    assert len(branch.freq_masks) == 0 and len(branch.time_masks) == 0
    x = torch.randn(3, 700)
    torch.testing.assert_close(branch(x), branch(x))


def test_instance_norm_normalises_each_bin_over_time():
    branch = FrequencyBranch(FrequencyConfig(**SMALL, freq_norm="instance"))
    spec = branch.log_spectrogram(torch.randn(2, 3000) * torch.linspace(0.1, 3, 3000))
    torch.testing.assert_close(spec.mean(-1), torch.zeros(2, 24), atol=1e-4, rtol=0)


def test_backward_reaches_every_parameter():
    branch = FrequencyBranch(FrequencyConfig(**SMALL)).train()
    branch(torch.randn(3, 900)).sum().backward()
    for name, p in branch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad,match", [
    (dict(spectrogram="cqt"), "spectrogram"),
    (dict(n_fft=64, n_mels=40), "n_mels"),
    (dict(hop_length=1024), "hop_length"),
    (dict(freq_mask_param=64), "freq_mask_param"),
    (dict(freq_norm="layer"), "freq_norm"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        FrequencyConfig(**{**SMALL, **bad})


@pytest.mark.parametrize("bad,match", [
    (dict(win_length=0), "win_length"),
    (dict(num_masks=-1), "num_masks"),
    (dict(time_mask_param=-3), "time_mask_param"),
    (dict(channels=(4.5, 8)), "channels"),
])
def test_config_rejects_values_that_used_to_pass_silently(bad, match):
    with pytest.raises(ValueError, match=match):
        FrequencyConfig(**{**SMALL, **bad})


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 300, 2), r"1 channel\(s\)"),
    (torch.randn(300), "got 1 dims"),
    (torch.ones(2, 300, dtype=torch.long), "floating-point"),
])
def test_bad_input_raises_clear_error(x, match):
    branch = FrequencyBranch(FrequencyConfig(**SMALL)).eval()
    with pytest.raises(ValueError, match=match):
        branch(x)


def test_channels_from_yaml_list():
    assert FrequencyConfig(channels=[8, 16]).channels == (8, 16)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_on_gpu_under_autocast(dtype):
    branch = FrequencyBranch(FrequencyConfig(**SMALL)).cuda().train()
    x = torch.randn(4, 4000, device="cuda")
    assert branch.log_spectrogram(x).device.type == "cuda"
    with torch.autocast("cuda", dtype=dtype):
        spec = branch.log_spectrogram(x)
        out = branch(x)
    assert spec.dtype == torch.float32
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in branch.parameters())


@pytest.mark.parametrize("kind", ["linear", "mel"])
def test_padded_signal_gives_what_it_gives_alone(kind):
    """Zero padding inside a batch (with lengths) changes nothing: same frames, a dB floor
    from the real frames only, and CNN pooling over the real frames only."""
    torch.manual_seed(0)
    branch = FrequencyBranch(FrequencyConfig(spectrogram=kind, n_fft=32, hop_length=8, n_mels=12,
                                             channels=(4, 8, 8), freq_mask_param=2))
    with torch.no_grad():
        for module in branch.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    branch.eval()
    short, long = torch.randn(1, 77), torch.randn(1, 150)
    batch = torch.zeros(2, 150)
    batch[0, :77], batch[1] = short, long
    with torch.no_grad():
        together = branch(batch, torch.tensor([77, 150]))
        torch.testing.assert_close(together[0], branch(short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[1], branch(long)[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the conv STFT (export)


@pytest.mark.parametrize("freq", [
    dict(spectrogram="mel", n_mels=16),
    dict(spectrogram="linear", n_fft=63, hop_length=7, win_length=40),
    dict(spectrogram="mel", n_fft=100, hop_length=30, win_length=60, n_mels=20),
])
def test_conv_stft_matches_torchaudio(freq: dict) -> None:
    branch = FrequencyBranch(FrequencyConfig(**{**SMALL, **freq})).eval()
    x = torch.randn(3, 1001) + torch.sin(torch.arange(1001) * 0.3)
    want = branch.spectrogram(x)  # the torchaudio transform itself
    want_log, want_out = branch.log_spectrogram(x), branch(x)
    keys = set(branch.state_dict())
    branch.set_stft("conv")
    assert set(branch.state_dict()) == keys  # the basis is not a parameter
    got = branch.power_spectrogram(x).squeeze(1)
    assert got.shape == want.shape
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    torch.testing.assert_close(branch.log_spectrogram(x), want_log, atol=1e-2, rtol=0)
    torch.testing.assert_close(branch(x), want_out, atol=1e-4, rtol=0)
    branch.set_stft("fft")
    assert "stft_basis" not in dict(branch.named_buffers())


def test_stft_mode_is_checked_and_fft_is_the_default() -> None:
    branch = FrequencyBranch(FrequencyConfig(**SMALL))
    assert branch.stft == "fft"
    with pytest.raises(ValueError, match="stft must be one of"):
        branch.set_stft("dft")


@pytest.mark.parametrize("shape", [(2, 3, 33, 17), (2, 3, 32, 16), (1, 1, 1, 5)])
def test_ceil_mean_pool_is_avg_pool_with_ceil_mode_and_compiles_exactly(shape):
    """The same function as nn.AvgPool2d(2, ceil_mode=True), forward and backward, and the same
    gradient under torch.compile (whose avg_pool2d(ceil_mode=True) backward is wrong on
    partial windows in torch 2.11)."""
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(torch.nn.AvgPool2d(2, ceil_mode=True)(x).shape, dtype=torch.float64)
    grads = []
    for pool in (torch.nn.AvgPool2d(2, ceil_mode=True), CeilMeanPool2d(),
                 torch.compile(CeilMeanPool2d())):
        xi = x.clone().requires_grad_()
        out = pool(xi)
        (out * weight).sum().backward()
        grads.append((out.detach(), xi.grad))
    for out, grad in grads[1:]:
        torch.testing.assert_close(out, grads[0][0])
        torch.testing.assert_close(grad, grads[0][1])
