#!/usr/bin/env bash
# The device run behind docs/benchmarks.md's "train step" figures (issue 15): this branch and an
# older main (commit MAIN, default bb4e4ce) side by side on one GPU, logs under OUT.
#   OUT=/tmp/out BUDGET=580 bash docs/benchmark_step.sh
# Builds the kernels, runs the CUDA tests, this branch's train-step benchmark, main's (eager),
# then train.py on both trees (GPU defaults and configs/gpu.yaml, no validation/test split, a
# ThroughputMonitor recording samples/s and GPU busy); every part is cut to fit BUDGET seconds.
set -uo pipefail
OUT=${OUT:-/tmp/out}; MAIN=${MAIN:-bb4e4ce}; PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
FAST="--val-fraction 0 --test-fraction 0"
mkdir -p "$OUT"
cd "$HERE"

build() {  # the kernels are keyed by their sources: a tree with the same cuda/ reuses the build
  (cd "$1" && timeout 300 $PY -c "
from models.wkv_build import load_extension_or_none as load
print('cuda', load('cuda')); print('cpu', load('cpu'))")
}

main_tree() {  # main at $MAIN, with this branch's benchmark and measuring callback beside it
  rm -rf /tmp/main && mkdir -p /tmp/main
  if [[ -n "${MAIN_TAR:-}" ]]; then tar -xf "$MAIN_TAR" -C /tmp/main || return 1
  else git -C "${REPO:-$HERE}" archive "$MAIN" | tar -x -C /tmp/main || return 1; fi
  cp "$HERE/benchmark_rwkv.py" /tmp/main/
  cp "$HERE/utils/benchmarking.py" "$HERE/utils/throughput.py" /tmp/main/utils/
}

train_run() {  # $1 tree, $2 label, rest: train.py options
  local tree=$1 label=$2; shift 2
  (cd "$tree" && timeout "$(left 80)" $PY -c "
import sys, train
from utils.throughput import ThroughputMonitor
sys.exit(train.main(sys.argv[1:], [ThroughputMonitor(every_n_steps=20, profile_at=42,
                                   profile_steps=5, record='$OUT/train_$label.jsonl',
                                   epoch_rates=False)]))  # train.py's own logs those
" --output-dir /tmp/runs_$label --no-progress-bar "$@") > "$OUT/train_$label.log" 2>&1
  echo "train $label rc=$?"; tail -3 "$OUT/train_$label.log"
}

left() {  # seconds for the next part: at most $1, and never past the call's $BUDGET
  local rest=$(( ${BUDGET:-580} - SECONDS )); (( rest > $1 )) && echo "$1" || echo $(( rest > 5 ? rest : 5 ))
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; date -u
  git -C "$HERE" log -1 --oneline; } > "$OUT/env.txt" 2>&1
build "$HERE" > "$OUT/build.log" 2>&1; tail -2 "$OUT/build.log"
timeout "$(left 100)" $PY -m pytest -q -p no:cacheprovider -m cuda -x \
  ${PYTEST_ARGS:-tests/test_rwkv.py tests/test_throughput.py tests/test_wkv_cuda.py} \
  > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?"; tail -4 "$OUT/pytest_cuda.log"
timeout "$(left 180)" $PY benchmark_rwkv.py --sections step --json "$OUT/step_branch.json" \
  ${STEP_ARGS:---step-models rwkv transformer classifier-gpu-yaml} > "$OUT/step_branch.log" 2>&1
cat "$OUT/step_branch.log"
if main_tree && build /tmp/main > "$OUT/build_main.log" 2>&1; then
  (cd /tmp/main && timeout "$(left 45)" $PY benchmark_rwkv.py --sections step --step-modes eager \
    --step-models rwkv classifier-gpu-yaml --json "$OUT/step_main.json") > "$OUT/step_main.log" 2>&1
  cat "$OUT/step_main.log"
  STEPS=${TRAIN_STEPS:-80}
  train_run "$HERE" branch_gpuyaml --config configs/gpu.yaml --max-steps $STEPS $FAST
  train_run /tmp/main main_gpuyaml --config configs/gpu.yaml --max-steps $STEPS $FAST
  train_run "$HERE" branch_default --max-steps $STEPS $FAST
  train_run /tmp/main main_default --max-steps $STEPS $FAST
fi
