"""pyproject.toml and the import graph: `pip install .` gives packages that import from any
folder, with the kernel sources and the console scripts; no import cycle between the project's
modules; constructors build nothing and set no process-wide flags."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "utils")
ENTRY_MODULES = ("train", "benchmark_rwkv", "benchmark_accuracy")
SCRIPTS = ("rwkv-signal-train", "rwkv-signal-predict", "rwkv-signal-benchmark",
           "rwkv-signal-accuracy", "rwkv-signal-build")
NOT_SHIPPED = (".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", "lightning_logs",
               ".pytest_cache", ".ruff_cache", ".whl", ".gl", ".device")

# Run in a fresh interpreter from a folder outside the checkout: the promised imports, where
# they come from, and what importing and constructing changed in the process.
PROBE = """
import json, os
import matplotlib, pytorch_lightning, scipy.signal, sklearn.model_selection, torch, torchaudio
# (the libraries set variables of their own on import: KMP_*, TORCHINDUCTOR_CACHE_DIR ...)
flags = lambda: [dict(os.environ), torch.get_float32_matmul_precision(),
                 torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()]
before = flags()
from models.rwkv import create_optimized_rwkv
from utils.memory import MemoryMonitor
from data.formats import read_dataset
from models.estimator import SignalClassifier
from models import wkv_build
import train, benchmark_rwkv, benchmark_accuracy, utils.console
create_optimized_rwkv(hidden_size=8, num_layers=1)
SignalClassifier()
MemoryMonitor()
print(json.dumps({"estimator": __import__("models.estimator").estimator.__file__,
                  "train": train.__file__, "sources": str(wkv_build.SOURCE_DIR),
                  "kernel_files": sorted(p.name for p in wkv_build.SOURCE_DIR.iterdir()),
                  "built": sorted(wkv_build._in_process), "unchanged": flags() == before}))
"""


def _builds_without_isolation() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the `wheel` package."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.slow
def test_pip_install_imports_from_any_folder_with_kernel_sources_and_scripts(tmp_path):
    source, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    # without isolation where this environment can build (no download), else pip fetches
    # the build backend pyproject.toml names
    isolated = not _builds_without_isolation()
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
               *([] if isolated else ["--no-build-isolation"]), "--target", str(site),
               str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode and isolated and "setuptools" in done.stderr:
        pytest.skip("no setuptools >= 70.1 here and none to fetch for an isolated build "
                    "(pip install -r requirements-dev.txt)")
    assert done.returncode == 0, done.stdout + done.stderr
    for script in SCRIPTS:
        assert (site / "bin" / script).is_file(), script

    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not the checkout
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("estimator", "train", "sources"):
        assert Path(found[key]).resolve().is_relative_to(site.resolve()), (key, found[key])
    assert {p.name for p in (ROOT / "cuda").iterdir()} <= set(found["kernel_files"])
    assert found["built"] == [], "importing or constructing built a WKV library"
    assert found["unchanged"], "importing or constructing changed a process-wide setting"

    done = subprocess.run([str(site / "bin" / "rwkv-signal-predict"), "--help"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--checkpoint" in done.stdout, done.stderr


def test_pyproject_installs_the_packages_entry_modules_and_scripts():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = config["tool"]["setuptools"]
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".")
                for name in PACKAGES for p in (ROOT / name).rglob("__init__.py")}
    assert packages <= set(tool["packages"])
    assert set(tool["py-modules"]) == set(ENTRY_MODULES)
    scripts = config["project"]["scripts"]
    assert set(scripts) == set(SCRIPTS)
    for target in scripts.values():  # every script names a function that exists
        module, function = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        names = {node.name for node in ast.parse(path.read_text()).body
                 if isinstance(node, ast.FunctionDef)}
        assert function in names, target


def _module_imports(path: Path) -> set[str]:
    """Modules `path` imports when it is imported: module-level statements, not function
    bodies or `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    return found


def test_no_import_cycle_between_the_projects_modules():
    files = [p for name in PACKAGES for p in (ROOT / name).rglob("*.py")]
    files += [ROOT / f"{name}.py" for name in ENTRY_MODULES]
    modules = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: sorted(m for m in _module_imports(path) if m in modules and m != name)
             for name, path in modules.items()}
    assert "models.wkv_build" in graph["models.wkv"]  # the graph sees the WKV modules

    state: dict[str, str] = {}

    def cycle_from(name: str, trail: list[str]) -> list[str] | None:
        state[name] = "open"
        for other in graph[name]:
            if state.get(other) == "open":
                return [*trail, name, other]
            if other not in state and (found := cycle_from(other, [*trail, name])):
                return found
        state[name] = "done"
        return None

    for name in graph:
        if name not in state:
            cycle = cycle_from(name, [])
            assert cycle is None, " -> ".join(cycle)


def test_constructors_build_no_kernel_and_set_no_process_wide_flags(monkeypatch):
    from models import wkv_build

    def refuse(*args, **kwargs):
        raise AssertionError("a constructor built or loaded a WKV library")

    for name in ("load_extension_or_none", "build", "build_cpu"):
        monkeypatch.setattr(wkv_build, name, refuse)
    from models.dual_branch import DualBranchClassifier
    from models.estimator import SignalClassifier
    from models.lightning_module import SignalClassifierModule
    from models.rwkv import create_optimized_rwkv, create_original_rwkv
    from utils.memory import MemoryMonitor, MemoryMonitorCallback

    def flags():
        return (dict(os.environ), torch.get_float32_matmul_precision(),
                torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())

    before = flags()
    create_optimized_rwkv(hidden_size=8, num_layers=1, compile_blocks=True)  # compiles lazily
    create_original_rwkv(hidden_size=8, num_layers=1)
    DualBranchClassifier(3, time={"hidden_size": 8, "num_layers": 1},
                         freq={"n_fft": 64, "hop_length": 16, "n_mels": 16})
    SignalClassifierModule({"time": {"hidden_size": 8, "num_layers": 1}}, num_classes=2)
    SignalClassifier(hidden_size=8)
    MemoryMonitor()
    MemoryMonitorCallback()
    assert flags() == before
