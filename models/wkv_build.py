"""JIT build and load of the WKV operator's C++/CUDA libraries (torch.utils.cpp_extension + ninja).

The operator `rwkv_signal::wkv` (and its backward) is defined once, in C++ (cuda/wkv_op.cpp:
schema, shapes for torch.compile, autograd). Two shared libraries register it:

    cpu   cuda/wkv_op.cpp + cuda/wkv_cpu.cpp: the schema, the Meta and Autograd kernels and the
          CPU kernel; needs only a C++ compiler. Every other library builds on it.
    cuda  cuda/wkv_kernel.cu: the CUDA kernel, registered for the CUDA dispatch key; needs nvcc
          (and a GPU to run).

Each is built once per source/torch/target combination into a cache folder and loaded from
there afterwards. A file lock (with a timeout that names the lock) keeps concurrent builders,
e.g. DDP ranks, from racing on the build folder. Run as a script to build ahead of training:

    python -m models.wkv_build          # the CPU library, and the CUDA one for the visible GPU
                                        # (what build_fast_rwkv.sh does)
    python -m models.wkv_build --check  # compile the CUDA kernel even without a GPU; any failure
                                        # is an error (exit 1)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.logs import DropLogMessages

log = logging.getLogger(__name__)


def _source_dir() -> Path:
    """The kernel sources: cuda/ beside models/ in a checkout (or an editable install); inside
    the package as models/wkv_kernels/ once `pip install .` copied them there."""
    here = Path(__file__).resolve().parent
    installed = here / "wkv_kernels"
    return installed if installed.is_dir() else here.parent / "cuda"


SOURCE_DIR = _source_dir()
CHECK_ARCHS = "8.0;9.0"  # what --check compiles for when no GPU says what it is
# -lineinfo: ncu/compute-sanitizer can point at source lines; it does not change the code
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr")


@dataclass(frozen=True)
class Extension:
    """What one library is built from; `prefix` names its cache folder."""

    prefix: str
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()


CUDA_EXTENSION = Extension("wkv_cuda", ("wkv_kernel.cu",), ("wkv_kernel.cuh", "wkv_common.h"),
                           ("-O3",), NVCC_FLAGS)


def cpu_extension() -> Extension:
    """The CPU library's build for this machine.

    -fopenmp: at::parallel_for is an inline OpenMP loop, serial without it; the library then
    shares torch's libgomp (same soname), so torch.set_num_threads applies. -fno-trapping-math:
    the kernel's selects (`gap >= 0 ? 1 : e`) vectorise only when the compiler may evaluate both
    sides; nothing here reads floating-point exception flags. No -ffast-math: it lets the
    compiler assume no infinities and NaNs, which changes what max and the selects compute.
    No -march=native: the cache folder may be shared between machines (a network home), and a
    library tuned to one CPU would crash another. AVX2 + FMA only where torch found them; the
    flags are part of the cache key, so an older CPU builds its own baseline copy.
    """
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if platform.machine().lower() in ("x86_64", "amd64") and cpu_capability() in ("AVX2", "AVX512"):
        cflags += ["-mavx2", "-mfma"]
    return Extension("wkv_cpu", ("wkv_op.cpp", "wkv_cpu.cpp"), ("wkv_common.h",), tuple(cflags),
                     ldflags=("-fopenmp",))


class BuildError(RuntimeError):
    """The library could not be built or loaded; the message says why."""


@dataclass(frozen=True)
class Built:
    """A library built (or found in the cache) and loaded into this process."""

    path: Path  # the shared object
    build_dir: Path
    seconds: float
    cached: bool


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


def cpu_capability() -> str:
    """The vector instruction set torch uses on this CPU: "AVX512", "AVX2", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def find_cxx() -> str | None:
    """The C++ compiler cpp_extension will call ($CXX, else c++), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cache_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(base) / "rwkv_signal"


def _build_tag(target: str, extension: Extension = CUDA_EXTENSION) -> str:
    digest = hashlib.sha256()
    for name in extension.sources + extension.headers:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(Path(__file__).read_bytes())  # the flags and the way of building
    flags = (extension.cflags, extension.cuda_cflags, extension.ldflags)
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{target}|{flags}".encode())
    return digest.hexdigest()[:12]


def _staged_sources(extension: Extension, build_dir: Path) -> list[str]:
    """The extension's sources and headers copied into build_dir/src (once; the folder's name
    hashes their contents), to compile from there. ninja keys its build on source paths, so
    compiling SOURCE_DIR itself made every checkout and installation of the same sources
    rebuild the shared cached library in turn; the copies give them all one build.ninja."""
    staged = build_dir / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for name in extension.sources + extension.headers:
        target = staged / name
        if not target.exists():
            partial = staged / f".{name}.{os.getpid()}.tmp"
            shutil.copyfile(SOURCE_DIR / name, partial)
            os.replace(partial, target)  # a killed copy never leaves a truncated source
    return [str(staged / s) for s in extension.sources]


# the library of each extension this process loaded: the operator's schema can be registered
# only once per process, so a second build (another cache folder, another target) is not loaded
_in_process: dict[str, Built] = {}


# cpp_extension warns at import where no CUDA runtime is installed, although the CPU library
# it then builds does not need one: noise on every CPU-only machine
logging.getLogger("torch.utils.cpp_extension").addFilter(
    DropLogMessages("No CUDA runtime is found"))


def _jit_load(extension: Extension, target: str, verbose: bool, timeout: float) -> Built:
    """Build (or find in the cache) `extension` for `target` (what its cache key must hold
    beyond sources, flags and torch: the GPU architectures, or the CPU's instruction set), and
    load it: its static initialisers register the operator's kernels with the dispatcher.
    Once a library of this extension is loaded, returns that one."""
    import filelock
    from torch.utils import cpp_extension

    if extension.prefix in _in_process:
        return _in_process[extension.prefix]

    name = f"{extension.prefix}_{_build_tag(target, extension)}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    cached = library.exists()
    lock_path = build_dir.parent / f"{name}.build.lock"
    start = time.perf_counter()
    if not cached:  # the first build takes tens of seconds (minutes for CUDA): say so first
        log.info("WKV %s kernel: building for %s (first use of these sources; cached after, "
                 "in %s) ...", extension.prefix.split("_")[-1].upper(), target, build_dir)
    try:
        with filelock.FileLock(str(lock_path), timeout=timeout):
            # We hold the lock, so no builder of ours is alive: a baton `lock` left in the build
            # folder is from a killed build and would make cpp_extension wait forever.
            (build_dir / "lock").unlink(missing_ok=True)
            cpp_extension.load(
                name=name,
                sources=_staged_sources(extension, build_dir),
                extra_cflags=list(extension.cflags),
                extra_cuda_cflags=list(extension.cuda_cflags) or None,
                extra_ldflags=list(extension.ldflags) or None,
                build_directory=str(build_dir),
                verbose=verbose,
                is_python_module=False,  # a plain library: TORCH_LIBRARY registers the op
            )
    except filelock.Timeout as exc:
        raise BuildError(
            f"waited {timeout:.0f} s for the build lock {lock_path}; another build holds it "
            "(if none is running, delete that file)"
        ) from exc
    except Exception as exc:  # compiler errors arrive as RuntimeError/OSError/IndexError
        raise BuildError(f"{type(exc).__name__}: {str(exc).strip()[-2000:]}") from exc
    _in_process[extension.prefix] = Built(library, build_dir, time.perf_counter() - start, cached)
    return _in_process[extension.prefix]


def build_cpu(verbose: bool = False, timeout: float = 900.0) -> Built:
    """Build (or find in the cache) and load the CPU library: the operator's schema, Meta and
    Autograd kernels and the CPU kernel. Raises BuildError with the reason on any failure."""
    if find_cxx() is None:
        raise BuildError(f"no C++ compiler ({os.environ.get('CXX', 'c++')} is not on PATH)")
    return _jit_load(cpu_extension(), cpu_capability(), verbose, timeout)


def build(arch_list: str | None = None, verbose: bool = False, timeout: float = 900.0) -> Built:
    """Build (or find in the cache) and load the CUDA library for `arch_list` ("8.0;9.0"); by
    default for the visible GPU. The operator's schema comes from the CPU library, which is
    loaded first. Raises BuildError with the reason on any failure."""
    arch_list = arch_list or gpu_arch()
    if arch_list is None:
        raise BuildError("no CUDA device and no architecture given (use --check to compile)")
    cuda_home = find_cuda_home()
    if cuda_home is None or not Path(cuda_home, "bin", "nvcc").exists():
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        raise BuildError(f"this torch ({torch.__version__}) is a CPU-only build")
    if load_extension_or_none("cpu") is None:
        raise BuildError(f"the CUDA kernel registers into the CPU library, which is "
                         f"unavailable: {why_unavailable('cpu')}")
    os.environ["CUDA_HOME"] = cuda_home
    # cpp_extension reads the arch list from the environment; without a GPU and without it,
    # it fails with an IndexError. -gencode flags would not replace its defaults.
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # read once at import; keep it in step with ours
    return _jit_load(CUDA_EXTENSION, arch_list, verbose, timeout)


# per kind ("cuda", "cpu"): (the loaded library or None, why it is None)
_loaded: dict[str, tuple[Built | None, str]] = {}


def _load_once(kind: str, build_fn: Callable[[], Built], detail: Callable[[], str]):
    """Build/load the `kind` library on first use; on failure remember why and warn once."""
    if kind not in _loaded:
        what = kind.upper()
        try:
            built = build_fn()
        except BuildError as exc:
            _loaded[kind] = (None, f"{what} build failed: {exc}")
            reason = str(exc) if kind == "cuda" else _first_line(exc)
            warnings.warn(f"WKV {what} kernel unavailable, using the PyTorch backend. {reason}",
                          stacklevel=3)
        else:
            _loaded[kind] = (built, "")
            log.info("WKV %s kernel %s (%s) in %.1f s: %s", what,
                     "loaded" if built.cached else "built", detail(), built.seconds,
                     built.build_dir)
    return _loaded[kind][0]


def _first_line(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{line[:300]} (`python -m models.wkv_build --verbose` shows the compiler's output)"


def load_extension_or_none(kind: str = "cuda") -> Built | None:
    """The loaded library of `kind` ("cuda" for the visible GPU, or "cpu"), building it on
    first use; None (with one warning that says why) if it cannot be had, so callers fall
    back to PyTorch."""
    if kind == "cpu":
        return _load_once("cpu", build_cpu, cpu_capability)
    if "cuda" not in _loaded and not torch.cuda.is_available():
        _loaded["cuda"] = (None, "no CUDA device")
    return _load_once("cuda", build, lambda: "sm_" + gpu_arch().replace(".", ""))


def loaded_extension(kind: str = "cuda") -> Built | None:
    """The library of `kind` if an earlier call loaded it; never builds (safe inside
    torch.compile)."""
    return _loaded.get(kind, (None, ""))[0]


def why_unavailable(kind: str = "cuda") -> str:
    """Why load_extension_or_none(kind) returned None ('' when it did not)."""
    load_extension_or_none(kind)
    return _loaded[kind][1]


def _build_and_report(what: str, target: str, build_fn: Callable[[], Built]) -> int:
    try:
        built = build_fn()
    except BuildError as exc:
        print(f"WKV {what} build failed: {exc}", file=sys.stderr)
        return 1
    state = "loaded from cache" if built.cached else "built"
    print(f"WKV {what} kernel {state} for {target} in {built.seconds:.1f} s")
    print(f"Cache: {built.build_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"compile even without a GPU (for architectures {CHECK_ARCHS})")
    parser.add_argument("--arch", help='architectures to build for, e.g. "9.0" or "8.0;9.0"')
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)

    if find_cxx() is None:
        print("No C++ compiler: the WKV operator will use its PyTorch backend.")
        return 0
    # the CUDA library needs the CPU one in this process (it registers into its schema)
    status = _build_and_report("CPU", cpu_capability(), lambda: build_cpu(verbose=args.verbose))
    arch = args.arch or gpu_arch() or (CHECK_ARCHS if args.check else None)
    if arch is None:
        print("No CUDA GPU visible: the WKV operator will use its CPU backends.")
        print("(Run with --check to compile the CUDA kernel anyway.)")
        return status
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{gpu_arch().replace('.', '')})")
    cuda_status = _build_and_report("CUDA", f"arch {arch}",
                                    lambda: build(arch, verbose=args.verbose))
    return max(status, cuda_status)


if __name__ == "__main__":
    sys.exit(main())
