"""Timing helpers and the WKV operator benchmark (every backend, forward and forward+backward,
against the bandwidth floor). Used by benchmark_rwkv.py."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

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


def wkv_bytes(bsz: int, steps: int, channels: int, bytes_per_el: int, backward: bool,
              gated: bool = False) -> int:
    """The operator's unavoidable bytes: the forward reads k, v (and the gate r) and writes y;
    the backward also reads k, v, gy (r) and writes gk, gv (gr). The saved states (one per 64
    steps) and the look-back's per-tile states add about 5% more in float32 and are not
    counted."""
    n = bsz * steps * channels * bytes_per_el
    forward = (4 if gated else 3) * n
    return forward + ((7 if gated else 5) * n if backward else 0)


def wkv_bandwidth_floor_ms(bsz: int, steps: int, channels: int, bytes_per_el: int,
                           tb_per_s: float, backward: bool, gated: bool = False) -> float:
    """The time to move the operator's unavoidable bytes (`wkv_bytes`) at `tb_per_s`."""
    moved = wkv_bytes(bsz, steps, channels, bytes_per_el, backward, gated)
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
    gated: bool = False  # with the fused output gate r
    mb_fwd: float = 0.0  # unavoidable bytes moved (MB), see wkv_bytes
    mb_fwd_bwd: float = 0.0

    @classmethod
    def from_dict(cls, row: dict) -> OpResult:
        """The inverse of as_dicts for one row (derived fields dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    @property
    def floor_fraction(self) -> float | None:
        """fwd+bwd floor over the measured time (graph replay where measured)."""
        best = self.graph_fwd_bwd_ms or self.fwd_bwd_ms
        return None if best is None else self.floor_fwd_bwd_ms / best

    @property
    def floor_fraction_fwd(self) -> float | None:
        best = self.graph_fwd_ms or self.fwd_ms
        return None if best is None else self.floor_fwd_ms / best


# Above this size of one (B, T, C) tensor the benchmark does not capture CUDA graphs: a capture
# keeps its own copy of every intermediate (doubling the memory), and at this size a launch's
# few microseconds are far below the kernels' time, so eager time is kernel time.
GRAPH_MAX_BYTES = 2**31


def bench_op(backend: str, dtype: torch.dtype, batch: int, steps: int, channels: int,
             device: torch.device, tb_s: float, repeat: int = 20, budget_s: float = 10.0,
             backward: bool = True, gated: bool = False) -> OpResult:
    """Time one backend at one size; a size that does not fit is reported, not raised."""
    nbytes = BYTES[dtype]
    result = OpResult(
        backend, str(dtype).replace("torch.", ""), batch, steps, channels, None, None, None,
        wkv_bandwidth_floor_ms(batch, steps, channels, nbytes, tb_s, False, gated),
        wkv_bandwidth_floor_ms(batch, steps, channels, nbytes, tb_s, True, gated),
        gated=gated,
        mb_fwd=wkv_bytes(batch, steps, channels, nbytes, False, gated) / 1e6,
        mb_fwd_bwd=wkv_bytes(batch, steps, channels, nbytes, True, gated) / 1e6)
    try:
        # drawn on the device: at T = 2^20 a CPU draw would take longer than the benchmark
        g = torch.Generator(device=device).manual_seed(0)
        shape = (batch, steps, channels)

        def draw(*size):
            return torch.randn(*size, generator=g, device=device)

        decay = (draw(channels) - 1).requires_grad_()
        first = draw(channels).requires_grad_()
        k = draw(*shape).to(dtype).requires_grad_()
        v = draw(*shape).to(dtype).requires_grad_()
        r = draw(*shape).to(dtype).requires_grad_() if gated else None
        gy = draw(*shape).to(dtype)
        leaves = [t for t in (decay, first, k, v, r) if t is not None]

        def fwd():
            with torch.no_grad():
                return wkv(decay, first, k, v, backend=backend, check_finite=False, r=r)

        def fwd_bwd():
            y, _ = wkv(decay, first, k, v, backend=backend, check_finite=False, r=r)
            # autograd.grad: no accumulation into .grad, as after zero_grad(set_to_none=True)
            torch.autograd.grad(y, leaves, gy)

        result.fwd_ms = time_ms(fwd, device, repeat=repeat, budget_s=budget_s)
        if backward:
            base = reset_peak_memory(device)
            result.fwd_bwd_ms = time_ms(fwd_bwd, device, repeat=repeat, budget_s=budget_s)
            result.peak_mib = peak_mib_since(device, base)
        small = batch * steps * channels * nbytes <= GRAPH_MAX_BYTES
        if device.type == "cuda" and backend == "cuda" and small:
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


def _percent(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def format_op_table(results: list[OpResult]) -> str:
    """Markdown: times (eager; CUDA-graph replay = kernel time), the unavoidable bytes, the
    bandwidth floor and the fraction of it reached (graph time where measured)."""
    lines = [
        "| backend | dtype | gate | B | T | C | fwd ms | fwd+bwd ms | graph fwd ms "
        "| graph fwd+bwd ms | MB fwd / fwd+bwd | floor fwd / fwd+bwd ms | of floor fwd / fwd+bwd "
        "| peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.backend} | {r.dtype} | {'r' if r.gated else ''} | {r.batch} | {r.steps} | "
            f"{r.channels} | {fmt(r.fwd_ms)} | {fmt(r.fwd_bwd_ms)} | {fmt(r.graph_fwd_ms)} | "
            f"{fmt(r.graph_fwd_bwd_ms)} | {fmt(r.mb_fwd)} / {fmt(r.mb_fwd_bwd)} | "
            f"{fmt(r.floor_fwd_ms)} / {fmt(r.floor_fwd_bwd_ms)} | "
            f"{_percent(r.floor_fraction_fwd)} / {_percent(r.floor_fraction)} | "
            f"{fmt(r.peak_mib, 4)} |" + (f" {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def as_dicts(results: list[OpResult]) -> list[dict]:
    return [dict(asdict(r), floor_fraction=r.floor_fraction,
                 floor_fraction_fwd=r.floor_fraction_fwd) for r in results]


# ------------------------------------------------------------------ a step under the profiler

# host calls that put work on the GPU: each costs the host a few microseconds
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


@dataclass
class StepProfile:
    """What a few profiled steps cost, per step: wall time (host clock, synchronised at both
    ends), GPU busy time (the union of kernel and copy intervals: overlapping kernels count
    once), the host calls that launched work and the kernels that ran."""

    wall_ms: float
    gpu_busy_ms: float
    launches: float  # host launch calls per step (a graph replay is one)
    kernels: float  # kernels executed per step (inside graphs too)

    @property
    def busy_fraction(self) -> float:
        return self.gpu_busy_ms / self.wall_ms if self.wall_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return {"wall_ms": self.wall_ms, "gpu_busy_ms": self.gpu_busy_ms,
                "busy_fraction": self.busy_fraction, "launches_per_step": self.launches,
                "kernels_per_step": self.kernels}


def busy_and_launches(prof) -> tuple[float, int, int]:
    """(GPU busy us, host launch calls, GPU kernels) from a finished torch.profiler.profile.
    The profiler also puts `record_function` ranges (torch.compile's, Lightning's) on the GPU
    timeline as user annotations spanning the gaps between kernels; they are not GPU work."""
    intervals, launches, kernels = [], 0, 0
    for event in prof.events():
        if getattr(event, "is_user_annotation", False):
            continue
        if event.device_type == torch.autograd.DeviceType.CUDA:
            intervals.append((event.time_range.start, event.time_range.end))
            kernels += 1
        elif event.name in LAUNCH_CALLS:
            launches += 1
    busy, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy, launches, kernels


def profile_steps(step: Callable[[], object], steps: int = 10,
                  wall_steps: int = 30) -> StepProfile:
    """Profile `steps` calls of a warmed-up `step` (GPU work per step: busy time, launches)
    and time `wall_steps` more without the profiler (its host overhead would inflate wall)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    busy_us, launches, kernels = busy_and_launches(prof)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(wall_steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / wall_steps
    return StepProfile(wall_ms, busy_us / 1e3 / steps, launches / steps, kernels / steps)
