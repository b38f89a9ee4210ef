"""Training's epoch alone on the GPU, in one process without Ray: what bounds an epoch there.

    python bench/gpu_check/train_step.py [--epochs 3]

Runs fmnist.train.loop's own _train_one_epoch (the tutorial's recipe: batch 200, Adam lr 0.002)
on the full training set resident on the GPU, with Adam's default (foreach) implementation and
with fused=True, and prints seconds per epoch after one warm-up epoch. Against the GPU check's
Ray Train figure, the difference is what Ray Train's worker adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fmnist.core.configs import TrainConfig  # noqa: E402
from fmnist.core.data import load_fashion_mnist  # noqa: E402
from fmnist.core.model import Classifier, normalize  # noqa: E402
from fmnist.train.loop import _train_one_epoch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: to dry-run this script without a GPU


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data = load_fashion_mnist()
    recipe = TrainConfig()  # the tutorial's, as `fmnist train` runs it by default
    config = recipe.model_config()
    x = normalize(torch.tensor(data.train_images), config).to(DEVICE)
    y = torch.tensor(data.train_labels).to(DEVICE)
    for name, options in (("Adam (foreach)", {}), ("Adam fused=True", {"fused": True})):
        torch.manual_seed(0)
        model = Classifier(config).to(DEVICE)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, **options)
        seconds = []
        for epoch in range(args.epochs + 1):  # the first is a warm-up
            order = torch.randperm(len(y)).to(DEVICE)
            start = time.perf_counter()
            loss = _train_one_epoch(model, optimizer, x, y, order, recipe.batch_size, recipe.label_smoothing, 0, 1,
                                    lambda step, steps: None)
            seconds.append(time.perf_counter() - start)
        print(f"{DEVICE} {name}: {statistics.median(seconds[1:]):.3f} s/epoch "
              f"({len(y) / statistics.median(seconds[1:]):,.0f} samples/s; warm-up {seconds[0]:.2f} s; loss {loss:.4f})")


if __name__ == "__main__":
    main()
