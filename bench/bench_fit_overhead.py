"""What a training run on Ray Train costs beyond its epochs, on a Ray that is already up.

    python bench/bench_fit_overhead.py [--runs 3]
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 python bench/bench_fit_overhead.py   # as the tests run

Each run is 1 epoch of a small network (hidden 32) on 1 worker; printed: the run's whole time,
the time before its first epoch (processes, imports, process group), and the epoch's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
from rich.console import Console  # noqa: E402

from fmnist.core.configs import TrainConfig  # noqa: E402
from fmnist.train.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="fit-overhead-")
    for run in range(args.runs):
        started = time.perf_counter()
        result = train(TrainConfig(epochs=1, hidden=(32,), num_workers=1, cpus_per_worker=1, storage_path=storage,
                                   name=f"run{run}"), Console(quiet=True))
        print(f"run {run}: total {time.perf_counter() - started:.1f} s, before the first epoch "
              f"{result.startup_seconds:.1f} s, the epoch {result.history[0]['epoch_seconds']:.1f} s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
