"""Experiment tracking: TensorBoard event files of every run, read back with TensorBoard's own
reader, and --mlflow refused in one line where MLflow is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.plugins.hparams import plugin_data_pb2

from fmnist.core.storage import StoragePath
from fmnist.core.tracking import MLFLOW_MISSING, TrainingTracker, scalar_tag
from fmnist.train.trainer import RECIPE_FIELDS

from conftest import REPO, tensorboard_events, tensorboard_scalars


def hparams_of(run_dir) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    """The HParams plugin's records in a run's event files, by tag (the first of each, as TensorBoard reads them)."""
    found = {}
    for event in tensorboard_events(run_dir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "hparams":
                found.setdefault(value.tag, plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content))
    return found


def test_every_run_writes_its_epochs_and_recipe_for_tensorboard(trained_run):
    scalars = tensorboard_scalars(trained_run.run_dir)
    (row,) = trained_run.history
    for key in ("train_loss", "test_loss", "test_accuracy", "samples_per_second", "train_seconds", "epoch_seconds"):
        assert scalars[scalar_tag(key)] == [(1, pytest.approx(row[key], rel=1e-6))], key
    assert {"loss/train", "loss/test", "accuracy/test"} <= set(scalars)
    assert scalars["lr"] == [(1, pytest.approx(0.002))]

    records = hparams_of(trained_run.run_dir)
    recipe = records["_hparams_/session_start_info"].session_start_info.hparams
    config = json.loads(open(os.path.join(trained_run.run_dir, "train_config.json")).read())
    assert set(recipe) == set(RECIPE_FIELDS)
    assert recipe["hidden"].string_value == "256,128,64" and recipe["schedule"].string_value == "constant"
    assert recipe["lr"].number_value == pytest.approx(config["lr"]) and recipe["epochs"].number_value == 1
    metrics = {m.name.tag for m in records["_hparams_/experiment"].experiment.metric_infos}
    assert metrics == {"loss/train", "loss/test", "accuracy/test"}  # shown with their last values
    assert records["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1 / epoch, "test_loss": 1.5 / epoch, "test_accuracy": 0.5 + epoch / 100,
            "val_loss": 1.4 / epoch, "val_accuracy": 0.4 + epoch / 100, "samples_per_second": 1000.0 * epoch}


@pytest.mark.slow
def test_a_remote_run_directory_gets_its_event_files_after_every_epoch_and_each_epoch_once(
        s3_server, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where MLflow puts a new experiment's artifacts (./mlruns)
    # A run directory on (a real S3 API's) object storage: files go up whole after each epoch.
    run_dir = StoragePath.parse(f"s3://{bucket}/runs/r")
    recipe = {"epochs": 3, "lr": 0.01, "hidden": (32, 16), "schedule": "cosine"}
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def seen():
        """What is on S3 now, fetched into a fresh local directory."""
        local = tmp_path / f"seen-{len(list(tmp_path.glob('seen-*')))}"
        local.mkdir()
        pafs.copy_files(run_dir.path, str(local), source_filesystem=run_dir.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local

    with TrainingTracker(run_dir, "r", recipe, lambda epoch: 0.01 / epoch, tracking_uri) as tracker:
        tracker.epochs([_row(1)])
        assert tensorboard_scalars(seen())["accuracy/test"] == [(1, pytest.approx(0.51))]
        # After a worker restart the history may come again, with an epoch the driver never saw.
        tracker.epochs([_row(1), _row(2), _row(3)])
        tracker.epochs([_row(1), _row(2), _row(3)])

    scalars = tensorboard_scalars(seen())
    assert [step for step, _ in scalars["accuracy/val"]] == [1, 2, 3]  # figures of any name: val_* too
    assert scalars["loss/val"][2] == (3, pytest.approx(1.4 / 3))
    assert scalars["lr"] == [(1, pytest.approx(0.01)), (2, pytest.approx(0.005)), (3, pytest.approx(0.01 / 3))]
    records = hparams_of(seen())
    assert records["_hparams_/session_start_info"].session_start_info.hparams["hidden"].string_value == "32,16"
    assert {m.name.tag for m in records["_hparams_/experiment"].experiment.metric_infos} == {
        "loss/train", "loss/test", "loss/val", "accuracy/test", "accuracy/val"}

    # A resumed run starts a new event file; what it logs follows on.
    with TrainingTracker(run_dir, "r", recipe, lambda epoch: 0.01, tracking_uri) as tracker:
        tracker.epochs([_row(1), _row(2), _row(3), _row(4)])
    now = seen()
    assert len(list(now.glob("events.out.tfevents.*"))) == 2
    assert [step for step, _ in tensorboard_scalars(now)["loss/test"]] == [1, 2, 3, 4]

    # MLflow: one run for both (re)starts, every epoch once, the recipe as params.
    client = MlflowClient(tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("fmnist").experiment_id])
    assert json.loads(run_dir.read_text("mlflow_run.json"))["run_id"] == logged.info.run_id
    assert logged.data.params == {"epochs": "3", "lr": "0.01", "hidden": "32,16", "schedule": "cosine"}
    history = client.get_metric_history(logged.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(e, pytest.approx(0.4 + e / 100)) for e in (1, 2, 3, 4)]
    assert logged.info.status == "FINISHED"


# Where MLflow is not installed: a finder that says so for it, as an environment without it would.
WITHOUT_MLFLOW = """
import sys, importlib.abc
class NoMlflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoMlflow())
import ray
def init(*args, **kwargs):  # to see that the refusal comes before Ray starts
    sys.exit("ray.init was called")
ray.init = init
from fmnist.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_mlflow_option_without_mlflow_is_one_error_line_before_anything_starts(real_data_dir, tmp_path, command):
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_MLFLOW, command, "--mlflow", "--epochs", "1", "--storage-path",
         str(tmp_path / "runs"), "--data-dir", str(real_data_dir)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {MLFLOW_MISSING}"]
    assert result.stdout == ""  # no "Training ..." line: Ray never started
    assert not (tmp_path / "runs").exists()
