"""Side-by-side performance report: the WKV operator's backends against the bandwidth floor.

    python benchmark_rwkv.py                      # full report on the GPU (smaller sizes on CPU)
    python benchmark_rwkv.py --sections op --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from utils.benchmarking import as_dicts, bench_op, format_op_table, measure_bandwidth_tb_s


def op_section(args, device, tb_s):
    dtypes = [getattr(torch, d) for d in args.dtypes]
    results = []
    for batch, steps in args.op_sizes:
        for dtype in dtypes:
            for backend in args.backends:
                if backend.startswith("cuda") and device.type != "cuda":
                    continue
                slow = backend == "reference" or (backend == "torch" and device.type == "cpu")
                r = bench_op(backend, dtype, batch, steps, args.hidden, device, tb_s,
                             repeat=2 if slow else 30, budget_s=30 if slow else 10)
                results.append(r)
                print(format_op_table([r]).splitlines()[-1], flush=True)
    return results


def parse_size(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=256, help="channels C")
    p.add_argument("--op-sizes", type=parse_size, nargs="+", default=None,
                   help="BxT sizes for the operator table, e.g. 8x3750 1x3750")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--backends", nargs="+",
                   default=["cuda", "cuda_sequential", "torch", "reference"])
    p.add_argument("--json", help="write all results to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.op_sizes is None:
        args.op_sizes = [(8, 3750), (1, 3750)] if device.type == "cuda" else [(8, 3750)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tb_s = measure_bandwidth_tb_s(device)
    print(f"Device: {name}; torch {torch.__version__}; copy bandwidth {tb_s:.2f} TB/s")
    results = op_section(args, device, tb_s)
    print(format_op_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "bandwidth_tb_s": tb_s, "op": as_dicts(results)}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
