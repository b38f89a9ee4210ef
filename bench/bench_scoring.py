"""Batch scoring throughput and peak memory: the Ray Data job against a plain single-process job.

    python bench/bench_scoring.py [--rows 10000 100000 1000000 3000000] [--rounds 3] [--batch-size 1024]

Input: the 10,000 test images repeated to each row count, as one Parquet file (id, label,
image as 784 uint8 pixels; row groups of 10,000). The jobs read it, run the model and write
the predictions as Parquet; the Ray job is ``workflows/score.py``, the plain ones are
``plain_job`` below (pyarrow read, forward pass, pyarrow write, in one process): "plain" runs the
forward pass in torch, as a user's own script would (the baseline the targets are set against),
"plain, numpy" in numpy as the Ray job's tasks do, which tells Ray's own cost from the forward pass's.

Each job is timed as a whole process, Python start to exit (imports, Ray start, the job,
Ray shutdown). Peak memory is the highest sum, over the process and all its descendants
(Ray's raylet, GCS, workers...), of the proportional set size, sampled every 0.2 s: PSS
counts a shared page (Ray's object store) once, not once per process that maps it.

The jobs run in rounds, each round every row count and both jobs one after the other, and each
figure is the median over rounds. The marginal throughput between the two largest row counts,
(rows' difference) / (seconds' difference), leaves out what every run pays once (start-up, shutdown).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fmnist.core.checkpoints import load_model, load_numpy_checkpoint, resolve_checkpoint, save_checkpoint  # noqa: E402
from fmnist.core.data import load_test_split  # noqa: E402
from fmnist.core.inputs import batch_pixels  # noqa: E402
from fmnist.core.model import Classifier, ModelConfig  # noqa: E402
from fmnist.score.scoring import PREDICTIONS_SCHEMA, predictions_table  # noqa: E402


def plain_job(checkpoint: str, source: str, output: str, batch_size: int, forward: str) -> None:
    """The same work as the Ray job, in one process: read a batch, score it (``forward``: torch
    or numpy, on all cores), write it.

    Row group by row group, one output file each: pyarrow's reader reads ahead through all the
    row groups it is given, and its writer holds on to memory as a file grows.
    """
    model = load_numpy_checkpoint(resolve_checkpoint(checkpoint)) if forward == "numpy" else load_model(checkpoint)
    config = model.config
    log_probabilities = model.log_probabilities
    Path(output).mkdir(parents=True)
    parquet = pq.ParquetFile(source)
    for group in range(parquet.num_row_groups):
        with pq.ParquetWriter(Path(output) / f"part-{group:05d}.parquet", PREDICTIONS_SCHEMA) as writer:
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group]):
                images = pa.table({"id": batch["id"], "path": pa.nulls(batch.num_rows, pa.string()),
                                   "label": batch["label"], "image": batch["image"]})
                pixels, _, _ = batch_pixels(images)
                writer.write_table(predictions_table(images, log_probabilities(pixels), config.class_names))


def write_input(path: Path, rows: int) -> None:
    """The test set repeated to ``rows`` rows, one row group per 10,000."""
    images, labels = load_test_split()
    test = pa.table({"label": labels,
                     "image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 28 * 28)})
    with pq.ParquetWriter(path, test.schema.insert(0, pa.field("id", pa.int64()))) as writer:
        for first in range(0, rows, len(test)):
            part = test.slice(0, min(len(test), rows - first))
            writer.write_table(part.add_column(0, "id", pa.array(range(first, first + len(part)), pa.int64())))


def tree_pss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # ended between the listing and the reading
    return total


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak PSS (bytes) of ``command`` and its descendants."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a full pipe would stall the job
        start = time.monotonic()
        process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_pss(process))
            time.sleep(0.2)
        seconds = time.monotonic() - start
        if process.returncode != 0:
            stderr.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{stderr.read().decode()}")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=None, help="scoring tasks at once (default: the product's)")
    parser.add_argument("--plain-job", nargs=4, metavar=("CHECKPOINT", "INPUT", "OUTPUT", "FORWARD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_job:
        plain_job(*args.plain_job[:3], batch_size=args.batch_size, forward=args.plain_job[3])
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Throughput does not depend on the weights: an untrained model will do.
        checkpoint = tmp / "checkpoint"
        save_checkpoint(checkpoint, Classifier(), ModelConfig(), {"epoch": 0, "test_accuracy": 0.0}, {})
        concurrency = ["--concurrency", str(args.concurrency)] if args.concurrency else []
        jobs = {
            "Ray Data": lambda src, out: [sys.executable, str(REPO / "workflows" / "score.py"), "--checkpoint",
                                          str(checkpoint), "--input", str(src), "--output", str(out),
                                          "--batch-size", str(args.batch_size), *concurrency],
            **{name: lambda src, out, forward=forward: [sys.executable, __file__, "--batch-size", str(args.batch_size),
                                                         "--plain-job", str(checkpoint), str(src), str(out), forward]
               for name, forward in (("plain", "torch"), ("plain, numpy", "numpy"))},
        }
        for rows in args.rows:
            write_input(tmp / f"input-{rows}.parquet", rows)
        runs = {(rows, name): [] for rows in args.rows for name in jobs}  # (seconds, peak) per round
        for round_ in range(args.rounds):
            for rows in args.rows:
                for name, command in jobs.items():
                    output = tmp / f"{name}-{rows}"
                    runs[rows, name].append(measure(command(tmp / f"input-{rows}.parquet", output)))
                    shutil.rmtree(output)
                    print(f"round {round_ + 1}: {rows:,} rows, {name}: {runs[rows, name][-1][0]:.1f} s", flush=True)

        seconds = {key: statistics.median(s for s, _ in values) for key, values in runs.items()}
        print(f"\nmedians of {args.rounds} rounds\n")
        print("| rows | job | seconds | images/s | peak memory (PSS) |")
        print("|---:|---|---:|---:|---:|")
        for rows in args.rows:
            for name in jobs:
                peak = statistics.median(p for _, p in runs[rows, name])
                print(f"| {rows:,} | {name} | {seconds[rows, name]:.1f} | {rows / seconds[rows, name]:,.0f} | "
                      f"{peak / 2**20:,.0f} MiB |")
            for plain in ("plain", "plain, numpy"):
                print(f"| {rows:,} | Ray / {plain} | | {seconds[rows, plain] / seconds[rows, 'Ray Data']:.2f}x | |")
        if len(args.rows) > 1:
            low, high = sorted(args.rows)[-2:]
            marginal = {name: (high - low) / (seconds[high, name] - seconds[low, name]) for name in jobs}
            print(f"\nmarginal throughput, {low:,} -> {high:,} rows: " + ", ".join(
                f"{name} {marginal[name]:,.0f} images/s" for name in jobs) + "; Ray / plain " + ", ".join(
                f"{marginal['Ray Data'] / marginal[plain]:.2f}x" for plain in ("plain", "plain, numpy")))

if __name__ == "__main__":
    main()
