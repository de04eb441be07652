"""Where the host time of one eager WKV call goes (the op table's host_us_per_call).

    python docs/profile_wkv_call.py [--device cuda] [--calls 300] [--out DIR]

On a tiny input (1 x 16 x 32, kernels of a few microseconds) the time of a call is the host's.
Times the pieces apart, each the mean over --calls back-to-back calls with the device waited
for once at the end:
- wkv() forward under no_grad, and the bare operator (torch.ops.rwkv_signal.wkv) beside it;
- wkv() forward with autograd recording;
- forward + backward through torch.autograd.grad, as the op table times it;
- the bare forward and backward operators called directly (no autograd);
- autograd's own cost for comparison: y = x * 2 and its grad.
Then torch.profiler over the forward + backward (CPU and CUDA activity): the ops by self CPU
time, written to DIR/wkv_call_prof.txt when --out is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_rwkv import mean_call_us  # noqa: E402
from models.wkv import prepare_backend, wkv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backend = prepare_backend(device)
    if backend not in ("cuda", "cpu"):
        print(f"the native WKV kernel is unavailable on {device}; nothing to profile")
        return 1
    g = torch.Generator(device=device).manual_seed(0)
    leaves = [torch.randn(*shape, generator=g, device=device).requires_grad_()
              for shape in ((32,), (32,), (1, 16, 32), (1, 16, 32))]
    plain = [t.detach() for t in leaves]
    op, op_bwd = torch.ops.rwkv_signal.wkv.default, torch.ops.rwkv_signal.wkv_backward.default
    gy = torch.ones_like(plain[2])
    x = torch.randn(1, 16, 32, device=device, requires_grad=True)

    def fwd_nograd():
        with torch.no_grad():
            wkv(*leaves, check_finite=False)

    def op_fwd():
        op(*plain, None, None)

    def fwd_autograd():
        wkv(*leaves, check_finite=False)

    def fwd_bwd():
        y, _ = wkv(*leaves, check_finite=False)
        torch.autograd.grad(y.sum(), leaves)

    def op_fwd_bwd():
        y, state, saved = op(*plain, None, None)
        op_bwd(*plain, None, None, saved, state, gy, None)

    def autograd_floor():
        torch.autograd.grad((x * 2).sum(), x)

    rows = [("wkv() forward, no_grad", fwd_nograd), ("operator forward", op_fwd),
            ("wkv() forward, autograd recording", fwd_autograd),
            ("wkv() forward + autograd.grad", fwd_bwd),
            ("operator forward + operator backward", op_fwd_bwd),
            ("autograd floor: (x * 2).sum() and its grad", autograd_floor)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"device {device} ({name}), torch {torch.__version__}, 1 x 16 x 32, "
             f"mean of {args.calls} calls"]
    for what, fn in rows:
        lines.append(f"{mean_call_us(fn, device, args.calls):9.1f} us  {what}")
    print("\n".join(lines), flush=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(50):
            fwd_bwd()
        if device.type == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "wkv_call_prof.txt").write_text("\n".join(lines) + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
