"""Experiment tracking from the driver: TensorBoard event files, always, and MLflow when asked.

Every run writes TensorBoard event files into its run directory (written with tensorboardX's
FileWriter): each epoch's figures as scalars, with the epoch as the
step, and at the end the recipe with the final figures for the HParams view. Each (re)start
writes a new event file beside the earlier ones; an epoch is written once, by the process
that reported it first. On object storage the event files are written in a local temporary
directory and uploaded after every epoch.

With ``--mlflow [TRACKING_URI]`` the same figures go to an MLflow run, with the recipe as
params and the best checkpoint (a directory ``fmnist.load_model`` reads), the loss curve and,
in the pipeline, the report files as artifacts. The run's id is kept in the run directory so
that a resume and the pipeline's evaluation log into the same MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from fmnist.core.errors import InputError, error_line
from fmnist.core.run_layout import HISTORY_FILE, LOSS_CURVE_FILE, MLFLOW_RUN_FILE, RUN_CONFIG_FILE
from fmnist.core.storage import StoragePath

MLFLOW_EXPERIMENT = "fmnist"  # unless MLFLOW_EXPERIMENT_NAME names another
MLFLOW_MISSING = "--mlflow needs MLflow, which is not installed; install it in the checkout with: pip install -e '.[mlflow]'"
CHECKPOINT_ARTIFACT = "checkpoint"  # the best checkpoint's artifact directory
RUN_ARTIFACTS = (LOSS_CURVE_FILE, HISTORY_FILE, RUN_CONFIG_FILE)  # run files logged to MLflow at the end
_SPLIT_FIGURE = re.compile(r"(train|val|test)_(loss|accuracy)")


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of an epoch figure: "test_loss" -> "loss/test", so that splits sit together."""
    match = _SPLIT_FIGURE.fullmatch(key)
    return f"{match[2]}/{match[1]}" if match else key


def check_mlflow(tracking_uri: str | None) -> None:
    """Refuse --mlflow where MLflow is not installed (before Ray starts)."""
    if tracking_uri is None:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise InputError(MLFLOW_MISSING) from None


def _hparam(value):
    """A recipe value as TensorBoard's HParams view takes it (numbers, strings, booleans)."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "none" if value is None else value


class _EventFiles:
    """One TensorBoard event file of a run directory, written locally and uploaded when it is not."""

    def __init__(self, run_dir: StoragePath):
        from tensorboardX import FileWriter

        self.run_dir = run_dir
        self.local_dir = run_dir.path if run_dir.is_local else tempfile.mkdtemp(prefix="fmnist-tensorboard-")
        # A suffix of our own: tensorboardX names files by the second, and a resume or the
        # pipeline's evaluation may open another one within it. Its thread writes each event
        # within a second.
        self.writer = FileWriter(self.local_dir, flush_secs=1, filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def add(self, summary, step: int) -> None:
        self.writer.add_summary(summary, step)

    def flush(self) -> None:
        """Upload what is written so far (object storage): the writer's thread may still hold the
        latest events, which the next flush or close() uploads."""
        self.writer.flush()
        if not self.run_dir.is_local:
            self._upload()

    def close(self) -> None:
        self.writer.close()  # every event written
        if not self.run_dir.is_local:
            self._upload()
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def _upload(self) -> None:
        for name in os.listdir(self.local_dir):
            self.run_dir.write(name, Path(self.local_dir, name).read_bytes())


def _image_summary(tag: str, png: bytes):
    from PIL import Image
    from tensorboardX.proto.summary_pb2 import Summary

    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    return Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=height, width=width, colorspace=4, encoded_image_string=png))])


class _MlflowRun:
    """The MLflow run a run directory logs into, through MLflow's client (no global active run)."""

    def __init__(self, run_dir: StoragePath, tracking_uri: str, name: str):
        from mlflow.exceptions import MlflowException

        for logger in ("mlflow", "alembic"):  # their INFO lines (creating a database, ...) are not ours to show
            logging.getLogger(logger).setLevel(logging.WARNING)
        tracking_uri = resolve_tracking_uri(tracking_uri)
        try:
            self._open(run_dir, tracking_uri, name)
        except MlflowException as e:  # an unknown scheme, a server that is not there, ...
            raise InputError(f"--mlflow {tracking_uri}: {error_line(e, first=True)[:300]}") from None

    def _open(self, run_dir: StoragePath, tracking_uri: str, name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        saved = _saved_mlflow_run(run_dir)
        self.resumed = saved.get("tracking_uri") == tracking_uri and self._exists(saved.get("run_id"))
        if self.resumed:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = _experiment_id(self.client)
            run = self.client.create_run(experiment_id, run_name=name, tags={"fmnist.run_dir": run_dir.uri})
            self.run_id = run.info.run_id
            run_dir.write(MLFLOW_RUN_FILE, json.dumps({"tracking_uri": tracking_uri, "run_id": self.run_id}).encode())

    def _exists(self, run_id: str | None) -> bool:
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(_hparam(v))) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_file(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="fmnist-mlflow-") as tmp:
            Path(tmp, name).write_bytes(data)
            self.client.log_artifact(self.run_id, str(Path(tmp, name)))

    def log_checkpoint(self, checkpoint: StoragePath) -> None:
        """The checkpoint directory as the artifact directory CHECKPOINT_ARTIFACT (fetched first from object storage)."""
        if isinstance(checkpoint.fs, pafs.LocalFileSystem):
            self.client.log_artifacts(self.run_id, checkpoint.path, CHECKPOINT_ARTIFACT)
            return
        with tempfile.TemporaryDirectory(prefix="fmnist-checkpoint-") as tmp:
            pafs.copy_files(checkpoint.path, tmp, source_filesystem=checkpoint.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            self.client.log_artifacts(self.run_id, tmp, CHECKPOINT_ARTIFACT)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _experiment_id(client) -> str:
    """The id of the experiment runs go to ($MLFLOW_EXPERIMENT_NAME, else MLFLOW_EXPERIMENT), made if missing."""
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(experiment)


def prepare_mlflow(tracking_uri: str) -> str:
    """For a search, on its driver: the tracking URI its trials log to (absolute), and the experiment
    made here, so that trials do not race to make it and its artifacts go where the user ran the search."""
    from mlflow.tracking import MlflowClient

    tracking_uri = resolve_tracking_uri(tracking_uri)
    _experiment_id(MlflowClient(tracking_uri))
    return tracking_uri


def resolve_tracking_uri(tracking_uri: str) -> str:
    """``tracking_uri``, or where empty MLflow's own choice: $MLFLOW_TRACKING_URI, else its local
    default (relative to here: made absolute)."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if not re.match(r"^[a-z][a-z0-9+.-]*:", uri):  # a plain path
        return Path(uri).absolute().as_uri()
    return uri


def _saved_mlflow_run(run_dir: StoragePath) -> dict:
    try:
        return json.loads(run_dir.read_text(MLFLOW_RUN_FILE))
    except (OSError, ValueError):
        return {}


class TrainingTracker:
    """What one training (re)start logs: a context manager around the run, fed each epoch's history."""

    def __init__(self, run_dir: StoragePath, name: str, recipe: dict, learning_rate: Callable[[int], float],
                 mlflow_uri: str | None = None):
        self.run_dir, self.recipe, self.learning_rate = run_dir, recipe, learning_rate
        self.events = _EventFiles(run_dir)
        self.mlflow = _MlflowRun(run_dir, mlflow_uri, name) if mlflow_uri is not None else None
        if self.mlflow and not self.mlflow.resumed:
            self.mlflow.log_params(recipe)
        self.last_epoch: int | None = None  # the last epoch logged by this process
        self.final: dict = {}  # the last epoch's figures, by tag

    def __enter__(self) -> "TrainingTracker":
        return self

    def epochs(self, history: list[dict]) -> None:
        """Log the epochs of ``history`` not logged yet: the new one, or after a worker restart, any it skipped."""
        if self.last_epoch is None:  # earlier epochs were logged by the (re)start that ran them
            self.last_epoch = history[-1]["epoch"] - 1
        from tensorboardX.summary import scalar

        for row in history:
            epoch = row["epoch"]
            if epoch <= self.last_epoch:
                continue
            figures = {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}
            figures["lr"] = self.learning_rate(epoch)
            for key, value in figures.items():
                self.events.add(scalar(scalar_tag(key), value), epoch)
                self.final[scalar_tag(key)] = value
            self._to_mlflow(lambda run: run.log_metrics(figures, step=epoch))
            self.last_epoch = epoch
        self.events.flush()

    def finish(self, best_checkpoint: StoragePath) -> None:
        """At the end of a run: the best checkpoint and the run's files as MLflow artifacts."""
        def log(run: _MlflowRun) -> None:
            run.log_checkpoint(best_checkpoint)
            for name in RUN_ARTIFACTS:
                if self.run_dir.child(name).exists():
                    with self.run_dir.fs.open_input_stream(self.run_dir.child(name).path) as f:
                        run.log_file(name, f.read())

        self._to_mlflow(log)

    def _to_mlflow(self, log: Callable[[_MlflowRun], None]) -> None:
        """Log to the MLflow run, if any; trouble there mid-run (a server gone) does not stop training."""
        if self.mlflow is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            log(self.mlflow)
        except (MlflowException, OSError) as e:  # OSError: requests' connection errors
            print(f"warning: logging to MLflow failed ({error_line(e, first=True)[:300]}); the run goes on without it",
                  file=sys.stderr)
            self.mlflow = None

    def __exit__(self, kind, error, traceback) -> None:
        if self.final:
            self._write_hparams()
        self.events.close()
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        status = "FINISHED" if kind is None else "KILLED" if interrupted else "FAILED"
        self._to_mlflow(lambda run: run.end(status))

    def _write_hparams(self) -> None:
        """The recipe, with the run's loss and accuracy tags as its metrics (HParams shows their last values)."""
        from tensorboardX.summary import hparams

        metrics = {tag: None for tag in self.final if tag.startswith(("loss/", "accuracy/"))}
        for summary in hparams({k: _hparam(v) for k, v in self.recipe.items()}, metrics):
            self.events.add(summary, self.last_epoch)


def log_evaluation(run_dir: StoragePath, step: int, images: dict[str, bytes], files: dict[str, bytes],
                   metrics: dict[str, float], mlflow_uri: str | None = None) -> None:
    """After the pipeline's evaluation: ``images`` (tag -> PNG) into TensorBoard at ``step``; and with
    ``mlflow_uri``, ``metrics`` and ``files`` (name -> content) into the run's MLflow run."""
    events = _EventFiles(run_dir)
    try:
        for tag, png in images.items():
            events.add(_image_summary(tag, png), step)
    finally:
        events.close()
    if mlflow_uri is None:
        return
    mlflow_run = _MlflowRun(run_dir, mlflow_uri, run_dir.path.rsplit("/", 1)[-1])
    mlflow_run.log_metrics(metrics, step=step)
    for name, data in files.items():
        mlflow_run.log_file(name, data)
    mlflow_run.end("FINISHED")
