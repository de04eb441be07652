"""The WKV operator: every backend against the float64 sequential reference."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.wkv import (
    EMPTY_P,
    empty_state,
    wkv,
    wkv_chunked,
    wkv_reference,
    wkv_reference_backward,
)

ROOT = Path(__file__).resolve().parents[1]
f64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """|a - b| / |b|, with |b| taken as at least floor (for values that cancel to near 0)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def make_inputs(B, T, C, device="cpu", k_range=3.0, decay_shift=0.0, seed=None, state=False):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    decay = torch.randn(C, generator=g, dtype=f64) + decay_shift
    first = torch.randn(C, generator=g, dtype=f64)
    k = (torch.rand(B, T, C, generator=g, dtype=f64) * 2 - 1) * k_range
    v = torch.randn(B, T, C, generator=g, dtype=f64)
    s = None
    if state:
        s = torch.stack(
            (torch.randn(B, C, generator=g, dtype=f64),
             torch.rand(B, C, generator=g, dtype=f64) + 1,
             torch.randn(B, C, generator=g, dtype=f64)), 1)
    to = {"device": device}
    return (decay.to(**to), first.to(**to), k.to(**to), v.to(**to),
            None if s is None else s.to(**to))


def grads_of(backend, decay, first, k, v, s, gy, through_state=True):
    """wkv's outputs and the gradients of a loss through y and, with through_state, through
    the final state as the A, B it represents. s may be None."""
    ins = [t.clone().requires_grad_() for t in (decay, first, k, v, s) if t is not None]
    args = ins if s is not None else [*ins, None]
    y, so = wkv(*args, backend=backend)
    loss = (y.double() * gy).sum()
    if through_state:
        loss = loss + (so[:, :2].double() * so[:, 2:].double().exp()).sum()
    return (y, so), torch.autograd.grad(loss, ins)


def reference(decay, first, k, v, state=None):
    """float64 sequential reference of the public operator."""
    return wkv(decay.double(), first.double(), k.double(), v.double(),
               None if state is None else state.double(), backend="reference")


SHAPES = [(1, 1, 1), (2, 17, 3), (3, 40, 5), (2, 64, 8), (1, 100, 33)]


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_reference_float64(shape):
    decay, first, k, v, s = make_inputs(*shape, state=True)
    y_ref, s_ref = reference(decay, first, k, v, s)
    y, s_out = wkv(decay, first, k, v, s, backend="torch")
    assert rel(y, y_ref) < 1e-10
    assert rel(s_out[:, :2] * torch.exp(s_out[:, 2:] - s_ref[:, 2:]), s_ref[:, :2]) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                       (torch.float16, 1e-2)])
def test_torch_backend_low_precision(dtype, tol):
    decay, first, k, v, _ = make_inputs(2, 50, 6)
    kq, vq = k.to(dtype), v.to(dtype)
    y_ref, _ = reference(decay, first, kq, vq)  # same rounded inputs
    y, state = wkv(decay.float(), first.float(), kq, vq, backend="torch")
    assert y.dtype == dtype and state.dtype == torch.float32
    assert rel(y, y_ref) < tol


def test_torch_backend_gradients_match_reference():
    decay, first, k, v, s = make_inputs(2, 37, 4, state=True)
    gy = torch.randn(2, 37, 4, dtype=f64)

    def grads(backend):
        ins = [t.clone().requires_grad_() for t in (decay, first, k, v, s)]
        y, so = wkv(*ins, backend=backend)
        # a loss through y and through the state as the A, B it represents
        loss = (y * gy).sum() + (so[:, :2] * so[:, 2:].exp()).sum()
        return torch.autograd.grad(loss, ins)

    for got, want in zip(grads("torch"), grads("reference"), strict=True):
        assert rel(got, want) < 1e-9


def test_kernel_backward_math_matches_autograd():
    """The step-by-step backward the CUDA kernel implements equals autograd of the reference."""
    decay, first, k, v, s = make_inputs(2, 30, 5, state=True)
    w, u = -torch.exp(decay), first
    gy, gs = torch.randn(2, 30, 5, dtype=f64), torch.randn(2, 3, 5, dtype=f64)
    ins = [t.clone().requires_grad_() for t in (w, u, k, v, s)]
    y, so = wkv_reference(*ins)
    loss = (y * gy).sum() + (so[:, 0] * gs[:, 0] + so[:, 1] * gs[:, 1]).sum()
    want = torch.autograd.grad(loss, ins)
    got = wkv_reference_backward(w, u, k, v, s, gy, gs)
    for g, h in zip(got, want, strict=True):
        assert rel(g, h) < 1e-10


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(backend):
    decay, first, k, v, s = make_inputs(1, 20, 2, state=True)
    k1, k2, v1, v2 = k[:, :9], k[:, 9:], v[:, :9], v[:, 9:]

    def chained(decay, first, k1, v1, k2, v2, s):
        # the state carried from one piece into the next, as streaming does
        y1, s1 = wkv(decay, first, k1, v1, s, backend=backend)
        y2, _ = wkv(decay, first, k2, v2, s1, backend=backend)
        return torch.cat((y1, y2), 1)

    ins = [t.clone().requires_grad_() for t in (decay, first, k1, v1, k2, v2, s)]
    assert torch.autograd.gradcheck(chained, ins, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_state_passing_equals_one_pass(backend):
    decay, first, k, v, _ = make_inputs(2, 70, 3)
    y, s = wkv(decay, first, k, v, backend=backend)
    ys, state = [], None
    for lo, hi in [(0, 1), (1, 20), (20, 53), (53, 70)]:
        yp, state = wkv(decay, first, k[:, lo:hi], v[:, lo:hi], state, backend=backend)
        ys.append(yp)
    assert rel(torch.cat(ys, 1), y) < 1e-12
    assert rel(state, s) < 1e-12


@pytest.mark.parametrize("k_range,decay_shift", [(60, 0), (60, 5), (60, -10), (1, 10), (30, 2)])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 45, 3), (1, 200, 1)])
def test_extreme_inputs_are_finite_and_exact(k_range, decay_shift, shape):
    decay, first, k, v, _ = make_inputs(*shape, k_range=k_range, decay_shift=decay_shift)
    y_ref, _ = reference(decay, first, k, v)
    y, s = wkv(decay.float(), first.float(), k.float(), v.float(), backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel(y, y_ref) < 1e-5


def test_wide_chunks_fall_back_to_steps():
    """k jumping by hundreds inside a chunk exceeds float64's range for the factorised sums;
    those chunks must be recomputed step by step, exactly."""
    decay, first, k, v, _ = make_inputs(2, 40, 4)
    k[:, 3] -= 400.0
    k[:, 20] += 400.0
    y_ref, _ = reference(decay, first, k, v)
    y, _, _ = wkv_chunked(-torch.exp(decay), first, k, v, empty_state(2, 4, dtype=f64))
    assert rel(y, y_ref) < 1e-10


def test_empty_state_matches_none_and_accepts_minus_inf():
    decay, first, k, v, _ = make_inputs(2, 10, 3)
    y0, _ = wkv(decay, first, k, v)
    s = empty_state(2, 3, dtype=f64)
    assert (s[:, 2] == EMPTY_P).all()
    s[:, 2] = float("-inf")
    y1, _ = wkv(decay, first, k, v, s)
    assert rel(y1, y0) < 1e-14


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_output_gate_is_sigmoid_r_times_wkv(backend):
    """wkv(..., r=r) is sigmoid(r) * wkv(...): the composition, gradients of r included."""
    decay, first, k, v, s = make_inputs(2, 40, 5, state=True)
    r = torch.randn(2, 40, 5, dtype=f64)
    gy = torch.randn(2, 40, 5, dtype=f64)
    ins = [t.clone().requires_grad_() for t in (decay, first, k, v, s, r)]
    y, so = wkv(*ins[:5], backend=backend, r=ins[5])
    # through the state as the A, B it represents (the gradient convention)
    got = torch.autograd.grad((y * gy).sum() + (so[:, :2] * so[:, 2:].exp()).sum(), ins)
    ref = [t.clone().requires_grad_() for t in (decay, first, k, v, s, r)]
    y_ref, so_ref = wkv(*ref[:5], backend="reference")
    loss = (torch.sigmoid(ref[5]) * y_ref * gy).sum() + (so_ref[:, :2] * so_ref[:, 2:].exp()).sum()
    want = torch.autograd.grad(loss, ref)
    assert rel(y, torch.sigmoid(r) * y_ref) < 1e-10
    for g, h in zip(got, want, strict=True):
        assert rel(g, h) < 1e-9


def edge_inputs(dtype=f64, device="cpu"):
    """decay beyond the range where exp is finite (w = -inf from 88.7 on) on channels 0-2, and
    k = +inf (an fp16 overflow) at two steps of channel 3, one of them followed by another."""
    decay, first, k, v, s = make_inputs(2, 100, 6, state=True, seed=7)
    decay[:3] = torch.tensor([89.0, 200.0, 1e4], dtype=f64)
    k = k.to(dtype)
    k[0, 10, 3] = k[0, 11, 3] = k[1, 60, 3] = float("inf")
    s[:, 2] = s[:, 2].clamp(max=0)
    return [t.to(device) for t in (decay, first, k, v.to(dtype), s)]


def bounded_like_the_kernels(decay, k):
    """The same inputs with the documented bounds applied: decay <= 30, k <= 1e30."""
    from models.wkv import DECAY_MAX, K_MAX

    return decay.clamp(max=DECAY_MAX), k.double().clamp(max=K_MAX)


def check_edges(backend, dtype, device="cpu", tol=1e-5):
    """No NaN at the numeric edges, and the same values as the reference on bounded inputs;
    no gradient reaches a bounded decay or k."""
    decay, first, k, v, s = edge_inputs(dtype, device)
    gy = torch.randn(k.shape, dtype=f64, device=device)
    compute = torch.float32 if backend in ("cpu", "cuda") else f64
    ins = [decay.to(compute), first.to(compute), k, v, s.to(compute)]
    ins = [t.clone().requires_grad_() for t in ins]
    y, so = wkv(*ins, backend=backend, check_finite=False)
    grads = torch.autograd.grad((y.double() * gy).sum(), ins)
    assert torch.isfinite(y).all() and torch.isfinite(so).all()
    for name, g in zip(["decay", "first", "k", "v", "state"], grads, strict=True):
        assert torch.isfinite(g).all(), name
    assert (grads[0][:3] == 0).all()  # decay past the bound
    assert grads[2][0, 10, 3] == 0 and grads[2][0, 11, 3] == 0 and grads[2][1, 60, 3] == 0
    # an overflowed k dominates its step: y is that step's v
    assert torch.allclose(y[0, 10, 3].double(), v[0, 10, 3].double(), rtol=1e-3)
    d_ref, k_ref = bounded_like_the_kernels(decay, k)
    y_ref, _ = wkv(d_ref.cpu(), first.cpu(), k_ref.cpu(), v.double().cpu(), s.cpu(),
                   backend="reference", check_finite=False)
    assert rel(y.cpu(), y_ref) < tol


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.float16])
def test_numeric_edges_stay_finite(backend, dtype):
    check_edges(backend, dtype, tol=1e-5 if dtype != torch.float16 else 1e-3)


def cpu_op():
    """The C++ operator with its CPU kernel, built here (skips without a C++ compiler)."""
    from models import wkv_build

    if wkv_build.find_cxx() is None:
        pytest.skip("no C++ compiler")
    wkv_build.build_cpu()  # a compiler is here: a failed build is a failure
    return torch.ops.rwkv_signal


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_registration_opcheck(with_state, gated, dtype):
    """Schema, Meta (fake) and autograd registration, incl. torch.compile's dynamic shapes."""
    ops = cpu_op()
    decay, first, k, v, s = make_inputs(2, 70, 3, state=True)
    r = torch.randn(2, 70, 3)
    args = [decay.float(), first.float(), k.to(dtype), v.to(dtype), s.float() if with_state
            else None, r.to(dtype) if gated else None]
    args = [None if t is None else t.clone().requires_grad_() for t in args]
    torch.library.opcheck(ops.wkv.default, args)
    y, so, saved = ops.wkv(*args)
    assert saved.shape == (2, 2, 3, 3) and not saved.requires_grad  # a state per 64 steps
    gargs = (*(None if t is None else t.detach() for t in args), saved, so.detach(),
             torch.randn_like(y), torch.randn_like(so))
    torch.library.opcheck(ops.wkv_backward.default, gargs)
    torch.library.opcheck(ops.wkv_backward.default, (*gargs[:-1], None))  # no final-state grad


def test_cpu_op_gradients_match_reference():
    ops = cpu_op()
    decay, first, k, v, s = make_inputs(2, 150, 4, state=True)
    gy = torch.randn(2, 150, 4, dtype=f64)

    def grads(fn):
        ins = [t.clone().requires_grad_() for t in (decay, first, k, v, s)]
        y, so = fn(*ins)
        loss = (y.double() * gy).sum() + (so[:, :2].double() * so[:, 2:].double().exp()).sum()
        return torch.autograd.grad(loss, ins)

    def through_op(*ins):
        return ops.wkv(*(t.float() for t in ins), None)[:2]

    want_all = grads(lambda *a: wkv(*a, backend="reference"))
    for got, want in zip(grads(through_op), want_all, strict=True):
        assert rel(got, want) < 1e-5


def test_eager_call_host_time_is_tens_of_microseconds():
    """The op path from wkv() down to the kernel costs little host time: Python checks, one
    dispatcher call, the C++ autograd node. Measured on a tiny CPU call (its kernel time is a
    few microseconds), so this bounds the per-call overhead a GPU call also pays."""
    cpu_op()
    decay, first, k, v, _ = make_inputs(1, 16, 32)
    ins = [t.float().requires_grad_() for t in (decay, first, k, v)]
    import time

    def per_call_us(fn, n=300):
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e6

    forward = per_call_us(lambda: wkv(*ins, backend="cpu", check_finite=False))
    # generous bounds: the machine is shared; the typical figures are in docs/benchmarks.md
    assert forward < 200, forward


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d, f, k, v: (d, f, k, v[:, :-1]), "same shape"),
        (lambda d, f, k, v: (d, f, k[0], v[0]), "3 dims"),
        (lambda d, f, k, v: (d, f, k.long(), v), "floating-point"),
        (lambda d, f, k, v: (d[:-1], f, k, v), "decay must have shape"),
        (lambda d, f, k, v: (d, f, k.index_fill(1, torch.tensor([2]), float("nan")), v), "NaN"),
        (lambda d, f, k, v: (d, f, k, v.to("meta")), "one device"),
        (lambda d, f, k, v: (d, f, k[:, :0], v[:, :0]), ">= 1"),
    ],
)
def test_bad_input_raises_clear_error(mutate, message):
    decay, first, k, v, _ = make_inputs(2, 5, 3)
    with pytest.raises(ValueError, match=message):
        wkv(*mutate(decay, first, k, v))


def test_bad_state_and_backend():
    decay, first, k, v, _ = make_inputs(2, 5, 3)
    with pytest.raises(ValueError, match=r"state must have shape \(B, 3, C\)"):
        wkv(decay, first, k, v, torch.zeros(2, 2, 3, dtype=f64))
    with pytest.raises(ValueError, match="backend must be one of"):
        wkv(decay, first, k, v, backend="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        wkv(decay, first, k, v, backend="cuda")


def test_auto_backend_logged_once(caplog):
    import models.wkv as mod

    mod._logged_choice.clear()
    decay, first, k, v, _ = make_inputs(1, 4, 2)
    with caplog.at_level(logging.INFO, logger="models.wkv"):
        wkv(decay, first, k, v)
        wkv(decay, first, k, v)
        with torch.no_grad():
            wkv(*make_inputs(2, 4, 256)[:4])  # wide, no autograd: the step loop
            wkv(*make_inputs(1, 4, 2)[:4])  # narrow: stays on the chunked scan
    lines = [r.message for r in caplog.records if r.message.startswith("WKV backend")]
    # float64 never goes to the float32 C++ kernel
    why = "float64 inputs on CPU (the C++ kernel is float32)"
    assert lines == [f"WKV backend: torch ({why})",
                     f"WKV backend: reference ({why}; without autograd the step loop is faster)"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc")
def test_cuda_kernel_compiles_without_gpu(tmp_path):
    """`python -m models.wkv_build --check` compiles the kernel with nvcc even with no GPU."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "models.wkv_build", "--check"], cwd=ROOT,
                          env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WKV CUDA kernel built" in proc.stdout
    assert list(tmp_path.rglob("*.so")), "no shared object was produced"
