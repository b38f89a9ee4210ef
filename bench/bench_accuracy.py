"""Test accuracy of a training recipe over several seeds: mean, spread, and per-seed figures.

    python bench/bench_accuracy.py --seeds 0 1 2 -- --epochs 30            # the tutorial's recipe
    python bench/bench_accuracy.py --seeds 0 1 2 -- --epochs 60 --schedule cosine

Everything after `--` is passed to `fmnist train` (runs go to a temporary directory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
from rich.console import Console  # noqa: E402

from fmnist.cli import _train_config, parse_arguments  # noqa: E402
from fmnist.core.cluster import start_ray  # noqa: E402
from fmnist.train.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, train_options = parser.parse_known_args()
    train_options = [o for o in train_options if o != "--"]
    quiet = Console(quiet=True)
    start_ray()  # one Ray instance for all seeds
    final, best = [], []
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            train_args = parse_arguments(
                ["train", *train_options, "--seed", str(seed), "--storage-path", storage, "--name", f"seed{seed}"]
            )
            result = train(_train_config(train_args), console=quiet)
            final.append(result.history[-1]["test_accuracy"])
            best.append(max(row["test_accuracy"] for row in result.history))  # for reference only: chosen on test
            print(f"seed {seed}: final {100 * final[-1]:.2f}%  best {100 * best[-1]:.2f}%", flush=True)
    ray.shutdown()
    print(f"recipe: {' '.join(train_options)}")
    for name, values in (("final epoch", final), ("best epoch", best)):
        print(f"{name}: mean {100 * statistics.mean(values):.2f}%, "
              f"min {100 * min(values):.2f}%, max {100 * max(values):.2f}%, "
              f"stdev {100 * statistics.stdev(values) if len(values) > 1 else 0:.2f} pp")


if __name__ == "__main__":
    main()
