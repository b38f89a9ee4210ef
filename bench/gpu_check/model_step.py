"""The model step of GPU scoring alone, in one process: images/s of the forward pass on the GPU.

    python bench/gpu_check/model_step.py CHECKPOINT [--rows 1000000]

The test set repeated to --rows rows, scored three ways, each after a warm-up, timed to the last
kernel's end (torch.cuda.synchronize):
  resident       uint8 pixels already on the GPU: normalize + forward only (the GPU's own speed)
  as the actor   Classifier.log_probabilities on numpy pixels: copy in, forward, copy out
  + table        the same, then predictions_table (the Parquet rows): all of an actor's work but I/O
What the Ray Data job adds on top is reading, writing and moving blocks between processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fmnist import load_model  # noqa: E402
from fmnist.core.data import load_test_split  # noqa: E402
from fmnist.core.model import normalize  # noqa: E402
from fmnist.score.scoring import predictions_table  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: to dry-run this script without a GPU


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(score_batches, rows: int) -> float:
    """images/s of ``score_batches()`` (scores all rows), after one warm-up call."""
    score_batches()
    synchronize()
    start = time.perf_counter()
    score_batches()
    synchronize()
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    model = load_model(args.checkpoint).to(DEVICE)
    images, labels = load_test_split()
    pixels = np.tile(images.reshape(len(images), -1), (args.rows // len(images) + 1, 1))[:args.rows]
    on_gpu = torch.from_numpy(pixels).to(DEVICE)
    rows = pa.table({"id": np.arange(args.rows), "path": pa.nulls(args.rows, pa.string()),
                     "label": np.tile(labels, args.rows // len(labels) + 1)[:args.rows]})
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"{name}, {args.rows:,} rows; images/s:")
    for batch_size in (1024, 8192, 65536):
        starts = range(0, args.rows, batch_size)

        @torch.inference_mode()
        def resident():
            for s in starts:
                model(normalize(on_gpu[s:s + batch_size], model.config))

        def as_actor():
            for s in starts:
                model.log_probabilities(pixels[s:s + batch_size])

        def with_table():
            for s in starts:
                predictions_table(rows.slice(s, batch_size), model.log_probabilities(pixels[s:s + batch_size]),
                                  model.config.class_names)

        figures = {name: timed(fn, args.rows) for name, fn in
                   (("resident", resident), ("as the actor", as_actor), ("+ table", with_table))}
        print(f"  batch {batch_size:>6,}: " + ", ".join(f"{name} {v:,.0f}" for name, v in figures.items()))
    if DEVICE == "cuda":
        print(f"GPU memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB at most allocated by this process")


if __name__ == "__main__":
    main()
