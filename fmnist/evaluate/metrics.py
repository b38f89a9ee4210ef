"""Evaluate Parquet predictions: accuracy, per-class precision/recall/F1, confusion matrix.

The figures are scikit-learn's ``classification_report`` / ``confusion_matrix`` with
``labels=range(10)`` and ``zero_division=0``: every class is reported, and a ratio whose
denominator is zero counts as 0 (also in the macro average). Only the ``label`` and
``prediction`` columns are read, so a million rows take well under a second. Predictions are
a committed output of ``fmnist score`` (its _SUCCESS manifest names the files), local or on
object storage, or one Parquet file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fmnist.core.errors import InputError
from fmnist.core.model_config import CLASS_NAMES
from fmnist.core.outputs import incomplete, read_committed
from fmnist.core.run_layout import CHECKPOINT_METADATA_KEY
from fmnist.core.storage import StoragePath, describe_error

COLUMNS = ("label", "prediction")


class ConfusedPair(NamedTuple):
    """Two classes mistaken for each other: a predicted as b, and b predicted as a."""

    a: int
    b: int
    a_as_b: int
    b_as_a: int

    @property
    def total(self) -> int:
        return self.a_as_b + self.b_as_a


@dataclass(frozen=True)
class Evaluation:
    """The confusion matrix of a set of predictions, and every figure derived from it."""

    confusion: np.ndarray  # (classes, classes) int64, rows = true class, columns = predicted
    source: str  # where the predictions were read from
    checkpoint: str | None = None  # the model that made them, where recorded
    unlabeled: int = 0  # rows without a label, left out of every figure
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def precision(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))

    @property
    def recall(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.support)

    @property
    def f1(self) -> np.ndarray:
        # 2tp / (2tp + fp + fn): the harmonic mean of precision and recall, 0 where both are.
        return _ratio(2 * np.diag(self.confusion), self.confusion.sum(axis=0) + self.support)

    @property
    def macro_avg(self) -> dict:
        return self._average(weights=None)

    @property
    def weighted_avg(self) -> dict:
        return self._average(weights=self.support)

    def _average(self, weights: np.ndarray | None) -> dict:
        return {
            "precision": float(np.average(self.precision, weights=weights)),
            "recall": float(np.average(self.recall, weights=weights)),
            "f1": float(np.average(self.f1, weights=weights)),
            "support": self.n,
        }

    def most_confused(self, limit: int = 5) -> list[ConfusedPair]:
        """The class pairs with the most mistakes between them (either way), most first."""
        c = self.confusion
        pairs = [
            ConfusedPair(a, b, int(c[a, b]), int(c[b, a]))
            for a in range(len(c)) for b in range(a + 1, len(c))
            if c[a, b] + c[b, a] > 0
        ]
        # Stable sort: ties keep class order, so the report is the same on every run.
        return sorted(pairs, key=lambda p: p.total, reverse=True)[:limit]

    def to_json(self) -> dict:
        """The figures as ``fmnist evaluate --json`` writes them (docs/usage.md)."""
        per_class = [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(self.class_names, self.precision, self.recall, self.f1, self.support)
        ]
        return {
            "accuracy": self.accuracy,
            "n": self.n,
            "per_class": per_class,
            "macro_avg": self.macro_avg,
            "weighted_avg": self.weighted_avg,
            "confusion_matrix": self.confusion.tolist(),
        }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def evaluate_arrays(
    labels: np.ndarray, predictions: np.ndarray, source: str = "arrays", checkpoint: str | None = None,
    unlabeled: int = 0, class_names: tuple[str, ...] = CLASS_NAMES,
) -> Evaluation:
    """Figures for integer class indices (both already checked to lie in range)."""
    k = len(class_names)
    confusion = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
    return Evaluation(confusion, source, checkpoint, unlabeled, class_names)


def evaluate_predictions(path: str | os.PathLike) -> Evaluation:
    """Read a predictions directory (or one Parquet file) and compute its figures.

    Raises InputError for anything that is not labelled predictions of our classes.
    """
    location = StoragePath.parse(str(path), "predictions")
    try:
        files = prediction_files(location)
        tables = [_read_columns(f) for f in files]
    except OSError as e:  # object storage out of reach midway
        raise InputError(f"predictions {location.uri}: {describe_error(e)}") from None
    path = location.uri
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise InputError(f"the predictions in {path} have zero rows; score some images first")
    labelled = table.filter(pc.is_valid(table["label"]))
    if labelled.num_rows == 0:
        raise InputError(
            f"the predictions in {path} have no labels; evaluation needs the true class in the 'label' "
            "column (score --input test, or Parquet input with a 'label' column)"
        )
    labels = labelled["label"].to_numpy()
    predictions = labelled["prediction"].to_numpy()
    _check_range("label", labels, path)
    _check_range("prediction", predictions, path)
    return evaluate_arrays(
        labels, predictions, source=str(path), checkpoint=_checkpoint(tables),
        unlabeled=table.num_rows - labelled.num_rows,
    )


def prediction_files(location: StoragePath) -> list[StoragePath]:
    """One Parquet file, or the files a committed predictions directory's manifest lists."""
    kind = location.info().type
    if kind == pafs.FileType.File:
        return [location]
    if kind == pafs.FileType.NotFound:
        raise InputError(f"predictions directory {location.uri} does not exist; "
                         "pass the --output directory of 'fmnist score'")
    files = read_committed(location, ".parquet")
    if files is None and location.files((".parquet",)):
        raise incomplete(location, "fmnist score")
    if not files:
        raise InputError(f"{location.uri} holds no .parquet files; pass the --output directory of 'fmnist score'")
    return files


def _read_columns(location: StoragePath) -> pa.Table:
    """The label and prediction columns of one file, as int64, after checking its schema."""
    file = location.uri
    try:
        schema = pq.read_schema(location.path, filesystem=location.fs)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{file} is not a readable Parquet file ({e}); re-run 'fmnist score'") from None
    for column in COLUMNS:
        if column not in schema.names:
            raise InputError(
                f"{file} has no '{column}' column (it has: {', '.join(schema.names)}); "
                "expected predictions written by 'fmnist score'"
            )
        if not pa.types.is_integer(schema.field(column).type):
            raise InputError(
                f"column '{column}' of {file} is {schema.field(column).type}, not an integer class index; "
                "expected predictions written by 'fmnist score'"
            )
    try:
        table = pq.read_table(location.path, filesystem=location.fs, columns=list(COLUMNS))
        if table["prediction"].null_count:
            raise InputError(f"{file} has rows without a prediction; re-run 'fmnist score'")
        # The cast keeps the schema metadata: it may record the checkpoint.
        return table.cast(pa.schema([(c, pa.int64()) for c in COLUMNS], metadata=table.schema.metadata))
    except (pa.ArrowException, OSError) as e:  # damaged data pages, or values no class index can be
        raise InputError(f"cannot read {file} ({' '.join(str(e).split())}); re-run 'fmnist score'") from None


def _check_range(column: str, values: np.ndarray, path: str | os.PathLike) -> None:
    bad = values[(values < 0) | (values >= len(CLASS_NAMES))]
    if len(bad):
        raise InputError(
            f"the '{column}' column in {path} holds {bad[0]}, not a class index 0..{len(CLASS_NAMES) - 1}; "
            "expected predictions of the Fashion-MNIST classes"
        )


def _checkpoint(tables: list[pa.Table]) -> str | None:
    """The checkpoint recorded by the scoring step; several are listed (a mixed directory)."""
    found = dict.fromkeys(
        metadata[CHECKPOINT_METADATA_KEY].decode()
        for metadata in (t.schema.metadata or {} for t in tables)
        if CHECKPOINT_METADATA_KEY in metadata
    )
    return ", ".join(found) or None


def write_report_file(path: str | os.PathLike, data: bytes, option: str) -> None:
    """Write ``data`` to ``path`` (local or a URI) whole; ``option`` names it in an error."""
    location = StoragePath.parse(str(path), option)
    try:
        location.write_whole(data)
    except OSError as e:
        raise InputError(f"cannot write {option} {location.uri}: {describe_error(e)}; "
                         "pass a path in a writable directory") from None


def write_json(evaluation: Evaluation, path: str | os.PathLike) -> None:
    """Write ``evaluation.to_json()`` to ``path``, atomically."""
    write_report_file(path, (json.dumps(evaluation.to_json(), indent=2) + "\n").encode(), "--json")
