#!/usr/bin/env bash
# The device run behind docs/benchmarks.md's "train step" figures (issue 15): this branch and an
# older main (commit MAIN, default bb4e4ce) side by side on one GPU, logs under OUT.
#   bash docs/benchmark_step.sh build-test   # build the kernels, CUDA tests, this branch's step benchmark
#   bash docs/benchmark_step.sh compare      # main's step benchmark; train.py samples/s, both trees
set -uo pipefail
OUT=${OUT:-/tmp/out}; MAIN=${MAIN:-bb4e4ce}; PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
mkdir -p "$OUT"
cd "$HERE"

build() {  # the kernels are keyed by their sources: a tree with the same cuda/ reuses the build
  (cd "$1" && timeout 300 $PY -c "
from models.wkv_build import load_extension_or_none as load
print('cuda', load('cuda')); print('cpu', load('cpu'))")
}

main_tree() {  # main at $MAIN, with this branch's benchmark and measuring callback beside it
  rm -rf /tmp/main && mkdir -p /tmp/main
  git -C "$HERE" archive "$MAIN" | tar -x -C /tmp/main || return 1
  cp "$HERE/benchmark_rwkv.py" /tmp/main/
  cp "$HERE/utils/benchmarking.py" "$HERE/utils/throughput.py" /tmp/main/utils/
}

train_run() {  # $1 tree, $2 label, rest: train.py options
  local tree=$1 label=$2; shift 2
  (cd "$tree" && timeout 240 $PY -c "
import sys, train
from utils.throughput import ThroughputMonitor
sys.exit(train.main(sys.argv[1:], [ThroughputMonitor(every_n_steps=25, profile_at=60,
                                   profile_steps=5, record='$OUT/train_$label.jsonl')]))
" --output-dir /tmp/runs_$label --no-progress-bar "$@") > "$OUT/train_$label.log" 2>&1
  echo "train $label rc=$?"; tail -3 "$OUT/train_$label.log"
}

case "${1:-build-test}" in
  build-test)
    { nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
      $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; date -u
      git -C "$HERE" log -1 --oneline; } > "$OUT/env.txt" 2>&1
    build "$HERE" > "$OUT/build.log" 2>&1; tail -2 "$OUT/build.log"
    timeout 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_wkv_cuda.py \
      tests/test_rwkv.py tests/test_throughput.py > "$OUT/pytest_cuda.log" 2>&1
    tail -4 "$OUT/pytest_cuda.log"
    timeout 330 $PY benchmark_rwkv.py --sections step --json "$OUT/step_branch.json" \
      > "$OUT/step_branch.log" 2>&1
    cat "$OUT/step_branch.log"
    ;;
  compare)
    main_tree && build /tmp/main > "$OUT/build_main.log" 2>&1
    (cd /tmp/main && timeout 150 $PY benchmark_rwkv.py --sections step --step-modes eager \
      --json "$OUT/step_main.json") > "$OUT/step_main.log" 2>&1; cat "$OUT/step_main.log"
    train_run "$HERE" branch_default --max-steps 250
    train_run /tmp/main main_default --max-steps 250
    train_run "$HERE" branch_gpuyaml --config configs/gpu.yaml --max-steps 250
    train_run /tmp/main main_gpuyaml --config configs/gpu.yaml --max-steps 250
    ;;
esac
