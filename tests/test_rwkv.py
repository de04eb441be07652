"""Tests for models/rwkv.py: shapes, optimized == original, checkpointing, streaming, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.rwkv import (
    RWKVConfig,
    RWKVEncoder,
    RWKVState,
    create_optimized_rwkv,
    create_original_rwkv,
    optimizer_groups,
    shift_mix,
)

cuda = pytest.mark.cuda

SMALL = dict(hidden_size=16, num_layers=2, ffn_mult=2)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Perturb every parameter: RWKV's zero-initialised projections would make most
    comparisons trivially equal (each block starts as the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def pair(**options) -> tuple[RWKVEncoder, RWKVEncoder]:
    """An optimized model with random weights and the original loaded with the same weights."""
    fast = randomize(create_optimized_rwkv(**{**SMALL, **options}))
    original = create_original_rwkv(**{**SMALL, **options})
    original.load_state_dict(fast.state_dict())
    return fast.eval(), original.eval()


# ------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("patch", [1, 4])
@pytest.mark.parametrize("T", [1, 2, 5, 17, 1000, 100_000])
def test_pooled_shape_for_any_length(T, patch):
    model = create_optimized_rwkv(hidden_size=8, num_layers=1, ffn_mult=1, patch_size=patch)
    with torch.no_grad():
        out = model(torch.randn(2, T, 1))
    assert out.shape == (2, 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("T,patch,bidirectional", [(1, 1, False), (7, 3, True), (64, 8, False)])
def test_sequence_shape(T, patch, bidirectional):
    model = create_optimized_rwkv(input_size=3, **SMALL, patch_size=patch,
                                  bidirectional=bidirectional, return_sequence=True)
    out = model(torch.randn(2, T, 3))
    assert out.shape == (2, math.ceil(T / patch), 16)


def test_two_dim_input_is_one_channel():
    model = randomize(create_optimized_rwkv(**SMALL)).eval()
    x = torch.randn(3, 20)
    torch.testing.assert_close(model(x), model(x.unsqueeze(-1)))


def test_patch_stem_is_a_strided_conv():
    model = randomize(create_optimized_rwkv(input_size=2, **SMALL, patch_size=4))
    conv = nn.Conv1d(2, 16, kernel_size=4, stride=4)
    with torch.no_grad():  # Linear input is (patch step, channel) flattened: step-major
        conv.weight.copy_(model.stem.proj.weight.view(16, 4, 2).transpose(1, 2))
        conv.bias.copy_(model.stem.proj.bias)
    x = torch.randn(3, 24, 2)
    torch.testing.assert_close(model.stem(x), conv(x.transpose(1, 2)).transpose(1, 2))


# ------------------------------------------------------------------- optimized == original


@pytest.mark.parametrize("options", [
    {},
    {"bidirectional": True},
    {"patch_size": 3, "pooling": "last"},
    {"return_sequence": True, "input_size": 2},
])
def test_optimized_matches_original(options):
    fast, original = pair(**options)
    x = torch.randn(2, 40, options.get("input_size", 1))
    torch.testing.assert_close(fast(x), original(x), rtol=1e-5, atol=1e-5)


def test_optimized_matches_original_gradients():
    fast, original = pair(bidirectional=True)
    x = torch.randn(2, 30, 1)
    xf, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (fast(xf) ** 2).sum().backward()
    (original(xo) ** 2).sum().backward()
    torch.testing.assert_close(xf.grad, xo.grad, rtol=1e-4, atol=1e-5)
    for (name, pf), po in zip(fast.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, po.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_original_uses_reference_wkv_and_same_state_dict():
    fast, original = pair(bidirectional=True, patch_size=2)
    assert fast.state_dict().keys() == original.state_dict().keys()
    assert {b.att.backend for b in original.blocks} == {"reference"}
    assert {b.att.backend for b in fast.blocks} == {"auto"}
    slow = create_optimized_rwkv(**SMALL, compile_kernels=False)
    assert {b.att.backend for b in slow.blocks} == {"torch"}


# --------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_gives_same_gradients():
    plain = randomize(create_optimized_rwkv(**SMALL, dropout=0.2, bidirectional=True))
    ckpt = create_optimized_rwkv(**SMALL, dropout=0.2, bidirectional=True,
                                 gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(3, 50, 1)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # same dropout masks; checkpointing replays the RNG state
        loss = (model.train()(x) ** 2).sum()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(g0, g1)


def test_set_gradient_checkpointing_toggles():
    model = create_optimized_rwkv(**SMALL)
    assert model.gradient_checkpointing is False
    model.set_gradient_checkpointing(True)
    assert model.gradient_checkpointing is True


# ------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunks,patch", [([1] * 12, 1), ([5, 1, 13, 2, 9], 1),
                                          ([4, 8, 2, 10, 6, 3], 2)])
def test_streaming_matches_one_pass(chunks, patch):
    torch.manual_seed(0)
    model = randomize(create_optimized_rwkv(**SMALL, patch_size=patch,
                                            return_sequence=True)).eval()
    x = torch.randn(2, sum(chunks), 1)
    state = model.init_state(2)
    outs = []
    for piece in x.split(chunks, dim=1):
        out, state = model(piece, state)
        outs.append(out)
        assert [t.shape for t in state] == [t.shape for t in model.init_state(2)]
    torch.testing.assert_close(torch.cat(outs, 1), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_streaming_pooled_output_is_whole_signal_pooling(pooling):
    model = randomize(create_optimized_rwkv(**SMALL, pooling=pooling)).eval()
    x = torch.randn(3, 70, 1)
    state = model.init_state(3)
    for piece in x.split(16, dim=1):
        out, state = model(piece, state)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert int(state.steps) == 70


def test_streaming_state_detaches_and_rejects_misuse():
    model = randomize(create_optimized_rwkv(**SMALL))
    _, state = model(torch.randn(2, 5, 1), model.init_state(2))
    assert isinstance(state, RWKVState) and state.wkv.requires_grad
    assert not any(t.requires_grad for t in state.detach())
    with pytest.raises(ValueError, match="expected wkv of shape"):
        model(torch.randn(3, 5, 1), state)
    bidirectional = create_optimized_rwkv(**SMALL, bidirectional=True)
    with pytest.raises(ValueError, match="unidirectional"):
        bidirectional.init_state(2)


# ------------------------------------------------------------------------------- init


def test_init_follows_rwkv_lm_v4():
    L, C = 4, 32
    model = create_optimized_rwkv(hidden_size=C, num_layers=L)
    for i, block in enumerate(model.blocks):
        decay = block.att.time_decay.detach()
        # spread from -5 (slow decay) to 3 (fast) across channels, monotone in the channel
        assert decay[0].item() == pytest.approx(-5.0) and decay[-1].item() == pytest.approx(3.0)
        assert (decay.diff() > 0).all()
        first = block.att.time_first.detach()
        assert first[:3].tolist() == pytest.approx([math.log(0.3), math.log(0.3) + 0.5,
                                                    math.log(0.3) - 0.5])
        ratio = 1 - i / L
        assert block.att.time_mix_k[C // 2].item() == pytest.approx(0.5 ** ratio)
        for linear in (block.att.key, block.att.receptance, block.att.output,
                       block.ffn.receptance, block.ffn.value):
            assert (linear.weight == 0).all()
    # deeper layers keep more long memory: mid-channel decay is lower higher up
    mids = [b.att.time_decay[C // 2].item() for b in model.blocks]
    assert mids == sorted(mids, reverse=True)


def test_blocks_start_as_identity_and_deep_stacks_train():
    model = create_optimized_rwkv(hidden_size=16, num_layers=24)
    x = torch.randn(2, 64, 1)
    expected = model.ln_out(model.ln_in(model.stem(x))).mean(1)
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(n) for n in norms)
    assert model.blocks[-1].att.output.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------- config, groups


def test_config_validation_and_unknown_options():
    with pytest.raises(ValueError, match="unknown RWKV option"):
        create_optimized_rwkv(hiden_size=3)
    with pytest.raises(ValueError, match="pooling"):
        RWKVConfig(pooling="max")
    with pytest.raises(ValueError, match="patch_size"):
        RWKVConfig(patch_size=0)
    with pytest.raises(ValueError, match="wkv_backend"):
        RWKVConfig(wkv_backend="triton")
    with pytest.raises(ValueError, match="compile_mode"):
        RWKVConfig(compile_mode="fast")


def test_optimizer_groups_cover_each_parameter_once():
    model = create_optimized_rwkv(**SMALL, bidirectional=True, patch_size=4)
    groups = optimizer_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)].split(".")[-1] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    assert {"time_decay", "time_first", "time_decay_reverse", "time_mix_k", "bias",
            "weight"} <= no_decay  # "weight" of the LayerNorms
    assert all(p.dim() == 2 for p in groups[0]["params"])


# ------------------------------------------------------------------------------- input


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 10, 2), "channel"),
    (torch.randn(10), "dims"),
    (torch.randn(2, 0, 1), "too short"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
    (torch.ones(2, 5, dtype=torch.long), "floating-point"),
])
def test_bad_input_raises_clear_errors(x, match):
    with pytest.raises(ValueError, match=match):
        create_optimized_rwkv(**SMALL)(x)


def test_bf16_autocast_on_cpu_is_finite():
    model = randomize(create_optimized_rwkv(**SMALL, bidirectional=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 33, 1))
    out.float().pow(2).sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------- GPU


def _cuda_kernel_available() -> bool:
    try:
        from models.wkv_build import load_extension_or_none
    except ImportError:
        return False
    return load_extension_or_none() is not None


@cuda
def test_cuda_backend_matches_torch_backend():
    if not _cuda_kernel_available():
        pytest.skip("the CUDA WKV kernel is not built")
    fast = randomize(create_optimized_rwkv(**SMALL, bidirectional=True, wkv_backend="cuda"))
    ref = create_optimized_rwkv(**SMALL, bidirectional=True, wkv_backend="torch")
    ref.load_state_dict(fast.state_dict())
    fast, ref = fast.cuda(), ref.cuda()
    x = torch.randn(4, 300, 1, device="cuda")
    outs = []
    for model in (fast, ref):
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.pow(2).sum().backward()
        outs.append((out, xi.grad, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-3, atol=1e-4)
    for g0, g1 in zip(outs[0][2], outs[1][2], strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-3, atol=1e-3)


@cuda
def test_streaming_matches_one_pass_on_cuda():
    model = randomize(create_optimized_rwkv(**SMALL, return_sequence=True)).cuda().eval()
    x = torch.randn(2, 96, 1, device="cuda")
    state, outs = model.init_state(2), []
    for piece in x.split(32, dim=1):
        out, state = model(piece, state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), model(x), rtol=1e-4, atol=1e-4)


@cuda
def test_compile_fullgraph_has_no_graph_breaks():
    if not _cuda_kernel_available():
        pytest.skip("the CUDA WKV kernel is not built")
    torch._dynamo.reset()
    model = randomize(create_optimized_rwkv(**SMALL, bidirectional=True)).cuda()
    x = torch.randn(2, 128, 1, device="cuda")
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    compiled(x).pow(2).sum().backward()


@cuda
def test_compile_blocks_option_matches_eager():
    torch._dynamo.reset()
    eager = randomize(create_optimized_rwkv(**SMALL)).cuda()
    compiled = create_optimized_rwkv(**SMALL, compile_blocks=True).cuda()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 64, 1, device="cuda")
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


@cuda
def test_reduce_overhead_compile_trains_like_eager():
    # each block replayed as a CUDA graph: recorded on the first steps, replayed after, with
    # the optimizer changing the weights in between
    torch._dynamo.reset()
    eager = randomize(create_optimized_rwkv(**SMALL)).cuda()
    compiled = create_optimized_rwkv(**SMALL, compile_blocks=True,
                                     compile_mode="reduce-overhead").cuda()
    compiled.load_state_dict(eager.state_dict())
    models = (eager, compiled)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for step in range(4):
        x = torch.randn(2, 64, 1, device="cuda")
        losses = []
        for model, opt in zip(models, optimizers, strict=True):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-3), step
        # validation between training steps, as Lightning runs it (inference mode, eval)
        with torch.inference_mode():
            for model in models:
                model.eval()
            outs = [model(x + 1).float().clone() for model in models]
            for model in models:
                model.train()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_autocast_forward_backward_finite(dtype, checkpointing):
    model = randomize(create_optimized_rwkv(hidden_size=64, num_layers=4, bidirectional=True,
                                            gradient_checkpointing=checkpointing)).cuda()
    x = torch.randn(4, 2000, 1, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("stem,patch,depth", [("conv", 1, 1), ("conv", 3, 1), ("conv", 1, 3),
                                              ("conv", 3, 2), ("patch", 4, 1), ("patch", 1, 1)])
@pytest.mark.parametrize("pooling", ["meanmax", "mean", "last"])
def test_padded_signal_gives_what_it_gives_alone(stem, patch, depth, pooling):
    """A signal zero-padded inside a batch of longer ones, with its length, gives exactly the
    features it gives alone: the stem (every layer of it), the reverse scan and the pooling
    leave padding out."""
    model = randomize(create_optimized_rwkv(**SMALL, stem=stem, patch_size=patch,
                                            stem_depth=depth, bidirectional=True,
                                            pooling=pooling))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    short, long = torch.randn(1, 37), torch.randn(1, 50)
    batch = torch.zeros(2, 50)
    batch[0, :37], batch[1] = short, long
    with torch.no_grad():
        together = model(batch, lengths=torch.tensor([37, 50]))
        torch.testing.assert_close(together[0], model(short)[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(together[1], model(long)[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [1, 3])
def test_conv_stem_shapes_and_original_model(depth):
    fast, original = pair(stem="conv", patch_size=3, pooling="meanmax", bidirectional=True,
                          stem_depth=depth)
    x = torch.randn(2, 31)
    assert fast(x).shape == (2, fast.out_features) == (2, 2 * SMALL["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(fast(x), original(x), atol=1e-4, rtol=1e-4)


def test_conv_stem_refuses_streaming_and_bad_kernels():
    model = create_optimized_rwkv(**SMALL, stem="conv")
    with pytest.raises(ValueError, match="'patch' stem"):
        model(torch.randn(1, 8), model.init_state(1))
    with pytest.raises(ValueError, match="stem_kernels"):
        RWKVConfig(stem="conv", stem_kernels=(4,))
    with pytest.raises(ValueError, match="stem must be one of"):
        RWKVConfig(stem="inception")
    with pytest.raises(ValueError, match="stem_depth = 3 needs the 'conv' stem"):
        RWKVConfig(stem="patch", stem_depth=3)
    with pytest.raises(ValueError, match="stem_depth must be an integer >= 1; got 0"):
        RWKVConfig(stem="conv", stem_depth=0)


# --------------------------------------------------- fused blocks == the per-op (unfused) math


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_blocks_match_unfused_outputs_and_gradients(dtype, tol, bidirectional):
    """The fused blocks (one shift-mix pass, k/v/r in one batched GEMM, sigmoid(r) * wkv in the
    operator) against the original's per-op code (explicit shift, three mixes, three GEMMs,
    sigmoid and product written out, the sequential reference WKV), outputs and every
    parameter's gradient."""
    fast, original = pair(bidirectional=bidirectional, return_sequence=True)
    fast, original = fast.to(dtype), original.to(dtype)
    x = torch.randn(3, 45, 1, dtype=dtype)
    xf, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(3, 45, SMALL["hidden_size"], dtype=dtype)
    out_f, out_o = fast(xf), original(xo)
    torch.testing.assert_close(out_f, out_o, rtol=tol, atol=tol)
    (out_f * weight).sum().backward()
    (out_o * weight).sum().backward()
    torch.testing.assert_close(xf.grad, xo.grad, rtol=tol, atol=tol)
    for (name, pf), po in zip(fast.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, po.grad, rtol=tol, atol=tol, msg=name)


def test_shift_mix_is_token_shift_and_lerp():
    x, last = torch.randn(2, 7, 5), torch.randn(2, 5)
    ratios = torch.rand(3, 5)
    out = shift_mix(x, last, ratios)
    xx = torch.cat((last.unsqueeze(1), x[:, :-1]), 1)
    for i in range(3):
        torch.testing.assert_close(out[i], ratios[i] * x + (1 - ratios[i]) * xx)
        assert out[i].is_contiguous()
    # no previous chunk: step 0 mixes with zeros
    torch.testing.assert_close(shift_mix(x, None, ratios)[:, :, 0], ratios[:, None] * x[:, 0])


@cuda
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_blocks_on_cuda_match_unfused(bidirectional):
    """On the GPU with the CUDA kernel: float32 against the unfused original (reference WKV),
    and under bf16 autocast (bf16 activations into the GEMMs and the gated kernel) within
    bf16 rounding of it."""
    if not _cuda_kernel_available():
        pytest.skip("the CUDA WKV kernel is not built")
    fast, original = pair(bidirectional=bidirectional, wkv_backend="cuda")
    fast, original = fast.cuda(), original.cuda()
    x = torch.randn(2, 200, 1, device="cuda")
    grads = []
    for model, amp in ((original, False), (fast, False), (fast, True)):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().pow(2).sum().backward()
        grads.append((out.float(), [p.grad.clone() for p in model.parameters()]))
    (ref, ref_g), (f32, f32_g), (bf16, bf16_g) = grads
    torch.testing.assert_close(f32, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(f32_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert (bf16 - ref).norm() / ref.norm() < 3e-2
    for a, b in zip(bf16_g, ref_g, strict=True):
        assert (a - b).norm() <= 5e-2 * b.norm() + 1e-3
