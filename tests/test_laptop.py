"""The laptop path: the CLI as a user runs it, with no RAY_ADDRESS: training in Ray Train's local
mode (no Ray instance), and --num-workers N, scoring and the rest on an embedded Ray of its own.

The rest of the suite shares one Ray instance, which the code rightly takes for a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, local_env, short_ray_tmpdir, worker_processes


def run_python(*args: str, ray_tmpdir: str | None = None) -> subprocess.CompletedProcess:
    # RAY_TMPDIR: where its Ray keeps its session (logs, one file per worker process), each process's
    # imports (PYTHONPROFILEIMPORTTIME) into its stderr log.
    env = local_env(ray_tmpdir, {"PYTHONPROFILEIMPORTTIME": "1"}) if ray_tmpdir else local_env()
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def run_cli(*args: str, ray_tmpdir: str | None = None) -> subprocess.CompletedProcess:
    return run_python(str(REPO / "workflows" / "train.py"), *args, ray_tmpdir=ray_tmpdir)


# Runs an fmnist command line in a process of its own, and says which of torch and Ray it imported.
IMPORTS_SHOWN = ("import sys; from fmnist.cli import main; code = main(sys.argv[1:]); "
                 "print('imported:', sorted({'torch', 'ray'} & sys.modules.keys())); sys.exit(code)")


@pytest.mark.slow
def test_training_defaults_to_local_mode_with_every_core_and_starts_no_ray(real_data_dir, tmp_path):
    with short_ray_tmpdir() as session_dir:
        done = run_python("-c", IMPORTS_SHOWN, "train", "--epochs", "1", "--storage-path", str(tmp_path),
                          "--name", "laptop", "--data-dir", str(real_data_dir), ray_tmpdir=session_dir)
        sessions = list(Path(session_dir).glob("ray/session_*"))
    assert done.returncode == 0, done.stderr
    assert sessions == []  # no Ray instance: the loop ran in this process (Ray Train's local mode)
    assert "imported: ['ray', 'torch']" in done.stdout
    cores = os.cpu_count()
    saved = json.loads((tmp_path / "laptop" / "train_config.json").read_text())
    assert (saved["num_workers"], saved["use_gpu"], saved["cpus_per_worker"]) == (1, False, cores)
    shown = " ".join(done.stdout.split())  # rich wraps long lines where stdout is no terminal
    assert f"on 1 worker in Ray Train's local mode (CPU, {cores} threads; no Ray instance" in shown
    assert len(list((tmp_path / "laptop").glob("checkpoint_*/model.safetensors"))) == 1
    assert "INFO" not in done.stdout + done.stderr  # Ray's log lines stay off the terminal


@pytest.mark.slow
def test_two_workers_on_ones_own_machine_run_on_an_embedded_ray(real_data_dir, tmp_path):
    with short_ray_tmpdir() as session_dir:
        done = run_python("-c", IMPORTS_SHOWN, "train", "--epochs", "1", "--num-workers", "2", "--storage-path",
                          str(tmp_path), "--name", "ddp", "--data-dir", str(real_data_dir), ray_tmpdir=session_dir)
        processes = worker_processes(session_dir)
    assert done.returncode == 0, done.stderr
    actors = {ran[0] for ran, _ in processes if ran}
    assert {"TrainController", "RayTrainWorker"} <= actors, actors
    saved = json.loads((tmp_path / "ddp" / "train_config.json").read_text())
    assert (saved["num_workers"], saved["cpus_per_worker"]) == (2, max(1, os.cpu_count() // 2))
    history = (tmp_path / "ddp" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and history[1].startswith("1,")


@pytest.mark.slow
def test_asking_for_more_than_the_machine_has_fails_at_once_with_one_line(real_data_dir, tmp_path):
    cores = os.cpu_count()
    for workers in ("1", "2"):  # local mode, and an embedded Ray
        done = run_cli("--num-workers", workers, "--cpus-per-worker", "512", "--storage-path", str(tmp_path),
                       "--data-dir", str(real_data_dir))
        assert done.returncode == 2
        assert done.stderr.splitlines() == [
            f"error: training with {workers} worker{'s' * (workers != '1')} needs {512 * int(workers)} CPU but this "
            f"machine has {cores} CPU; ask for fewer (--num-workers, --cpus-per-worker)"]  # no nodes to add here
        assert "Waiting" not in done.stdout  # no autoscaler to wait for on one's own machine


@pytest.mark.slow
def test_scoring_on_cpus_never_imports_torch_and_evaluating_neither_torch_nor_ray(trained_run, real_data_dir,
                                                                                   tmp_path):
    # torch's import is 1.5 s of a process's start; the checkpoint is read and run in numpy.
    done = run_python("-c", IMPORTS_SHOWN, "score", "--checkpoint", trained_run.run_dir,
                      "--output", str(tmp_path / "p"), "--data-dir", str(real_data_dir))
    assert done.returncode == 0, done.stderr
    assert "imported: ['ray']" in done.stdout
    assert sum(pq.read_metadata(f).num_rows for f in (tmp_path / "p").glob("*.parquet")) == 10_000
    done = run_python("-c", IMPORTS_SHOWN, "evaluate", str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout and "Classification report" in done.stdout


@pytest.mark.parametrize("argv", [["train", "--epochs", "0"], ["pipeline", "--lr", "-1"], ["tune", "--trials", "0"]])
def test_a_usage_error_is_told_without_importing_torch_or_ray(argv):
    done = run_python("-c", IMPORTS_SHOWN, *argv)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "imported: []" in done.stdout
