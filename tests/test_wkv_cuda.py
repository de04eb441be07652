"""The CUDA WKV kernel against the float64 reference (runs only where a GPU is present).

tests/test_wkv_emulated.py runs the same kernel code on the CPU; here it runs on the GPU, with
the real memory model, scheduling and limits (grid size, T = 2^24, B = 70,000)."""

import math

import pytest
import torch

from models.wkv import empty_state, wkv
from tests.test_wkv import check_edges, make_inputs, rel

pytestmark = pytest.mark.cuda  # skipped without a GPU (conftest.py)
DEVICE = BACKEND = "cuda"
LONG_T = 2**24  # the longest record tested, B=1, C=32
WIDE_B = 70_000  # more batch rows than a grid's y or z dimension could hold
f64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def library():
    from models import wkv_build

    if DEVICE == "cuda":
        wkv_build.build()  # a GPU is here: a failed build is a failure, not a skip
    assert wkv_build.load_extension_or_none(BACKEND) is not None


def ran_the_kernel(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "WKVFunction" in y.grad_fn.name()


def outputs_and_grads(backend, tensors, gy, through_state=True):
    """wkv's outputs and the gradients of sum(y * gy) (+ the final state as the A, B it
    represents) for tensors = (decay, first, k, v, state or None, r or None)."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    decay, first, k, v, s, r = leaves
    y, so = wkv(decay, first, k, v, s, backend=backend, r=r)
    loss = (y.double() * gy).sum()
    if through_state:
        loss = loss + (so[:, :2].double() * so[:, 2:].double().exp()).sum()
    present = [t for t in leaves if t is not None]
    return (y, so), torch.autograd.grad(loss, present)


def inputs(B, T, C, dtype, with_state=True, gated=True, **kw):
    """float64 inputs (decay, first, k, v, state, r) on DEVICE, k, v and r rounded to `dtype`
    first so the reference sees the kernel's inputs; state p <= 0 keeps the loss's e^p small."""
    device = DEVICE
    decay, first, k, v, s = make_inputs(B, T, C, device=device, state=with_state, **kw)
    if with_state:
        s[:, 2] = s[:, 2].clamp(max=0)
    r = torch.randn(B, T, C, dtype=f64, device=device) if gated else None
    rounded = [None if t is None else t.to(dtype).double() for t in (k, v, r)]
    return decay, first, rounded[0], rounded[1], s, rounded[2]


def as_kernel_inputs(tensors, dtype):
    decay, first, k, v, s, r = tensors
    low = [None if t is None else t.to(dtype) for t in (k, v, r)]
    return (decay.float(), first.float(), low[0], low[1], None if s is None else s.float(),
            low[2])


def assert_matches_reference(tensors, dtype, gy, tol=None, reduced_tol=None):
    (y_ref, s_ref), g_ref = outputs_and_grads("reference", tensors, gy)
    (y, so), g = outputs_and_grads(BACKEND, as_kernel_inputs(tensors, dtype), gy)
    assert ran_the_kernel(y)
    tol = tol or TOL[dtype]
    assert y.dtype == dtype and so.dtype == torch.float32
    assert rel(y, y_ref) < tol
    assert rel(so[:, :2] * torch.exp(so[:, 2:].double() - s_ref[:, 2:]), s_ref[:, :2]) < 1e-5
    names = [n for n, t in zip(["decay", "first", "k", "v", "state", "r"], tensors, strict=True)
             if t is not None]
    for name, got, want in zip(names, g, g_ref, strict=True):
        assert got.dtype == (dtype if name in ("k", "v", "r") else torch.float32), name
        # decay and first gradients are float32 sums over B*T terms of both signs: with C=1
        # the sum can cancel to a small value, and its relative error grows
        reduced = name in ("decay", "first")
        assert rel(got, want) < (reduced_tol or max(tol, 2e-4) if reduced else tol), name


# every path: one step; tails; C not a multiple of 4 (scalar kernels) or of a tile's channels
# (idle lanes); several channel groups and tiles per series
SHAPES = [(1, 1, 1), (2, 17, 3), (3, 100, 33), (2, 700, 256), (4, 48, 1), (2, 130, 8),
          (3, 1000, 36), (1, 3750, 256)]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, dtype, with_state, gated):
    tensors = inputs(*shape, dtype, with_state, gated)
    gy = torch.randn(shape, dtype=f64, device=DEVICE).to(dtype).double()  # gy in k's dtype
    assert_matches_reference(tensors, dtype, gy)


def test_small_case_for_sanitizers():
    """Small enough for compute-sanitizer (memcheck, racecheck): every dtype, the vector and
    the scalar kernels, state and gate, several tiles with look-back, a tail. The reference runs
    on the CPU, so the GPU runs (nearly) nothing but the WKV kernels."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((2, 300, 8), (1, 200, 5)):
            decay, first, k, v, s, r = (None if t is None else t.cpu() for t in inputs(*shape,
                                                                                        dtype))
            gy = torch.randn(shape, dtype=f64).to(dtype).double()
            (y_ref, _), g_ref = outputs_and_grads("reference", (decay, first, k, v, s, r), gy)
            on_gpu = [t.to(DEVICE) for t in as_kernel_inputs((decay, first, k, v, s, r), dtype)]
            (y, _), g = outputs_and_grads(BACKEND, on_gpu, gy.to(DEVICE))
            assert rel(y.cpu(), y_ref) < TOL[dtype]
            for name, got, want in zip(["decay", "first", "k", "v", "state", "r"], g, g_ref,
                                       strict=True):
                assert rel(got.cpu(), want) < max(TOL[dtype], 2e-4), name


def test_strided_and_unaligned_inputs():
    """Non-contiguous inputs, and a contiguous one that starts 4 bytes into its storage (no
    16-byte vectors: the scalar kernels run), give the reference's values."""
    B, T, C = 2, 150, 16
    decay, first, k, v, s, r = inputs(B, T, C, torch.float32)
    wide = torch.zeros(B, T, 2 * C, device=DEVICE)
    wide[..., ::2] = k.float()
    k_strided = wide[..., ::2]
    flat = torch.zeros(B * T * C + 1, device=DEVICE)
    v_unaligned = flat[1:].view(B, T, C)
    v_unaligned.copy_(v.float())
    assert not k_strided.is_contiguous() and v_unaligned.data_ptr() % 16 != 0
    gy = torch.randn(B, T, C, dtype=f64, device=DEVICE)
    (y_ref, _), g_ref = outputs_and_grads("reference", (decay, first, k, v, s, r), gy)
    tensors = (decay.float(), first.float(), k_strided, v_unaligned, s.float(), r.float())
    (y, _), g = outputs_and_grads(BACKEND, tensors, gy)
    assert rel(y, y_ref) < 1e-5
    for got, want in zip(g, g_ref, strict=True):
        assert rel(got, want) < 2e-4


def test_state_passing_equals_one_pass():
    decay, first, k, v, _, _ = inputs(3, 1000, 20, torch.float32, with_state=False, gated=False)
    decay, first, k, v = decay.float(), first.float(), k.float(), v.float()
    y, s = wkv(decay, first, k, v, backend=BACKEND)
    ys, state = [], None
    for lo, hi in [(0, 7), (7, 64), (64, 161), (161, 300), (300, 1000)]:
        part, state = wkv(decay, first, k[:, lo:hi], v[:, lo:hi], state, backend=BACKEND)
        ys.append(part)
    assert rel(torch.cat(ys, 1), y) < 1e-5
    assert rel(state[:, :2] * torch.exp(state[:, 2:] - s[:, 2:]), s[:, :2]) < 1e-5


@pytest.mark.parametrize("k_range,decay_shift", [(60, 0), (60, 5), (60, -10), (1, 10)])
def test_extreme_inputs(k_range, decay_shift):
    tensors = inputs(2, 300, 12, torch.float32, k_range=k_range, decay_shift=decay_shift)
    gy = torch.randn(2, 300, 12, dtype=f64, device=DEVICE)
    (y_ref, _), g_ref = outputs_and_grads("reference", tensors, gy, through_state=False)
    (y, s), g = outputs_and_grads(BACKEND, as_kernel_inputs(tensors, torch.float32), gy,
                                  through_state=False)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel(y, y_ref) < 1e-5
    for name, got, want in zip(["decay", "first", "k", "v", "state", "r"], g, g_ref,
                               strict=True):
        assert torch.isfinite(got).all(), name
        # exponents near +-60: the float32 sums of the decay gradient lose a few digits
        assert rel(got, want) < (5e-3 if name == "decay" else 1e-4), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_numeric_edges(dtype):
    """decay beyond exp's range and k = +inf (fp16 overflow): finite, and the reference's
    values on the bounded inputs."""
    check_edges(BACKEND, dtype, device=DEVICE, tol=1e-5 if dtype == torch.float32 else 1e-3)


def test_gradient_values_at_100k_steps():
    """T = 100,000: outputs and gradient values (not only finiteness) against the chunked
    float64 backend, on slices at the start, the middle and the end and in total."""
    B, T, C = 2, 100_000, 8
    decay, first, k, v, s, _ = inputs(B, T, C, torch.float32, gated=False, k_range=3,
                                      decay_shift=-4)
    tensors = (decay, first, k, v, s, None)
    gy = torch.randn(B, T, C, dtype=f64, device=DEVICE)
    (y_ref, _), g_ref = outputs_and_grads("torch", tensors, gy)
    (y, _), g = outputs_and_grads(BACKEND, as_kernel_inputs(tensors, torch.float32), gy)
    assert rel(y, y_ref) < 1e-5
    for name, got, want in zip(["decay", "first", "k", "v", "state"], g, g_ref, strict=True):
        assert rel(got, want) < 1e-4, name
        if name in ("k", "v"):
            for part in (slice(0, 2048), slice(T // 2, T // 2 + 2048), slice(T - 2048, T)):
                assert rel(got[:, part], want[:, part]) < 1e-4, (name, part)


def closed_form_state(w, k, v, piece=2**20):
    """The state after k, v (float64, from the empty state) by its closed form, no scan:
    A = sum_i e^{(T-1-i) w + k_i} v_i, B likewise, with p = the largest exponent. Differentiable
    (p is a constant scale); summed in pieces of `piece` steps to bound memory."""
    bsz, steps, channels = k.shape
    if steps == 0:
        return empty_state(bsz, channels, k.device, f64)
    parts = []
    for lo in range(0, steps, piece):
        hi = min(steps, lo + piece)
        age = torch.arange(steps - 1 - lo, steps - 1 - hi, -1, device=k.device, dtype=f64)
        e = age[:, None] * w + k[:, lo:hi]
        m = e.amax(1).detach()
        x = torch.exp(e - m[:, None])
        parts.append(((x * v[:, lo:hi]).sum(1), x.sum(1), m))
    top = torch.stack([m for _, _, m in parts]).amax(0)
    a = sum(pa * torch.exp(m - top) for pa, _, m in parts)
    b = sum(pb * torch.exp(m - top) for _, pb, m in parts)
    return torch.stack((a, b, top), 1)


@pytest.mark.slow
def test_longest_record_against_slices_carried_by_state():
    """B=1, T=2^24, C=32 (262,144 tiles of look-back per channel group): the final state
    against its closed form, and outputs on slices at the start, the middle and the end against
    the chunked float64 backend started from the closed-form state entering the slice; then the
    gradients of a loss on the last slice, through the whole record."""
    T, C, L = LONG_T, 32, 4096
    g = torch.Generator(device=DEVICE).manual_seed(0)
    # the slowest channel remembers ~8,000 steps (125 tiles). Slower decays lose accuracy in
    # float32 state (docs/models.md, Precision); this test is about composing 262,144 tiles.
    decay = torch.linspace(-9, 1, C, device=DEVICE, dtype=f64)
    first = torch.randn(C, generator=g, device=DEVICE, dtype=f64)
    k = torch.rand(1, T, C, generator=g, device=DEVICE) * 6 - 3
    v = torch.randn(1, T, C, generator=g, device=DEVICE)
    w = -torch.exp(decay)
    with torch.no_grad():
        y, state = wkv(decay.float(), first.float(), k, v, backend=BACKEND, check_finite=False)
        want = closed_form_state(w, k.double(), v.double())
        assert rel(state[:, :2] * torch.exp(state[:, 2:].double() - want[:, 2:]),
                   want[:, :2]) < 1e-4
        for t0 in (0, T // 2 + 12345, T - L):
            entering = closed_form_state(w, k[:, :t0].double(), v[:, :t0].double())
            y_ref, _ = wkv(decay, first, k[:, t0:t0 + L].double(), v[:, t0:t0 + L].double(),
                           entering, backend="torch", check_finite=False)
            assert rel(y[:, t0:t0 + L], y_ref) < 1e-4, t0
        del y, want
    # gradients of a loss on the last slice reach back through the whole record
    t0 = T - L
    gy = torch.randn(1, L, C, generator=g, device=DEVICE, dtype=f64)
    leaves = [t.float().clone().requires_grad_() for t in (decay, first)] + [
        t.clone().requires_grad_() for t in (k, v)]
    y, _ = wkv(*leaves, backend=BACKEND, check_finite=False)
    got = torch.autograd.grad((y[:, t0:].double() * gy).sum(), leaves)
    del y
    ref = [t.double().clone().requires_grad_() for t in (decay, first, k, v)]
    entering = closed_form_state(-torch.exp(ref[0]), ref[2][:, :t0], ref[3][:, :t0])
    y_ref, _ = wkv(ref[0], ref[1], ref[2][:, t0:], ref[3][:, t0:], entering, backend="torch",
                   check_finite=False)
    want = torch.autograd.grad((y_ref * gy).sum(), ref)
    assert rel(got[0], want[0]) < 1e-4 and rel(got[1], want[1]) < 1e-4
    for name, a, b in (("k", got[2], want[2]), ("v", got[3], want[3])):
        scale = b.norm()  # early steps get gradients near 0: compare against the whole
        for part in (slice(0, L), slice(t0 - L, t0), slice(t0, T)):
            assert ((a[:, part].double() - b[:, part]).norm() / scale).item() < 1e-4, (name, part)


@pytest.mark.parametrize("T,C", [(5, 4), (70, 3)])
def test_batch_of_70000_rows(T, C):
    """B = 70,000 (beyond a grid's y or z limit of 65,535; the grid here is 1-D), with state
    and gate; T = 70 has two tiles a row, so 70,000 look-backs run side by side."""
    tensors = inputs(WIDE_B, T, C, torch.float32)
    gy = torch.randn(WIDE_B, T, C, dtype=f64, device=DEVICE)
    assert_matches_reference(tensors, torch.float32, gy, tol=2e-5)


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_opcheck(with_state, gated):
    """The registration on CUDA tensors: schema, Meta kernel (with dynamic shapes), autograd."""
    ops = torch.ops.rwkv_signal
    decay, first, k, v, s, r = as_kernel_inputs(inputs(2, 150, 8, torch.float32, with_state,
                                                       gated), torch.float32)
    args = [None if t is None else t.clone().requires_grad_() for t in (decay, first, k, v, s, r)]
    torch.library.opcheck(ops.wkv.default, args)
    y, so, saved = ops.wkv(*args)
    gargs = (*(None if t is None else t.detach() for t in args), saved, so.detach(),
             torch.randn_like(y), torch.randn_like(so))
    torch.library.opcheck(ops.wkv_backward.default, gargs)


def test_no_host_synchronisation():
    """Forward and backward never wait for the GPU (a sync would cost host time and break
    CUDA graph capture)."""
    decay, first, k, v, s, r = as_kernel_inputs(inputs(2, 300, 16, torch.float32),
                                                torch.float32)
    leaves = [t.clone().requires_grad_() for t in (decay, first, k, v, s, r)]

    def step():
        y, so = wkv(*leaves[:5], backend=BACKEND, check_finite=False, r=leaves[5])
        torch.autograd.grad(y.sum() + so[:, :2].sum(), leaves)

    step()  # warm-up: first allocations, library lookups
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 24, device=DEVICE)
    decay = torch.randn(8, device=DEVICE, requires_grad=True)
    first = torch.randn(8, device=DEVICE, requires_grad=True)

    def f(x):
        k, v, r = lin(x).chunk(3, -1)
        y, s = wkv(decay, first, k, v, check_finite=False, r=r)
        return torch.tanh(y).sum() + s[:, :2].sum()

    x = torch.randn(2, 100, 8, device=DEVICE)
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    params = [decay, first, lin.weight]
    got = torch.autograd.grad(compiled(x), params)
    want = torch.autograd.grad(f(x), params)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-5
    if dynamic:  # another length reuses the graph
        x2 = torch.randn(2, 333, 8, device=DEVICE)
        assert torch.allclose(compiled(x2), f(x2), rtol=1e-5)


def test_cuda_graph_captures_forward_and_backward():
    """Captured in a CUDA graph (what reduce-overhead does), replays give eager's values for
    new inputs: every launch is on the current stream, nothing syncs."""
    decay, first, k, v, s, r = as_kernel_inputs(inputs(2, 500, 16, torch.float32),
                                                torch.float32)
    leaves = [t.clone().requires_grad_() for t in (decay, first, k, v, s, r)]

    def step():
        y, so = wkv(*leaves[:5], backend=BACKEND, check_finite=False, r=leaves[5])
        return (y, *torch.autograd.grad((y * y).sum() + so[:, :2].sum(), leaves))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in leaves[2:]:
            t.copy_(torch.randn_like(t))
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager, strict=True):
        assert rel(a, b) < 1e-6


def test_reduce_overhead_compile_trains_like_eager():
    torch._dynamo.reset()
    decay, first, k, v, s, r = as_kernel_inputs(inputs(2, 256, 16, torch.float32),
                                                torch.float32)

    def f(decay, first, k, v, s, r):
        y, so = wkv(decay, first, k, v, s, check_finite=False, r=r)
        return (y * y).mean() + so[:, :2].mean()

    compiled = torch.compile(f, mode="reduce-overhead")
    for _ in range(3):  # recording, then replays
        ins = [t.clone().requires_grad_() for t in (decay, first, k, v, s, r)]
        torch.compiler.cudagraph_mark_step_begin()
        got = torch.autograd.grad(compiled(*ins), ins)
        want = torch.autograd.grad(f(*ins), ins)
        for a, b in zip(got, want, strict=True):
            assert rel(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_feeds_half_inputs(dtype):
    lin = torch.nn.Linear(16, 32, device=DEVICE)
    decay = torch.randn(16, device=DEVICE, requires_grad=True)
    first = torch.randn(16, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 64, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        k, v = lin(x).chunk(2, -1)
        assert k.dtype == dtype
        y, _ = wkv(decay, first, k, v)
        loss = y.float().square().mean()
    loss.backward()
    assert y.dtype == dtype
    assert torch.isfinite(decay.grad).all() and torch.isfinite(lin.weight.grad).all()
    assert math.isfinite(loss.item())
