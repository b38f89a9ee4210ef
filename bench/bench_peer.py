"""This project against Ray's own Fashion-MNIST example, whole processes on one's own machine.

    python bench/bench_peer.py [--rounds 3] [--epochs 1 3]

The peer is `ray.train.examples.pytorch.torch_fashion_mnist_example` as Ray ships it (imported
from the installed package, not copied): its train_func_per_worker on a TorchTrainer of its own
default 2 CPU workers, its recipe (batch 32, SGD), reading the data from ~/data as it does (laid
out here from the local IDX files, as its download would leave them), only the epochs set. Each
round runs both for each number of epochs N, as processes of their own: `fmnist train --epochs N`
(the defaults: Ray Train's local mode) and the example. Reported, medians over rounds: the whole
process of the fewest epochs (the start and the first epoch) and the marginal cost of an epoch
between the fewest and the most, with the ratio peer / fmnist for each.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmnist.core.data import SPLITS, find_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEER = """
import sys
import ray.train
from ray.train.torch import TorchTrainer
from ray.train.examples.pytorch.torch_fashion_mnist_example import train_func_per_worker

trainer = TorchTrainer(train_func_per_worker, scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                       train_loop_config={"lr": 1e-3, "epochs": int(sys.argv[1]), "batch_size_per_worker": 32 // 2})
print(trainer.fit().metrics)
"""


def peer_home(data_dir: Path, home: Path) -> None:
    """~/data/FashionMNIST/raw as torchvision's download leaves it (unpacked IDX files)."""
    raw = home / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (file for images, labels, _ in SPLITS.values() for file in (images, labels)):
        source = next(p for p in (data_dir / name, data_dir / f"{name}.gz") if p.exists())
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as f, open(raw / name, "wb") as out:
            shutil.copyfileobj(f, out)


def timed(argv: list[str], env: dict) -> float:
    start = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 3])
    args = parser.parse_args()
    low, high = args.epochs
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp, "home")
        peer_home(find_data_dir(), home)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        for round_ in range(args.rounds):
            for n in (low, high):
                ours = [sys.executable, "-m", "fmnist", "train", "--epochs", str(n), "--storage-path",
                        str(Path(tmp, "runs")), "--name", f"r{round_}-{n}"]
                times.setdefault(("fmnist", n), []).append(timed(ours, env))
                times.setdefault(("peer", n), []).append(timed([sys.executable, "-c", PEER, str(n)],
                                                               {**env, "HOME": str(home)}))
                print(f"round {round_ + 1}, {n} epoch(s): fmnist {times['fmnist', n][-1]:.1f} s, "
                      f"peer {times['peer', n][-1]:.1f} s", flush=True)

    def margin(who: str) -> float:
        return statistics.median((h - l) / (high - low) for l, h in zip(times[who, low], times[who, high]))

    first = {who: statistics.median(times[who, low]) for who in ("fmnist", "peer")}
    epoch = {who: margin(who) for who in ("fmnist", "peer")}
    print(f"\nmedians of {args.rounds} rounds:")
    print("| | fmnist train | Ray's example | example / fmnist |\n|---|---|---|---|")
    print(f"| whole process, {low} epoch(s) | {first['fmnist']:.1f} s | {first['peer']:.1f} s | "
          f"{first['peer'] / first['fmnist']:.1f}x |")
    print(f"| marginal epoch | {epoch['fmnist']:.2f} s | {epoch['peer']:.2f} s | "
          f"{epoch['peer'] / epoch['fmnist']:.1f}x |")


if __name__ == "__main__":
    main()
