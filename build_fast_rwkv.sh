#!/usr/bin/env bash
# Set up the project and build the WKV kernels (C++ CPU kernel; CUDA kernel for this GPU).
#
#   ./build_fast_rwkv.sh            install pinned dependencies, build the kernels
#   ./build_fast_rwkv.sh --dev      also install the test tools (pytest, ruff)
#   ./build_fast_rwkv.sh --check    compile the kernel even without a GPU (proves it builds)
#   ./build_fast_rwkv.sh --no-install   only build the kernel
#
# Dependencies go into the active virtual environment (or conda env); when none is active,
# into a fresh .venv next to this script (activate it with `. .venv/bin/activate`).
# Without nvcc or a GPU the operator uses its C++ CPU kernel (or, without a C++ compiler, its
# PyTorch backend), and this script says so.
set -euo pipefail
cd "$(dirname "$0")"

dev=0 check=0 install=1
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --check) check=1 ;;
    --no-install) install=0 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  python="$VIRTUAL_ENV/bin/python"
elif [[ -n "${CONDA_PREFIX:-}" ]]; then
  python="$CONDA_PREFIX/bin/python"
else
  if [[ ! -x .venv/bin/python ]]; then
    echo "No active virtual environment: creating .venv"
    python3 -m venv .venv
  fi
  python="$PWD/.venv/bin/python"
fi
echo "Python: $python"

if (( install )); then
  # Only the dependencies: train.py and the benchmarks run from this folder as they are;
  # `pip install .` (README: "Use it as a library") makes them importable from anywhere.
  requirements=(-r requirements.txt -r requirements-formats.txt)
  (( dev )) && requirements+=(-r requirements-dev.txt)
  start=$(date +%s)
  "$python" -m pip install --quiet --upgrade pip
  # torch and torchaudio are pinned to 2.11.0 in requirements.txt (CUDA 13.0 wheels)
  "$python" -m pip install --quiet "${requirements[@]}"
  echo "Dependencies installed in $(( $(date +%s) - start )) s"
fi

# The CPU kernel needs a C++ compiler; the CUDA kernel needs CUDA_HOME (models/wkv_build.py
# finds /usr/local/cuda or the nvcc on PATH).
if (( check )); then
  "$python" -m models.wkv_build --check
else
  "$python" -m models.wkv_build
fi
