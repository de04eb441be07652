#!/usr/bin/env bash
# The device run behind docs/benchmarks.md's "train.py on the GPU: samples/s and GPU busy"
# (issue 15): train.py of this tree (captured, the default, and --no-capture) and of an older main
# (commit MAIN, default d79eb28) one after another on one GPU, logs under OUT.
#   OUT=/tmp/out BUDGET=585 bash docs/benchmark_train.sh
#   MAIN_TAR=main.tar ...   # main's files from `git archive MAIN` where the GPU machine has no .git
# This tree's runs are measured by train.py's own ThroughputMonitor, read back from their
# TensorBoard event files; main gets the same monitor (this tree's utils/throughput.py and
# utils/benchmarking.py copied beside it) through train.main's extra callbacks.
set -uo pipefail
OUT=${OUT:-/tmp/out}; MAIN=${MAIN:-d79eb28}; PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
FAST="--val-fraction 0.01 --test-fraction 0.01 --no-progress-bar"
STEPS="--max-steps ${TRAIN_STEPS:-140}"  # the monitor logs at steps 85 and 135 (50-step windows
                                         # after its profiler window at steps 30-34)
mkdir -p "$OUT"; cd "$HERE"; T0=$SECONDS

left() {  # seconds for the next part: at most $1, and never past the call's $BUDGET
  local rest=$(( ${BUDGET:-585} - (SECONDS - T0) ))
  (( rest > $1 )) && echo "$1" || echo $(( rest > 5 ? rest : 5 ))
}

rm -rf /tmp/main && mkdir -p /tmp/main
if [[ -n "${MAIN_TAR:-}" ]]; then tar -xf "$MAIN_TAR" -C /tmp/main
else git -C "$HERE" archive "$MAIN" | tar -x -C /tmp/main; fi
cp utils/benchmarking.py utils/throughput.py /tmp/main/utils/
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  $PY -c "import torch, pytorch_lightning as pl; print(torch.__version__, torch.version.cuda, pl.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1
(cd /tmp/main && TORCH_EXTENSIONS_DIR=/tmp/ext_main timeout 300 $PY -m cuda.build \
  > "$OUT/build_main.log" 2>&1) &  # main's kernels, from its own sources
TORCH_EXTENSIONS_DIR=/tmp/ext timeout 300 $PY -m models.wkv_build > "$OUT/build.log" 2>&1
wait

this_run() {  # $1 label, rest: train.py options
  local label=$1; shift
  TORCH_EXTENSIONS_DIR=/tmp/ext timeout -k 5 "$(left 130)" $PY train.py \
    --output-dir /tmp/runs_$label $FAST "$@" > "$OUT/train_$label.log" 2>&1
  echo "train $label rc=$?"
  $PY - /tmp/runs_$label > "$OUT/train_$label.tb.txt" 2>&1 <<'P'
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for run in sorted(glob.glob(sys.argv[1] + "/*/version_*")):
    events = EventAccumulator(run).Reload()
    for tag in sorted(events.Tags()["scalars"]):
        if "throughput" in tag or "samples_per_s" in tag or "peak" in tag:
            print(tag, [(e.step, round(e.value, 4)) for e in events.Scalars(tag)])
P
}

main_run() {  # $1 label, rest: train.py options
  local label=$1; shift
  (cd /tmp/main && TORCH_EXTENSIONS_DIR=/tmp/ext_main timeout -k 5 "$(left 130)" $PY -c "
import sys, train
from utils.throughput import ThroughputMonitor
sys.exit(train.main(sys.argv[1:], [ThroughputMonitor(every_n_steps=50,
                                   record='$OUT/train_$label.jsonl')]))
" --output-dir /tmp/runs_$label $FAST "$@") > "$OUT/train_$label.log" 2>&1
  echo "train $label rc=$?"
}

this_run gpuyaml_capture --config configs/gpu.yaml $STEPS  # captured: the default on one GPU
main_run main_gpuyaml --config configs/gpu.yaml $STEPS
this_run default_capture $STEPS
main_run main_default $STEPS
this_run gpuyaml_eager --config configs/gpu.yaml --no-capture $STEPS
cat "$OUT"/train_*.tb.txt "$OUT"/train_*.jsonl 2>/dev/null
