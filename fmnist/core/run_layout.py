"""The layout of run and search directories: the one place that names their files.

    <storage-path>/<name>/
      train_config.json     the run's recipe and placement (a resume keeps it)
      history.csv           one row per finished epoch
      loss_curve.png        the curves of history.csv
      events.out.tfevents.* TensorBoard (fmnist.core.tracking)
      mlflow_run.json       with --mlflow: the MLflow run it logs into
      checkpoint_*/         checkpoints (fmnist.core.checkpoints says what is in one)
    and from the pipeline: predictions/, report.json, confusion_matrix.png, mistakes.png

    <storage-path>/<name>/  of a search (fmnist tune)
      search_config.json    the search's settings and space (a resume keeps them)
      leaderboard.csv       one row per trial, best first
      best_config.json      the best trial's recipe, and its confirmation run
      trial_<id>/           each trial's run directory, as above
      confirm_seed<N>/      with --confirm: the best recipe retrained, as above
      tune_<id>/, ...       Ray Tune's own records of the trials and the search (a resume reads them)
"""

from __future__ import annotations

import csv
import io
from datetime import datetime

from fmnist.core.errors import InputError
from fmnist.core.storage import StoragePath, check_run_name

RUN_CONFIG_FILE = "train_config.json"
HISTORY_FILE = "history.csv"
LOSS_CURVE_FILE = "loss_curve.png"
MLFLOW_RUN_FILE = "mlflow_run.json"
PREDICTIONS_DIR = "predictions"
REPORT_FILE = "report.json"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
MISTAKES_FILE = "mistakes.png"
SEARCH_CONFIG_FILE = "search_config.json"
LEADERBOARD_FILE = "leaderboard.csv"
BEST_CONFIG_FILE = "best_config.json"
CHECKPOINT_METADATA_KEY = b"fmnist.checkpoint"  # predictions' Parquet schema metadata: the checkpoint that scored them
STOPPED_EARLY_COLUMN = "stopped_early"  # of history.csv in a run with --early-stopping: 1 on the epoch it stopped


def stopped_early(history: list[dict]) -> bool:
    """Whether a run's history (rows as read_history or the training loop give them) ends in an
    early stop: its last row says so (--early-stopping)."""
    return bool(history) and str(history[-1].get(STOPPED_EARLY_COLUMN, 0)) == "1"


def read_history(run_dir: StoragePath) -> list[dict[str, str]]:
    """The rows of a run's history.csv, as text; none for a run without one yet."""
    if not run_dir.child(HISTORY_FILE).exists():
        return []
    return list(csv.DictReader(io.StringIO(run_dir.read_text(HISTORY_FILE))))


def storage_root(storage_path: str) -> StoragePath:
    """--storage-path, which holds runs and searches: a directory (made if missing), not a file."""
    storage = StoragePath.parse(storage_path)
    if storage.is_file():
        raise InputError(f"--storage-path {storage.uri} is a file; pass a directory (it is made if missing)")
    return storage


def run_or_search_dir(storage: StoragePath, name: str | None, resume: bool, kind: str,
                      config_file: str) -> StoragePath:
    """The ``kind`` ("run" or "search") directory ``name`` under ``storage`` (by default named after the
    time): a new one, or with ``resume`` one that holds its ``config_file``."""
    name = name or datetime.now().strftime(("train" if kind == "run" else "tune") + "-%Y%m%d-%H%M%S")
    check_run_name(name)
    directory = storage.child(name)
    if not resume and directory.exists():
        raise InputError(f"{kind} directory {directory.uri} exists; pass --resume to continue it, or another --name")
    if resume and not directory.child(config_file).exists():
        raise InputError(f"--resume: {directory.uri} is not a {kind} directory (no {config_file})")
    return directory
