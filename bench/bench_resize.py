"""Which resampling filter should scoring use to bring larger images down to 28x28?

    python bench/bench_resize.py --checkpoint RUN_OR_CHECKPOINT [--factors 2 3 1.5]

The 10,000 test images are scaled up by each factor with each common filter (as a camera, a
screenshot or an image editor might have made them), then brought back to 28x28 with each
candidate filter and scored. A filter is good when the model predicts the same class as on the
original 28x28 image: the table gives that agreement, and the accuracy, per candidate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmnist.core.checkpoints import load_model  # noqa: E402
from fmnist.core.data import load_test_split  # noqa: E402
from fmnist.core.model import normalize  # noqa: E402

FILTERS = {name.lower(): f for name, f in Image.Resampling.__members__.items()}
UPSCALERS = ("nearest", "bilinear", "bicubic", "lanczos")


def predictions(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = normalize(torch.from_numpy(images.reshape(len(images), -1)), model.config)
        return model(x).argmax(dim=1).numpy()


def rescaled(images: np.ndarray, factor: float, up: str, down: str) -> np.ndarray:
    size = round(28 * factor)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        big = Image.fromarray(image).resize((size, size), FILTERS[up])
        out[i] = np.asarray(big.resize((28, 28), FILTERS[down]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--factors", type=float, nargs="+", default=[2, 3, 1.5])
    args = parser.parse_args()
    model = load_model(args.checkpoint)
    images, labels = load_test_split()
    original = predictions(model, images)
    print(f"original 28x28: accuracy {np.mean(original == labels):.2%}")
    print("| factor | downscaling filter | agreement with 28x28 (mean over upscalers) | worst upscaler | accuracy |")
    print("|---|---|---|---|---|")
    for factor in args.factors:
        for down in FILTERS:
            agreement, accuracy = {}, []
            for up in UPSCALERS:
                p = predictions(model, rescaled(images, factor, up, down))
                agreement[up] = np.mean(p == original)
                accuracy.append(np.mean(p == labels))
            worst = min(agreement, key=agreement.get)
            print(f"| {factor:g}x | {down} | {np.mean(list(agreement.values())):.2%} "
                  f"| {worst} {agreement[worst]:.2%} | {np.mean(accuracy):.2%} |", flush=True)


if __name__ == "__main__":
    main()
