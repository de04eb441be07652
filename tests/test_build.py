"""cuda/build.py: finding the toolkit and guarding the build folder with a lock."""

import filelock
import pytest

from cuda import build

needs_nvcc = pytest.mark.skipif(build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc)")


def test_no_gpu_and_no_arch_is_a_clear_build_error(monkeypatch):
    monkeypatch.setattr(build, "gpu_arch", lambda: None)
    with pytest.raises(build.BuildError, match="no CUDA device and no architecture"):
        build.build()


@needs_nvcc
def test_a_held_build_lock_times_out_naming_the_lock(tmp_path, monkeypatch):
    # build() sets these for cpp_extension; setting them here first restores them afterwards
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("CUDA_HOME", build.find_cuda_home())
    lock_path = build.cache_root() / f"wkv_{build._build_tag('8.0')}.build.lock"
    lock_path.parent.mkdir(parents=True)
    with filelock.FileLock(str(lock_path)), pytest.raises(build.BuildError) as err:
        build.build("8.0", timeout=0.5)
    message = str(err.value)
    assert str(lock_path) in message and "another build holds it" in message


def test_no_cxx_is_a_clear_cpu_build_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(build.BuildError, match="no C\\+\\+ compiler"):
        build.build_cpu()


def test_cpu_cache_key_holds_the_instruction_set():
    ext = build.cpu_extension()
    assert build._build_tag("AVX2", ext) != build._build_tag("DEFAULT", ext)
    assert build._build_tag("AVX2", ext) != build._build_tag("AVX2")  # not the CUDA build's


@pytest.mark.skipif(build.find_cxx() is None, reason="no C++ compiler")
def test_build_script_builds_the_cpu_kernel():
    """`python -m cuda.build` (what build_fast_rwkv.sh runs) builds or loads the CPU kernel."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "cuda.build"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WKV CPU kernel " in proc.stdout and f"for {build.cpu_capability()}" in proc.stdout
    module, build_dir, _, cached = build.build_cpu()
    assert cached and module.chunk == 16 and list(build_dir.glob("*.so"))
