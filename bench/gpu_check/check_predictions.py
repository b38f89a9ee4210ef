"""Do the GPU's predictions of the test set agree with a CPU forward pass of the same checkpoint?

    python bench/gpu_check/check_predictions.py CHECKPOINT PREDICTIONS

CHECKPOINT: the checkpoint or run directory that was scored; PREDICTIONS: `fmnist score --input test`'s
output. Agreement: the same argmax on every row, and every probability within 1e-4. Exit 1 if not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fmnist import load_model  # noqa: E402
from fmnist.core.data import load_test_split  # noqa: E402

TOLERANCE = 1e-4


def main() -> None:
    checkpoint, predictions = sys.argv[1:]
    images, _ = load_test_split()
    cpu = np.exp(load_model(checkpoint).log_probabilities(images.reshape(len(images), -1)))
    table = pq.read_table(predictions).sort_by("id")
    ids = table["id"].to_numpy()
    assert np.array_equal(ids, np.arange(len(images))), f"ids are not 0..{len(images) - 1}"
    gpu = np.stack(table["probabilities"].to_numpy(zero_copy_only=False))
    argmax_differs = int((gpu.argmax(axis=1) != cpu.argmax(axis=1)).sum())
    prediction_differs = int((table["prediction"].to_numpy() != cpu.argmax(axis=1)).sum())
    worst = float(np.abs(gpu - cpu).max())
    print(f"{len(ids):,} rows: argmax differs on {argmax_differs}, 'prediction' differs on {prediction_differs}; "
          f"largest probability difference {worst:.2e} (tolerance {TOLERANCE:.0e})")
    if argmax_differs or prediction_differs or worst > TOLERANCE:
        sys.exit("the GPU's predictions do not agree with the CPU's")
    print("agree")


if __name__ == "__main__":
    main()
