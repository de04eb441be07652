"""benchmark_rwkv.py: a small CPU run writes real numbers; bad options fail clearly."""

import json

import pytest
import torch

import benchmark_rwkv


def test_quick_cpu_op_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rc = benchmark_rwkv.main(["--device", "cpu", "--quick", "--sections", "op", "--backends",
                              "torch", "reference", "--op-sizes", "1x64", "--op-dtypes",
                              "float32", "--repeat", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["op"]
    assert [r["backend"] for r in rows] == ["torch", "reference"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["dtype"] == "float32" for r in rows)


def test_bad_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark_rwkv.main(["--op-sizes", "8by3750"])
    assert exit_.value.code == 2
    assert "expected BxT like 8x3750" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_gpu_says_so(capsys):
    assert benchmark_rwkv.main(["--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
