"""Batch scoring with Ray Data: images in, one Parquet row of predictions per image out.

    input (test set | image files | Parquet)  ->  a Ray Dataset, streamed batch by batch
        -> map_batches(Predictor): a pool of model actors, each holding the model
        -> write_parquet into a hidden staging directory beside --output
        -> renamed to --output only once every batch is written

The driver checks the checkpoint and the input before Ray starts and keeps only a small
table of work (the test set, file paths, or Parquet row groups). Row groups and image files
are read by Ray Data tasks, a batch at a time, so memory stays flat however many images there
are. On a cluster those tasks and the writes run on the driver's node, where the paths are:
only the model actors need other nodes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fmnist.checkpoints import load_checkpoint, resolve_checkpoint
from fmnist.cluster import is_embedded, one_per_gpu, start_ray, wait_for_resources
from fmnist.data import load_test_split
from fmnist.errors import InputError
from fmnist.evaluation import CHECKPOINT_METADATA_KEY
from fmnist.images import UnreadableImage, list_image_files, read_image
from fmnist.model import IMAGE_PIXELS, Classifier, ModelConfig, normalize
from fmnist.storage import StoragePath, is_uri

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
# Parquet input: rows per Ray Data read task and block. Larger blocks cost memory (each is held
# whole in the object store), smaller ones scheduling time.
ROWS_PER_READ_TASK = 50_000
CPU_ACTORS = 2  # model actors on CPUs, unless told otherwise
IMAGE_COLUMN_HELP = "a column 'image' of 784 uint8 pixels (a list) or of PNG/JPEG bytes (binary)"


@dataclass(frozen=True)
class ScoreConfig:
    checkpoint: str  # checkpoint directory, or run directory (its best checkpoint)
    output: str  # directory of Parquet files to create
    input: str = "test"  # 'test', a directory of images, or a Parquet file or directory
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
    seconds: float  # the Ray Data job, from its start to the output in place
    skipped: list[str]  # unreadable images, with the reason, when skip_bad

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds


# ----------------------------------------------------------------------------- inputs


class _RowGroup(NamedTuple):
    file: str
    index: int
    rows: int
    first_id: int  # the position of its first row in the input


class _Input(NamedTuple):
    """What to score, checked on the driver before Ray starts."""

    rows: int  # images to score
    table: pa.Table | None = None  # their rows (id, path, label[, image]): the test set, image files
    read_tasks: list[list[_RowGroup]] | None = None  # or the Parquet row groups that hold them, per task

    def blocks(self, batch_size: int) -> int:
        """How many Ray Data blocks it makes: one per read task, or per batch of table rows."""
        return len(self.read_tasks) if self.read_tasks else math.ceil(self.rows / batch_size)


def _image_rows(ids, labels, paths=None, images=None) -> pa.Table:
    """The columns every input kind hands to the model actors: id, path, label[, image].

    Without ``images`` the actors read the files at ``paths``.
    """
    ids = pa.array(ids).cast(pa.int64())
    columns = {
        "id": ids,
        "path": pa.nulls(len(ids), pa.string()) if paths is None else pa.array(paths, pa.string()),
        "label": pa.array(labels).cast(pa.int64()),
    }
    if images is not None:
        columns["image"] = images
    return pa.table(columns)


def _test_input(data_dir: str | None) -> _Input:
    images, labels = load_test_split(data_dir)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), IMAGE_PIXELS)
    return _Input(len(labels), table=_image_rows(np.arange(len(labels)), labels, images=pixels))


def _folder_key(name: str) -> str:
    # Class names like "T-shirt/top" cannot be folder names as they are: match "T-shirt_top",
    # "t-shirt top", ... by letters and digits alone.
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _image_dir_input(directory: Path, class_names: tuple[str, ...]) -> _Input:
    """The images under ``directory`` in sorted path order; a file's label is the class its folder is named after."""
    files = list_image_files(directory)
    if not files:
        raise InputError(f"--input {directory} holds no PNG/JPEG images (and no Parquet files); nothing to score")
    classes = {_folder_key(name): index for index, name in enumerate(class_names)}
    labels = [classes.get(_folder_key(f.parent.name)) if f.parent != directory else None for f in files]
    rows = _image_rows(np.arange(len(files)), pa.array(labels, pa.int64()), paths=[str(f) for f in files])
    return _Input(len(files), table=rows)


def _is_image_bytes(kind: pa.DataType) -> bool:
    """Whether an 'image' column of this type holds encoded PNG/JPEG bytes (else pixel lists)."""
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _check_parquet_schema(file: Path, schema: pa.Schema) -> str:
    """The file's image encoding ('bytes' or 'pixels'), or an InputError for what scoring can't read."""
    if "image" not in schema.names:
        raise InputError(f"{file} has no column 'image'; scoring needs {IMAGE_COLUMN_HELP}")
    kind = schema.field("image").type
    is_bytes = _is_image_bytes(kind)
    is_pixels = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not (is_bytes or (is_pixels and kind.value_type == pa.uint8())):
        raise InputError(f"{file}: column 'image' is {kind}; scoring needs {IMAGE_COLUMN_HELP}")
    for name in ("id", "label"):
        if name in schema.names and not pa.types.is_integer(schema.field(name).type):
            raise InputError(f"{file}: column '{name}' is {schema.field(name).type}; it must hold integers")
    return "bytes" if is_bytes else "pixels"


def _parquet_input(files: list[Path]) -> _Input:
    row_groups, rows = [], 0
    encodings: dict[str, Path] = {}  # image encoding -> the first file that has it
    for file in files:
        try:
            with pq.ParquetFile(file) as parquet:
                schema, metadata = parquet.schema_arrow, parquet.metadata
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{file} is not a readable Parquet file ({' '.join(str(e).split())})") from None
        encodings.setdefault(_check_parquet_schema(file, schema), file)
        if len(encodings) > 1:  # batches mix rows of several files: one encoding for all
            raise InputError(f"{encodings['pixels']} holds pixel lists but {encodings['bytes']} image bytes in "
                             "column 'image'; score them as separate inputs")
        for index in range(metadata.num_row_groups):
            row_groups.append(_RowGroup(str(file), index, metadata.row_group(index).num_rows, first_id=rows))
            rows += row_groups[-1].rows
    if rows == 0:
        raise InputError(f"--input {', '.join(map(str, files[:3]))}{'...' if len(files) > 3 else ''} has no rows")
    # Tasks of about ROWS_PER_READ_TASK rows, whatever the row group size.
    return _Input(rows, read_tasks=list(_consecutive(row_groups, ROWS_PER_READ_TASK)))


class _ParquetRowGroups(ray.data.Datasource):
    """Parquet row groups as Ray Data read tasks that know the input position of their rows.

    Rows get those positions as ids where the files have no 'id' column; Ray Data's own
    Parquet reader cannot tell them.
    """

    def __init__(self, tasks: list[list[_RowGroup]], batch_size: int):
        super().__init__()
        self.tasks = tasks
        self.batch_size = batch_size

    def estimate_inmemory_data_size(self) -> int:
        return sum(group.rows for groups in self.tasks for group in groups) * IMAGE_PIXELS

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [self._read_task(groups) for groups in self.tasks]

    def _read_task(self, groups: list[_RowGroup]) -> ReadTask:
        rows = sum(group.rows for group in groups)
        metadata = BlockMetadata(num_rows=rows, size_bytes=rows * IMAGE_PIXELS,
                                 input_files=sorted({group.file for group in groups}), exec_stats=None)
        return ReadTask(functools.partial(_read_row_groups, groups, self.batch_size), metadata)


def _consecutive(row_groups: list[_RowGroup], rows: int) -> Iterator[list[_RowGroup]]:
    """The row groups in runs of at least ``rows`` rows (the last run may have fewer)."""
    run: list[_RowGroup] = []
    for group in row_groups:
        run.append(group)
        if sum(g.rows for g in run) >= rows:
            yield run
            run = []
    if run:
        yield run


def _read_row_groups(groups: list[_RowGroup], batch_size: int) -> Iterator[pa.Table]:
    for group in groups:
        with pq.ParquetFile(group.file) as parquet:
            columns = [c for c in ("id", "label", "image") if c in parquet.schema_arrow.names]
            next_id = group.first_id
            # One row group per call: given several, pyarrow reads ahead through all of them.
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group.index], columns=columns):
                n = batch.num_rows
                ids = batch.column("id") if "id" in columns else np.arange(next_id, next_id + n)
                labels = batch.column("label") if "label" in columns else pa.nulls(n, pa.int64())
                yield _image_rows(ids, labels, images=_common_image_type(batch.column("image")))
                next_id += n


def _common_image_type(images: pa.Array) -> pa.Array:
    # Files of one input may hold (fixed-size or large) lists, or (large) binary: one type per
    # encoding lets Ray Data put rows of different files in one batch.
    return images.cast(pa.binary() if _is_image_bytes(images.type) else pa.list_(pa.uint8()))


def _open_input(spec: str, data_dir: str | None, class_names: tuple[str, ...]) -> _Input:
    if spec == "test":
        return _test_input(data_dir)
    path = Path(spec).expanduser().absolute()
    if not path.exists():
        raise InputError(f"--input {path} does not exist; pass 'test', a directory of PNG/JPEG images, or Parquet")
    if path.is_file():
        return _parquet_input([path])
    parquet_files = sorted(path.rglob("*.parquet"), key=str)
    if parquet_files:
        return _parquet_input(parquet_files)
    return _image_dir_input(path, class_names)


def _on_the_driver_node() -> dict:
    """Ray options for the tasks that read the input's files and write the output's.

    On a cluster they run on the driver's node, whose disk those paths are on (other nodes may
    not see it). They reserve no CPU there: the head node may have none, or the actors hold them.
    """
    if is_embedded():
        return {}
    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "label_selector": {"ray.io/node-id": here}}  # a label Ray gives every node


def _to_dataset(source: _Input, batch_size: int, tally: ray.actor.ActorHandle, skip_bad: bool) -> ray.data.Dataset:
    """The input as blocks of id, path, label and image (pixel lists or PNG/JPEG bytes)."""
    if source.read_tasks:
        # One block per task: Ray Data would cut each into many small ones, whose scheduling
        # took a fifth of the job's time on a 2-core machine.
        return ray.data.read_datasource(_ParquetRowGroups(source.read_tasks, batch_size),
                                        override_num_blocks=source.blocks(batch_size), **_on_the_driver_node())
    table = source.table
    blocks = ray.data.from_arrow([table.slice(i, batch_size) for i in range(0, len(table), batch_size)])
    if "image" in table.column_names:
        return blocks
    return blocks.map_batches(_decode_image_files, fn_kwargs=dict(tally=tally, skip_bad=skip_bad),
                              batch_size=None, batch_format="pyarrow", **_on_the_driver_node())


# ----------------------------------------------------------------------------- the model actors


def _row_name(batch: pa.Table, row: int) -> str:
    path = batch["path"][row].as_py()
    return path if path is not None else f"image id {batch['id'][row].as_py()}"


def batch_pixels(batch: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images of a batch as (N, 784) uint8 for the N rows that have a readable one.

    Returns the pixels, a mask of those rows, and "<row> (<what is wrong>)" for each other row.
    Images come as pixel lists, as PNG/JPEG bytes, or, without an 'image' column, as files at 'path'.
    """
    column = batch["image"].combine_chunks() if "image" in batch.column_names else None
    if column is not None and not _is_image_bytes(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
        readable = lengths == IMAGE_PIXELS
        pixels = column.filter(pa.array(readable)).flatten().to_numpy(zero_copy_only=False, writable=True)
        problems = [f"{_row_name(batch, i)} (has {lengths[i]} pixel values, expected {IMAGE_PIXELS})"
                    for i in np.flatnonzero(~readable)]
        return pixels.reshape(-1, IMAGE_PIXELS), readable, problems
    sources = (column if column is not None else batch["path"]).to_pylist()
    readable = np.ones(len(sources), dtype=bool)
    images, problems = [], []
    for i, source in enumerate(sources):
        try:
            if source is None:
                raise UnreadableImage("no image")
            images.append(read_image(source))
        except UnreadableImage as e:
            readable[i] = False
            problems.append(f"{_row_name(batch, i)} ({e})")
    pixels = np.stack(images).reshape(-1, IMAGE_PIXELS) if images else np.empty((0, IMAGE_PIXELS), np.uint8)
    return pixels, readable, problems


@torch.inference_mode()
def predict(model: Classifier, config: ModelConfig, batch: pa.Table, pixels: np.ndarray) -> pa.Table:
    """Predictions (PREDICTIONS_SCHEMA) for a batch's id/path/label and its (N, 784) uint8 pixels."""
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


def _readable(batch: pa.Table, tally: ray.actor.ActorHandle, skip_bad: bool) -> tuple[pa.Table, np.ndarray]:
    """The rows of a batch that have a readable image, and their (N, 784) pixels.

    The other rows go to the tally, and fail the job unless ``skip_bad``.
    """
    pixels, readable, problems = batch_pixels(batch)
    if problems:
        # Reported (and waited for) first: the driver names the first one if the run fails.
        ray.get(tally.add.remote(0, problems))
        if not skip_bad:
            raise UnreadableImage(problems[0])
        batch = batch.filter(pa.array(readable))
    return batch, pixels


def _decode_image_files(batch: pa.Table, tally: ray.actor.ActorHandle, skip_bad: bool) -> pa.Table:
    """Rows naming image files -> the same rows with their pixels, read where the files are."""
    batch, pixels = _readable(batch, tally, skip_bad)
    return batch.append_column("image", pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), IMAGE_PIXELS))


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
        batch, pixels = _readable(batch, self.tally, self.skip_bad)
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def _staging_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """A directory beside ``output`` to write into, moved to ``output`` only if the block succeeds.

    On any failure, Ctrl-C included, it is deleted: ``output`` is never left half-written.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.incomplete-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        if overwrite and output.exists():
            replaced = staging.with_name(f".{output.name}.replaced-{uuid.uuid4().hex[:8]}")
            output.rename(replaced)
            staging.rename(output)
            _remove(replaced)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    if is_uri(config.output):
        raise InputError(f"--output {config.output}: scoring writes to a local or NFS directory, not a URI; "
                         "copy the predictions to object storage afterwards")
    output = Path(config.output).expanduser().absolute()
    if output.exists() and not config.overwrite:
        raise InputError(f"--output {output} already exists; pass --overwrite to replace it, or choose another")
    checkpoint = resolve_checkpoint(config.checkpoint)
    model = load_checkpoint(checkpoint)  # a bad checkpoint fails here, in one line, before any actor starts
    model_config = model.config
    source = _open_input(config.input, config.data_dir, model_config.class_names)
    started_ray = start_ray(config.verbose)
    try:
        if not config.verbose:
            _quiet_ray_data_console()
        predictions, tally = _predictions(config, model, model_config, source, console)
        try:
            result = _write(predictions, tally, source.rows, output, checkpoint, config, console)
        finally:
            ray.kill(tally)  # it would outlive the job in a Ray session that goes on
    finally:
        if started_ray:
            ray.shutdown()
    _print_summary(console, result)
    return result


def _predictions(config: ScoreConfig, model: Classifier, model_config: ModelConfig, source: _Input,
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
    predictions = _to_dataset(source, config.batch_size, tally, config.skip_bad).map_batches(
        Predictor,
        fn_constructor_kwargs=dict(model=model, config=model_config, use_gpu=config.use_gpu,
                                   threads=threads, tally=tally, skip_bad=config.skip_bad),
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=config.batch_size, batch_format="pyarrow",
        num_cpus=cpus, num_gpus=1 if config.use_gpu else None,
    )
    return predictions, tally


def _write(predictions: ray.data.Dataset, tally: ray.actor.ActorHandle, total: int, output: Path,
           checkpoint: StoragePath, config: ScoreConfig, console: Console) -> ScoreResult:
    """Run the pipeline into Parquet files at ``output``: all of them, or none."""
    schema = PREDICTIONS_SCHEMA.with_metadata({CHECKPOINT_METADATA_KEY: checkpoint.uri.encode()})
    start = time.monotonic()
    with _staging_dir(output, config.overwrite) as staging:
        with _progress(console, tally, total):
            try:
                predictions.write_parquet(str(staging), schema=schema, min_rows_per_file=ROWS_PER_FILE,
                                          ray_remote_args=_on_the_driver_node())
            except Exception:
                _, unreadable = ray.get(tally.get.remote())
                if unreadable and not config.skip_bad:
                    raise InputError(f"cannot read {unreadable[0]}; fix or remove it, "
                                     "or pass --skip-bad to score the other images") from None
                raise
        _, skipped = ray.get(tally.get.remote())
        files = sorted(staging.glob("*.parquet"))
        scored = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if scored == 0:
            raise InputError(f"none of the {total:,} images of --input {config.input} could be read "
                             f"(the first: {skipped[0]})")
    return ScoreResult(output=str(output), checkpoint=checkpoint.uri, rows=scored, files=len(files),
                       seconds=time.monotonic() - start, skipped=skipped)
