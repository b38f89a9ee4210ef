"""The tutorial's question, answered with searches: how far past 90% can its MLP go?

    python bench/bench_search.py fixed --trials 40 --max-epochs 60      # 784-256-128-64-10, recipe searched
    python bench/bench_search.py free --trials 60 --max-epochs 60       # depth, widths, activation, recipe
    python bench/bench_search.py fixed --trials 4 --max-epochs 3 --confirm 1   # a smoke run (minutes)

Each runs ``fmnist tune`` (random search, ASHA on validation accuracy, 5,000 held-out images) into
``--storage-path`` (default ./runs/bench), then retrains the best recipe on the full training set
with ``--confirm`` seeds (default 3) and reports the mean ± sd of their final test accuracy, the
figure the targets are about. It prints the leaderboard, the throughput of the search (trials and
epochs per hour, at what concurrency) and writes a summary JSON into the search directory.
Everything after ``--`` goes to ``fmnist tune`` as it is (e.g. ``-- --search optuna``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmnist.cli import _config_from_args, parse_arguments  # noqa: E402
from fmnist.core.configs import SearchConfig  # noqa: E402
from fmnist.tune.search import run_search  # noqa: E402

TUTORIAL_NETWORK = "256,128,64"
TARGETS = {"fixed": 0.910, "free": 0.915}  # the 3-seed mean final test accuracy each search aims for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("search", choices=("fixed", "free"),
                        help="fixed: the tutorial's network, recipe searched; free: the network searched too")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--grace-period", type=int, default=5)
    parser.add_argument("--confirm", type=int, default=3, help="seeds to retrain the best recipe with")
    parser.add_argument("--storage-path", default="./runs/bench")
    parser.add_argument("--name", default=None)
    args, tune_options = parser.parse_known_args()
    tune_options = [o for o in tune_options if o != "--"]
    name = args.name or f"{args.search}-{datetime.now():%Y%m%d-%H%M%S}"
    argv = ["tune", "--trials", str(args.trials), "--max-epochs", str(args.max_epochs),
            "--grace-period", str(args.grace_period), "--confirm", str(args.confirm),
            "--storage-path", args.storage_path, "--name", name, *tune_options]
    if args.search == "fixed":
        argv += ["--architecture", TUTORIAL_NETWORK]
    config = _config_from_args(SearchConfig, parse_arguments(argv))

    started = time.time()
    result = run_search(config)
    leaderboard = Path(result.search_dir) / "leaderboard.csv"
    # The search itself: until its leaderboard is written, before --confirm's runs.
    hours = (leaderboard.stat().st_mtime - started) / 3600

    with open(leaderboard) as f:
        board = list(csv.DictReader(f))
    epochs = sum(int(row["epochs"]) for row in board)
    confirmed = result.confirmed or []
    mean = sum(confirmed) / len(confirmed) if confirmed else None
    summary = {
        "command": "python bench/bench_search.py " + " ".join(sys.argv[1:]),
        "search": args.search, "trials": len(board), "epochs_trained": epochs,
        "stopped_early": sum(row["status"] == "stopped early" for row in board),
        "failed": sum(row["status"] == "failed" for row in board),
        "hours": hours, "trials_per_hour": len(board) / hours, "epochs_per_hour": epochs / hours,
        "best": {"trial": result.best.trial, "val_accuracy": result.best.val_accuracy,
                 "train_command": result.train_command} if result.best else None,
        "confirmed_test_accuracy": confirmed, "confirmed_mean": mean, "target": TARGETS[args.search],
        "target_met": mean is not None and mean >= TARGETS[args.search],
    }
    (Path(result.search_dir) / "bench_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{len(board)} trials, {epochs} epochs in {hours * 60:.1f} min of search: {summary['trials_per_hour']:.1f} trials/h, "
          f"{summary['epochs_per_hour']:.0f} epochs/h; {summary['stopped_early']} stopped early by ASHA")
    if mean is not None:
        print(f"best recipe, final test accuracy over {len(confirmed)} seeds: {100 * mean:.2f}% "
              f"(target {100 * TARGETS[args.search]:.1f}%: {'met' if summary['target_met'] else 'not met'})")
    print(f"summary: {Path(result.search_dir) / 'bench_summary.json'}")


if __name__ == "__main__":
    main()
