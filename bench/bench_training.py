"""Training speed: the tutorial's loop, a plain in-memory loop, and our Ray Train run.

    python bench/bench_training.py [--epochs 3]

(a) the tutorial: torchvision dataset + DataLoader, ToTensor + Normalize, batch 200;
(b) a plain single-process loop over in-memory tensors, same model, optimizer and batch;
(c) `fmnist train` (Ray Train) with 1 and with 2 workers, embedded Ray started per run.
Reported: train seconds per epoch (mean over epochs), samples/s, and for (c) the start-up:
from the call of train() to the start of the first epoch (Ray, workers, data).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from fmnist.data import find_data_dir, load_fashion_mnist  # noqa: E402
from fmnist.model import Classifier, normalize  # noqa: E402
from fmnist.training import TrainConfig, train  # noqa: E402

TRAIN_SAMPLES = 60_000


def _epochs(step_fn, batches, epochs: int) -> float:
    """Mean seconds of one training pass."""
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in batches():
            step_fn(images, labels)
        times.append(time.perf_counter() - started)
    return sum(times) / len(times)


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
    per_epoch = sum(r["train_seconds"] for r in result.history) / epochs
    return per_epoch, result.startup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = [("(a) tutorial loop (DataLoader)", tutorial_loop(find_data_dir(), args.epochs), None),
            ("(b) plain in-memory loop", plain_loop(args.epochs), None)]
    for workers in (1, 2):
        rows.append((f"(c) Ray Train, {workers} worker{'s' * (workers > 1)}", *ray_train(workers, args.epochs)))
    plain = rows[1][1]
    tutorial = rows[0][1]
    print(f"| run | train s/epoch | samples/s | vs (b) | speed-up over (a) | start-up s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, overhead in rows:
        print(f"| {name} | {seconds:.2f} | {TRAIN_SAMPLES / seconds:,.0f} | {seconds / plain:.2f}x | "
              f"{tutorial / seconds:.1f}x | {'' if overhead is None else f'{overhead:.1f}'} |")


if __name__ == "__main__":
    main()
