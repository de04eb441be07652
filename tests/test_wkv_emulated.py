"""The CUDA kernel's own code (cuda/wkv_kernel.cu and .cuh) run on the CPU over
tests/wkv_emulation.h, against the float64 reference: every GPU thread a fiber, blocks
interleaved by a seeded scheduler. This checks the kernel's logic (tiles, tails, the scans, the
look-back, the reductions) on machines without a GPU; tests/test_wkv_cuda.py checks the same on
the GPU itself, where the memory model and timing are real."""

import hashlib
from pathlib import Path

import pytest
import torch

from models import wkv_build
from models.wkv import DECAY_MAX, K_MAX, empty_state, wkv_reference
from tests.test_wkv import edge_inputs, make_inputs, rel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(wkv_build.find_cxx() is None, reason="no C++ compiler"),
]
HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "wkv_emulation.cpp", HERE / "wkv_emulation.h",
           wkv_build.SOURCE_DIR / "wkv_kernel.cu", wkv_build.SOURCE_DIR / "wkv_kernel.cuh",
           wkv_build.SOURCE_DIR / "wkv_common.h"]
f64 = torch.float64
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_FLOOR = 0.05


@pytest.fixture(scope="module")
def emulated():
    """The emulated kernel module, built once into the extension cache (under a lock)."""
    import filelock
    from torch.utils import cpp_extension

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    name = f"wkv_emulation_{digest}"
    build_dir = wkv_build.cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(build_dir.parent / f"{name}.build.lock"), timeout=900):
        (build_dir / "lock").unlink(missing_ok=True)
        return cpp_extension.load(name=name, sources=[str(SOURCES[0])],
                                  build_directory=str(build_dir), extra_cflags=["-O2"])


def run(emulated, decay, first, k, v, state=None, r=None, gy=None, gstate=None, concurrency=8,
        seed=0, release_delay=0):
    """Forward and backward on the emulated GPU: (y, state_out, saved), gradients, stats."""
    emulated.configure(concurrency, seed, release_delay)
    y, state_out, saved = emulated.forward(decay, first, k, v, state, r)
    grads = None
    if gy is not None:
        grads = emulated.backward(decay, first, k, v, state, r, saved, state_out, gy, gstate)
    return (y, state_out, saved), grads, emulated.stats()


def reference_with_grads(decay, first, k, v, state, r, gy, gstate):
    """float64 reference forward, and the gradients of sum(y * gy) + <gstate[:2], state_out[:2]>
    (the kernel's convention: the p row of gstate is ignored)."""
    B, _, C = k.shape
    ins = [t.double().clone().requires_grad_() for t in (decay, first, k, v)]
    s = (empty_state(B, C, dtype=f64) if state is None
         else state.double().clone().requires_grad_())
    rr = None if r is None else r.double().clone().requires_grad_()
    kk = ins[2].clamp(max=K_MAX)
    y, so = wkv_reference(-torch.exp(ins[0].clamp(max=DECAY_MAX)), ins[1], kk, ins[3], s)
    if rr is not None:
        y = torch.sigmoid(rr) * y
    loss = (y * gy.double()).sum() + (so[:, :2] * gstate[:, :2].double()).sum()
    leaves = ins + ([s] if state is not None else []) + ([rr] if rr is not None else [])
    return y.detach(), so.detach(), torch.autograd.grad(loss, leaves)


def check(emulated, B, T, C, dtype, with_state, gated, seed=0, **options):
    decay, first, k, v, s = make_inputs(B, T, C, state=with_state, seed=seed)
    if with_state:
        s[:, 2] = s[:, 2].clamp(max=0)
    k, v = k.to(dtype), v.to(dtype)
    # seeded, so that a case's inputs do not depend on which tests ran before it
    gen = torch.Generator().manual_seed(1000 + seed)
    r = torch.randn(B, T, C, generator=gen, dtype=f64).to(dtype) if gated else None
    gy = torch.randn(B, T, C, generator=gen, dtype=f64).to(dtype)
    gstate = torch.randn(B, 3, C, generator=gen)
    (y, so, saved), g, stats = run(emulated, decay.float(), first.float(), k, v,
                                   None if s is None else s.float(), r, gy, gstate, seed=seed,
                                   **options)
    y_ref, so_ref, g_ref = reference_with_grads(decay, first, k, v, s, r, gy, gstate)
    tol = TOL[dtype]
    assert y.dtype == dtype and saved.shape == (B, -(-T // 64), 3, C)
    assert rel(y, y_ref) < tol
    assert rel(so[:, :2] * torch.exp(so[:, 2:].double() - so_ref[:, 2:]), so_ref[:, :2]) < 1e-5
    names = ["decay", "first", "k", "v"] + (["state"] if with_state else [])
    names += ["r"] if gated else []
    got = [g[0], g[1], g[2], g[3]] + ([g[4]] if with_state else []) + ([g[5]] if gated else [])
    # a gradient that cancels to a small fraction of the incoming one (one step, v close to y)
    # is held to that fraction's size: float32 rounding of its O(1) terms is what is left
    floor = GRAD_FLOOR * (gy.double().norm() + gstate.double().norm())
    for name, a, b in zip(names, got, g_ref, strict=True):
        assert a.dtype == (dtype if name in ("k", "v", "r") else torch.float32), name
        assert rel(a, b, floor) < max(tol, 1e-5), name
    return stats


# shapes that reach every path: one step; a tail tile; C not a multiple of 4 (scalar path) or of
# the tile's channels (idle lanes); several tiles per series; several channel groups
SHAPES = [(1, 1, 1), (2, 17, 3), (2, 130, 8), (1, 700, 33), (3, 300, 12), (2, 200, 132),
          (1, 64, 4), (1, 129, 4)]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(emulated, shape, dtype, with_state, gated):
    check(emulated, *shape, dtype, with_state, gated)


@pytest.mark.parametrize("seed", range(4))
def test_look_back_under_many_interleavings(emulated, seed):
    """Many blocks in flight and inclusive prefixes published late: tiles fold aggregates of
    several predecessors, over more than one window of R predecessors."""
    stats = check(emulated, 1, 64 * 40, 8, torch.float32, True, True, seed=seed, concurrency=40,
                  release_delay=200)
    assert stats["saw_aggregate"] > 0 and stats["saw_not_ready"] > 0
    assert stats["windows_continued"] > 0


def test_one_block_at_a_time_sees_only_prefixes(emulated):
    """Blocks run one after another: every predecessor has published its prefix."""
    stats = check(emulated, 2, 64 * 5, 4, torch.float32, False, False, concurrency=1)
    assert stats["saw_aggregate"] == 0 and stats["saw_not_ready"] == 0
    assert stats["saw_prefix"] > 0


def test_unaligned_inputs_take_the_scalar_path(emulated):
    """A contiguous tensor that starts 4 bytes into its storage cannot be read as 16-byte
    vectors: the scalar kernel runs, with the same values."""
    B, T, C = 2, 150, 8
    decay, first, k, v, _ = make_inputs(B, T, C)
    flat = torch.randn(B * T * C + 1)
    k_odd = flat[1:].view(B, T, C)
    k_odd.copy_(k.float())
    assert k_odd.data_ptr() % 16 != 0
    (y, _, _), _, _ = run(emulated, decay.float(), first.float(), k_odd, v.float())
    y_ref, _ = wkv_reference(-torch.exp(decay), first, k, v, empty_state(B, C, dtype=f64))
    assert rel(y, y_ref) < 2e-6


def test_unaligned_saved_state_takes_the_scalar_backward(emulated):
    """The backward reads the forward's saved states 16 bytes at a time: handed a `saved` that
    starts 4 bytes into its storage, it runs the scalar kernel (a GPU would fault on the
    vector loads), with the gradients of the aligned call."""
    B, T, C = 2, 200, 8
    decay, first, k, v, _ = make_inputs(B, T, C)
    args = [t.float() for t in (decay, first, k, v)]
    gy = torch.randn(B, T, C)
    (y, state_out, saved), aligned, stats = run(emulated, *args, gy=gy)
    assert stats["misaligned_vector_loads"] == 0
    flat = torch.empty(saved.numel() + 1)
    saved_odd = flat[1:].view(saved.shape)
    saved_odd.copy_(saved)
    assert saved_odd.data_ptr() % 16 != 0
    emulated.configure(8, 0, 0)
    odd = emulated.backward(*args, None, None, saved_odd, state_out, gy, None)
    assert emulated.stats()["misaligned_vector_loads"] == 0
    for name, a, b in zip(("decay", "first", "k", "v"), odd[:4], aligned[:4], strict=True):
        assert rel(a, b) < 1e-6, name


def test_many_batch_rows(emulated):
    B, T, C = 600, 5, 4
    check(emulated, B, T, C, torch.float32, True, False, concurrency=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_numeric_edges(emulated, dtype):
    """decay beyond exp's range, k = +inf: finite outputs and gradients, no gradient through
    the bounds, the reference's values on bounded inputs."""
    decay, first, k, v, s = edge_inputs(dtype)
    gy = torch.randn(k.shape).to(dtype)
    gstate = torch.zeros(k.shape[0], 3, k.shape[2])
    (y, so, _), g, _ = run(emulated, decay.float(), first.float(), k, v, s.float(), None, gy,
                           gstate)
    assert torch.isfinite(y).all() and torch.isfinite(so).all()
    assert all(torch.isfinite(t).all() for t in g[:5])
    assert (g[0][:3] == 0).all() and g[2][0, 10, 3] == 0 and g[2][1, 60, 3] == 0
    y_ref, _, g_ref = reference_with_grads(decay, first, k, v, s, None, gy, gstate)
    assert rel(y, y_ref) < (2e-6 if dtype == torch.float32 else 2e-3)
    for name, a, b in zip(["decay", "first", "k", "v", "state"], g, g_ref, strict=False):
        assert rel(a, b) < (1e-5 if dtype == torch.float32 else 2e-3), name
