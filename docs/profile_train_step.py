"""Where a train.py step's time goes on a GPU: the profiling behind docs/benchmarks.md's
"The whole train step as one CUDA graph".

    python docs/profile_train_step.py OUT TAG -- [train.py options]
    python docs/profile_train_step.py /tmp/prof whole_default -- --capture --max-steps 210 \\
        --synthetic-signals 8000 --val-fraction 0.01 --test-fraction 0.01 --no-progress-bar

Runs train.py (train.main, with one extra callback) and writes into OUT:
- TAG_prof.txt: GPU busy ms, host launch calls and kernels per step over steps 60-80
  (torch.profiler, CPU and CUDA activity; busy = union of kernel intervals, as the
  ThroughputMonitor counts it), then the ops by self CPU time and by CUDA time;
- TAG_cprofile.txt: Python's cProfile over steps 90-140 (the host's time by function);
- TAG_wall.txt: wall ms per step over steps 150-200, no profiler running: the window's time
  with the GPU synchronised at both ends, over its 50 steps (with no sync per step the host
  queues steps ahead of the GPU, so the time between step starts alone is not the step's);
  then the median, min and max of the time between consecutive step starts.
Use at least --max-steps 201 and an epoch longer than 200 steps (e.g. --synthetic-signals
8000 at batch 32) so no epoch end falls in the windows.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402  (the repository root, wherever this is run from)
from utils.benchmarking import busy_and_launches  # noqa: E402

PROFILE, CPROFILE, WALL = (60, 80), (90, 140), (150, 200)


class StepProfile(Callback):
    """The three windows above, by optimizer step (trainer.global_step)."""

    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag
        self.prof = self.cprofile = None
        self.marks: list[float] = []
        self.done: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == PROFILE[0] and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
        if step == CPROFILE[0] and self.cprofile is None:
            self.cprofile = cProfile.Profile()
            self.cprofile.enable()
        if WALL[0] <= step <= WALL[1]:
            if step in WALL:  # with no sync per step the host runs ahead of the GPU
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == PROFILE[1] and self.prof is not None and "prof" not in self.done:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.done.add("prof")
            busy, launches, kernels = busy_and_launches(self.prof)
            n = PROFILE[1] - PROFILE[0]
            table = self.prof.key_averages()
            (self.out / f"{self.tag}_prof.txt").write_text(
                f"busy/step {busy / 1e3 / n:.3f} ms launches/step {launches / n:.1f} "
                f"kernels/step {kernels / n:.1f}\n"
                + table.table(sort_by="self_cpu_time_total", row_limit=45,
                              max_name_column_width=70)
                + "\n\n" + table.table(sort_by="self_cuda_time_total", row_limit=30,
                                       max_name_column_width=70))
        if step == CPROFILE[1] and self.cprofile is not None and "cprofile" not in self.done:
            self.cprofile.disable()
            self.done.add("cprofile")
            text = io.StringIO()
            stats = pstats.Stats(self.cprofile, stream=text)
            stats.sort_stats("cumulative").print_stats(70)
            stats.sort_stats("tottime").print_stats(50)
            (self.out / f"{self.tag}_cprofile.txt").write_text(text.getvalue())
        if step == WALL[1] and "wall" not in self.done:
            self.done.add("wall")
            ms = [(b - a) * 1e3 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
            synced = (self.marks[-1] - self.marks[0]) * 1e3 / len(ms)
            (self.out / f"{self.tag}_wall.txt").write_text(
                f"wall/step {synced:.3f} ms (GPU synchronised at both ends; steps {WALL[0]}-"
                f"{WALL[1]}, no profiler; batch {trainer.train_dataloader.batch_size}); host "
                f"time between step starts: median {statistics.median(ms):.3f} ms min "
                f"{min(ms):.3f} max {max(ms):.3f}\n")


if __name__ == "__main__":
    out, tag = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    sys.exit(train.main(argv, [StepProfile(out, tag)]))
