"""Training as a user feels it: whole `fmnist train` processes, timed step by step.

    python bench/bench_process.py [--epochs 1 6] [--rounds 3] [--pipeline] [--checkout DIR] [-- TRAIN OPTIONS]

Each round runs `python workflows/train.py --epochs N` once for each N (no RAY_ADDRESS, the
defaults: Ray Train's local mode), reading its output as it comes: process start -> the header
line -> the first epoch's row -> the last epoch's row -> exit. Each round also times the floor
of any such process, `python -c "import ray.train, torch"`, and the first row and the exit are
reported after it too. Reported: the median over rounds of each step, and the
marginal wall-clock cost of an epoch, (T(M) - T(N)) / (M - N) between the fewest and the most
epochs: it includes evaluation, checkpoint and report, which `train_seconds` leaves out.
Everything after ``--`` goes to `fmnist train` as it is (e.g. ``-- --num-workers 2``).
``--checkout DIR`` runs another checkout's code (e.g. a `git worktree` of an earlier commit), for
a before/after in one sitting.
With ``--pipeline`` each run is `workflows/pipeline.py` instead, and the seconds its scoring of
the test set took (Ray already up, as the pipeline's "Scored ... in S s" line says) are reported
too, with the whole scoring stage as the user waits for it (from its heading to that line: the
checkpoint's load, the job's set-up and the commit of the output included).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EPOCH_ROW = re.compile(r"^\s+(\d+)/(\d+)\s")
SCORED = re.compile(r"^Scored [\d,]+ images in ([\d.]+) s")
STEPS = ("to the header", "header to the first epoch", "first to last epoch", "last epoch to exit", "whole process")


def user_env(checkout: Path) -> dict[str, str]:
    """One's own machine: no RAY_ADDRESS; ``checkout``'s fmnist first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(checkout)}


def floor_once() -> float:
    """The seconds of a process that only imports what training needs: Ray Train and torch."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import ray.train, torch"], check=True, env=user_env(REPO))
    return time.monotonic() - start


def run_once(workflow: str, epochs: int, options: list[str], storage: str, checkout: Path) -> dict[str, float]:
    """One process: the seconds of each of STEPS (and of the pipeline's scoring)."""
    env = user_env(checkout)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(checkout / "workflows" / f"{workflow}.py"), "--epochs", str(epochs),
                             "--storage-path", storage, *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=checkout)  # Ray puts the driver's directory on its workers' path
    seen: dict[str, float] = {}
    output = []
    for line in proc.stdout:
        now = time.monotonic() - start
        output.append(line)
        if line.startswith("Training ") and "header" not in seen:
            seen["header"] = now
        row = EPOCH_ROW.match(line)
        if row:
            seen.setdefault("first", now)
            seen["last"] = now
        scored = SCORED.match(line)
        if scored:
            seen["scoring"] = float(scored.group(1))
            seen["scored"] = now
        if "Scoring the test set" in line and line.lstrip().startswith("─"):
            seen["scoring stage"] = now
    proc.wait()
    end = time.monotonic() - start
    if proc.returncode != 0 or len(seen) < 3:
        sys.exit(f"fmnist train failed (exit {proc.returncode}):\n{''.join(output[-20:])}")
    steps = dict(zip(STEPS, (seen["header"], seen["first"] - seen["header"], seen["last"] - seen["first"],
                             end - seen["last"], end)))
    if "scoring" not in seen:
        return steps
    return steps | {"scoring the test set": seen["scoring"],
                    "the scoring stage": seen["scored"] - seen["scoring stage"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline", action="store_true", help="time `fmnist pipeline` instead of `fmnist train`")
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose code runs (default: this one)")
    args, options = parser.parse_known_args()
    options = [o for o in options if o != "--"]
    workflow = "pipeline" if args.pipeline else "train"
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.epochs}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.rounds):
            floor = floor_once()
            for n in args.epochs:  # interleaved: each round runs every N within the same minutes
                steps = run_once(workflow, n, options, storage, args.checkout.resolve())
                steps |= {"floor": floor, "first row after the floor": steps["to the header"] +
                          steps["header to the first epoch"] - floor,
                          "exit after the floor": steps["whole process"] - floor}
                results[n].append(steps)
                print(f"round {round_ + 1}, {n} epoch(s): " +
                      ", ".join(f"{k} {v:.1f} s" for k, v in results[n][-1].items()), flush=True)

    steps = list(results[args.epochs[0]][0])
    print(f"\nmedians of {args.rounds} rounds, `fmnist {workflow} {' '.join(options)}` ({args.checkout}):")
    print("| epochs | " + " | ".join(steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for n in args.epochs:
        medians = [statistics.median(r[step] for r in results[n]) for step in steps]
        print(f"| {n} | " + " | ".join(f"{m:.1f} s" for m in medians) + " |")
    low, high = min(args.epochs), max(args.epochs)
    if high > low:
        margins = [(h["whole process"] - l["whole process"]) / (high - low)
                   for l, h in zip(results[low], results[high])]  # per round: both ran in the same minutes
        print(f"\nmarginal cost of an epoch (whole processes of {low} and {high} epochs): "
              f"{statistics.median(margins):.2f} s (per round: {', '.join(f'{m:.2f}' for m in margins)})")


if __name__ == "__main__":
    main()
