"""The run directory's layout: the one place that names its files.

    <storage-path>/<name>/
      train_config.json     the run's recipe and placement (a resume keeps it)
      history.csv           one row per finished epoch
      loss_curve.png        the curves of history.csv
      events.out.tfevents.* TensorBoard (fmnist.tracking)
      mlflow_run.json       with --mlflow: the MLflow run it logs into
      checkpoint_*/         checkpoints (fmnist.checkpoints says what is in one)
    and from the pipeline: predictions/, report.json, confusion_matrix.png, mistakes.png
"""

from __future__ import annotations

import csv
import io

from fmnist.storage import StoragePath

RUN_CONFIG_FILE = "train_config.json"
HISTORY_FILE = "history.csv"
LOSS_CURVE_FILE = "loss_curve.png"
MLFLOW_RUN_FILE = "mlflow_run.json"
PREDICTIONS_DIR = "predictions"
REPORT_FILE = "report.json"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
MISTAKES_FILE = "mistakes.png"
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
