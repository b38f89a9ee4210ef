"""The laptop path: the CLI as a user runs it, with no RAY_ADDRESS, each command on an embedded Ray
of its own where it uses Ray (training in local mode and on 2 workers: tests/test_smoke.py).

The rest of the suite shares one Ray instance, which the code rightly takes for a cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import IMPORTS_SHOWN, REPO, local_env


def run_python(*args: str, ray_tmpdir: str | None = None) -> subprocess.CompletedProcess:
    # RAY_TMPDIR: where its Ray keeps its session (logs, one file per worker process), each process's
    # imports (PYTHONPROFILEIMPORTTIME) into its stderr log.
    env = local_env(ray_tmpdir, {"PYTHONPROFILEIMPORTTIME": "1"}) if ray_tmpdir else local_env()
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def run_cli(*args: str, ray_tmpdir: str | None = None) -> subprocess.CompletedProcess:
    return run_python(str(REPO / "workflows" / "train.py"), *args, ray_tmpdir=ray_tmpdir)


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
