"""JIT build and load of the CUDA WKV extension (torch.utils.cpp_extension + ninja).

Built once per source/torch/GPU-architecture combination into a cache folder and loaded from
there afterwards. A file lock (with a timeout that names the lock) keeps concurrent builders,
e.g. DDP ranks, from racing on the build folder. Run as a script to build ahead of training:

    python -m cuda.build            # build for the visible GPU (what build_fast_rwkv.sh does)
    python -m cuda.build --check    # compile even without a GPU, to prove the kernel builds
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("wkv_op.cpp", "wkv_kernel.cu")
HEADERS = ("wkv_chunk.h",)
CHECK_ARCHS = "8.0;9.0"  # what --check compiles for when no GPU says what it is
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr")


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why."""


def find_cuda_home() -> str | None:
    """A CUDA toolkit (bin/nvcc and include/cuda_runtime.h): CUDA_HOME if set, else
    /usr/local/cuda, else the one around the nvcc on PATH (which may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = [Path("/usr/local/cuda")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def gpu_arch() -> str | None:
    """Compute capability of the current GPU as "9.0", or None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def cache_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(base) / "rwkv_signal"


def _build_tag(arch_list: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS + ("build.py",):
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch_list}|{NVCC_FLAGS}".encode())
    return digest.hexdigest()[:12]


def build(arch_list: str | None = None, verbose: bool = False, timeout: float = 900.0):
    """Build (or load from the cache) the extension for `arch_list` ("8.0;9.0"); by default
    for the visible GPU. Returns (module, build folder, seconds spent, was_cached).
    Raises BuildError with the reason on any failure."""
    import filelock

    arch_list = arch_list or gpu_arch()
    if arch_list is None:
        raise BuildError("no CUDA device and no architecture given (use --check to compile)")
    cuda_home = find_cuda_home()
    if cuda_home is None or not Path(cuda_home, "bin", "nvcc").exists():
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        raise BuildError(f"this torch ({torch.__version__}) is a CPU-only build")
    os.environ["CUDA_HOME"] = cuda_home
    # cpp_extension reads the arch list from the environment; without a GPU and without it,
    # it fails with an IndexError. -gencode flags would not replace its defaults.
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # read once at import; keep it in step with ours

    tag = _build_tag(arch_list)
    build_dir = cache_root() / f"wkv_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cached = (build_dir / f"wkv_{tag}.so").exists()
    lock_path = build_dir.parent / f"wkv_{tag}.build.lock"
    start = time.perf_counter()
    try:
        with filelock.FileLock(str(lock_path), timeout=timeout):
            # We hold the lock, so no builder of ours is alive: a baton `lock` left in the build
            # folder is from a killed build and would make cpp_extension wait forever.
            (build_dir / "lock").unlink(missing_ok=True)
            module = cpp_extension.load(
                name=f"wkv_{tag}",
                sources=[str(SOURCE_DIR / s) for s in SOURCES],
                extra_cflags=["-O3"],
                extra_cuda_cflags=list(NVCC_FLAGS),
                build_directory=str(build_dir),
                verbose=verbose,
            )
    except filelock.Timeout as exc:
        raise BuildError(
            f"waited {timeout:.0f} s for the build lock {lock_path}; another build holds it "
            "(if none is running, delete that file)"
        ) from exc
    except Exception as exc:  # compiler errors arrive as RuntimeError/OSError/IndexError
        raise BuildError(f"{type(exc).__name__}: {str(exc).strip()[-2000:]}") from exc
    return module, build_dir, time.perf_counter() - start, cached


_loaded: dict[str, object] = {}


def load_extension_or_none() -> ModuleType | None:
    """The built extension for the visible GPU, building it on first use; None (with one
    warning that says why) if it cannot be had, so callers fall back to PyTorch."""
    if "module" not in _loaded:
        if not torch.cuda.is_available():
            _loaded.update(module=None, why="no CUDA device")
        else:
            try:
                module, build_dir, seconds, cached = build()
                _loaded.update(module=module, why="")
                log.info(
                    "WKV CUDA kernel %s (sm_%s) in %.1f s: %s",
                    "loaded" if cached else "built",
                    gpu_arch().replace(".", ""),
                    seconds,
                    build_dir,
                )
            except BuildError as exc:
                _loaded.update(module=None, why=f"CUDA build failed: {exc}")
                warnings.warn(
                    f"WKV CUDA kernel unavailable, using the PyTorch backend. {exc}", stacklevel=2
                )
    return _loaded["module"]


def loaded_extension() -> ModuleType | None:
    """The extension if an earlier call loaded it; never builds (safe inside torch.compile)."""
    return _loaded.get("module")


def why_unavailable() -> str:
    """Why load_extension_or_none() returned None ('' when it did not)."""
    load_extension_or_none()
    return str(_loaded.get("why", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"compile even without a GPU (for architectures {CHECK_ARCHS})")
    parser.add_argument("--arch", help='architectures to build for, e.g. "9.0" or "8.0;9.0"')
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)

    arch = args.arch or gpu_arch() or (CHECK_ARCHS if args.check else None)
    if arch is None:
        print("No CUDA GPU visible: the WKV operator will use its PyTorch backend.")
        print("(Run with --check to compile the CUDA kernel anyway.)")
        return 0
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{gpu_arch().replace('.', '')})")
    try:
        _, build_dir, seconds, cached = build(arch, verbose=args.verbose)
    except BuildError as exc:
        print(f"WKV CUDA build failed: {exc}", file=sys.stderr)
        return 1
    state = "loaded from cache" if cached else "built"
    print(f"WKV CUDA kernel {state} for arch {arch} in {seconds:.1f} s")
    print(f"Cache: {build_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
