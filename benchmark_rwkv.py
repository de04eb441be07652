"""Side-by-side performance report: original vs optimized RWKV, the WKV operator's backends,
sequence-length scaling, peers (cuDNN LSTM, SDPA Transformer) and the full classifier.

    python benchmark_rwkv.py                       # everything, GPU sizes (B=8, T=3750, 6x256)
    python benchmark_rwkv.py --quick               # CPU-friendly sizes
    python benchmark_rwkv.py --op-table --json op.json   # only the WKV op table (~2 min, GPU)
    python benchmark_rwkv.py --sections model op --json out.json --plot scaling.png

Timing: CUDA events after warm-up, median of repeats (perf_counter on CPU). A size that does
not fit in memory is reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch import nn

from models.dual_branch import DualBranchClassifier
from models.rwkv import create_optimized_rwkv, create_original_rwkv
from models.wkv import BACKENDS, prepare_backend, wkv
from utils.benchmarking import (
    BYTES,
    OpResult,
    as_dicts,
    bench_op,
    fmt,
    format_op_table,
    graph_ms,
    measure_bandwidth_tb_s,
    peak_mib_since,
    profile_steps,
    reset_peak_memory,
    time_ms,
)

SECTIONS = ("model", "op", "scaling", "peers", "classifier", "step")
STEP_MODELS = ("rwkv", "transformer", "classifier", "classifier-gpu-yaml")


# ------------------------------------------------------------------------------------------
# Measuring a module


def _graph_train_step(model, x, amp, loss_fn, repeat, budget_s, device) -> dict:
    """The whole train step (forward, backward, AdamW) captured in one CUDA graph: what the
    step costs once per-launch CPU overhead is gone (torch.compile's "reduce-overhead" mode
    does the same capture)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None,
                              cache_enabled=False)

    def step():
        with autocast:
            loss = loss_fn(model(x))
        loss.backward()
        opt.step()

    try:
        out = {"graph_train_ms": graph_ms(step, device, repeat=repeat, budget_s=budget_s)}
    except RuntimeError as exc:  # e.g. an op that syncs with the host cannot be captured
        out = {"graph_note": f"capture failed: {str(exc).splitlines()[0][:200]}"}
    opt.zero_grad(set_to_none=True)
    return out


def measure_module(model: nn.Module, x: torch.Tensor, device, amp: torch.dtype | None,
                   train: bool, repeat: int, budget_s: float, loss_fn=None,
                   graphs: bool = False) -> dict:
    """Forward time, (optionally) one AdamW train step's time, and peak memory of each."""
    out: dict = {}
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    try:
        model.eval()

        def forward():
            with torch.no_grad(), autocast:
                return model(x)

        base = reset_peak_memory(device)
        y = forward()
        out["output_shape"] = list(y.shape)
        out["fwd_ms"] = time_ms(forward, device, warmup=1, repeat=repeat, budget_s=budget_s)
        out["fwd_peak_mib"] = peak_mib_since(device, base)
        if train:
            model.train()
            fused = device.type == "cuda"
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
            loss_fn = loss_fn or (lambda y: y.float().square().mean())

            def step():
                with autocast:
                    loss = loss_fn(model(x))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            base = reset_peak_memory(device)
            out["train_ms"] = time_ms(step, device, warmup=1, repeat=repeat, budget_s=budget_s)
            out["train_peak_mib"] = peak_mib_since(device, base)
            del opt
            if graphs and device.type == "cuda":
                out.update(_graph_train_step(model, x, amp, loss_fn, repeat, budget_s, device))
    except torch.OutOfMemoryError:
        out["note"] = "out of memory"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# Sections


def model_section(args, device) -> dict:
    """Original (sequential reference WKV, per-op code) vs optimized, same weights."""
    B, T, C, L = args.batch_size, args.seq_len, args.hidden, args.layers
    amp = args.amp
    print(f"\n## Original vs optimized RWKV: input ({B}, {T}, 1), {L} layers x {C} hidden, "
          f"autocast {amp}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 1, generator=g).to(device)
    results = {}
    variants = {
        "optimized": dict(gradient_checkpointing=False),
        "optimized+checkpointing": dict(gradient_checkpointing=True),
    }
    if args.patch_size > 1:
        variants[f"optimized patch {args.patch_size}"] = dict(patch_size=args.patch_size,
                                                             gradient_checkpointing=True)
    if args.compile:
        variants["optimized+compile"] = dict(gradient_checkpointing=False, compile_blocks=True)
        variants["optimized+compile reduce-overhead"] = dict(
            gradient_checkpointing=False, compile_blocks=True, compile_mode="reduce-overhead")
    torch.manual_seed(0)
    optimized = create_optimized_rwkv(1, C, L).to(device)
    with torch.no_grad():  # RWKV's init makes every block the identity: perturb to compare
        for p in optimized.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(device))
    for name, opts in variants.items():
        torch.manual_seed(0)
        # no finiteness check of the input: it syncs with the host, which a CUDA graph forbids
        model = create_optimized_rwkv(1, C, L, check_input_finite=False, **opts).to(device)
        # reduce-overhead already replays CUDA graphs: its plain timing is the graph timing
        r = measure_module(model, x, device, amp, train=True, repeat=args.repeat, budget_s=20,
                           graphs=opts.get("compile_mode") != "reduce-overhead")
        r["params"] = n_params(model)
        results[name] = r
        print(f"{name}: params {r['params']:,}, fwd {fmt(r.get('fwd_ms'))} ms, train step "
              f"{fmt(r.get('train_ms'))} ms (CUDA graph {fmt(r.get('graph_train_ms'))} ms), "
              f"peak train {fmt(r.get('train_peak_mib'))} MiB "
              f"{r.get('note', '')}{r.get('graph_note', '')}", flush=True)
    if not args.skip_original:
        original = create_original_rwkv(1, C, L).to(device)
        original.load_state_dict(optimized.state_dict())
        # compare outputs before timing: the timed train step changes the original's weights
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            optimized.eval()
            original.eval()
            diff = (optimized(x).float() - original(x).float()).abs().max().item()
        results["max_output_difference"] = diff
        r = measure_module(original, x, device, amp, train=not args.skip_original_train,
                           repeat=1, budget_s=1)
        r["params"] = n_params(original)
        results["original"] = r
        opt, orig = results["optimized"], r
        speedup = orig["fwd_ms"] / opt["fwd_ms"]
        results["forward_speedup"] = speedup
        print(f"original: params {r['params']:,}, fwd {fmt(r['fwd_ms'])} ms, train step "
              f"{fmt(r.get('train_ms'))} ms")
        print(f"forward speedup {speedup:,.0f}x; throughput {B / opt['fwd_ms'] * 1e3:,.1f} vs "
              f"{B / orig['fwd_ms'] * 1e3:,.2f} samples/s; max output difference {diff:.2e} "
              f"({'outputs match' if diff < (5e-2 if amp else 1e-4) else 'OUTPUTS DIFFER'})")
        if "train_ms" in orig:
            results["train_speedup"] = orig["train_ms"] / opt["train_ms"]
            print(f"train step speedup {results['train_speedup']:,.0f}x")
        if opt.get("fwd_peak_mib") and orig.get("fwd_peak_mib"):
            print(f"forward memory: {fmt(opt['fwd_peak_mib'])} vs {fmt(orig['fwd_peak_mib'])} MiB")
    return results


def _runs_on(backend: str, device: torch.device) -> bool:
    """Whether a WKV backend takes tensors on `device` (the native kernels are per device)."""
    if backend == "cuda":
        return device.type == "cuda"
    return backend != "cpu" or device.type == "cpu"


def host_us_per_call(device, calls: int = 200) -> dict:
    """Host time of one eager call of the native op on a tiny input (1 x 16 x 32): the calls
    are issued back to back and the GPU waited for once, so with kernels this small the time
    is the host's (Python checks, dispatcher, autograd, allocation, launches)."""
    g = torch.Generator(device=device).manual_seed(0)
    leaves = [torch.randn(*shape, generator=g, device=device).requires_grad_()
              for shape in ((32,), (32,), (1, 16, 32), (1, 16, 32))]

    def fwd():
        with torch.no_grad():
            wkv(*leaves, check_finite=False)

    def fwd_bwd():
        y, _ = wkv(*leaves, check_finite=False)
        torch.autograd.grad(y.sum(), leaves)

    return {name: mean_call_us(fn, device, calls)
            for name, fn in (("fwd_us", fwd), ("fwd_bwd_us", fwd_bwd))}


def mean_call_us(fn, device, calls: int = 200, warmup: int = 20) -> float:
    """Microseconds per call of fn over `calls` back-to-back calls, the device waited for once
    at the end (after `warmup` calls): for tiny kernels, the host's time per call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def op_section(args, device, tb_s) -> dict:
    print(f"\n## WKV operator, C={args.hidden} (floor at {tb_s:.2f} TB/s measured copy rate)")
    results = []
    runs = [(b, t, d, False) for b, t in args.op_sizes for d in args.op_dtypes]
    runs += [(b, t, d, True) for b, t in args.op_gated_sizes for d in args.op_dtypes]
    for batch, steps, dtype, gated in runs:
        for backend in args.backends:
            if not _runs_on(backend, device):
                continue
            if backend == "reference" and batch * steps > 8 * 4096:
                continue
            slow = backend == "reference" or (backend == "torch" and device.type == "cpu")
            r = bench_op(backend, dtype, batch, steps, args.hidden, device, tb_s,
                         repeat=3 if slow else args.op_repeat, budget_s=30 if slow else 10,
                         gated=gated)
            results.append(r)
            print(format_op_table([r]).splitlines()[-1], flush=True)
    print(format_op_table(results))
    host = {}
    if any(_runs_on(b, device) and b in ("cuda", "cpu") for b in args.backends):
        host = host_us_per_call(device)
        print(f"host time per eager call (1 x 16 x 32, auto backend): forward "
              f"{host['fwd_us']:.1f} us, forward+backward {host['fwd_bwd_us']:.1f} us")
    return {"rows": as_dicts(results), "host_us_per_call": host}


def scaling_section(args, device, tb_s) -> list:
    """fwd+bwd time vs T for each backend, until a backend passes the time budget."""
    print(f"\n## Scaling: WKV fwd+bwd vs T, B={args.scaling_batch}, fp32")
    rows = []
    for channels in args.scaling_hidden:
        for backend in args.backends:
            if not _runs_on(backend, device):
                continue
            for steps in args.scaling_lengths:
                r = bench_op(backend, torch.float32, args.scaling_batch, steps, channels, device,
                             tb_s, repeat=10, budget_s=5)
                rows.append(r)
                print(format_op_table([r]).splitlines()[-1], flush=True)
                if r.note or (r.fwd_bwd_ms or 0) > args.slow_ms:
                    break  # too slow (or too big) for longer sequences
    return as_dicts(rows)


class LSTMStack(nn.Module):
    def __init__(self, hidden, layers):
        super().__init__()
        self.stem = nn.Linear(1, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)

    def forward(self, x):
        return self.lstm(self.stem(x))[0].mean(1)


class TransformerStack(nn.Module):
    """Pre-norm Transformer encoder of the same width/depth; attention through PyTorch SDPA."""

    def __init__(self, hidden, layers, heads=4):
        super().__init__()
        self.stem = nn.Linear(1, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(self.stem(x)).mean(1)


def peers_section(args, device) -> dict:
    B, C, L = args.batch_size, args.hidden, args.layers
    print(f"\n## Peers at B={B}, {L} layers x {C}: train step (AdamW) and peak memory, autocast "
          f"{args.amp}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    results: dict = {}
    for steps in args.peer_lengths:
        x = torch.randn(B, steps, 1, device=device)
        row = {}
        models = {
            "rwkv": lambda: create_optimized_rwkv(1, C, L, check_input_finite=False),
            "rwkv+checkpointing": lambda: create_optimized_rwkv(
                1, C, L, gradient_checkpointing=True, check_input_finite=False),
            "transformer (SDPA)": lambda: TransformerStack(C, L),
            "lstm (cuDNN)": lambda: LSTMStack(C, L),
        }
        if args.compile:  # both sides under torch.compile, for a like-for-like comparison
            models["rwkv+compile"] = lambda: create_optimized_rwkv(
                1, C, L, compile_blocks=True, check_input_finite=False)
            models["transformer (SDPA)+compile"] = lambda: _compiled(TransformerStack(C, L))
        for name, make in models.items():
            if name.startswith("lstm") and steps > args.lstm_max_len:
                continue
            torch.manual_seed(0)
            model = make().to(device)
            with sdpa_kernel(backends):
                r = measure_module(model, x, device, args.amp, train=True,
                                   repeat=args.repeat, budget_s=20, graphs=True)
            row[name] = r
            print(f"T={steps:>7} {name:<28} fwd {fmt(r.get('fwd_ms')):>7} ms  train "
                  f"{fmt(r.get('train_ms')):>7} ms  graph train {fmt(r.get('graph_train_ms')):>7}"
                  f" ms  peak {fmt(r.get('train_peak_mib')):>7} MiB "
                  f"{r.get('note', '')}{r.get('graph_note', '')}", flush=True)
            del model
        results[steps] = row
    def overtakes(key, suffix=""):
        return next((t for t, row in results.items()
                     if row.get("rwkv" + suffix, {}).get(key, math.inf)
                     < row.get("transformer (SDPA)" + suffix, {}).get(key, math.inf)), None)

    overtakes_at = {"eager": overtakes("train_ms"), "graph": overtakes("graph_train_ms")}
    print(f"RWKV train step beats the Transformer from T = {overtakes_at['eager']} (eager) / "
          f"{overtakes_at['graph']} (CUDA graphs) on, of the lengths tried")
    if args.compile:
        overtakes_at.update(compiled_eager=overtakes("train_ms", "+compile"),
                            compiled_graph=overtakes("graph_train_ms", "+compile"))
        print(f"both compiled: from T = {overtakes_at['compiled_eager']} (eager) / "
              f"{overtakes_at['compiled_graph']} (CUDA graphs) on")
    return {"rows": {str(t): row for t, row in results.items()},
            "rwkv_overtakes_at": overtakes_at}


def _compiled(model: nn.Module) -> nn.Module:
    model.compile()  # in place, like the RWKV blocks' compile_blocks
    return model


def classifier_section(args, device) -> dict:
    B, T = args.batch_size, args.seq_len
    print(f"\n## Dual-branch classifier: B={B}, T={T}, 5 classes, autocast {args.amp}")
    results = {}
    for patch in sorted({1, args.patch_size}):
        torch.manual_seed(0)
        time_cfg = dict(hidden_size=args.hidden, num_layers=args.layers, patch_size=patch,
                        gradient_checkpointing=True)
        model = DualBranchClassifier(5, time=time_cfg).to(device)
        x = torch.randn(B, T, device=device)
        target = torch.randint(0, 5, (B,), device=device)
        r = measure_module(model, x, device, args.amp, train=True, repeat=args.repeat,
                           budget_s=20,
                           loss_fn=lambda y, t=target: nn.functional.cross_entropy(y.float(), t))
        if "fwd_ms" in r:
            r["inference_samples_per_s"] = B / r["fwd_ms"] * 1e3
            r["train_samples_per_s"] = B / r["train_ms"] * 1e3
        results[f"patch {patch}"] = r
        print(f"patch {patch}: params {n_params(model):,}, inference {fmt(r.get('fwd_ms'))} ms "
              f"({fmt(r.get('inference_samples_per_s'))} samples/s), train step "
              f"{fmt(r.get('train_ms'))} ms ({fmt(r.get('train_samples_per_s'))} samples/s), "
              f"peak {fmt(r.get('train_peak_mib'))} MiB {r.get('note', '')}", flush=True)
    return results


# the classifier train.py builds with the GPU defaults on its built-in data (auto_model for
# 2000 signals of 3750 samples) and with configs/gpu.yaml (no reverse scan), with the CLI's
# other defaults (conv stem, bidirectional, meanmax pooling, instance norm + amplitude): as
# train.model_settings gives, written out so the benchmark also runs on older checkouts
_CLI_TIME = dict(stem="conv", pooling="meanmax", bidirectional=True)
_CLASSIFIERS = {
    "classifier": dict(time=dict(hidden_size=64, num_layers=2, patch_size=8, **_CLI_TIME),
                       freq=dict(channels=[16, 32, 64]), instance_norm=True, keep_amplitude=True),
    "classifier-gpu-yaml": dict(time={**_CLI_TIME, "hidden_size": 256, "num_layers": 6,
                                      "patch_size": 4, "bidirectional": False},
                                freq=dict(channels=[16, 32, 64, 128]), instance_norm=True,
                                keep_amplitude=True),
}


def _step_model(name: str, C: int, L: int) -> nn.Module:
    if name == "rwkv":  # the time branch at full resolution: no patch stem
        return create_optimized_rwkv(1, C, L, check_input_finite=False)
    if name == "transformer":
        return TransformerStack(C, L)
    return DualBranchClassifier.from_dict({"num_classes": 5, **_CLASSIFIERS[name]})


def measure_train_step(model: nn.Module, x: torch.Tensor, loss_fn, device, amp,
                       compiled: bool, repeat: int, tables: bool = False) -> dict:
    """Forward (eval, no grad) and train step (forward, backward, AdamW as train.py builds it)
    of `model`, eager or whole-model torch.compile(mode="reduce-overhead"): wall ms, GPU busy
    ms and fraction, host launches and kernels per step (torch.profiler), peak MiB."""
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    mark = torch.compiler.cudagraph_mark_step_begin if compiled else (lambda: None)
    if compiled:
        model.compile(mode="reduce-overhead")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # foreach, as in training
    out: dict = {}

    def forward():
        mark()
        with torch.no_grad(), autocast:
            return model(x)

    def step():
        mark()
        with autocast:
            loss = loss_fn(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        t0 = time.perf_counter()
        model.eval()
        for _ in range(3):
            forward()
        out["fwd_ms"] = time_ms(forward, device, warmup=1, repeat=repeat, budget_s=10)
        model.train()
        base = reset_peak_memory(device)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        out["warmup_s"] = time.perf_counter() - t0
        out["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
        out.update(profile_steps(step, steps=5, wall_steps=repeat).as_dict())
        if tables:  # where the step's GPU and host time go
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            averages = prof.key_averages()
            out["gpu_table"] = averages.table(sort_by="self_cuda_time_total", row_limit=18,
                                              max_name_column_width=60)
            out["cpu_table"] = averages.table(sort_by="self_cpu_time_total", row_limit=18,
                                              max_name_column_width=60)
        out["train_peak_mib"] = peak_mib_since(device, base)
        out["train_samples_per_s"] = x.shape[0] / out["wall_ms"] * 1e3
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        out["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    opt.state.clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return out


def step_section(args, device) -> dict:
    """The train step, eager and whole-model compiled (CUDA graphs), of the RWKV time branch
    at full resolution, the SDPA Transformer of the same size and train.py's classifiers."""
    B, T, C, L = args.batch_size, args.seq_len, args.hidden, args.layers
    print(f"\n## Train step: B={B}, T={T}, {L} x {C}, autocast {args.amp}, AdamW; wall / GPU "
          f"busy (torch.profiler) / launches per step")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        print("(needs a GPU)")
        return {}
    x = torch.randn(B, T, device=device)
    target = torch.randint(0, 5, (B,), device=device)
    results: dict = {}
    for name in args.step_models:
        for mode in args.step_modes:
            torch.manual_seed(0)
            torch._dynamo.reset()
            model = _step_model(name, C, L).to(device)
            inputs = x.unsqueeze(-1) if name in ("rwkv", "transformer") else x
            if name in ("rwkv", "transformer"):
                def loss_fn(y):
                    return y.float().square().mean()
            else:
                def loss_fn(y):
                    return nn.functional.cross_entropy(y.float(), target)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                r = measure_train_step(model, inputs, loss_fn, device, args.amp,
                                       mode == "compiled", args.repeat, args.step_tables)
            results[f"{name} {mode}"] = r
            print(f"{name:<20} {mode:<9} fwd {fmt(r.get('fwd_ms')):>7} ms  step "
                  f"{fmt(r.get('wall_ms')):>7} ms  GPU busy {fmt(r.get('gpu_busy_ms')):>7} ms "
                  f"({fmt(100 * r.get('busy_fraction', math.nan))}%)  launches "
                  f"{fmt(r.get('launches_per_step'))}  kernels {fmt(r.get('kernels_per_step'))}"
                  f"  peak {fmt(r.get('train_peak_mib'))} MiB  {r.get('note', '')}", flush=True)
            for table in ("gpu_table", "cpu_table"):
                if table in r:
                    print(f"{name} {mode}, 3 steps, by self {table[:3].upper()} time "
                          f"(graph breaks: {r.get('graph_breaks')}):\n{r[table]}")
            del model
    for mode in args.step_modes:
        rwkv, peer = results.get(f"rwkv {mode}", {}), results.get(f"transformer {mode}", {})
        if "wall_ms" in rwkv and "wall_ms" in peer:
            print(f"{mode}: RWKV time branch step is {peer['wall_ms'] / rwkv['wall_ms']:.2f}x "
                  f"the Transformer's speed")
    return results


def plot_scaling(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in rows:
        # kernel time from CUDA-graph replay where measured, else the eager time
        ms = r.get("graph_fwd_bwd_ms") or r["fwd_bwd_ms"]
        if ms is not None:
            series.setdefault((r["backend"], r["channels"]), []).append((r["steps"], ms))
    for (backend, channels), points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        ax.loglog(xs, ys, marker="o", label=f"{backend}, C={channels}")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("WKV fwd+bwd ms")
    ax.set_title("WKV forward+backward vs T (CUDA backends: graph replay)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


# ------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    try:
        b, t = text.lower().split("x")
        return int(b), int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxT like 8x3750; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--quick", action="store_true",
                   help="CPU-friendly sizes (B=2, T=512, 2 layers x 64) unless set explicitly")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--patch-size", type=int, default=8,
                   help="also measure the conv stem that shortens T by this factor")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="autocast dtype for model sections (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--op-table", action="store_true",
                   help="only the WKV operator table: the cuda backend, float32/bfloat16/float16, "
                        "B = 1 and 8, T = 16 (host time), 3750, 65536 and 2^20 at C = 256, and "
                        "the gated variant at 8 x 3750; about 2 minutes on an H200")
    p.add_argument("--op-sizes", type=parse_size, nargs="+", help="BxT sizes for the op table")
    p.add_argument("--op-gated-sizes", type=parse_size, nargs="*", default=[],
                   help="BxT sizes timed again with the fused output gate r")
    p.add_argument("--op-dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=[str(d).removeprefix("torch.") for d in BYTES])
    p.add_argument("--op-repeat", type=int, default=30, help="timed calls per op-table entry")
    p.add_argument("--backends", nargs="+", choices=BACKENDS,
                   default=["cuda", "cpu", "torch", "reference"])
    p.add_argument("--scaling-lengths", type=int, nargs="+")
    p.add_argument("--scaling-hidden", type=int, nargs="+", default=[32, 256])
    p.add_argument("--scaling-batch", type=int, default=8)
    p.add_argument("--slow-ms", type=float, default=3000.0,
                   help="stop growing T for a backend once one run takes longer than this")
    p.add_argument("--peer-lengths", type=int, nargs="+")
    p.add_argument("--lstm-max-len", type=int, default=16384)
    p.add_argument("--skip-original", action="store_true", help="skip the sequential original")
    p.add_argument("--compile", action="store_true",
                   help="model and peers sections: also time the models under torch.compile "
                        "(train.py --compile; compiling takes a minute)")
    p.add_argument("--skip-original-train", action="store_true",
                   help="time only the original's forward (its train step takes long)")
    p.add_argument("--step-models", nargs="+", choices=STEP_MODELS, default=list(STEP_MODELS),
                   help="models of the 'step' section")
    p.add_argument("--step-modes", nargs="+", choices=["eager", "compiled"],
                   default=["eager", "compiled"],
                   help="'compiled': the whole model under torch.compile(mode='reduce-overhead')")
    p.add_argument("--step-tables", action="store_true",
                   help="also print the profiler's GPU and CPU time tables of each train step")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="write the scaling plot (PNG) here")
    p.add_argument("--replot", metavar="JSON",
                   help="only redraw the scaling plot (--plot) from an earlier --json file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            plot_scaling(json.load(fh)["scaling"], args.plot or "scaling.png")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if args.op_table:
        args.sections, args.backends, args.hidden = ["op"], ["cuda"], args.hidden or 256
        args.op_sizes = args.op_sizes or [(b, t) for t in (16, 3750, 65536, 2**20)
                                          for b in (1, 8)]
        args.op_gated_sizes = args.op_gated_sizes or [(8, 3750)]
        args.op_dtypes = ["float32", "bfloat16", "float16"]
    small = args.quick or not gpu
    args.batch_size = args.batch_size or (2 if small else 8)
    args.seq_len = args.seq_len or (512 if small else 3750)
    args.hidden = args.hidden or (64 if small else 256)
    args.layers = args.layers or (2 if small else 6)
    args.op_sizes = args.op_sizes or ([(2, 512)] if small else [(8, 3750), (1, 3750), (8, 65536)])
    args.op_dtypes = [getattr(torch, d) for d in args.op_dtypes]
    args.scaling_lengths = args.scaling_lengths or (
        [256, 1024, 4096] if small else [256, 1024, 4096, 16384, 65536, 262144])
    args.peer_lengths = args.peer_lengths or ([512] if small else [1024, 3750, 16384, 65536])
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.amp = None if dtype == "float32" else getattr(torch, dtype)

    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    tb_s = measure_bandwidth_tb_s(device)
    backend = prepare_backend(device)
    print(f"# RWKV benchmark, {time.strftime('%Y-%m-%d')}")
    print(f"Device: {name}; torch {torch.__version__}; WKV backend {backend}; "
          f"copy bandwidth {fmt(tb_s)} TB/s")
    report = {"device": name, "torch": torch.__version__, "bandwidth_tb_s": tb_s,
              "config": {k: v for k, v in vars(args).items() if k not in ("amp", "op_dtypes")}}
    report["config"]["op_sizes"] = [list(s) for s in args.op_sizes]
    report["config"]["op_gated_sizes"] = [list(s) for s in args.op_gated_sizes]
    sections = {
        "model": lambda: model_section(args, device),
        "op": lambda: op_section(args, device, tb_s),
        "scaling": lambda: scaling_section(args, device, tb_s),
        "peers": lambda: peers_section(args, device),
        "classifier": lambda: classifier_section(args, device),
        "step": lambda: step_section(args, device),
    }
    for section in args.sections:
        report[section] = sections[section]()
        if args.json:  # written after every section, so a stopped run keeps what it measured
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1, default=str)
    if "scaling" in report and args.plot:
        plot_scaling(report["scaling"], args.plot)
    if "op" in report and len(args.sections) > 1:  # the op table again, last, for the log tail
        print("\n## WKV operator (summary)")
        print(format_op_table([OpResult.from_dict(r) for r in report["op"]["rows"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
