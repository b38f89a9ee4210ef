"""Batch scoring with Ray Data: images in, one Parquet row of predictions per image out.

    input (test set | image files | Parquet)  ->  a Ray Dataset, streamed batch by batch (core.inputs, score.datasource)
        -> map_batches: on CPUs Ray Data tasks, fused with the read and the write where Ray can;
           on GPUs one model actor per GPU
        -> write_parquet into a hidden staging directory beside --output
        -> moved to --output only once every batch is written, and a _SUCCESS manifest last (outputs)

The driver checks the checkpoint, the input and the output before Ray starts. On a cluster,
local and NFS paths are read and written on the driver's node, where they are; object
storage (s3://, gs://) by Ray Data tasks on any node.
"""

from __future__ import annotations

import contextlib
import math
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fmnist.core import ray_compat
from fmnist.core.checkpoints import load_checkpoint, load_numpy_checkpoint, resolve_checkpoint
from fmnist.core.cluster import file_task_options, one_per_gpu, start_ray, wait_for_resources
from fmnist.core.errors import InputError
from fmnist.core.inputs import ScoringInput, open_input
from fmnist.core.model_config import ModelConfig
from fmnist.core.numpy_model import NumpyClassifier
from fmnist.core.outputs import StagedOutput
from fmnist.core.run_layout import CHECKPOINT_METADATA_KEY
from fmnist.core.storage import StoragePath, describe_error
from fmnist.score.datasource import readable_rows, to_dataset

if TYPE_CHECKING:
    from fmnist.core.model import Classifier

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("prediction", pa.int64(), nullable=False),
    pa.field("predicted_class", pa.string(), nullable=False),
    pa.field("confidence", pa.float32(), nullable=False),
    pa.field("probabilities", pa.list_(pa.float32()), nullable=False),
])
ROWS_PER_FILE = 100_000  # on GPUs: few, large output files rather than one per batch


@dataclass(frozen=True)
class ScoreConfig:
    checkpoint: str  # checkpoint directory, or run directory (its best checkpoint)
    output: str  # directory (prefix) of Parquet files to create: local, NFS or a URI
    input: str = "test"  # 'test', a directory of images, or a Parquet file or directory; local or a URI
    data_dir: str | None = None  # Fashion-MNIST IDX files, for input 'test'
    batch_size: int = 1024
    concurrency: int | None = None  # scoring tasks at once (None: one per CPU); with use_gpu, actors (one per GPU)
    use_gpu: bool = False  # one GPU per actor
    overwrite: bool = False
    skip_bad: bool = False  # skip unreadable images instead of failing
    resource_timeout_s: float = 60.0  # on a cluster: how long the CPUs/GPUs asked for may take to appear
    verbose: bool = False


@dataclass
class ScoreResult:
    output: str  # the predictions directory
    checkpoint: str  # the checkpoint directory that was used
    rows: int
    files: int
    seconds: float  # the Ray Data job, from its set-up (the input's blocks, the model's) to the output's commit
    skipped: list[str]  # unreadable images, with the reason, when skip_bad

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds


# ----------------------------------------------------------------------------- the model


def predictions_table(batch: pa.Table, log_probs: np.ndarray, class_names: tuple[str, ...]) -> pa.Table:
    """Predictions (PREDICTIONS_SCHEMA) for a batch's id/path/label and the (N, classes) log-probabilities
    of its readable images."""
    if len(log_probs) == 0:  # every image of the batch was skipped (--skip-bad)
        return PREDICTIONS_SCHEMA.empty_table()
    prediction = log_probs.argmax(axis=1)  # on log-probabilities, as training's accuracy does
    probabilities = np.exp(log_probs)
    n, classes = probabilities.shape
    offsets = pa.array(np.arange(0, (n + 1) * classes, classes, dtype=np.int32))
    return pa.table([
        batch["id"], batch["path"], batch["label"],
        pa.array(prediction, pa.int64()),
        pc.take(pa.array(class_names), pa.array(prediction)),
        pa.array(probabilities[np.arange(n), prediction]),
        pa.ListArray.from_arrays(offsets, pa.array(probabilities.reshape(-1))),
    ], schema=PREDICTIONS_SCHEMA)


@ray.remote(num_cpus=0)
class _Tally:
    """Where the scoring tasks (or actors) report what they scored and what they could not read."""

    def __init__(self):
        self.scored = 0
        self.unreadable: list[str] = []

    def add(self, scored: int, unreadable: list[str]) -> None:
        self.scored += scored
        self.unreadable += unreadable

    def get(self) -> tuple[int, list[str]]:
        return self.scored, self.unreadable


# This worker process's model, kept for its next tasks: {ObjectRef hex: model}. One at a time: a
# later job's model (another object) replaces it.
_loaded_model: dict[str, NumpyClassifier] = {}


def score_block(block: pa.Table, model: NumpyClassifier | Classifier, config: ModelConfig, batch_size: int,
                tally: ray.actor.ActorHandle, skip_bad: bool) -> Iterator[pa.Table]:
    """Predictions for a block of input rows, ``batch_size`` rows at a time, by ``model``'s
    log_probabilities: (N, 784) uint8 pixels -> (N, classes)."""
    for start in range(0, len(block), batch_size):
        batch, pixels = readable_rows(block.slice(start, batch_size), tally, skip_bad)
        predictions = predictions_table(batch, model.log_probabilities(pixels), config.class_names)
        tally.add.remote(len(predictions), [])
        yield predictions


def _score_on_cpu(block: pa.Table, model_ref: ray.ObjectRef, **options) -> Iterator[pa.Table]:
    """A Ray Data task's predictions for a block, by the numpy model its worker process already holds.

    One thread, as the task reserves one CPU: Ray starts its workers with OMP_NUM_THREADS=1 (unless
    the user set it), which numpy's BLAS follows."""
    key = model_ref.hex()
    if key not in _loaded_model:
        _loaded_model.clear()
        _loaded_model[key] = ray.get(model_ref)
    yield from score_block(block, _loaded_model[key], **options)


class GPUPredictor:
    """A Ray Data model actor on a GPU: loads the torch model once, then scores one batch per call."""

    def __init__(self, model_ref: ray.ObjectRef, **options):
        self.model = ray.get(model_ref).to("cuda")
        self.options = options

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        yield from score_block(batch, self.model, **self.options)


# ----------------------------------------------------------------------------- output and console


@contextlib.contextmanager
def _progress(console: Console, tally: ray.actor.ActorHandle, total: int) -> Iterator[None]:
    """A live bar of images scored, polled from the scoring tally while the job runs."""
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
    for handler in ray_compat.ray_data_console_handlers():
        handler.setLevel(logging.CRITICAL + 1)


# ----------------------------------------------------------------------------- the job


def score(config: ScoreConfig, console: Console | None = None) -> ScoreResult:
    """Score ``config.input`` with the model of ``config.checkpoint`` into Parquet at ``config.output``."""
    console = console or Console()
    output = _output_dir(config)
    checkpoint = resolve_checkpoint(config.checkpoint)
    # A bad checkpoint fails here, in one line, before Ray starts. On CPUs, torch is never imported.
    model = load_checkpoint(checkpoint) if config.use_gpu else load_numpy_checkpoint(checkpoint)
    model_config = model.config
    source = open_input(config.input, config.data_dir, model_config.class_names)
    _check_output(output, config, source)
    with StagedOutput(output) as staged:
        started_ray = start_ray(config.verbose)
        try:
            if not config.verbose:
                _quiet_ray_data_console()
            with _cpu_limit(config):
                start = time.monotonic()
                predictions, tally = _predictions(config, model, model_config, source, console)
                try:
                    result = _write(predictions, tally, source.rows, staged, checkpoint, config, console, start)
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


def _predictions(config: ScoreConfig, model: Classifier | NumpyClassifier, model_config: ModelConfig,
                 source: ScoringInput, console: Console) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """The pipeline, not run yet: input blocks -> predictions; and their tally.

    On CPUs the model runs in numpy, in Ray Data tasks that Ray fuses with the read and the write where they
    may run on the same node (embedded Ray, object storage): a block then never crosses the object
    store. On GPUs, in one actor per GPU, which loads the model once.
    """
    if config.use_gpu:
        actors = min(config.concurrency or one_per_gpu(), math.ceil(source.rows / config.batch_size))
        wait_for_resources({"CPU": 1, "GPU": 1}, actors, f"scoring with {actors} model actor{'s' * (actors > 1)}",
                           "ask for fewer (--concurrency) or leave out --use-gpu",
                           config.resource_timeout_s, console)
    else:
        wait_for_resources({"CPU": 1}, 1, "scoring", "add a node with CPUs",
                           config.resource_timeout_s, console)
    tally = _Tally.remote()
    # Each task (or actor) gets the model as this one object, not a copy in its arguments: on CPUs
    # as numpy arrays, so that the tasks' worker processes need not import torch.
    options = dict(model_ref=ray.put(model), config=model_config,
                   batch_size=config.batch_size, tally=tally, skip_bad=config.skip_bad)
    blocks = to_dataset(source, config.batch_size, tally, config.skip_bad)
    if config.use_gpu:
        predictions = blocks.map_batches(GPUPredictor, fn_constructor_kwargs=options,
                                         compute=ray.data.ActorPoolStrategy(size=actors),
                                         batch_size=config.batch_size, batch_format="pyarrow", num_cpus=1, num_gpus=1)
    else:
        predictions = blocks.map_batches(_score_on_cpu, fn_kwargs=options, batch_size=None,
                                         batch_format="pyarrow", num_cpus=1)
    return predictions, tally


@contextlib.contextmanager
def _cpu_limit(config: ScoreConfig) -> Iterator[None]:
    """--concurrency on CPUs: at most that many CPUs for the job's Ray Data tasks (one each). A limit
    on the whole job, since a concurrency per step keeps Ray from fusing the steps."""
    options = ray.data.DataContext.get_current().execution_options
    limits = options.resource_limits
    if config.concurrency and not config.use_gpu:
        options.resource_limits = limits.copy(cpu=config.concurrency)
    try:
        yield
    finally:
        options.resource_limits = limits


def _write(predictions: ray.data.Dataset, tally: ray.actor.ActorHandle, total: int, staged: StagedOutput,
           checkpoint: StoragePath, config: ScoreConfig, console: Console, start: float) -> ScoreResult:
    """Run the pipeline (set up at monotonic time ``start``) into Parquet files in ``staged``, and
    commit them to the output."""
    schema = PREDICTIONS_SCHEMA.with_metadata({CHECKPOINT_METADATA_KEY: checkpoint.uri.encode()})
    staging = staged.dir
    with _progress(console, tally, total):
        try:
            # On CPUs each task writes its block as one file: bundling rows across tasks would
            # keep Ray from fusing the read into the task that scores and writes.
            predictions.write_parquet(staging.path, filesystem=staging.fs, schema=schema,
                                      min_rows_per_file=ROWS_PER_FILE if config.use_gpu else None,
                                      ray_remote_args=file_task_options(staging))
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
