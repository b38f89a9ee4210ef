"""The smoke tier: the everyday commands, as a user runs them on their own machine, end to end.

CI runs it on the oldest Ray that pyproject admits, in a venv of its own (`pytest -m smoke`), and
with the rest of the suite on the newest. Each command runs in a process of its own, with no
RAY_ADDRESS: training in local mode, then on 2 workers (an embedded Ray), scoring, evaluating, a
tiny search, and serving."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from conftest import (IMPORTS_SHOWN, free_port, interrupt, local_env, pyproject, request, short_ray_tmpdir, start,
                      wait_until, worker_processes)

pytestmark = pytest.mark.smoke


def fmnist(*args: str, cwd=None, ray_tmpdir: str | None = None) -> subprocess.CompletedProcess:
    """``python -m fmnist ARGS`` (or ``python -c CODE ARGS``), as a user runs it on their own machine."""
    command = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "fmnist", *args]
    done = subprocess.run(command, env=local_env(ray_tmpdir), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"fmnist {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_train_in_local_mode_and_on_two_workers_then_score_and_evaluate(real_data_dir, tmp_path):
    data = ["--data-dir", str(real_data_dir)]
    with short_ray_tmpdir() as session_dir:
        # 1 worker, the default on one's own machine: Ray Train's local mode, every core, no Ray instance.
        local = fmnist("-c", IMPORTS_SHOWN, "train", "--epochs", "1", "--storage-path", str(tmp_path),
                       "--name", "local", *data, ray_tmpdir=session_dir)
        assert list(Path(session_dir).glob("ray/session_*")) == []
        # --num-workers 2: DDP on an embedded Ray of its own, the workers sharing the cores.
        fmnist("train", "--epochs", "1", "--num-workers", "2", "--storage-path", str(tmp_path), "--name", "ddp",
               *data, ray_tmpdir=session_dir)
        actors = {ran[0] for ran, _ in worker_processes(session_dir) if ran}
    assert "imported: ['ray', 'torch']" in local.stdout
    cores = os.cpu_count()
    shown = " ".join(local.stdout.split())  # rich wraps long lines where stdout is no terminal
    assert f"on 1 worker in Ray Train's local mode (CPU, {cores} threads; no Ray instance" in shown
    assert "INFO" not in local.stdout + local.stderr  # Ray's log lines stay off the terminal
    assert {"TrainController", "RayTrainWorker"} <= actors, actors
    for run, placement in (("local", (1, False, cores)), ("ddp", (2, False, max(1, cores // 2)))):
        saved = json.loads((tmp_path / run / "train_config.json").read_text())
        assert (saved["num_workers"], saved["use_gpu"], saved["cpus_per_worker"]) == placement
        history = (tmp_path / run / "history.csv").read_text().splitlines()
        assert len(history) == 2 and float(history[1].split(",")[3]) > 0.8, (run, history)
    assert len(list((tmp_path / "local").glob("checkpoint_*/model.safetensors"))) == 1

    fmnist("score", "--checkpoint", str(tmp_path / "ddp"), "--output", str(tmp_path / "predictions"), *data)
    assert pq.read_table(tmp_path / "predictions").num_rows == 10_000
    shown = fmnist("evaluate", str(tmp_path / "predictions"), "--json", str(tmp_path / "report.json"))
    assert "Classification report" in shown.stdout
    assert json.loads((tmp_path / "report.json").read_text())["accuracy"] > 0.8


@pytest.mark.slow
def test_a_tiny_search(real_data_dir, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"depth": 1, "width": {"choice": [16, 32]}, "lr": {"loguniform": [1e-4, 0.005]}}))
    done = fmnist("tune", "--trials", "4", "--max-epochs", "3", "--grace-period", "1", "--concurrency", "2",
                  "--validation", "1000", "--space", str(space), "--storage-path", str(tmp_path), "--name", "s",
                  "--data-dir", str(real_data_dir), cwd=tmp_path)
    assert "reproduce it with" in done.stdout
    board = (tmp_path / "s" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 5, board


def test_serve_answers_a_prediction_and_stops_on_ctrl_c(real_data_dir, tmp_path):
    from PIL import Image

    from fmnist.core.data import load_test_split

    fmnist("train", "--epochs", "1", "--storage-path", str(tmp_path), "--name", "run", "--data-dir", str(real_data_dir))
    images, labels = load_test_split(real_data_dir)
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    port = free_port()
    answers = []

    def answered() -> bool:
        try:
            answers.append(request(f"http://127.0.0.1:{port}/predict", png.getvalue(), "image/png", timeout_s=5))
        except OSError:
            return False
        return answers[-1][0] == 200  # before the application is up, the proxy answers 404

    with short_ray_tmpdir() as ray_tmpdir:
        proc = start([sys.executable, "-m", "fmnist", "serve", "--checkpoint", str(tmp_path / "run"),
                      "--port", str(port)], env=local_env(ray_tmpdir))
        wait_until(proc, answered, timeout_s=180, poll_s=0.5)
        output = interrupt(proc, within_s=30)
    assert proc.returncode == 130, output
    answer = answers[-1][1]
    assert answer["label"] == labels[0] and len(answer["probabilities"]) == 10, answers


def test_the_ray_it_runs_on_is_one_pyproject_admits():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    (ray_requirement,) = [Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("ray[")]
    assert ray.__version__ in SpecifierSet(str(ray_requirement.specifier)), ray.__version__
