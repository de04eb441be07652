"""models/wkv_build.py: finding the toolkit, guarding the build folder with a lock, packaging."""

import filelock
import pytest

from models import wkv_build as build

needs_nvcc = pytest.mark.skipif(build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc)")


def test_no_gpu_and_no_arch_is_a_clear_build_error(monkeypatch):
    monkeypatch.setattr(build, "gpu_arch", lambda: None)
    with pytest.raises(build.BuildError, match="no CUDA device and no architecture"):
        build.build()


@needs_nvcc
def test_a_held_build_lock_times_out_naming_the_lock(tmp_path, monkeypatch):
    if build.load_extension_or_none("cpu") is None:  # the CUDA library registers into it
        pytest.skip("no CPU library")
    monkeypatch.delitem(build._in_process, "wkv_cuda", raising=False)
    # build() sets these for cpp_extension; setting them here first restores them afterwards
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("CUDA_HOME", build.find_cuda_home())
    lock_path = build.cache_root() / f"wkv_cuda_{build._build_tag('8.0')}.build.lock"
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
    """`python -m models.wkv_build` (what build_fast_rwkv.sh runs) builds or loads the CPU
    library, which registers the operator."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "models.wkv_build"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WKV CPU kernel " in proc.stdout and f"for {build.cpu_capability()}" in proc.stdout
    built = build.build_cpu()
    assert built.path.exists() and built.path.parent == built.build_dir
    import torch

    assert torch.ops.rwkv_signal.wkv.default._schema.name == "rwkv_signal::wkv"


def test_cuda_folder_holds_kernel_sources_only():
    """No Python package named `cuda` (it would shadow NVIDIA's cuda-python namespace), and
    the build finds every source it names."""
    assert not (build.SOURCE_DIR / "__init__.py").exists()
    assert not list(build.SOURCE_DIR.glob("*.py"))
    for ext in (build.CUDA_EXTENSION, build.cpu_extension()):
        for name in ext.sources + ext.headers:
            assert (build.SOURCE_DIR / name).is_file(), name


def test_pyproject_ships_the_kernel_sources():
    """`pip install .` copies cuda/ into the package as models/wkv_kernels, where the build
    looks for it once installed."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    tool = config["tool"]["setuptools"]
    assert "cuda" not in tool["packages"] and "models.wkv_kernels" in tool["packages"]
    assert tool["package-dir"]["models.wkv_kernels"] == "cuda"
    patterns = tool["package-data"]["models.wkv_kernels"]
    shipped = {p.name for pattern in patterns for p in build.SOURCE_DIR.glob(pattern)}
    needed = {*build.CUDA_EXTENSION.sources, *build.CUDA_EXTENSION.headers,
              *build.cpu_extension().sources, *build.cpu_extension().headers}
    assert needed <= shipped


def test_every_checkout_compiles_the_same_staged_copies(tmp_path, monkeypatch):
    """Two folders holding the same sources (two checkouts, a checkout and an installation)
    compile the same paths inside the build folder, so they share one cached build instead
    of rebuilding it for each other (ninja keys its build on source paths)."""
    ext = build.cpu_extension()
    staged = []
    for name in ("checkout", "site-packages"):
        folder = tmp_path / name
        folder.mkdir()
        for file in ext.sources + ext.headers:
            (folder / file).write_bytes((build.SOURCE_DIR / file).read_bytes())
        monkeypatch.setattr(build, "SOURCE_DIR", folder)
        staged.append(build._staged_sources(ext, tmp_path / "build"))
    assert staged[0] == staged[1] == [str(tmp_path / "build" / "src" / s) for s in ext.sources]
    for file in ext.sources + ext.headers:
        copy = tmp_path / "build" / "src" / file
        assert copy.read_bytes() == (build.SOURCE_DIR / file).read_bytes()


@needs_nvcc
@pytest.mark.slow
def test_kernel_timing_program_compiles(tmp_path):
    """docs/wkv_kernel_timing.cu (the kernel timings in docs/benchmarks.md) launches the
    kernels of cuda/wkv_kernel.cuh directly: it must keep compiling as they change."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    nvcc = Path(build.find_cuda_home()) / "bin" / "nvcc"
    proc = subprocess.run([str(nvcc), "-O3", "-std=c++17", "-arch=sm_90",
                           "--expt-relaxed-constexpr", f"-I{root / 'cuda'}", "-c",
                           str(root / "docs" / "wkv_kernel_timing.cu"),
                           "-o", str(tmp_path / "timing.o")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "timing.o").stat().st_size > 0


@needs_nvcc
@pytest.mark.slow
def test_kernel_timing_program_refuses_a_bad_launch_count(tmp_path):
    """WKV_TIMING_ITERS that is not a whole number >= 1 gets a clear message and exit status 2,
    before any GPU call (so this runs without a GPU), not a timing divided by zero."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    nvcc = Path(build.find_cuda_home()) / "bin" / "nvcc"
    binary = tmp_path / "timing"
    proc = subprocess.run([str(nvcc), "-O3", "-std=c++17", "-arch=sm_90",
                           "--expt-relaxed-constexpr", f"-I{root / 'cuda'}",
                           str(root / "docs" / "wkv_kernel_timing.cu"), "-o", str(binary)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for bad in ("abc", "0", "-3"):
        run = subprocess.run([str(binary)], env={"WKV_TIMING_ITERS": bad}, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2
        assert f"WKV_TIMING_ITERS must be a whole number >= 1, got '{bad}'" in run.stdout
