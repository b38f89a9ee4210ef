"""Scoring's inputs as a Ray Data dataset: Parquet row groups and image files read by tasks.

Local paths are read on the driver's node, where they are; object storage (s3://, gs://) by
tasks on any node, in parallel. Every input becomes blocks of id, path, label and image.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from fmnist.core.cluster import file_task_options
from fmnist.core.images import UnreadableImage
from fmnist.core.inputs import RowGroup, ScoringInput, batch_pixels, read_row_groups
from fmnist.core.model_config import IMAGE_PIXELS
from fmnist.core.storage import StoragePath


class _ParquetRowGroups(ray.data.Datasource):
    """Parquet row groups as Ray Data read tasks that know the input position of their rows.

    Rows get those positions as ids where the files have no 'id' column; Ray Data's own
    Parquet reader cannot tell them.
    """

    def __init__(self, tasks: list[list[RowGroup]], batch_size: int):
        super().__init__()
        self.tasks = tasks
        self.batch_size = batch_size

    def estimate_inmemory_data_size(self) -> int:
        return sum(group.rows for groups in self.tasks for group in groups) * IMAGE_PIXELS

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [self._read_task(groups) for groups in self.tasks]

    def _read_task(self, groups: list[RowGroup]) -> ReadTask:
        rows = sum(group.rows for group in groups)
        metadata = BlockMetadata(num_rows=rows, size_bytes=rows * IMAGE_PIXELS,
                                 input_files=sorted({group.file.uri for group in groups}), exec_stats=None)
        return ReadTask(functools.partial(read_row_groups, groups, self.batch_size), metadata)



def to_dataset(source: ScoringInput, batch_size: int, tally: ray.actor.ActorHandle,
               skip_bad: bool) -> ray.data.Dataset:
    """The input as blocks of id, path, label and image (pixel lists or PNG/JPEG bytes).

    Unreadable image files go to ``tally`` (see readable_rows).
    """
    if source.read_tasks:
        # One block per task: Ray Data would cut each into many small ones, whose scheduling
        # took a fifth of the job's time on a 2-core machine.
        return ray.data.read_datasource(_ParquetRowGroups(source.read_tasks, batch_size),
                                        override_num_blocks=len(source.read_tasks),
                                        **file_task_options(source.location))
    table = source.table
    # A block per CPU, of whole batches: each becomes one task that reads, scores and writes it.
    batches = math.ceil(len(table) / batch_size)
    rows = batch_size * math.ceil(batches / max(1, int(ray.cluster_resources().get("CPU", 1))))
    # from_blocks describes the blocks here; from_arrow would start a Ray task per block to do it.
    blocks = ray.data.from_blocks([table.slice(i, rows) for i in range(0, len(table), rows)])
    if "image" in table.column_names:
        return blocks
    return blocks.map_batches(_decode_image_files,
                              fn_kwargs=dict(tally=tally, skip_bad=skip_bad, directory=source.location),
                              batch_size=None, batch_format="pyarrow", **file_task_options(source.location))



def readable_rows(batch: pa.Table, tally: ray.actor.ActorHandle, skip_bad: bool) -> tuple[pa.Table, np.ndarray]:
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


def _decode_image_files(batch: pa.Table, tally: ray.actor.ActorHandle, skip_bad: bool,
                        directory: StoragePath) -> pa.Table:
    """Rows naming image files under ``directory`` -> the same rows with their pixels."""
    batch = batch.append_column("image", pa.array([_file_bytes(directory, uri) for uri in batch["path"].to_pylist()],
                                                  pa.binary()))
    batch, pixels = readable_rows(batch, tally, skip_bad)
    batch = batch.drop_columns(["image"])
    pixel_lists = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), IMAGE_PIXELS)
    return batch.append_column("image", pixel_lists)



def _file_bytes(directory: StoragePath, uri: str) -> bytes:
    """The bytes of the file at ``uri`` under ``directory``; none where it cannot be read (then named unreadable)."""
    try:
        return directory.relative(directory.path + uri[len(directory.uri):]).read_bytes()
    except OSError:
        return b""
