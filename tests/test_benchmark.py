"""benchmark_rwkv.py: a small CPU run writes real numbers; bad options fail clearly."""

import json

import pytest
import torch

import benchmark_rwkv
from utils.benchmarking import fmt, peak_mib_since, reset_peak_memory


def test_quick_cpu_op_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rc = benchmark_rwkv.main(["--device", "cpu", "--quick", "--sections", "op", "--backends",
                              "torch", "reference", "--op-sizes", "1x64", "--op-dtypes",
                              "float32", "--repeat", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["op"]["rows"]
    assert [r["backend"] for r in rows] == ["torch", "reference"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["dtype"] == "float32" for r in rows)
    assert all(r["mb_fwd_bwd"] == 8 * 64 * 64 * 4 / 1e6 for r in rows)  # 8 tensors of B*T*C


def test_op_table_with_the_cpu_kernel_and_the_gate(tmp_path, capsys):
    """The op table on CPU: the C++ kernel, the fused gate, host time per call, the summary."""
    from models import wkv_build

    if wkv_build.find_cxx() is None:
        pytest.skip("no C++ compiler")
    out = tmp_path / "bench.json"
    rc = benchmark_rwkv.main(["--device", "cpu", "--quick", "--sections", "op", "model",
                              "--skip-original", "--backends", "cpu", "--op-sizes", "1x64",
                              "--op-gated-sizes", "1x64", "--op-dtypes", "float32", "bfloat16",
                              "--op-repeat", "2", "--repeat", "1", "--layers", "1",
                              "--hidden", "16", "--seq-len", "64", "--json", str(out)])
    assert rc == 0
    op = json.loads(out.read_text())["op"]
    assert [(r["dtype"], r["gated"]) for r in op["rows"]] == [
        ("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)]
    assert op["rows"][2]["mb_fwd"] == 4 * 64 * 16 * 4 / 1e6  # k, v, r read, y written
    assert op["host_us_per_call"]["fwd_us"] > 0 and op["host_us_per_call"]["fwd_bwd_us"] > 0
    printed = capsys.readouterr().out
    assert "## WKV operator (summary)" in printed and "| cpu | bfloat16 | r | 1 | 64 | 16 |" \
        in printed


def test_op_table_preset_needs_no_other_flag():
    args = benchmark_rwkv.build_parser().parse_args(["--op-table"])
    assert args.op_table and args.op_repeat == 30


def test_bad_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark_rwkv.main(["--op-sizes", "8by3750"])
    assert exit_.value.code == 2
    assert "expected BxT like 8x3750" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_gpu_says_so(capsys):
    assert benchmark_rwkv.main(["--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--op-dtypes", "float64"), ("--backends", "triton")])
def test_unknown_dtype_or_backend_is_an_argparse_error(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark_rwkv.main([option, value])
    assert exit_.value.code == 2
    assert f"invalid choice: '{value}'" in capsys.readouterr().err


def test_fmt_and_peak_memory_helpers():
    assert [fmt(None), fmt(float("nan")), fmt(0.12345), fmt(12.345), fmt(1234.5), fmt(123.45, 4)] \
        == ["-", "-", "0.123", "12.3", "1234", "123.5"]
    cpu = torch.device("cpu")
    assert reset_peak_memory(cpu) == 0 and peak_mib_since(cpu, 0) is None


def test_wkv_call_profile_times_the_pieces_of_an_eager_call(tmp_path):
    """docs/profile_wkv_call.py (the host-time breakdown in docs/benchmarks.md) on the CPU
    kernel: every piece timed, the profiler's table written."""
    import importlib.util
    from pathlib import Path

    from models import wkv_build

    if wkv_build.find_cxx() is None:
        pytest.skip("no C++ compiler")
    path = Path(__file__).resolve().parents[1] / "docs" / "profile_wkv_call.py"
    spec = importlib.util.spec_from_file_location("profile_wkv_call", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--device", "cpu", "--calls", "3", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "wkv_call_prof.txt").read_text()
    for piece in ("operator forward + operator backward", "autograd floor",
                  "wkv() forward + autograd.grad", "rwkv_signal::wkv_backward"):
        assert piece in text
