"""Ray Train's local mode, as a user meets it: `fmnist train` on one's own machine with no
RAY_ADDRESS, through the CLI in a process of its own. It gets the tests the Ray path has: Ctrl-C
and resume to the same figures, validation and best-K, an S3 run directory, tracking, a run
directory that stops taking writes; and a run it wrote must not matter to score or to a resume
on Ray Train's workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from fmnist.core.checkpoints import METRICS_FILE, MODEL_FILE, resolve_checkpoint
from fmnist.core.storage import StoragePath

from conftest import (REPO, break_once_written, interrupt, local_env, short_ray_tmpdir, start, tensorboard_scalars,
                      wait_until)
from test_training import read_history


def fmnist(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmnist", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def ray_sessions(ray_tmpdir: str) -> list[Path]:
    return list(Path(ray_tmpdir).glob("ray/session_*"))


@pytest.mark.slow
def test_ctrl_c_then_resume_gives_the_figures_of_an_uninterrupted_run_and_ray_train_can_go_on(
        real_data_dir, tmp_path):
    options = ["--epochs", "3", "--schedule", "cosine", "--cpus-per-worker", "1", "--seed", "7",
               "--storage-path", str(tmp_path), "--data-dir", str(real_data_dir)]
    with short_ray_tmpdir() as ray_tmpdir:
        env = local_env(ray_tmpdir)
        proc = start([sys.executable, "-m", "fmnist", "train", *options, "--name", "cut"], env=env, cwd=REPO)
        wait_until(proc, (tmp_path / "cut" / "history.csv").exists)
        output = interrupt(proc, within_s=30)
        assert proc.returncode == 130, output
        assert "--resume" in output and len(read_history(tmp_path / "cut")) < 3
        done = fmnist("train", "--resume", "--name", "cut", *options[-4:], env=env)
        assert done.returncode == 0, done.stderr
        whole = fmnist("train", *options, "--name", "whole", env=env)
        assert whole.returncode == 0, whole.stderr
        assert ray_sessions(ray_tmpdir) == []  # local mode started no Ray instance, in any of the three

        resumed, uninterrupted = read_history(tmp_path / "cut"), read_history(tmp_path / "whole")
        assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
        for got, want in zip(resumed, uninterrupted):
            for key in ("train_loss", "test_loss", "test_accuracy"):
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), (got["epoch"], key)

        # The run that local mode wrote goes on on Ray Train's workers (an embedded Ray), from its
        # latest checkpoint, which Ray Train itself never saw.
        more = fmnist("train", "--resume", "--name", "cut", "--epochs", "4", "--num-workers", "2", *options[-4:],
                      env=env)
        assert more.returncode == 0, more.stderr
        assert ray_sessions(ray_tmpdir)
    assert [r["epoch"] for r in read_history(tmp_path / "cut")] == ["1", "2", "3", "4"]
    assert [step for step, _ in tensorboard_scalars(tmp_path / "cut")["accuracy/test"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_validation_best_k_an_s3_run_directory_and_tracking(real_data_dir, s3_server, bucket, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = f"s3://{bucket}/runs/v"
    with short_ray_tmpdir() as ray_tmpdir:
        env = local_env(ray_tmpdir, s3_server.env)
        done = fmnist("train", "--epochs", "3", "--hidden", "64", "--validation", "1000", "--keep", "1",
                      "--storage-path", f"s3://{bucket}/runs", "--name", "v", "--mlflow", tracking_uri,
                      "--data-dir", str(real_data_dir), env=env)
        assert done.returncode == 0, done.stderr
        assert ray_sessions(ray_tmpdir) == []
        for name, value in s3_server.env.items():  # for this process's own reads of the bucket
            os.environ.setdefault(name, value)
        local = tmp_path / "seen"
        remote = StoragePath.parse(run)
        pafs.copy_files(remote.path, str(local), source_filesystem=remote.fs,
                        destination_filesystem=pafs.LocalFileSystem())

        history = read_history(local)
        assert [r["epoch"] for r in history] == ["1", "2", "3"] and all(r["val_accuracy"] for r in history)
        # --keep 1: the best by validation accuracy, and the latest; each checkpoint written whole.
        checkpoints = sorted(local.glob("checkpoint_*"))
        epochs = {json.loads((c / METRICS_FILE).read_text())["epoch"] for c in checkpoints}
        best = max(history, key=lambda r: (float(r["val_accuracy"]), int(r["epoch"])))
        assert epochs == {int(best["epoch"]), 3}
        assert all((c / MODEL_FILE).exists() for c in checkpoints)
        assert json.loads(resolve_checkpoint(run).read_text(METRICS_FILE))["epoch"] == int(best["epoch"])
        assert [step for step, _ in tensorboard_scalars(local)["accuracy/val"]] == [1, 2, 3]

        client = MlflowClient(tracking_uri)
        (logged,) = client.search_runs([client.get_experiment_by_name("fmnist").experiment_id])
        assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_accuracy")] == [1, 2, 3]
        assert logged.info.status == "FINISHED"

        # score takes the run as it takes one of Ray Train's.
        scored = fmnist("score", "--checkpoint", run, "--output", str(tmp_path / "p"),
                        "--data-dir", str(real_data_dir), env=env)
        assert scored.returncode == 0, scored.stderr
    assert pq.read_table(tmp_path / "p").num_rows == 10_000


@pytest.mark.slow
def test_a_run_directory_that_stops_taking_writes_stops_the_run_with_one_line(real_data_dir, tmp_path):
    history = tmp_path / "broken" / "history.csv"

    break_once_written(history)  # once epoch 1 is written, history.csv can no longer be replaced
    with short_ray_tmpdir() as ray_tmpdir:
        done = fmnist("train", "--epochs", "20", "--keep", "20", "--storage-path", str(tmp_path), "--name", "broken",
                      "--data-dir", str(real_data_dir), env=local_env(ray_tmpdir))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: cannot write {history} (Is a directory); "
                                        "pass a --storage-path you can write to"]
    checkpoints = [p for p in history.parent.iterdir() if p.name.startswith("checkpoint_")]
    assert 1 <= len(checkpoints) < 20  # the run stopped there, its checkpoints kept for a resume
