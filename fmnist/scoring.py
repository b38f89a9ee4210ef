"""Batch scoring with Ray Data: images in, one Parquet row of predictions per image out.

    input (test set | image files | Parquet)  ->  a Ray Dataset, streamed batch by batch (score_inputs)
        -> map_batches(Predictor): a pool of model actors, each holding the model
        -> write_parquet into a hidden staging directory beside --output
        -> moved to --output only once every batch is written, and a _SUCCESS manifest last (outputs)

The driver checks the checkpoint, the input and the output before Ray starts. On a cluster,
local and NFS paths are read and written on the driver's node, where they are; object
storage (s3://, gs://) by Ray Data tasks on any node.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fmnist.checkpoints import load_checkpoint, resolve_checkpoint
from fmnist.cluster import file_task_options, is_embedded, one_per_gpu, start_ray, wait_for_resources
from fmnist.errors import InputError
from fmnist.evaluation import CHECKPOINT_METADATA_KEY
from fmnist.model import Classifier, ModelConfig, normalize
from fmnist.score_inputs import ScoringInput, open_input, readable_rows, to_dataset
from fmnist.outputs import StagedOutput
from fmnist.storage import StoragePath, describe_error

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("prediction", pa.int64(), nullable=False),
    pa.field("predicted_class", pa.string(), nullable=False),
    pa.field("confidence", pa.float32(), nullable=False),
    pa.field("probabilities", pa.list_(pa.float32()), nullable=False),
])
ROWS_PER_FILE = 100_000  # few, large output files rather than one per batch
CPU_ACTORS = 2  # model actors on CPUs, unless told otherwise


@dataclass(frozen=True)
class ScoreConfig:
    checkpoint: str  # checkpoint directory, or run directory (its best checkpoint)
    output: str  # directory (prefix) of Parquet files to create: local, NFS or a URI
    input: str = "test"  # 'test', a directory of images, or a Parquet file or directory; local or a URI
    data_dir: str | None = None  # Fashion-MNIST IDX files, for input 'test'
    batch_size: int = 1024
    concurrency: int | None = None  # model actors; None: CPU_ACTORS, or with use_gpu one per GPU there is
    use_gpu: bool = False  # one GPU per actor
    overwrite: bool = False
    skip_bad: bool = False  # skip unreadable images instead of failing
    resource_timeout_s: float = 60.0  # on a cluster: how long actors' CPUs/GPUs may take to appear
    verbose: bool = False


@dataclass
class ScoreResult:
    output: str  # the predictions directory
    checkpoint: str  # the checkpoint directory that was used
    rows: int
    files: int
    seconds: float  # the Ray Data job, from its start to the last file written
    skipped: list[str]  # unreadable images, with the reason, when skip_bad

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds


# ----------------------------------------------------------------------------- the model actors


@torch.inference_mode()
def predict(model: Classifier, config: ModelConfig, batch: pa.Table, pixels: np.ndarray) -> pa.Table:
    """Predictions (PREDICTIONS_SCHEMA) for a batch's id/path/label and its (N, 784) uint8 pixels."""
    if len(pixels) == 0:  # every image of the batch was skipped (--skip-bad)
        return PREDICTIONS_SCHEMA.empty_table()
    device = next(model.parameters()).device
    log_probs = model(normalize(torch.from_numpy(pixels), config).to(device))
    prediction = log_probs.argmax(dim=1)  # on log-probabilities, as training's accuracy does
    probabilities = log_probs.exp()
    confidence = probabilities.gather(1, prediction[:, None])[:, 0]
    prediction, probabilities, confidence = (t.cpu().numpy() for t in (prediction, probabilities, confidence))
    n, classes = probabilities.shape
    offsets = pa.array(np.arange(0, (n + 1) * classes, classes, dtype=np.int32))
    return pa.table([
        batch["id"], batch["path"], batch["label"],
        pa.array(prediction, pa.int64()),
        pc.take(pa.array(config.class_names), pa.array(prediction)),
        pa.array(confidence),
        pa.ListArray.from_arrays(offsets, pa.array(probabilities.reshape(-1))),
    ], schema=PREDICTIONS_SCHEMA)


@ray.remote(num_cpus=0)
class _Tally:
    """Where the model actors report what they scored and what they could not read."""

    def __init__(self):
        self.scored = 0
        self.unreadable: list[str] = []

    def add(self, scored: int, unreadable: list[str]) -> None:
        self.scored += scored
        self.unreadable += unreadable

    def get(self) -> tuple[int, list[str]]:
        return self.scored, self.unreadable


class Predictor:
    """A Ray Data model actor: holds the model, scores one batch of images per call."""

    def __init__(self, model: Classifier, config: ModelConfig, use_gpu: bool, threads: int,
                 tally: ray.actor.ActorHandle, skip_bad: bool):
        torch.set_num_threads(threads)
        self.model = model.to("cuda" if use_gpu else "cpu")
        self.config = config
        self.tally = tally
        self.skip_bad = skip_bad

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, pixels = readable_rows(batch, self.tally, self.skip_bad)
        predictions = predict(self.model, self.config, batch, pixels)
        self.tally.add.remote(len(predictions), [])
        return predictions


def _placement(use_gpu: bool, actors: int) -> tuple[float, int]:
    """The CPUs each model actor reserves, and the torch threads it runs."""
    if use_gpu or not is_embedded():
        return 1.0, 1
    # An embedded local Ray: the actors share the cores. They reserve all but two, which Ray
    # Data's read and write tasks need (one CPU each): without them the writes wait for the
    # actors to finish, and the predictions pile up in memory.
    cores = ray.cluster_resources().get("CPU", 1)
    return max(cores - 2, 0) / actors, max(1, int(cores) // actors)


# ----------------------------------------------------------------------------- output and console


@contextlib.contextmanager
def _progress(console: Console, tally: ray.actor.ActorHandle, total: int) -> Iterator[None]:
    """A live bar of images scored, polled from the actors' tally while the job runs."""
    progress = Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
        TextColumn("{task.fields[rate]:,.0f} images/s"), TimeElapsedColumn(),
        console=console, transient=True,
    )
    task = progress.add_task("", total=total, rate=0.0)
    done = threading.Event()

    def poll() -> None:
        start = time.monotonic()
        while not done.wait(0.5):
            scored, _ = ray.get(tally.get.remote())
            progress.update(task, completed=scored, rate=scored / (time.monotonic() - start))

    poller = threading.Thread(target=poll, daemon=True)
    with progress:
        poller.start()
        try:
            yield
        finally:
            done.set()
            poller.join()


def _print_summary(console: Console, result: ScoreResult) -> None:
    files = f"{result.files} Parquet file{'s' if result.files != 1 else ''}"
    console.print(f"[bold]Scored {result.rows:,} images[/] in {result.seconds:.1f} s "
                  f"({result.images_per_second:,.0f} images/s) into {files}")
    # soft_wrap: paths stay whole, to be copied from the terminal
    console.print(f"predictions: {result.output}", soft_wrap=True, highlight=False)
    if result.skipped:
        console.print(f"[yellow]Skipped {len(result.skipped)} unreadable image(s):[/]")
        for problem in result.skipped:
            console.print(f"  {problem}", soft_wrap=True, highlight=False, markup=False)


def _quiet_ray_data_console() -> None:
    # Ray Data logs its plan and any failure on the terminal, which our progress bar and one-line
    # errors replace; its log file in the Ray session directory keeps everything.
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.CRITICAL + 1)


# ----------------------------------------------------------------------------- the job


def score(config: ScoreConfig, console: Console | None = None) -> ScoreResult:
    """Score ``config.input`` with the model of ``config.checkpoint`` into Parquet at ``config.output``."""
    console = console or Console()
    output = _output_dir(config)
    checkpoint = resolve_checkpoint(config.checkpoint)
    model = load_checkpoint(checkpoint)  # a bad checkpoint fails here, in one line, before any actor starts
    model_config = model.config
    source = open_input(config.input, config.data_dir, model_config.class_names)
    _check_output(output, config, source)
    with StagedOutput(output) as staged:
        started_ray = start_ray(config.verbose)
        try:
            if not config.verbose:
                _quiet_ray_data_console()
            predictions, tally = _predictions(config, model, model_config, source, console)
            try:
                result = _write(predictions, tally, source.rows, staged, checkpoint, config, console)
            finally:
                ray.kill(tally)  # it would outlive the job in a Ray session that goes on
        finally:
            if started_ray:
                ray.shutdown()
    _print_summary(console, result)
    return result


def _output_dir(config: ScoreConfig) -> StoragePath:
    """--output, checked before the checkpoint and input are read: new, or --overwrite."""
    output = StoragePath.parse(config.output, "--output")
    if not output.is_local and "/" not in output.path.strip("/"):
        raise InputError(f"--output {output.uri} is a bucket or a filesystem root; pass a directory in it")
    try:
        exists = output.exists()
    except OSError as e:
        raise InputError(f"--output {output.uri}: {describe_error(e)}") from None
    if exists and not config.overwrite:
        raise InputError(f"--output {output.uri} already exists; pass --overwrite to replace it, or choose another")
    return output


def _check_output(output: StoragePath, config: ScoreConfig, source: ScoringInput) -> None:
    """--overwrite replaces the output whole: it must not hold what the job reads, or where you are."""
    in_use = {"--checkpoint": StoragePath.parse(config.checkpoint), "the current directory": StoragePath.parse(".")}
    if source.location is not None:
        in_use["--input"] = source.location
    for what, held in in_use.items():
        if output.holds(held):
            raise InputError(f"--output {output.uri} holds {what}, which replacing it would delete; "
                             "choose another --output")


def _predictions(config: ScoreConfig, model: Classifier, model_config: ModelConfig, source: ScoringInput,
                 console: Console) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """The pipeline, not run yet: input blocks -> the model actors' predictions; and their tally."""
    actors = config.concurrency or (one_per_gpu() if config.use_gpu else CPU_ACTORS)
    actors = min(actors, source.blocks(config.batch_size))  # more would have nothing to do
    cpus, threads = _placement(config.use_gpu, actors)
    wait_for_resources({"CPU": cpus, "GPU": int(config.use_gpu)}, actors,
                       f"scoring with {actors} model actor{'s' * (actors > 1)}",
                       "ask for fewer (--concurrency) or leave out --use-gpu",
                       0 if is_embedded() else config.resource_timeout_s, console)
    tally = _Tally.remote()
    predictions = to_dataset(source, config.batch_size, tally, config.skip_bad).map_batches(
        Predictor,
        fn_constructor_kwargs=dict(model=model, config=model_config, use_gpu=config.use_gpu,
                                   threads=threads, tally=tally, skip_bad=config.skip_bad),
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=config.batch_size, batch_format="pyarrow",
        num_cpus=cpus, num_gpus=1 if config.use_gpu else None,
    )
    return predictions, tally


def _write(predictions: ray.data.Dataset, tally: ray.actor.ActorHandle, total: int, staged: StagedOutput,
           checkpoint: StoragePath, config: ScoreConfig, console: Console) -> ScoreResult:
    """Run the pipeline into Parquet files in ``staged``, and commit them to the output."""
    schema = PREDICTIONS_SCHEMA.with_metadata({CHECKPOINT_METADATA_KEY: checkpoint.uri.encode()})
    start = time.monotonic()
    staging = staged.dir
    with _progress(console, tally, total):
        try:
            predictions.write_parquet(staging.path, filesystem=staging.fs, schema=schema,
                                      min_rows_per_file=ROWS_PER_FILE, ray_remote_args=file_task_options(staging))
        except Exception:
            _, unreadable = ray.get(tally.get.remote())
            if unreadable and not config.skip_bad:
                raise InputError(f"cannot read {unreadable[0]}; fix or remove it, "
                                 "or pass --skip-bad to score the other images") from None
            raise
    _, skipped = ray.get(tally.get.remote())
    files = staging.files((".parquet",))
    scored = sum(pq.ParquetFile(f.path, filesystem=f.fs).metadata.num_rows for f in files)
    if scored == 0:
        raise InputError(f"none of the {total:,} images of --input {config.input} could be read "
                         f"(the first: {skipped[0] if skipped else 'none reported'})")
    staged.commit(rows=scored, schema=[[f.name, str(f.type)] for f in PREDICTIONS_SCHEMA],
                  checkpoint=checkpoint.uri, input=_shown_input(config), skipped=len(skipped))
    return ScoreResult(output=staged.output.uri, checkpoint=checkpoint.uri, rows=scored, files=len(files),
                       seconds=time.monotonic() - start, skipped=skipped)


def _shown_input(config: ScoreConfig) -> str:
    return config.input if config.input == "test" else StoragePath.parse(config.input).uri
