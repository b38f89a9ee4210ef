"""What scoring reads: the test set, a folder of image files, or Parquet; without Ray.

The driver checks the input before Ray starts and keeps only a small table of work (the test
set, file paths, or Parquet row groups); fmnist.score.datasource reads the rest a batch at a
time, so memory stays flat however many images there are. Every input becomes rows of id,
path, label and image (784 pixel values, or PNG/JPEG bytes). `fmnist evaluate --mistakes`
reads images back by id from here too.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fmnist.core.data import load_test_split
from fmnist.core.errors import InputError
from fmnist.core.images import IMAGE_SUFFIXES, UnreadableImage, read_image
from fmnist.core.model_config import IMAGE_PIXELS
from fmnist.core.outputs import incomplete, read_committed
from fmnist.core.run_layout import CHECKPOINT_METADATA_KEY
from fmnist.core.storage import StoragePath, describe_error

# Parquet input: rows per Ray Data read task and block. Larger blocks cost memory (each is held
# whole in the object store), smaller ones scheduling time.
ROWS_PER_READ_TASK = 50_000
READ_TASKS = 8  # at least this many read tasks where the input has as many row groups: parallel reads
IMAGE_COLUMN_HELP = "a column 'image' of 784 uint8 pixels (a list) or of PNG/JPEG bytes (binary)"


class RowGroup(NamedTuple):
    file: StoragePath
    index: int
    rows: int
    first_id: int  # the position of its first row in the input


class ScoringInput(NamedTuple):
    """What to score, checked on the driver before Ray starts."""

    rows: int  # images to score
    table: pa.Table | None = None  # their rows (id, path, label[, image]): the test set, image files
    read_tasks: list[list[RowGroup]] | None = None  # or the Parquet row groups that hold them, per task
    location: StoragePath | None = None  # where the files are (None: the test set, in memory)



def _image_rows(ids, labels, paths=None, images=None) -> pa.Table:
    """The columns every input kind becomes: id, path, label[, image].

    Without ``images``, the files at ``paths`` are read into an image column by fmnist.score.datasource.
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


def _test_input(data_dir: str | None) -> ScoringInput:
    images, labels = load_test_split(data_dir)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), IMAGE_PIXELS)
    return ScoringInput(len(labels), table=_image_rows(np.arange(len(labels)), labels, images=pixels))


def _folder_key(name: str) -> str:
    # Class names like "T-shirt/top" cannot be folder names as they are: match "T-shirt_top",
    # "t-shirt top", ... by letters and digits alone.
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _image_dir_input(directory: StoragePath, files: list[StoragePath], class_names: tuple[str, ...]) -> ScoringInput:
    """The images under ``directory`` in sorted path order; a file's label is the class its folder is
    named after, by name or by number (0-9, a common export of Fashion-MNIST)."""
    if not files:
        raise InputError(f"--input {directory.uri} holds no PNG/JPEG images (and no Parquet files); nothing to score")
    classes = {_folder_key(name): index for index, name in enumerate(class_names)}
    classes |= {str(index): index for index in range(len(class_names))}
    folders = [f.path[len(directory.path) + 1:].rpartition("/")[0] for f in files]  # "" for a file at the top
    labels = [classes.get(_folder_key(folder.rsplit("/", 1)[-1])) if folder else None for folder in folders]
    unnamed = sorted({folder for folder, label in zip(folders, labels) if folder and label is None})
    if unnamed:  # a typo in a class folder's name would otherwise leave its images unlabelled unseen
        shown = ", ".join(unnamed[:5]) + (f" and {len(unnamed) - 5} more" if len(unnamed) > 5 else "")
        print(f"warning: folder{'s' * (len(unnamed) > 1)} {shown} of --input {directory.uri} name no class "
              "(a class name or 0-9); their images are unlabelled", file=sys.stderr)
    rows = _image_rows(np.arange(len(files)), pa.array(labels, pa.int64()), paths=[f.uri for f in files])
    return ScoringInput(len(files), table=rows, location=directory)


def _is_image_bytes(kind: pa.DataType) -> bool:
    """Whether an 'image' column of this type holds encoded PNG/JPEG bytes (else pixel lists)."""
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _check_parquet_schema(file: str, schema: pa.Schema) -> str:
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


def _parquet_input(location: StoragePath, files: list[StoragePath], committed: bool) -> ScoringInput:
    """``files`` (under ``location``), checked; ``committed``: whether a _SUCCESS manifest lists them."""
    row_groups, rows = [], 0
    encodings: dict[str, str] = {}  # image encoding -> the first file that has it
    for file in files:
        try:
            with pq.ParquetFile(file.path, filesystem=file.fs) as parquet:
                schema, metadata = parquet.schema_arrow, parquet.metadata
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{file.uri} is not a readable Parquet file ({' '.join(str(e).split())})") from None
        if not committed and CHECKPOINT_METADATA_KEY in (schema.metadata or {}):
            raise incomplete(location, "fmnist score")  # our own output, without its manifest
        encodings.setdefault(_check_parquet_schema(file.uri, schema), file.uri)
        if len(encodings) > 1:  # batches mix rows of several files: one encoding for all
            raise InputError(f"{encodings['pixels']} holds pixel lists but {encodings['bytes']} image bytes in "
                             "column 'image'; score them as separate inputs")
        for index in range(metadata.num_row_groups):
            row_groups.append(RowGroup(file, index, metadata.row_group(index).num_rows, first_id=rows))
            rows += row_groups[-1].rows
    if rows == 0:
        raise InputError(f"--input {', '.join(f.uri for f in files[:3])}{'...' if len(files) > 3 else ''} has no rows")
    # Tasks of about ROWS_PER_READ_TASK rows, whatever the row group size, and at least
    # READ_TASKS of them where there are as many row groups.
    per_task = min(ROWS_PER_READ_TASK, math.ceil(rows / READ_TASKS))
    return ScoringInput(rows, read_tasks=list(_consecutive(row_groups, per_task)), location=location)


def _consecutive(row_groups: list[RowGroup], rows: int) -> Iterator[list[RowGroup]]:
    """The row groups in runs of at least ``rows`` rows (the last run may have fewer)."""
    run: list[RowGroup] = []
    for group in row_groups:
        run.append(group)
        if sum(g.rows for g in run) >= rows:
            yield run
            run = []
    if run:
        yield run


def read_row_groups(groups: list[RowGroup], batch_size: int) -> Iterator[pa.Table]:
    for group in groups:
        with pq.ParquetFile(group.file.path, filesystem=group.file.fs) as parquet:
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


def open_input(spec: str, data_dir: str | None, class_names: tuple[str, ...]) -> ScoringInput:
    """--input: 'test', or a Parquet file, or a directory (prefix) of Parquet files or of images, local or a URI."""
    if spec == "test":
        return _test_input(data_dir)
    if not spec:
        raise InputError("--input is empty; pass 'test', a directory of PNG/JPEG images, or Parquet")
    location = StoragePath.parse(spec, "--input")
    try:
        kind = location.info().type
        if kind == pafs.FileType.NotFound:
            raise InputError(f"--input {location.uri} does not exist; "
                             "pass 'test', a directory of PNG/JPEG images, or Parquet")
        if kind == pafs.FileType.File:
            if location.path.lower().endswith(IMAGE_SUFFIXES):  # one image: its folder holds it, unlabelled
                parent = StoragePath(location.fs, location.path.rsplit("/", 1)[0], location.uri.rsplit("/", 1)[0])
                return _image_dir_input(parent, [location], class_names)
            return _parquet_input(location, [location], committed=True)
        committed = read_committed(location, ".parquet")
        parquet_files = committed if committed is not None else location.files((".parquet",))
        if parquet_files:
            return _parquet_input(location, parquet_files, committed=committed is not None)
        return _image_dir_input(location, location.files(IMAGE_SUFFIXES), class_names)
    except OSError as e:
        raise InputError(f"--input {location.uri}: {describe_error(e)}") from None


def _row_name(batch: pa.Table, row: int) -> str:
    path = batch["path"][row].as_py()
    return path if path is not None else f"image id {batch['id'][row].as_py()}"


def batch_pixels(batch: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images of a batch as (N, 784) uint8 for the N rows that have a readable one.

    Returns the pixels, a mask of those rows, and "<row> (<what is wrong>)" for each other row.
    Images come as pixel lists, as PNG/JPEG bytes, or, without an 'image' column, as files at 'path'.
    """
    ids = pc.is_null(batch["id"]).to_numpy(zero_copy_only=False)
    problems: dict[int, str] = {i: "has no id" for i in np.flatnonzero(ids)}
    column = batch["image"].combine_chunks() if "image" in batch.column_names else None
    if column is not None and not _is_image_bytes(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
        for i in np.flatnonzero(lengths != IMAGE_PIXELS):
            problems.setdefault(i, f"has {lengths[i]} pixel values, expected {IMAGE_PIXELS}")
        full = lengths == IMAGE_PIXELS
        values = column.filter(pa.array(full)).flatten()  # the pixels of the full-length rows, flattened once
        if values.null_count:
            gaps = pc.is_null(values).to_numpy(zero_copy_only=False).reshape(-1, IMAGE_PIXELS).any(axis=1)
            for i in np.flatnonzero(full)[gaps]:
                problems.setdefault(i, "has missing pixel values")
        readable = _without(problems, len(batch))
        # With nulls present, to_numpy gives floats: the rows kept hold none, so uint8 is exact.
        pixels = values.to_numpy(zero_copy_only=False).reshape(-1, IMAGE_PIXELS)[readable[full]]
        pixels = pixels.astype(np.uint8, copy=False)
    else:
        images = []
        for i, source in enumerate((column if column is not None else batch["path"]).to_pylist()):
            if i in problems:
                continue
            try:
                if source is None:
                    raise UnreadableImage("no image")
                images.append(read_image(source))
            except UnreadableImage as e:
                problems[i] = str(e)
        readable = _without(problems, len(batch))
        pixels = np.stack(images) if images else np.empty((0, IMAGE_PIXELS), np.uint8)
    named = [f"{_row_name(batch, i)} ({problems[i]})" for i in sorted(problems)]
    return pixels.reshape(-1, IMAGE_PIXELS), readable, named


def _without(problems: dict[int, str], rows: int) -> np.ndarray:
    """A mask of the rows that have no problem."""
    readable = np.ones(rows, dtype=bool)
    readable[list(problems)] = False
    return readable


def images_by_id(source: ScoringInput, ids: list[int]) -> dict[int, tuple[np.ndarray, int | None]]:
    """The (28, 28) uint8 image and the label (or None) of each input row with one of ``ids``,
    numbered as scoring numbers them; read a batch at a time, decoding only the rows asked for."""
    wanted = pa.array(sorted(set(ids)), pa.int64())
    if source.table is not None:
        tables: Iterator[pa.Table] = iter([source.table])
    else:
        tables = (t for groups in source.read_tasks for t in read_row_groups(groups, ROWS_PER_READ_TASK))
    found = {}
    for table in tables:
        rows = table.filter(pc.is_in(table["id"], value_set=wanted))
        if rows.num_rows == 0:
            continue
        pixels, _, problems = batch_pixels(rows)
        if problems:
            raise InputError(f"cannot read the image of {problems[0]}")
        for image_id, label, image in zip(rows["id"].to_pylist(), rows["label"].to_pylist(), pixels):
            found[image_id] = (image.reshape(28, 28), label)
    return found
