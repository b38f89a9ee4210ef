"""The pipeline end to end on the real data: train -> score -> evaluate, into one run directory."""

import json

import pyarrow.parquet as pq

from fmnist.cli import main

from conftest import PNG_MAGIC


def test_pipeline_leaves_everything_in_one_run_directory(ray_session, real_data_dir, tmp_path, capsys):
    # One epoch cannot reach 99%: the gate fails (exit 1) after all the work is written.
    code = main(["pipeline", "--epochs", "1", "--storage-path", str(tmp_path), "--name", "p",
                 "--data-dir", str(real_data_dir), "--min-accuracy", "0.99"])
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
    for png in ("loss_curve.png", "confusion_matrix.png"):
        assert (run / png).read_bytes()[:8] == PNG_MAGIC
    assert "Shirt" in out and "T-shirt/top" in out  # the report's class names

