"""Accuracy benchmark: train.py's defaults on a suite of labelled datasets with official splits.

For every NAME_TRAIN / NAME_TEST pair (.ts, .tsv, .csv or .npz) under SUITE (the folder itself
and its sub-folders), and every seed, runs `train.py --data NAME_TRAIN --test-data NAME_TEST
--seed S` exactly as a user would (one process per run, the defaults untouched unless
--train-args says otherwise), reads its test_metrics.json, and measures beside it, in the same
run, MiniRocket (aeon's MiniRocketClassifier, 10,000 kernels, ridge; needs the optional `aeon`
package, else the column says so) and 1-nearest-neighbour Euclidean distance, both on
z-normalised series as the development suite's baselines are. Published figures are shown for
the sets of the development suite (their sources are listed in docs/accuracy.md).

    python benchmark_accuracy.py SUITE                      # every pair, seeds 0 1 2
    python benchmark_accuracy.py SUITE --sets GunPoint,Coffee --seeds 0 1 2 3 4
    python benchmark_accuracy.py SUITE --jobs 4             # runs in parallel (GPU: several
                                                            # small sets at once)
    python benchmark_accuracy.py SUITE --ensemble 5         # train.py --ensemble 5 per run
    python benchmark_accuracy.py SUITE --quick              # one set, one seed (CI smoke test)

Writes OUTPUT/accuracy.json (every figure, per seed, with the commands, device, date and
versions) and OUTPUT/accuracy.md (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXTENSIONS = (".ts", ".tsv", ".csv", ".npz")  # preference order when a set has several

# Test accuracy on the default split of the development suite's sets, from its README:
# best deep model of CNN, ResNet, InceptionTime, H-InceptionTime, LITETime (bake-off redux,
# Middlehurst et al. 2024; PickupGestureWiimoteZ_eq from the same results' `best` folder),
# and the best of the 40 classifiers there.
PUBLISHED = {
    "ArrowHead": (0.8743, "H-InceptionTime", 0.8743),
    "Coffee": (1.0, "all five deep models", 1.0),
    "GunPoint": (1.0, "H-InceptionTime", 1.0),
    "ItalyPowerDemand": (0.9670, "H-InceptionTime", 0.9708),
    "PickupGestureWiimoteZ_eq": (0.92, "H-InceptionTime", 0.94),
    "Trace": (1.0, "four deep models", 1.0),
    # held-out sets (never tuned on): H-InceptionTime from the same bake-off files, resample 0
    "ACSF1": (0.95, "H-InceptionTime", None),
    "OSULeaf": (0.9504, "H-InceptionTime", None),
}


@dataclass(frozen=True)
class Pair:
    """One dataset of the suite: its name and official train and test files."""

    name: str
    train: Path
    test: Path


def find_pairs(suite: Path) -> list[Pair]:
    """Every NAME_TRAIN.ext with a NAME_TEST.ext beside it, under suite (one level of
    sub-folders), one per NAME (.ts preferred, then .tsv, .csv, .npz)."""
    found: dict[str, Pair] = {}
    for folder in [suite, *sorted(p for p in suite.iterdir() if p.is_dir())]:
        for ext in EXTENSIONS:
            for train in sorted(folder.glob(f"*_TRAIN{ext}")):
                test = train.with_name(train.name.replace("_TRAIN", "_TEST"))
                name = train.name[: -len(f"_TRAIN{ext}")]
                if test.exists() and name not in found:
                    found[name] = Pair(name, train, test)
    return [found[k] for k in sorted(found, key=str.lower)]


# ---------------------------------------------------------------------------- baselines


def read_pair(pair: Pair):
    """(train signals, train labels, test signals, test labels) with the project's readers."""
    sys.path.insert(0, str(HERE))
    from data.formats import read_train_test

    train, test = read_train_test(pair.train, pair.test)
    return ([np.asarray(s, np.float64) for s in train.signals], train.labels,
            [np.asarray(s, np.float64) for s in test.signals], test.labels)


def znormalize_rows(x: np.ndarray) -> np.ndarray:
    mean, std = x.mean(1, keepdims=True), x.std(1, keepdims=True)
    return (x - mean) / np.where(std == 0, 1.0, std)


def one_nn_accuracy(xtr, ytr, xte, yte) -> float:
    """1-NN, Euclidean distance (ties: the lowest training index)."""
    d = (xte ** 2).sum(1)[:, None] + (xtr ** 2).sum(1)[None, :] - 2.0 * xte @ xtr.T
    return float(np.mean(ytr[np.argmin(d, axis=1)] == yte))


def baselines(pair: Pair, seeds: list[int]) -> dict:
    """1-NN ED and MiniRocket (mean over seeds) on z-normalised series; 'n/a' with the reason
    where they cannot run (unequal lengths, aeon missing)."""
    started = time.perf_counter()
    xtr, ytr, xte, yte = read_pair(pair)
    if len({len(s) for s in xtr + xte}) != 1:
        why = "unequal lengths"
        return {"one_nn_ed": None, "minirocket": None, "baseline_note": why}
    ztr, zte = znormalize_rows(np.vstack(xtr)), znormalize_rows(np.vstack(xte))
    result = {"one_nn_ed": one_nn_accuracy(ztr, ytr, zte, yte), "minirocket": None,
              "minirocket_seeds": [], "baseline_note": ""}
    try:
        from aeon.classification.convolution_based import MiniRocketClassifier
    except ImportError:
        result["baseline_note"] = "MiniRocket skipped: aeon is not installed"
        return result
    try:
        for seed in seeds:
            clf = MiniRocketClassifier(random_state=seed, n_jobs=1)
            clf.fit(ztr[:, None, :], ytr)
            result["minirocket_seeds"].append(
                float(np.mean(clf.predict(zte[:, None, :]) == yte)))
    except Exception as exc:  # an aeon that does not fit this environment: say so, go on
        result["baseline_note"] = f"MiniRocket failed: {type(exc).__name__}: {exc}"[:200]
        return result
    result["minirocket"] = float(np.mean(result["minirocket_seeds"]))
    result["baseline_seconds"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------- training runs


def train_command(pair: Pair, seed: int, output: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(HERE / "train.py"), "--data", str(pair.train),
            "--test-data", str(pair.test), "--seed", str(seed), "--output-dir", str(output),
            "--name", f"{pair.name}_seed{seed}", "--no-progress-bar", *extra]


def run_training(pair: Pair, seed: int, output: Path, extra: list[str], threads: int) -> dict:
    """One train.py run; its test metrics, wall time and log tail (on failure)."""
    command = train_command(pair, seed, output, extra)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = output / f"{pair.name}_seed{seed}.log"
    log.write_text(done.stdout + done.stderr)
    run = {"seed": seed, "seconds": seconds, "returncode": done.returncode,
           "command": shlex.join(["python", "train.py", *command[2:]])}
    results = sorted((output / f"{pair.name}_seed{seed}").glob("version_*/test_metrics.json"))
    if done.returncode != 0 or not results:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        run["error"] = " | ".join(tail)
        return run
    metrics = json.loads(results[-1].read_text())
    run["accuracy"] = metrics["metrics"]["test/acc"]
    run["macro_f1"] = metrics["metrics"]["test/macro_f1"]
    run["confidence_95"] = metrics.get("confidence_95", {}).get("test/acc")
    run["global_step"] = metrics.get("global_step") or sum(
        m.get("global_step", 0) for m in metrics.get("members", []))
    members = metrics.get("members", [])
    run["ensemble"] = len(members) or 1
    # an ensemble's members on their own: what a single model of these defaults gives
    run["member_accuracies"] = [m["metrics"]["test/acc"] for m in members] or [run["accuracy"]]
    return run


# ---------------------------------------------------------------------------- report


def summarise(pair: Pair, runs: list[dict], base: dict) -> dict:
    accuracies = [r["accuracy"] for r in runs if "accuracy" in r]
    singles = [a for r in runs for a in r.get("member_accuracies", [])]
    published = PUBLISHED.get(pair.name)
    return {
        "dataset": pair.name, "train_file": pair.train.name, "test_file": pair.test.name,
        "runs": runs,
        "mean": float(np.mean(accuracies)) if accuracies else None,
        "sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
        "single_model_mean": float(np.mean(singles)) if singles else None,
        "single_model_sd": float(np.std(singles, ddof=1)) if len(singles) > 1 else 0.0,
        "ensemble": max((r.get("ensemble", 1) for r in runs), default=1),
        "failed": len(runs) - len(accuracies),
        "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
        **base,
        "published_deep": None if published is None else published[0],
        "published_deep_model": None if published is None else published[1],
        "published_best": None if published is None else published[2],
    }


def _cell(value: float | None, missing: str = "–") -> str:
    return missing if value is None else f"{value:.4f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dataset | this project, mean ± sd (runs) | its single models | "
             "MiniRocket, same run | 1-NN ED, same run | best deep, published | "
             "best overall, published | s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours = ("failed" if row["mean"] is None else
                f"**{row['mean']:.4f}** ± {row['sd']:.4f} ({len(row['runs']) - row['failed']})")
        if row["failed"]:
            ours += f", {row['failed']} failed"
        note = row.get("baseline_note") or ""
        minirocket = _cell(row.get("minirocket"), f"n/a ({note})" if note else "–")
        single = ("–" if row.get("single_model_mean") is None else
                  f"{row['single_model_mean']:.4f} ± {row['single_model_sd']:.4f}")
        if row.get("ensemble", 1) > 1:
            ours += f", ensembles of {row['ensemble']}"
        lines.append(f"| {row['dataset']} | {ours} | {single} | {minirocket} | "
                     f"{_cell(row.get('one_nn_ed'), 'n/a')} | {_cell(row['published_deep'])} | "
                     f"{_cell(row['published_best'])} | {row['seconds_per_run']:.0f} |")
    both = [r for r in rows if r["mean"] is not None and r.get("minirocket") is not None]
    if both:
        ours = np.mean([r["mean"] for r in both])
        theirs = np.mean([r["minirocket"] for r in both])
        wins = sum(r["mean"] >= r["minirocket"] for r in both)
        singles = np.mean([r["single_model_mean"] for r in both])
        lines.append(f"| mean of the {len(both)} sets with MiniRocket | **{ours:.4f}** | "
                     f"{singles:.4f} | {theirs:.4f} | | | | |")
        lines.append("")
        lines.append(f"At or above MiniRocket on {wins} of {len(both)} sets.")
    deep = [r for r in rows if r["mean"] is not None and r["published_deep"] is not None]
    if deep:
        lines.append(f"Mean over the {len(deep)} sets with a published deep figure: "
                     f"{np.mean([r['mean'] for r in deep]):.4f} (published best deep "
                     f"{np.mean([r['published_deep'] for r in deep]):.4f}).")
    return "\n".join(lines)


def device_description() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        return (f"CPU, {torch.get_num_threads()} threads, {platform.processor() or 'x86_64'} "
                f"(torch {torch.__version__})")
    except ImportError:
        return platform.platform()


def _join_train_args(argv: list[str]) -> list[str]:
    """`--train-args --no-augment` as `--train-args=--no-augment`: argparse takes a value
    that starts with '-' and holds no space for an option of its own and stops."""
    out: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--train-args":
            value = next(items, None)
            out.append("--train-args" if value is None else f"--train-args={value}")
        else:
            out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmark_accuracy.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("suite", type=Path, help="folder of NAME_TRAIN/NAME_TEST files "
                                                 "(or of sub-folders holding them)")
    parser.add_argument("--sets", help="comma-separated dataset names (default: all found)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ensemble", type=int, metavar="K",
                        help="train.py --ensemble K for every run (default: train.py's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--train-args", default="", metavar="'ARGS'",
                        help="extra train.py options for every run, e.g. '--max-steps 200'")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip MiniRocket and 1-NN")
    parser.add_argument("--quick", action="store_true",
                        help="the first set only, seed 0: a smoke test of the whole path")
    parser.add_argument("--output", type=Path, default=Path("runs/accuracy"),
                        help="folder for accuracy.json, accuracy.md, the run folders and logs")
    args = parser.parse_args(_join_train_args(sys.argv[1:] if argv is None else argv))

    if not args.suite.is_dir():
        parser.error(f"suite {args.suite} is not a folder")
    pairs = find_pairs(args.suite)
    if args.sets:
        wanted = args.sets.split(",")
        unknown = sorted(set(wanted) - {p.name for p in pairs})
        if unknown:
            parser.error(f"no NAME_TRAIN/NAME_TEST pair for {unknown} under {args.suite}; "
                         f"found {[p.name for p in pairs]}")
        pairs = [p for p in pairs if p.name in wanted]
    if not pairs:
        parser.error(f"no NAME_TRAIN/NAME_TEST pairs ({', '.join(EXTENSIONS)}) under "
                     f"{args.suite}")
    if args.quick:
        pairs, args.seeds = pairs[:1], args.seeds[:1]
    if args.jobs < 1 or (args.ensemble is not None and args.ensemble < 1):
        parser.error("--jobs and --ensemble must be >= 1")
    extra = shlex.split(args.train_args)
    if args.ensemble is not None:
        extra += ["--ensemble", str(args.ensemble)]
    args.output.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(tempfile.mkdtemp(prefix="runs_", dir=args.output))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    started = time.perf_counter()
    tasks = [(p, s) for p in pairs for s in args.seeds]
    given = argv if argv is not None else sys.argv[1:]
    shown = " ".join(shlex.quote(a) for a in given if a != str(args.suite))
    command = f"python benchmark_accuracy.py SUITE {shown}".strip()
    results: dict[int, dict] = {}
    base: dict[str, dict] = {}

    def report(final: bool) -> list[dict]:
        """accuracy.json and accuracy.md of what has finished (rewritten as runs end, so an
        interrupted benchmark keeps its results)."""
        rows = []
        for pair in pairs:
            runs = [results[i] for i, (p, _) in enumerate(tasks) if p is pair and i in results]
            if runs:
                missing = "not run: --no-baselines" if args.no_baselines else "pending"
                rows.append(summarise(pair, runs, base.get(pair.name,
                                                           {"baseline_note": missing})))
        header = (f"Accuracy benchmark, {datetime.date.today().isoformat()}, "
                  f"{device_description()}, seeds {' '.join(map(str, args.seeds))}"
                  + (f", ensemble {args.ensemble}" if args.ensemble else "")
                  + (f", train.py {args.train_args}" if args.train_args else "")
                  + f": `{command}`, {time.perf_counter() - started:.0f} s"
                  + ("" if final else f" so far ({len(results)} of {len(tasks)} runs)"))
        payload = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "device": device_description(), "command": command, "seeds": args.seeds,
                   "ensemble": args.ensemble, "train_args": args.train_args,
                   "seconds": time.perf_counter() - started, "complete": final,
                   "datasets": rows}
        (args.output / "accuracy.json").write_text(json.dumps(payload, indent=2))
        (args.output / "accuracy.md").write_text(header + "\n\n" + markdown_table(rows) + "\n")
        if final:
            print(header + "\n\n" + markdown_table(rows))
        return rows

    # baselines beside the training runs, on a quarter of the workers
    with ThreadPoolExecutor(args.jobs) as pool, \
            ThreadPoolExecutor(max(1, args.jobs // 4)) as baseline_pool:
        base_futures = {} if args.no_baselines else {
            p.name: baseline_pool.submit(baselines, p, args.seeds) for p in pairs}
        futures = {pool.submit(run_training, p, s, runs_dir, extra, threads): i
                   for i, (p, s) in enumerate(tasks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            base.update({n: f.result() for n, f in base_futures.items() if f.done()})
            report(final=False)
        base.update({n: f.result() for n, f in base_futures.items()})
    rows = report(final=True)
    for i, (pair, _) in enumerate(tasks):
        if "error" in results[i]:
            print(f"{pair.name} seed {results[i]['seed']} failed: {results[i]['error']}",
                  file=sys.stderr)
    failed = sum(r["failed"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
