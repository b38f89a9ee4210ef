"""The pipeline end to end on the real data: train -> score -> evaluate, into one run directory."""

import json

import mlflow.artifacts
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import fmnist
from fmnist.cli import main
from fmnist.core.data import load_test_split
from fmnist.core.model import normalize
from fmnist.train.trainer import RECIPE_FIELDS

from conftest import PNG_MAGIC, tensorboard_images


@pytest.mark.slow
def test_pipeline_leaves_everything_in_one_run_directory(ray_session, real_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where MLflow puts a new experiment's artifacts (./mlruns)
    # One epoch cannot reach 99%: the gate fails (exit 1) after all the work is written.
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a real local MLflow store, no server
    code = main(["pipeline", "--epochs", "1", "--storage-path", str(tmp_path), "--name", "p",
                 "--data-dir", str(real_data_dir), "--min-accuracy", "0.99", "--mlflow", tracking_uri])
    out, err = capsys.readouterr()
    assert code == 1 and "below --min-accuracy 0.99" in err
    run = tmp_path / "p"
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 2
    trained_accuracy = float(history[1].split(",")[3])

    predictions = pq.read_table(run / "predictions")
    assert predictions.num_rows == 10_000
    report = json.loads((run / "report.json").read_text())
    assert report["n"] == 10_000
    # What evaluation computes from the Parquet is what training reported for that checkpoint.
    assert abs(report["accuracy"] - trained_accuracy) <= 1e-4
    for png in ("loss_curve.png", "confusion_matrix.png", "mistakes.png"):
        assert (run / png).read_bytes()[:8] == PNG_MAGIC
    assert "Shirt" in out and "T-shirt/top" in out  # the report's class names
    assert f"mistakes: {run / 'mistakes.png'}" in out
    # The plots are in TensorBoard too, at the last epoch, as the PNGs in the run directory.
    assert tensorboard_images(run) == {"confusion_matrix": (1, (run / "confusion_matrix.png").read_bytes()),
                      "mistakes": (1, (run / "mistakes.png").read_bytes())}

    # What MLflow's own client reads back of the run.
    client = MlflowClient(tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("fmnist").experiment_id])
    run_id = logged.info.run_id
    assert logged.info.run_name == "p" and logged.info.status == "FINISHED"
    config = json.loads((run / "train_config.json").read_text())
    assert set(logged.data.params) == set(RECIPE_FIELDS)
    assert logged.data.params["lr"] == str(config["lr"]) and logged.data.params["hidden"] == "256,128,64"
    for key in ("train_loss", "test_loss", "test_accuracy", "samples_per_second", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1], key
    assert client.get_metric_history(run_id, "test_accuracy")[0].value == trained_accuracy
    assert logged.data.metrics["evaluation_accuracy"] == report["accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "loss_curve.png", "history.csv", "report.json", "confusion_matrix.png",
            "mistakes.png"} <= artifacts
    report_copy = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report.json",
                                                      tracking_uri=tracking_uri, dst_path=str(tmp_path / "dl"))
    assert json.loads(open(report_copy).read()) == report

    # The logged model, as a user gets it back, scores exactly as the run's best checkpoint.
    checkpoint = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint",
                                                     tracking_uri=tracking_uri, dst_path=str(tmp_path / "dl"))
    images, _ = load_test_split(real_data_dir)
    batch = normalize(torch.from_numpy(images), fmnist.load_model(run).config)
    with torch.no_grad():
        assert torch.equal(fmnist.load_model(checkpoint)(batch), fmnist.load_model(run)(batch))

