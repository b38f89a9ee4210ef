"""Failures as they happen on clusters: a worker killed mid-run, resources that are not there."""

from __future__ import annotations

import csv
import signal
import sys
import time

import psutil
import pytest

from fmnist.cli import main

from conftest import REPO, one_error_line, start, wait_until


def children_running(pid: int, name: str) -> list[psutil.Process]:
    """The descendants of ``pid`` whose command line names ``name``, but for the tasks that only submit to
    such an actor, and for those that just ended."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if name in " ".join(p.cmdline()) and ".submit" not in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def _epochs_recorded(run_dir) -> list[str]:
    try:
        with open(run_dir / "history.csv") as f:
            return [row["epoch"] for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []


def _kill_a_worker_after_epoch_1(real_data_dir, tmp_path, max_failures: int) -> tuple[int, str]:
    """A 3-epoch, 2-worker training (its own process) whose second worker is killed once epoch 1 is
    recorded; its exit status and output."""
    proc = start([sys.executable, str(REPO / "workflows" / "train.py"), "--epochs", "3", "--num-workers", "2",
                  "--cpus-per-worker", "1", "--max-failures", str(max_failures), "--storage-path", str(tmp_path),
                  "--name", "ft", "--data-dir", str(real_data_dir)])
    wait_until(proc, lambda: _epochs_recorded(tmp_path / "ft"))
    workers = children_running(proc.pid, "RayTrainWorker")
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    assert proc.poll() is None and len(_epochs_recorded(tmp_path / "ft")) < 3  # the kill landed mid-run
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_every_epoch_is_recorded_once(real_data_dir, tmp_path):
    code, output = _kill_a_worker_after_epoch_1(real_data_dir, tmp_path, max_failures=2)
    assert code == 0, output
    assert _epochs_recorded(tmp_path / "ft") == ["1", "2", "3"]


@pytest.mark.slow
def test_a_failure_beyond_max_failures_is_one_error_line_saying_how_to_resume(real_data_dir, tmp_path):
    code, output = _kill_a_worker_after_epoch_1(real_data_dir, tmp_path, max_failures=0)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith("error: training failed (") and "--resume" in errors[0] and "--name ft" in errors[0]


@pytest.mark.parametrize("command, asked, has", [
    # On GPUs, by default one worker or model actor per GPU there is, and at least one.
    (["train", "--use-gpu"], "1 GPU", "0 GPU"),
    (["train", "--use-gpu", "--num-workers", "2"], "2 GPU", "0 GPU"),
    (["train", "--num-workers", "40", "--no-gpu"], "40 CPU", "6 CPU"),
    (["score", "--use-gpu"], "1 GPU", "0 GPU"),
])
def test_asking_for_what_the_cluster_lacks_fails_fast_with_one_line(
        ray_session, trained_run, real_data_dir, tmp_path, capsys, command, asked, has):
    if command[0] == "train":
        options = ["--storage-path", str(tmp_path)]
    else:
        options = ["--checkpoint", trained_run.run_dir, "--output", str(tmp_path / "predictions")]
    started = time.monotonic()
    code = main([*command, *options, "--resource-timeout", "3", "--data-dir", str(real_data_dir)])
    err = one_error_line(capsys)
    assert code == 2 and time.monotonic() - started < 60
    assert f"needs {asked}" in err and f"has {has}" in err


@pytest.mark.slow
def test_a_killed_scoring_task_is_retried_and_every_row_written_once(trained_run, real_data_dir, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fmnist.core.data import load_test_split

    images, labels = load_test_split(real_data_dir)
    repeats = 20  # 200,000 rows: long enough to kill a scoring task mid-job
    table = pa.table({
        "image": pa.FixedSizeListArray.from_arrays(pa.array(np.tile(images.reshape(-1), repeats)), 784),
        "label": pa.array(np.tile(labels, repeats)),
    })
    pq.write_table(table, tmp_path / "input.parquet", row_group_size=10_000)
    output = tmp_path / "predictions"
    proc = start([sys.executable, str(REPO / "workflows" / "score.py"), "--checkpoint", trained_run.run_dir,
                  "--input", str(tmp_path / "input.parquet"), "--output", str(output), "--concurrency", "2",
                  "--batch-size", "1000"])
    wait_until(proc, lambda: children_running(proc.pid, "_score_on_cpu"))  # a Ray worker's title names its task
    tasks = children_running(proc.pid, "_score_on_cpu")
    wait_until(proc, lambda: tasks[0].cpu_times().user >= 1.0)  # it has scored a while: batches are done
    tasks[0].send_signal(signal.SIGKILL)
    assert proc.poll() is None and not output.exists()  # the kill landed mid-job
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    ids = pq.read_table(output, columns=["id"])["id"].to_numpy()
    assert len(ids) == len(table) and len(np.unique(ids)) == len(table)
