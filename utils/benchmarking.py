"""Timing helpers and the WKV operator benchmark (every backend, forward and forward+backward,
against the bandwidth floor). Used by benchmark_rwkv.py."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from models.wkv import wkv

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
MiB = 2**20


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a report: `digits` significant digits below 1000, whole numbers above,
    "-" for a missing (None or NaN) value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory measurement on `device`; returns the bytes allocated now (0 off
    CUDA). Pass it to `peak_mib_since`."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_mib_since(device: torch.device, base: int) -> float | None:
    """Peak CUDA memory allocated above `base` since `reset_peak_memory`, in MiB (None off
    CUDA: there is no allocator peak to read)."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated() - base) / MiB


def wkv_bandwidth_floor_ms(bsz: int, steps: int, channels: int, bytes_per_el: int,
                           tb_per_s: float, backward: bool) -> float:
    """The time to move the operator's unavoidable bytes at `tb_per_s`: forward reads k, v and
    writes y; forward + backward also reads k, v, gy and writes gk, gv."""
    n = bsz * steps * channels * bytes_per_el
    moved = 3 * n + (5 * n if backward else 0)
    return moved / (tb_per_s * 1e12) * 1e3


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 20,
            budget_s: float = 10.0) -> float:
    """Median wall time of fn in ms: CUDA events on a GPU (after warm-up), perf_counter on CPU.
    Stops repeating once `budget_s` is spent, so slow backends still report."""
    start_all = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - start_all > budget_s / 2:
            break
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > budget_s:
            break
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], device: torch.device, repeat: int = 20,
             budget_s: float = 10.0) -> float:
    """Median time of fn captured once in a CUDA graph and replayed: the GPU's own time,
    without the per-launch CPU cost that eager timing includes for short kernels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = time_ms(graph.replay, device, warmup=2, repeat=repeat, budget_s=budget_s)
    del graph
    return ms


def measure_bandwidth_tb_s(device: torch.device) -> float:
    """Device-to-device copy rate, counting bytes read plus written (the floor's ceiling)."""
    if device.type != "cuda":
        return float("nan")
    nbytes = 256 * 1024 * 1024  # 256 MiB, five times the L2 cache
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeat=20)
    return 2 * nbytes / (ms * 1e-3) / 1e12


@dataclass
class OpResult:
    backend: str
    dtype: str
    batch: int
    steps: int
    channels: int
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_mib: float | None
    floor_fwd_ms: float
    floor_fwd_bwd_ms: float
    note: str = ""
    graph_fwd_ms: float | None = None  # CUDA-graph replay: kernel time without launch cost
    graph_fwd_bwd_ms: float | None = None

    @property
    def floor_fraction(self) -> float | None:
        best = self.graph_fwd_bwd_ms or self.fwd_bwd_ms
        return None if best is None else self.floor_fwd_bwd_ms / best


def bench_op(backend: str, dtype: torch.dtype, batch: int, steps: int, channels: int,
             device: torch.device, tb_s: float, repeat: int = 20, budget_s: float = 10.0,
             backward: bool = True) -> OpResult:
    """Time one backend at one size; a size that does not fit is reported, not raised."""
    nbytes = BYTES[dtype]
    floor_f = wkv_bandwidth_floor_ms(batch, steps, channels, nbytes, tb_s, backward=False)
    floor_fb = wkv_bandwidth_floor_ms(batch, steps, channels, nbytes, tb_s, backward=True)
    result = OpResult(backend, str(dtype).replace("torch.", ""), batch, steps, channels, None,
                      None, None, floor_f, floor_fb)
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        decay = (torch.randn(channels, generator=g) - 1).to(device).requires_grad_()
        first = torch.randn(channels, generator=g).to(device).requires_grad_()
        k = torch.randn(batch, steps, channels, generator=g).to(device, dtype).requires_grad_()
        v = torch.randn(batch, steps, channels, generator=g).to(device, dtype).requires_grad_()
        gy = torch.randn(batch, steps, channels, generator=g).to(device, dtype)

        def fwd():
            with torch.no_grad():
                return wkv(decay, first, k, v, backend=backend, check_finite=False)

        def fwd_bwd():
            y, _ = wkv(decay, first, k, v, backend=backend, check_finite=False)
            # autograd.grad: no accumulation into .grad, as after zero_grad(set_to_none=True)
            torch.autograd.grad(y, [decay, first, k, v], gy)

        result.fwd_ms = time_ms(fwd, device, repeat=repeat, budget_s=budget_s)
        if backward:
            base = reset_peak_memory(device)
            result.fwd_bwd_ms = time_ms(fwd_bwd, device, repeat=repeat, budget_s=budget_s)
            result.peak_mib = peak_mib_since(device, base)
        if device.type == "cuda" and backend.startswith("cuda"):
            result.graph_fwd_ms = graph_ms(fwd, device, repeat=repeat, budget_s=budget_s)
            if backward:
                result.graph_fwd_bwd_ms = graph_ms(fwd_bwd, device, repeat=repeat,
                                                   budget_s=budget_s)
    except torch.OutOfMemoryError:
        result.note = "out of memory"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def format_op_table(results: list[OpResult]) -> str:
    lines = [
        "| backend | dtype | B | T | C | fwd ms | fwd+bwd ms | graph fwd ms | graph fwd+bwd ms "
        "| peak MiB | floor fwd+bwd ms | of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        frac = r.floor_fraction
        lines.append(
            f"| {r.backend} | {r.dtype} | {r.batch} | {r.steps} | {r.channels} | {fmt(r.fwd_ms)} | "
            f"{fmt(r.fwd_bwd_ms)} | {fmt(r.graph_fwd_ms)} | {fmt(r.graph_fwd_bwd_ms)} | "
            f"{fmt(r.peak_mib, 4)} | {fmt(r.floor_fwd_bwd_ms)} | "
            f"{'-' if frac is None or math.isnan(frac) else f'{100 * frac:.0f}%'} |"
            + (f" {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def as_dicts(results: list[OpResult]) -> list[dict]:
    return [dict(asdict(r), floor_fraction=r.floor_fraction) for r in results]
