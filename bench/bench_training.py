"""Training speed: the tutorial's loop, a plain in-memory loop, and our Ray Train run.

    python bench/bench_training.py [--epochs 4] [--rounds 3]

(a) the tutorial: torchvision dataset + DataLoader, ToTensor + Normalize, batch 200;
(b) a plain single-process loop over in-memory tensors, same model, optimizer and batch;
(c) `fmnist train` (Ray Train) with 1 worker (Ray Train's local mode, the default on one machine)
    and with 2 workers (an embedded Ray started per run).
Per-epoch times on a small VM swing by 10-20% within a minute, so the runs go in rounds,
(a) (b) (c) one after the other, and each figure is the median over rounds of a run's
median epoch; the ratios to (b) are also given per round, where both ran in the same minute.
Reported: train seconds per epoch, samples/s, and for (c) the start-up: from the call of
train() to the start of the first epoch (data, and with 2 workers Ray and its workers).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from fmnist.core.configs import TrainConfig  # noqa: E402
from fmnist.core.data import find_data_dir, load_fashion_mnist  # noqa: E402
from fmnist.core.model import Classifier, normalize  # noqa: E402
from fmnist.train.trainer import train  # noqa: E402

TRAIN_SAMPLES = 60_000


def _epochs(step_fn, batches, epochs: int) -> float:
    """Median seconds of one training pass."""
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in batches():
            step_fn(images, labels)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _step_fn():
    torch.manual_seed(0)
    model = Classifier().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)

    def step(images, labels):
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def tutorial_loop(data_dir: Path, epochs: int) -> float:
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for gz in data_dir.glob("*.gz"):  # torchvision checks for all four files
            with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        trainset = datasets.FashionMNIST(root, train=True, download=False, transform=transform)
        loader = torch.utils.data.DataLoader(trainset, batch_size=200, shuffle=True)
        return _epochs(_step_fn(), lambda: loader, epochs)


def plain_loop(epochs: int) -> float:
    data = load_fashion_mnist()
    model_config = Classifier().config
    images = normalize(torch.from_numpy(data.train_images), model_config)
    labels = torch.from_numpy(data.train_labels)

    def batches():
        order = torch.randperm(TRAIN_SAMPLES)
        for start in range(0, TRAIN_SAMPLES, 200):
            idx = order[start:start + 200]
            yield images[idx], labels[idx]

    return _epochs(_step_fn(), batches, epochs)


def ray_train(workers: int, epochs: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as storage:
        result = train(TrainConfig(epochs=epochs, num_workers=workers, storage_path=storage, name="bench"),
                       console=Console(quiet=True))
    return statistics.median(r["train_seconds"] for r in result.history), result.startup_seconds


RUNS = ("(a) tutorial loop (DataLoader)", "(b) plain in-memory loop", "(c) Ray Train, 1 worker",
        "(c) Ray Train, 2 workers")


def one_round(epochs: int) -> list[tuple[float, float | None]]:
    """(seconds per epoch, start-up seconds or None) for each of RUNS, run one after the other."""
    return [(tutorial_loop(find_data_dir(), epochs), None), (plain_loop(epochs), None),
            ray_train(1, epochs), ray_train(2, epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(args.epochs))
        print(f"round {r + 1}: " + ", ".join(f"{s:.2f}" for s, _ in rounds[-1]) + " s/epoch", flush=True)

    def median(run: int) -> float:
        return statistics.median(rnd[run][0] for rnd in rounds)

    tutorial, plain = median(0), median(1)
    print("| run | train s/epoch (min-max) | samples/s | vs (b) | vs (b), per round | speed-up over (a) | start-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run, name in enumerate(RUNS):
        seconds = median(run)
        spread = f"{min(rnd[run][0] for rnd in rounds):.2f}-{max(rnd[run][0] for rnd in rounds):.2f}"
        paired = ", ".join(f"{rnd[run][0] / rnd[1][0]:.2f}" for rnd in rounds)
        startups = [rnd[run][1] for rnd in rounds if rnd[run][1] is not None]
        startup = f"{statistics.median(startups):.1f}" if startups else ""
        print(f"| {name} | {seconds:.2f} ({spread}) | {TRAIN_SAMPLES / seconds:,.0f} | {seconds / plain:.2f}x | "
              f"{paired} | {tutorial / seconds:.1f}x | {startup} |")


if __name__ == "__main__":
    main()
